"""The uptraining example end to end at toy size: train a byte-level MHA model, save it as a
HuggingFace-style directory, convert it with flash-attn-ext-convert, reload and uptrain."""

import os
import sys

import pytest
import torch

pytest.importorskip("safetensors")
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")
)

import uptrain  # noqa: E402
from flash_attn_ext import convert  # noqa: E402


def test_train_convert_uptrain(tmp_path):
    torch.manual_seed(0)
    train_data, held_out = uptrain.load_corpus(max_bytes=200_000)
    assert len(train_data) > 100_000 and len(held_out) > 5_000
    model = uptrain.TinyLM(uptrain.new_config(dim=32, layers=1, heads=4, kv_heads=4, seq=32))
    start = uptrain.evaluate(model, held_out, 32, n_batches=2, batch_size=4)
    curve = uptrain.train(
        model, train_data, held_out, 30, batch_size=8, seq=32, out=str(tmp_path / "mha"), progress=False, eval_every=10
    )
    assert [s for s, _ in curve] == [10, 20, 30]
    assert curve[-1][1] < start, "training did not lower the held-out loss"
    convert.convert_checkpoint(str(tmp_path / "mha"), str(tmp_path / "mqa"), 1, progress=False)
    mqa = uptrain.load_checkpoint(str(tmp_path / "mqa"))
    assert mqa.layers[0]["attn"].num_kv_heads == 1
    after = uptrain.train(mqa, train_data, held_out, 3, batch_size=4, seq=32, progress=False, grad_accum=2)
    assert torch.isfinite(torch.tensor(after[-1][1]))
    assert uptrain.decode_tokens_per_second(mqa, new_tokens=4, prompt=4) > 0
