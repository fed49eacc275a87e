"""MoBA routed decode: incremental block means, routing equal to the prefill rows, outputs equal to moba_attn."""

import pytest
import torch

from sparse_attn import block_mean_pool
from sparse_attn._native import _has_kernel
from sparse_attn.decode import decode_kernel_accepts
from sparse_attn.methods.moba import (
    MoBABlockMeans,
    _route_from_means,
    _route_with_means,
    moba_attention_reference,
    moba_attn,
    moba_decode,
    moba_route,
)
from sparse_attn.selection import topk_rows
from sparse_attn.testing import assert_flash_rule


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
    # So does one whose dtype changed (the means are fp64 for an fp64 cache, fp32 otherwise).
    assert torch.equal(cache.update(k[:1, :, :130].double()), block_mean_pool(k[:1, :, :128].double(), 32))
    # Also between two dtypes whose means are both fp32: the same rows as float16 pool anew.
    cache.update(k[:1, :, :130])
    assert torch.equal(cache.update(k[:1, :, :130].half() * 2), block_mean_pool(k[:1, :, :128].half() * 2, 32))
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


needs_native = pytest.mark.skipif(not _has_kernel("moba_route_means", "CPU"), reason="native op not built")


@needs_native
@pytest.mark.parametrize("precision", ["highest", "medium"])
def test_decode_routes_are_the_prefill_routes_bit_for_bit(rng, precision):
    """Gaussian data, so scores round: decode must still rank exactly as the prefill router (spec 3),
    whatever the matmul precision (a matmul at 'medium' sends dozens of rows elsewhere)."""
    q, k = torch.randn(1, 4, 2048, 64, generator=rng), torch.randn(1, 2, 2048, 64, generator=rng)
    prefill = moba_route(q, k, block_size=16, topk=4)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        cache = MoBABlockMeans(16)
        for length in (1000, 2047, 2048):
            routes = _route_with_means(q[:, :, length - 16 : length], cache.update(k[:, :, :length]), length, 16, 4)
            expected = moba_route(q[:, :, :length], k[:, :, :length], block_size=16, topk=4)
            assert torch.equal(routes, expected[:, :, -16:])
        # All rows at once: the prefill's bottom-right rows are decode rows of the whole cache.
        assert torch.equal(_route_with_means(q, cache.update(k), 2048, 16, 4), prefill)
    finally:
        torch.set_float32_matmul_precision(previous)


@needs_native
def test_decode_routes_break_exact_ties_as_the_prefill(rng):
    """Blocks whose means are permutations of one vector score equally in exact arithmetic; rounding
    decides, and it must decide as in the prefill."""
    for _ in range(20):
        base = torch.randn(64, generator=rng)
        blocks = torch.stack([base[torch.randperm(64, generator=rng)] for _ in range(8)])
        k = blocks.repeat_interleave(16, dim=0)[None, None]
        q = torch.randn(1, 1, 128, 1, generator=rng).expand(1, 1, 128, 64).contiguous()
        routes = _route_with_means(q[:, :, -1:], MoBABlockMeans(16).update(k), 128, 16, 3)
        assert torch.equal(routes, moba_route(q, k, block_size=16, topk=3)[:, :, -1:])


def test_decode_routes_equal_prefill_rows_without_the_native_ops(rng, monkeypatch):
    """Without the native ops both routings run `_route_from_means`: it must score a decode row as the
    prefill scores it, on near-tied blocks too (an fp32 matmul rounds by its row count: 9 of 1440 flipped)."""
    import sparse_attn.methods.moba as moba

    monkeypatch.setattr(moba, "_has_kernel", lambda *args: False)
    base = torch.randn(128, generator=rng)
    for _ in range(3):
        k = base + 1e-3 * torch.randn(1, 2, 256, 128, generator=rng)  # near-equal block means
        q = torch.randn(1, 8, 256, 128, generator=rng)
        prefill, cache = moba.moba_route(q, k, block_size=16, topk=4), MoBABlockMeans(16)
        for length in range(16, 257):
            routes = _route_with_means(q[:, :, length - 1 : length], cache.update(k[:, :, :length]), length, 16, 4)
            assert torch.equal(routes, prefill[:, :, length - 1 : length]), length


@needs_native
def test_route_means_op(rng):
    q, k = torch.randn(2, 4, 20, 8, generator=rng), torch.randn(2, 2, 45, 8, generator=rng)
    all_means, complete = block_mean_pool(k, 8), block_mean_pool(k[:, :, :40], 8)
    route_means = torch.ops.sparse_attn.moba_route_means
    for causal, means in ((True, complete), (True, all_means), (False, all_means)):
        expected = moba_route(q, k, block_size=8, topk=3, causal=causal)
        assert torch.equal(route_means(q, means, 45, 8, 3, causal), expected)
        torch.library.opcheck(route_means.default, (q, means, 45, 8, 3, causal))
    with pytest.raises(ValueError, match="needs 6"):  # non-causal rows rank the partial last block too
        route_means(q, complete, 45, 8, 3, False)
    with pytest.raises(ValueError, match="needs 5"):
        route_means(q, complete[:, :, :4], 45, 8, 3, True)
    with pytest.raises(TypeError, match="block_means must be"):
        route_means(q, complete.double(), 45, 8, 3, True)
    with pytest.raises(ValueError, match="kv_len"):
        route_means(q, complete, 10, 8, 3, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_decode_routes_are_the_prefill_routes_bit_for_bit(rng, dtype):
    """The CUDA router from cached means against the fused CUDA router, on Gaussian data (rounded scores),
    a growing cache and TF32 allowed for matmuls (which the routers must not use)."""
    assert _has_kernel("moba_route_means", "CUDA"), "the CUDA moba_route_means op was not built"
    q = torch.randn(2, 8, 4096, 128, generator=rng).to("cuda", dtype)
    k = torch.randn(2, 2, 4096, 128, generator=rng).to("cuda", dtype)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        cache = MoBABlockMeans(64)
        for length in (63, 64, 1000, 4095, 4096):
            routes = _route_with_means(q[:, :, length - 16 : length], cache.update(k[:, :, :length]), length, 64, 8)
            expected = moba_route(q[:, :, :length], k[:, :, :length], block_size=64, topk=8)
            assert torch.equal(routes, expected[:, :, -16:]), length
        torch.library.opcheck(
            torch.ops.sparse_attn.moba_route_means.default, (q[:, :, -4:], cache.means, 4096, 64, 8, True)
        )
    finally:
        torch.set_float32_matmul_precision(previous)


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_queries", [1, 4])
def test_moba_decode_follows_the_flash_rule_in_16_bits(rng, dtype, num_queries):
    """The decode path (the split-KV op's C++ twin for one query, the engine for several) against the fp64
    oracle of the same routes, within twice the error of a same-precision PyTorch implementation."""
    q = torch.randn(2, 4, 300, 64, generator=rng).to(dtype)
    k, v = (torch.randn(2, 2, 300, 64, generator=rng).to(dtype) for _ in range(2))
    routes = moba_route(q, k, block_size=32, topk=3)
    rows = slice(300 - num_queries, 300)
    ref, _ = moba_attention_reference(q, k, v, routes, block_size=32)
    same, _ = moba_attention_reference(q, k, v, routes, block_size=32, compute_dtype=dtype)
    out = moba_decode(q[:, :, rows], k, v, block_size=32, topk=3, block_means=MoBABlockMeans(32))
    assert out.dtype == dtype
    assert_flash_rule(out, ref[:, :, rows], same[:, :, rows], 2, "output")


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
