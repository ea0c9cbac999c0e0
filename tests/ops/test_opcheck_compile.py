"""Op registration: torch.library.opcheck (schema, autograd registration, fake tensors,
AOT dispatch) on every op, and torch.compile without graph breaks."""

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

import flash_attn_ext
from reference import make_qkv

OPS = torch.ops.flash_attn_ext


def _forward_cases(device):
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        q, k, v = make_qkv(2, 4, 2, 37, 45, 16, dtype, device, requires_grad=dtype != torch.bfloat16)
        cases.append((q, k, v, None, 0.0, 0.25, -1, -1, True))
        cases.append((q, k, v, None, 0.0, 0.25, 8, 0, False))
    q, k, v = make_qkv(1, 2, 2, 20, 30, 8, torch.float32, device, layout="blhd", requires_grad=True)
    mask = (torch.rand(1, 1, 20, 30) > 0.3).to(device)
    cases.append((q, k, v, mask, 0.0, 0.3, -1, -1, True))
    cases.append((q, k, v, torch.randn(1, 2, 1, 30, device=device), 0.0, 0.3, 4, 4, True))
    return cases


@pytest.mark.parametrize("case", range(8))
def test_opcheck_attention_forward(device, case):
    args = _forward_cases(device)[case]
    torch.library.opcheck(OPS.attention_forward, args)


@pytest.mark.parametrize("case", range(8))
def test_opcheck_attention_backward(device, case):
    q, k, v, mask, p, scale, wl, wr, br = _forward_cases(device)[case]
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse, rng = OPS.attention_forward(q, k, v, mask, p, scale, wl, wr, br)
    dout = torch.randn_like(out)
    torch.library.opcheck(OPS.attention_backward, (dout, q, k, v, out, lse, rng, mask, p, scale, wl, wr, br))


@pytest.mark.parametrize("case", [0, 3, 5])
def test_opcheck_attention_backward_grad_lse(device, case):
    q, k, v, mask, p, scale, wl, wr, br = _forward_cases(device)[case]
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse, rng = OPS.attention_forward(q, k, v, mask, p, scale, wl, wr, br)
    args = (torch.randn_like(out), q, k, v, out, lse, rng, mask, p, scale, wl, wr, br, 0.0, None, torch.randn_like(lse))
    torch.library.opcheck(OPS.attention_backward, args)


def test_compile_through_lse(device):
    """A loss on the lse compiles without graph breaks and matches eager."""
    q, k, v = make_qkv(1, 4, 2, 33, 41, 16, torch.float32, device, requires_grad=True)

    def loss(q, k, v):
        out, lse = flash_attn_ext.attention(q, k, v, causal=True, return_lse=True)
        return out.sum() + lse.square().sum()

    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_softcap(device, dtype):
    q, k, v = make_qkv(2, 4, 2, 19, 23, 16, dtype, device, requires_grad=True)
    args = (q, k, v, None, 0.0, 0.25, 5, 0, True, 1.5)
    torch.library.opcheck(OPS.attention_forward, args)
    out, lse, rng = OPS.attention_forward(*((t.detach() if isinstance(t, torch.Tensor) else t) for t in args))
    torch.library.opcheck(
        OPS.attention_backward,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, rng, None, 0.0, 0.25, 5, 0, True, 1.5),
    )


