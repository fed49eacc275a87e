"""Bad input across the public functions, on every path: a clear TypeError/ValueError naming the argument,
never an error from inside an op (a str `causal` reached the Triton ops' schemas; an empty sequence
reached the estimators' reshapes)."""

import pytest
import torch

import sparse_attn
from sparse_attn.testing import random_block_layout

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _qkv(batch=1, seq_q=32, seq_kv=32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 4, seq_q, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(batch, 2, seq_kv, 16, generator=g).to(DEVICE) for _ in range(2))
    return q, k, v


def _with_causal(causal):
    """name -> a call of that public function with `causal`."""
    q, k, v = _qkv()
    layout = random_block_layout(1, 4, 32, 32, 16, 16, 0.5, seed=0, device=DEVICE)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]
    cu = torch.tensor([0, 32], dtype=torch.int32, device=DEVICE)
    scores = torch.rand(1, 4, 2, 2, device=DEVICE)
    dsa_q, dsa_k, weights = torch.randn(1, 32, 2, 16), torch.randn(1, 32, 16), torch.rand(1, 32, 2)
    return {
        "block_sparse_attn": lambda: sparse_attn.block_sparse_attn(q, k, v, layout, causal=causal),
        "block_sparse_attn_varlen": lambda: sparse_attn.block_sparse_attn_varlen(
            *packed, cu, cu, 32, 32, layout, causal=causal
        ),
        "moba_attn": lambda: sparse_attn.moba_attn(q, k, v, block_size=16, topk=2, causal=causal),
        "xattention_attn": lambda: sparse_attn.xattention_attn(q, k, v, block_size=16, stride=4, causal=causal),
        "xattention_select": lambda: sparse_attn.xattention_select(scores, 0.9, causal=causal, block_size=16),
        "proxy_attn": lambda: sparse_attn.proxy_attn(q, k, v, block_size=16, stride=4, causal=causal),
        "proxy_estimate": lambda: sparse_attn.proxy_estimate(q, k, block_size=16, stride=4, causal=causal),
        "dsa_select": lambda: sparse_attn.dsa_select(dsa_q, dsa_k, weights, topk=8, causal=causal),
        "indexer_kl_loss": lambda: sparse_attn.indexer_kl_loss(torch.zeros(1, 32, 32), q, k, causal=causal),
    }


@pytest.mark.parametrize("function", sorted(_with_causal(True)))
def test_causal_must_be_a_bool(function):
    with pytest.raises(TypeError, match="causal must be a bool, got str"):
        _with_causal("yes")[function]()


@pytest.mark.parametrize("shape", [(0, 32, 32), (1, 0, 32), (1, 0, 0)], ids=["no-batch", "no-query", "no-key"])
@pytest.mark.parametrize("method", ["xattention", "proxyattn"])
def test_estimators_refuse_empty_inputs(method, shape):
    q, k, v = _qkv(*shape)
    with pytest.raises(ValueError, match="at least one sequence with at least one query and one key"):
        if method == "xattention":
            sparse_attn.xattention_attn(q, k, v, block_size=16, stride=4)
        else:
            sparse_attn.proxy_attn(q, k, v, block_size=16, stride=4)


def _with_flag(value):
    """(flag name, a call of a public function with that flag set to `value`)."""
    q, k, v = _qkv()
    layout = random_block_layout(1, 4, 32, 32, 16, 16, 0.5, seed=0, device=DEVICE)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]
    cu = torch.tensor([0, 32], dtype=torch.int32, device=DEVICE)
    indices = torch.zeros(1, 32, 1, 4, dtype=torch.int32, device=DEVICE)
    return [
        ("return_lse", lambda: sparse_attn.block_sparse_attn(q, k, v, layout, return_lse=value)),
        ("return_lse", lambda: sparse_attn.block_sparse_attn_varlen(*packed, cu, cu, 32, 32, layout, return_lse=value)),
        ("return_lse", lambda: sparse_attn.moba_attn(q, k, v, block_size=16, topk=2, return_lse=value)),
        ("return_lse", lambda: sparse_attn.moba_attn_varlen(*packed, cu, 32, 16, 2, return_lse=value)),
        ("return_lse", lambda: sparse_attn.token_sparse_attn(q, k, v, indices, return_lse=value)),
        ("check_indices", lambda: sparse_attn.token_sparse_attn(q, k, v, indices, check_indices=value)),
        ("return_layout", lambda: sparse_attn.xattention_attn(q, k, v, block_size=16, stride=4, return_layout=value)),
        ("return_layout", lambda: sparse_attn.proxy_attn(q, k, v, block_size=16, stride=4, return_layout=value)),
        (
            "return_stats",
            lambda: sparse_attn.s2o_attention(q, k, v, segment_len=16, block_m=16, block_n=16, return_stats=value),
        ),  # fmt: skip
        (
            "check_plan",
            lambda: sparse_attn.s2o_attention(q, k, v, segment_len=16, block_m=16, block_n=16, check_plan=value),
        ),  # fmt: skip
    ]


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_flags_must_be_bools(value):
    for name, call in _with_flag(value):
        with pytest.raises(TypeError, match=f"^{name} must be a bool"):
            call()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_attention_refuses_8_bit_floats(dtype):
    """fp8 attention inputs are refused up front (they failed inside ops, or ran and returned fp8), by every
    attention function; the DSA indexer takes fp8 q and k on purpose and is not among them."""
    q, k, v = (t.to(dtype) for t in _qkv())
    layout = random_block_layout(1, 4, 32, 32, 16, 16, 0.5, seed=0, device=DEVICE)
    indices = torch.zeros(1, 32, 2, 4, dtype=torch.int32, device=DEVICE)
    calls = [
        lambda: sparse_attn.block_sparse_attn(q, k, v, layout),
        lambda: sparse_attn.moba_attn(q, k, v, block_size=16, topk=2),
        lambda: sparse_attn.xattention_attn(q, k, v, block_size=16, stride=4),
        lambda: sparse_attn.proxy_attn(q, k, v, block_size=16, stride=4),
        lambda: sparse_attn.s2o_attention(q, k, v, segment_len=16, block_m=16, block_n=16),
        lambda: sparse_attn.token_sparse_attn(q, k, v, indices),
        lambda: sparse_attn.sparse_mla(q[0].transpose(0, 1), k[0, :1].transpose(0, 1), indices[0, :, :1], 0.1, d_v=8),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="16-, 32- or 64-bit floating-point"):
            call()
