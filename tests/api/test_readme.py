"""The README stays true: each of its Python blocks runs on its own, as a user would paste it
into a fresh interpreter, and the signatures and command-line options it documents are the
code's."""

import inspect
import os
import re
import subprocess
import sys

import pytest
import torch

import flash_attn_ext
from flash_attn_ext import convert, nn

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def _readme() -> str:
    with open(README) as f:
        return f.read()


def _python_blocks():
    """(first line number, code) of every ```python block, indentation (list items) removed."""
    blocks, lines = [], _readme().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```python\s*$", lines[i])
        if m:
            indent, start, body = len(m.group(1)), i + 1, []
            i += 1
            while not lines[i].strip().startswith("```"):
                body.append(lines[i][indent:])
                i += 1
            blocks.append((start + 1, "\n".join(body)))
        i += 1
    return blocks


BLOCKS = _python_blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"line{n}" for n, _ in BLOCKS])
def test_python_block_runs_on_its_own(line, code, tmp_path):
    """A fresh interpreter per block: a block that uses a name it never defines fails here."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"README.md block at line {line} failed:\n{code}\n--- stderr:\n{r.stderr[-3000:]}"


def _render(fn, name):
    """name(args) as the README writes a signature: defaults as Python literals, strings in
    double quotes, '*' before keyword-only parameters, no annotations."""
    parts, star = [], False
    for p in inspect.signature(fn).parameters.values():
        if p.name == "self":
            continue
        if p.kind == p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.kind == p.VAR_POSITIONAL:
            parts.append("*" + p.name)
            star = True
            continue
        if p.kind == p.VAR_KEYWORD:
            parts.append("**" + p.name)
            continue
        if p.default is p.empty:
            parts.append(p.name)
        else:
            d = p.default
            parts.append(f"{p.name}=" + (f'"{d}"' if isinstance(d, str) else repr(d)))
    return f"{name}({', '.join(parts)})"


SIGNATURES = [
    (flash_attn_ext.scaled_dot_product_attention, "flash_attn_ext.scaled_dot_product_attention"),
    (flash_attn_ext.attention, "flash_attn_ext.attention"),
    (flash_attn_ext.KVCache.__init__, "flash_attn_ext.KVCache"),
    (flash_attn_ext.kv_cache_append, "flash_attn_ext.kv_cache_append"),
    (flash_attn_ext.attention_with_kvcache, "flash_attn_ext.attention_with_kvcache"),
    (nn.Attention.__init__, "flash_attn_ext.nn.Attention"),
    (nn.Attention.forward, "forward"),
    (nn.Attention.make_cache, "make_cache"),
]


@pytest.mark.parametrize("fn, name", SIGNATURES, ids=[n for _, n in SIGNATURES])
def test_documented_signature_is_the_code(fn, name):
    text = re.sub(r"\s+", " ", _readme())  # (signatures wrap across lines in the README)
    text = text.replace("( ", "(")
    expected = _render(fn, name)
    assert expected in text, f"README.md should document {expected}"


def test_every_converter_option_is_documented():
    text = _readme()
    parser_options = re.findall(r'add_argument\("(--[a-z-]+)"', inspect.getsource(convert.main))
    assert len(parser_options) >= 10
    for option in parser_options:
        assert option in text, f"README.md does not mention flash-attn-ext-convert {option}"
    for dtype in convert._DTYPES:
        assert dtype in text


def test_render_is_what_the_readme_writes():
    """(the renderer itself, on a known signature)"""

    def f(a, b=None, *, c="x", d=(-1, -1), e=torch.float32, **kw):
        pass

    assert _render(f, "f") == 'f(a, b=None, *, c="x", d=(-1, -1), e=torch.float32, **kw)'
