"""The attention oracles against PyTorch's own SDPA, and their edge conventions."""

import pytest
import torch
import torch.nn.functional as F

from sparse_attn import BlockSparseLayout, causal_block_mask
from sparse_attn.reference import (
    block_sparse_attention_reference,
    causal_token_mask,
    masked_attention,
    token_sparse_attention_reference,
)


def qkv(rng, batch=2, hq=4, hkv=2, sq=40, skv=40, d=16, dtype=torch.float64):
    q = torch.randn(batch, hq, sq, d, generator=rng, dtype=dtype)
    k = torch.randn(batch, hkv, skv, d, generator=rng, dtype=dtype)
    v = torch.randn(batch, hkv, skv, d, generator=rng, dtype=dtype)
    return q, k, v


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("sq,skv", [(40, 40), (13, 40)])
def test_full_layout_equals_dense_causal_bottom_right(rng, sq, skv):
    q, k, v = qkv(rng, sq=sq, skv=skv)
    mq, n = -(-sq // 8), -(-skv // 16)
    full = BlockSparseLayout.from_dense_mask(
        torch.ones(2, 1, mq, n, dtype=torch.bool), q_block_size=8, kv_block_size=16, seq_len_q=sq, seq_len_kv=skv
    )
    out, lse = block_sparse_attention_reference(q, k, v, full)
    torch.testing.assert_close(out, sdpa(q, k, v, causal_token_mask(sq, skv)))
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 4.0
    expected_lse = torch.logsumexp(logits.masked_fill(~causal_token_mask(sq, skv), float("-inf")), -1)
    torch.testing.assert_close(lse, expected_lse)


def test_block_layout_masks_unselected_blocks(rng):
    q, k, v = qkv(rng, hq=4, hkv=2)
    mask = torch.rand(2, 2, 5, 5, generator=rng) < 0.5
    layout = BlockSparseLayout.from_dense_mask(mask, q_block_size=8, kv_block_size=8, seq_len_q=40, seq_len_kv=40)
    token_mask = mask.repeat_interleave(8, 2).repeat_interleave(8, 3).repeat_interleave(2, 1)
    allowed = token_mask & causal_token_mask(40, 40)
    out, lse = block_sparse_attention_reference(q, k, v, layout)
    has_key = allowed.any(-1)
    torch.testing.assert_close(out[has_key], sdpa(q, k, v, allowed)[has_key])
    assert bool((out[~has_key] == 0).all()) and bool(torch.isneginf(lse[~has_key]).all())


def test_empty_rows_give_zero_and_neg_inf_with_finite_grads(rng):
    q, k, v = (t.requires_grad_() for t in qkv(rng, batch=1))
    empty = BlockSparseLayout.from_dense_mask(
        torch.zeros(1, 4, 5, 5, dtype=torch.bool), q_block_size=8, kv_block_size=8, seq_len_q=40, seq_len_kv=40
    )
    out, lse = block_sparse_attention_reference(q, k, v, empty)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    out.sum().backward()
    for t in (q, k, v):
        assert bool(torch.isfinite(t.grad).all())


def test_token_indices_equal_masked_attention(rng):
    q, k, v = qkv(rng, sq=12, skv=30)
    indices = torch.randint(-1, 30, (2, 12, 2, 6), generator=rng, dtype=torch.int32)
    out, lse = token_sparse_attention_reference(q, k, v, indices, causal=True)
    allowed = torch.zeros(2, 2, 12, 30, dtype=torch.bool)
    for b in range(2):
        for i in range(12):
            for g in range(2):
                picked = indices[b, i, g]
                allowed[b, g, i, picked[picked >= 0].long()] = True
    allowed = allowed.repeat_interleave(2, 1) & causal_token_mask(12, 30)
    expected, expected_lse = masked_attention(q, k, v, allowed)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, expected_lse)


def test_shared_token_indices_with_all_keys_equal_dense(rng):
    q, k, v = qkv(rng, sq=10, skv=10)
    everything = torch.arange(10, dtype=torch.int32).expand(2, 10, 1, 10)
    out, _ = token_sparse_attention_reference(q, k, v, everything, causal=True)
    torch.testing.assert_close(out, sdpa(q, k, v, causal_token_mask(10, 10)))


def test_reference_gradients_gradcheck(rng):
    q, k, v = (t.requires_grad_() for t in qkv(rng, batch=1, hq=2, hkv=1, sq=9, skv=9, d=4))
    mask = torch.rand(1, 1, 3, 3, generator=rng) < 0.7
    layout = BlockSparseLayout.from_dense_mask(
        mask | causal_block_mask(9, 9, 3, 3).diag().diag_embed(),
        q_block_size=3,
        kv_block_size=3,
        seq_len_q=9,
        seq_len_kv=9,
    )
    torch.autograd.gradcheck(lambda q, k, v: block_sparse_attention_reference(q, k, v, layout), (q, k, v))


def test_compute_dtype_float32(rng):
    q, k, v = qkv(rng, dtype=torch.float16)
    out, lse = masked_attention(q, k, v, causal_token_mask(40, 40), compute_dtype=torch.float32)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32


def test_max_err_fails_nan_and_passes_equal_infinities():
    """The comparison every test uses: NaN never passes, an empty row's -inf LSE equals -inf."""
    from sparse_attn.testing import max_err

    inf = float("inf")
    assert max_err(torch.tensor([-inf, 1.0]), torch.tensor([-inf, 1.5])) == 0.5
    for got, want in (([float("nan")], [float("nan")]), ([-inf], [0.0]), ([inf], [-inf])):
        assert max_err(torch.tensor(got), torch.tensor(want)) == inf
