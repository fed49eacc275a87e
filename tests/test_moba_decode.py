"""MoBA routed decode: incremental block means, routing equal to the prefill rows, outputs equal to moba_attn."""

import pytest
import torch

from sparse_attn import block_mean_pool
from sparse_attn.decode import decode_kernel_accepts
from sparse_attn.methods.moba import (
    MoBABlockMeans,
    _route_from_means,
    moba_attn,
    moba_decode,
    moba_route,
)
from sparse_attn.selection import topk_rows


def small_int(rng, *shape):
    """Integer entries: block means and scores are exact, so routings must agree bit for bit (ties included)."""
    return torch.randint(-3, 4, shape, generator=rng).float()


def test_block_means_grow_one_token_at_a_time(rng):
    k = torch.randn(2, 3, 150, 16, generator=rng)
    cache = MoBABlockMeans(32)
    for length in range(151):
        means = cache.update(k[:, :, :length])
        complete = length // 32
        assert torch.equal(means, block_mean_pool(k[:, :, : complete * 32], 32)), length
    # A cache that shrank (a new sequence) or changed batch starts over.
    assert torch.equal(cache.update(k[:, :, :40]), block_mean_pool(k[:, :, :32], 32))
    assert torch.equal(cache.update(k[:1, :, :100]), block_mean_pool(k[:1, :, :96], 32))
    cache.reset()
    assert cache.means is None


@pytest.mark.parametrize("num_queries", [1, 3])
@pytest.mark.parametrize("block_size, topk", [(16, 1), (16, 3), (32, 4)])
def test_decode_routes_equal_prefill_rows(rng, num_queries, block_size, topk):
    q, k = small_int(rng, 2, 4, 150, 16), small_int(rng, 2, 2, 150, 16)
    prefill = moba_route(q, k, block_size=block_size, topk=topk)
    cache = MoBABlockMeans(block_size)
    for length in (5, 15, 97, 128, 129, 150):  # a growing cache from below one block, crossing block boundaries
        rows = q[:, :, length - num_queries : length]
        means = cache.update(k[:, :, :length])
        routes = _route_from_means(rows, means, length, block_size, topk, True, topk_rows)
        expected = moba_route(q[:, :, :length], k[:, :, :length], block_size=block_size, topk=topk)
        assert torch.equal(routes, expected[:, :, -num_queries:]), length
    assert torch.equal(routes, prefill[:, :, -num_queries:])


@pytest.mark.parametrize("num_queries", [1, 4])
@pytest.mark.parametrize("use_cache", [False, True])
def test_moba_decode_equals_moba_attn_rows(rng, num_queries, use_cache):
    q = torch.randn(2, 4, 200, 32, generator=rng)
    k, v = (torch.randn(2, 2, 200, 32, generator=rng) for _ in range(2))
    full = moba_attn(q, k, v, block_size=32, topk=3, backend="reference")
    cache = MoBABlockMeans(32) if use_cache else None
    rows = q[:, :, -num_queries:]
    if num_queries == 1:
        assert decode_kernel_accepts(rows, k, v)  # the split-KV decode kernel (C++ twin on the CPU)
    out = moba_decode(rows, k, v, block_size=32, topk=3, block_means=cache)
    torch.testing.assert_close(out, full[:, :, -num_queries:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_len, num_queries", [(10, 1), (10, 3), (31, 1), (32, 1)])
def test_moba_decode_before_the_first_complete_block(rng, cache_len, num_queries):
    """The first steps after a short prompt (once a reshape error): only the current block to attend."""
    q = torch.randn(1, 2, cache_len, 16, generator=rng)
    k, v = (torch.randn(1, 2, cache_len, 16, generator=rng) for _ in range(2))
    full = moba_attn(q, k, v, block_size=32, topk=2, backend="reference")
    out = moba_decode(q[:, :, -num_queries:], k, v, block_size=32, topk=2, block_means=MoBABlockMeans(32))
    torch.testing.assert_close(out, full[:, :, -num_queries:], rtol=1e-5, atol=1e-5)


def test_moba_decode_with_gradients_runs_the_engine(rng):
    q = torch.randn(1, 2, 1, 32, generator=rng, requires_grad=True)
    k, v = (torch.randn(1, 1, 100, 32, generator=rng, requires_grad=True) for _ in range(2))
    assert not decode_kernel_accepts(q, k, v)
    out = moba_decode(q, k, v, block_size=16, topk=2)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    full_q = torch.cat([torch.randn(1, 2, 99, 32, generator=rng), q.detach()], dim=2)
    expected = moba_attn(full_q, k.detach(), v.detach(), block_size=16, topk=2, backend="reference")[:, :, -1:]
    torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-5)


def test_moba_decode_bad_input(rng):
    q, k = torch.randn(1, 2, 17, 32, generator=rng), torch.randn(1, 1, 100, 32, generator=rng)
    with pytest.raises(ValueError, match="at most 16 queries"):
        moba_decode(q, k, k, block_size=16, topk=2)
    with pytest.raises(ValueError, match="block_means"):
        moba_decode(q[:, :, :1], k, k, block_size=16, topk=2, block_means=MoBABlockMeans(32))
    with pytest.raises(ValueError, match="topk"):
        moba_decode(q[:, :, :1], k, k, block_size=16, topk=0)
    with pytest.raises(ValueError, match="block_size"):
        MoBABlockMeans(0)
