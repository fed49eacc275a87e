"""MoBA attention: routed attention against the dense-mask oracle (FlashAttention's error rule)."""

import pytest
import torch
import torch.nn.functional as F

from sparse_attn.engine import triton_available
from sparse_attn.methods.moba import moba_attention_reference, moba_attn, moba_route
from sparse_attn.reference import causal_token_mask
from sparse_attn.testing import assert_flash_rule, structured_qkv

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="triton is not installed")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv("SPARSE_ATTN_POISON_OUTPUTS", "1")


def make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, dim, dtype):
    shapes = ((batch, hq, seq_q, dim), (batch, hkv, seq_kv, dim), (batch, hkv, seq_kv, dim))
    return [torch.randn(s, generator=rng).to(DEVICE, dtype).requires_grad_() for s in shapes]


def check(q, k, v, *, block_size, topk, causal=True):
    out = moba_attn(q, k, v, block_size=block_size, topk=topk, causal=causal)
    routes = moba_route(q.detach(), k.detach(), block_size=block_size, topk=topk, causal=causal)
    ref, _ = moba_attention_reference(q, k, v, routes, block_size=block_size, causal=causal)
    same, _ = moba_attention_reference(q, k, v, routes, block_size=block_size, causal=causal, compute_dtype=q.dtype)
    assert not torch.isnan(out).any(), "unwritten (poisoned) output"
    assert_flash_rule(out, ref, same, 2, "output")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad.double())
    same_grads = torch.autograd.grad(same, (q, k, v), grad.to(same.dtype))
    for name, g, r, s in zip("qkv", grads, ref_grads, same_grads):
        assert_flash_rule(g, r, s, 3, f"d{name}")
    return out


CASES = {
    # name: (batch, hq, hkv, seq_q, seq_kv, dim, block, topk)
    "mha": (1, 2, 2, 160, 160, 32, 32, 3),
    "gqa4_ragged": (2, 4, 1, 150, 150, 32, 16, 4),
    "q_shorter_than_kv": (1, 4, 2, 40, 170, 32, 32, 2),
    "head_dim_64": (1, 2, 1, 128, 128, 64, 32, 2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_oracle(rng, case, dtype):
    batch, hq, hkv, seq_q, seq_kv, dim, block, topk = CASES[case]
    q, k, v = make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, dim, dtype)
    check(q, k, v, block_size=block, topk=topk)


def test_non_causal(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 96, 96, 32, torch.float32)
    check(q, k, v, block_size=32, topk=2, causal=False)


def test_full_budget_is_dense_causal(rng):
    q, k, v = make_qkv(rng, 1, 4, 2, 128, 128, 32, torch.float32)
    out = moba_attn(q, k, v, block_size=32, topk=4)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_token_mask(128, 128, DEVICE), enable_gqa=True)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_structured_inputs_route_to_planted_spans():
    inputs = structured_qkv(batch=1, num_q_heads=2, num_kv_heads=1, seq_len=512, head_dim=32, seed=3, device=DEVICE)
    out = moba_attn(inputs.q, inputs.k, inputs.v, block_size=32, topk=4)
    dense = F.scaled_dot_product_attention(inputs.q, inputs.k, inputs.v, is_causal=True, enable_gqa=True)
    # A quarter of the blocks at most, yet the structured mass (sinks, locality, spans) is mostly kept.
    assert ((out - dense).norm() / dense.norm()).item() < 0.5


def test_block_size_the_kernel_cannot_take(rng):
    q, k, v = (t.detach() for t in make_qkv(rng, 1, 2, 2, 64, 64, 32, torch.float32))
    with pytest.raises(ValueError, match="kv_block_size=8"):
        moba_attn(q, k, v, block_size=8, topk=2, backend="triton")
    out = moba_attn(q, k, v, block_size=8, topk=2, backend="reference")
    assert out.shape == q.shape
    with pytest.raises(ValueError, match="topk"):
        moba_attn(q, k, v, block_size=16, topk=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
def test_gpu_real_sizes(rng, dtype, dim):
    q, k, v = make_qkv(rng, 2, 8, 2, 2048, 2048, dim, dtype)
    check(q, k, v, block_size=128, topk=4)
