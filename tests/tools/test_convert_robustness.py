"""The checkpoint converter when things go wrong (issue 9): truncated or corrupt shards and
configs, a config that lies about head counts, a full disk, an interrupt mid-write. Each gives
a clear error (a ConversionError naming the file, or the interrupt itself), leaves no output
and no temporary directory, and leaves the input bitwise untouched."""

import errno
import json
import os

import pytest

safetensors_torch = pytest.importorskip("safetensors.torch")

from flash_attn_ext import convert  # noqa: E402
from test_convert import CONFIG, _digest, _state_dict, _write_checkpoint  # noqa: E402


def _leftovers(parent):
    return [p for p in os.listdir(parent) if p.startswith(".convert-")]


def _refused(tmp_path, src, match, *, exc=convert.ConversionError, dst=None, **kw):
    dst = dst or str(tmp_path / "out")
    before = _digest(src)
    with pytest.raises(exc, match=match):
        convert.convert_checkpoint(src, dst, 2, progress=False, **kw)
    assert _digest(src) == before, "the input was modified"
    assert _leftovers(tmp_path) == [], "a temporary directory was left behind"
    return dst


def _shard_paths(src):
    return sorted(os.path.join(src, n) for n in os.listdir(src) if n.endswith(".safetensors"))


@pytest.mark.parametrize("damage", ["truncate-data", "truncate-header", "empty", "garbage"])
@pytest.mark.parametrize("which", [0, 1], ids=["first-shard", "last-shard"])
def test_truncated_or_corrupt_shard(tmp_path, damage, which):
    src = str(tmp_path / "mha")
    _write_checkpoint(src, _state_dict(), shards=2)
    path = _shard_paths(src)[which]
    data = open(path, "rb").read()
    blob = {
        "truncate-data": data[: len(data) - 100],
        "truncate-header": data[:20],
        "empty": b"",
        "garbage": bytes(range(256)) * 8,
    }[damage]
    with open(path, "wb") as f:
        f.write(blob)
    dst = _refused(tmp_path, src, f"cannot read shard {os.path.basename(path)}")
    assert not os.path.exists(dst)


def test_corrupt_pytorch_model_bin(tmp_path):
    import torch

    src = tmp_path / "mha"
    os.makedirs(src)
    torch.save(_state_dict(), src / "pytorch_model.bin")
    with open(src / "config.json", "w") as f:
        json.dump(CONFIG, f)
    data = open(src / "pytorch_model.bin", "rb").read()
    with open(src / "pytorch_model.bin", "wb") as f:
        f.write(data[: len(data) // 2])
    _refused(tmp_path, str(src), "cannot read shard pytorch_model.bin")


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"model_type": "llama", ', "not valid JSON"),
        ("[1, 2, 3]", "must hold a JSON object"),
        ('{"model_type": "llama"}', "num_attention_heads|head"),
    ],
)
def test_corrupt_config(tmp_path, content, match):
    src = str(tmp_path / "mha")
    _write_checkpoint(src, _state_dict())
    with open(os.path.join(src, "config.json"), "w") as f:
        f.write(content)
    _refused(tmp_path, src, match)


def test_corrupt_index(tmp_path):
    src = str(tmp_path / "mha")
    _write_checkpoint(src, _state_dict(), shards=2)
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
        f.write('{"metadata": {}}')  # no weight_map
    _refused(tmp_path, src, "not a valid checkpoint index")


@pytest.mark.parametrize("heads,kv_heads", [(8, 4), (16, 8), (8, 2)])
def test_config_lying_about_head_counts(tmp_path, heads, kv_heads):
    """The tensors are 8 heads of 8 (hidden 64, MHA); the config claims otherwise. (A claim of 4
    heads of 16 cannot be caught: the same matrices read that way are a valid model.)"""
    src = str(tmp_path / "mha")
    _write_checkpoint(src, _state_dict(), dict(CONFIG, num_attention_heads=heads, num_key_value_heads=kv_heads))
    _refused(tmp_path, src, "the config declares")


@pytest.mark.parametrize("fail_at", [1, 2])
@pytest.mark.parametrize("force", [False, True], ids=["new-output", "force-over-existing"])
def test_full_disk_mid_conversion(tmp_path, monkeypatch, fail_at, force):
    """save_file fails with ENOSPC on shard fail_at: a ConversionError naming the file and the
    reason; with --force, the existing output is still the old one."""
    src, dst = str(tmp_path / "mha"), str(tmp_path / "out")
    _write_checkpoint(src, _state_dict(), shards=2)
    if force:
        os.makedirs(dst)
        with open(os.path.join(dst, "old.txt"), "w") as f:
            f.write("the previous conversion")
    real_save, calls = safetensors_torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == fail_at:
            with open(filename, "wb") as f:  # a partial file, as a real full disk leaves
                f.write(b"\0" * 10)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors_torch, "save_file", save_file)
    _refused(
        tmp_path,
        src,
        r"writing model-0000\d-of-00002.safetensors failed \(No space left on device\)",
        dst=dst,
        force=force,
    )
    if force:
        assert sorted(os.listdir(dst)) == ["old.txt"]
    else:
        assert not os.path.exists(dst)


def test_interrupt_mid_write(tmp_path, monkeypatch):
    """Ctrl-C while the second shard is written: KeyboardInterrupt propagates, nothing is left."""
    src, dst = str(tmp_path / "mha"), str(tmp_path / "out")
    _write_checkpoint(src, _state_dict(), shards=3)
    real_save, calls = safetensors_torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors_torch, "save_file", save_file)
    _refused(tmp_path, src, None, exc=KeyboardInterrupt, dst=dst)
    assert not os.path.exists(dst)


def test_cli_reports_a_corrupt_shard_as_an_error(tmp_path, capsys):
    src, dst = str(tmp_path / "mha"), str(tmp_path / "out")
    _write_checkpoint(src, _state_dict())
    with open(os.path.join(src, "model.safetensors"), "r+b") as f:
        f.truncate(50)
    assert convert.main(["--input", src, "--output", dst, "--num-kv-heads", "2", "--no-progress"]) == 2
    assert "cannot read shard model.safetensors" in capsys.readouterr().err
    assert not os.path.exists(dst)