def test_opcheck_with_dropout_schema_and_fake(device):
    # Dropout draws from the generator, so eager-vs-compiled numerics (aot_dispatch) are
    # compared under a fixed seed in test_compile_dropout instead.
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8, torch.float32, device, requires_grad=True)
    torch.library.opcheck(
        OPS.attention_forward,
        (q, k, v, None, 0.2, 0.3, -1, -1, True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


class Block(torch.nn.Module):
    """A pre-norm transformer block whose attention is the fused op (GQA, causal)."""

    def __init__(self, dim=64, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, dim // heads
        self.norm = torch.nn.LayerNorm(dim)
        self.q = torch.nn.Linear(dim, dim)
        self.kv_proj = torch.nn.Linear(dim, 2 * kv_heads * self.d)
        self.o = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, L, _ = x.shape
        y = self.norm(x)
        q = self.q(y).view(B, L, self.h, self.d).transpose(1, 2)
        k, v = self.kv_proj(y).view(B, L, 2, self.kv, self.d).unbind(2)
        a = flash_attn_ext.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        return x + self.o(a.transpose(1, 2).reshape(B, L, -1))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_matches_eager(device, dynamic):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = Block().to(device)
    compiled = torch.compile(block, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for L in (17, 33):
        x = torch.randn(2, L, 64, device=device, requires_grad=True)
        ref = block(x)
        (gx_ref,) = torch.autograd.grad(ref.square().sum(), (x,))
        out = compiled(x)
        (gx,) = torch.autograd.grad(out.square().sum(), (x,))
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(gx, gx_ref)
    assert flash_attn_ext.fallback_counts() == {}


def test_compile_inductor(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = Block().to(device)
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 19, 64, device=device)
    torch.testing.assert_close(compiled(x), block(x), atol=1e-5, rtol=1e-5)


def test_compile_dropout(device):
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8, torch.float32, device)
    fn = torch.compile(
        lambda q, k, v: flash_attn_ext.attention(q, k, v, dropout_p=0.5), fullgraph=True, backend="aot_eager"
    )
    torch.manual_seed(3)
    a = fn(q, k, v)
    torch.manual_seed(3)
    b = flash_attn_ext.attention(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_decode_step_with_every_inference_op(device, dynamic):
    """kv_cache_append (in place), attention_kvcache and merge_attention_states in one
    fullgraph-compiled decode step (no graph breaks), against eager: same output and the same
    cache contents afterwards."""
    torch._dynamo.reset()

    def step(q, kc, vc, kn, vn, lens, q2, k2, v2):
        out, lse = flash_attn_ext.attention_with_kvcache(
            q, kc, vc, kn, vn, cache_seqlens=lens, causal=True, return_softmax_lse=True
        )
        o2, l2 = flash_attn_ext.attention(q2, k2, v2, return_lse=True)
        return flash_attn_ext.merge_attention_states(out.transpose(1, 2), lse, o2, l2)

    def inputs():
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g).to(device)
        return (
            r(2, 1, 4, 8),
            torch.zeros(2, 32, 2, 8, device=device),
            torch.zeros(2, 32, 2, 8, device=device),
            r(2, 1, 2, 8),
            r(2, 1, 2, 8),
            torch.tensor([3, 7], dtype=torch.int32, device=device),
            r(2, 4, 1, 8),
            r(2, 2, 5, 8),
            r(2, 2, 5, 8),
        )

    eager_in, compiled_in = inputs(), inputs()
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    with torch.no_grad():
        ref, ref_lse = step(*eager_in)
        out, lse = compiled(*compiled_in)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    assert torch.equal(compiled_in[1], eager_in[1]) and compiled_in[1].abs().sum() > 0  # the append happened


def test_kvcache_error_check_survives_compile(device):
    """_raise_kvcache_device_errors (behind check_kvcache_errors) has a fake kernel and a
    side effect: opcheck passes, and a fullgraph-compiled step keeps the call in its graph
    instead of dropping an op that returns nothing."""
    op = torch.ops.flash_attn_ext._raise_kvcache_device_errors.default
    torch.library.opcheck(op, (torch.empty(0, device=device),))
    torch._dynamo.reset()
    seen = []

    def forward_graph(gm, example_inputs):  # the graph after AOT tracing and its dead-code pass
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm

    backend = aot_autograd(fw_compiler=forward_graph)

    def step(x):
        torch.ops.flash_attn_ext._raise_kvcache_device_errors(x)
        return x + 1

    x = torch.zeros(2, device=device)
    torch.testing.assert_close(torch.compile(step, fullgraph=True, backend=backend)(x), x + 1)
    assert op in seen or op.overloadpacket in seen, seen
