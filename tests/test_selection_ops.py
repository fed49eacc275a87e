"""The selection primitives: native ops against the PyTorch references, and the rules themselves."""

import pytest
import torch

import sparse_attn
from sparse_attn import reference

NATIVE_CPU = sparse_attn.native_available("cpu")
needs_native = pytest.mark.skipif(not NATIVE_CPU, reason="native CPU ops not built")


def tied_scores(rng, rows, cols):
    """Scores on a coarse grid, so ties are common, plus -inf and NaN entries."""
    scores = torch.randint(0, 5, (rows, cols), generator=rng).float()
    scores[torch.rand(rows, cols, generator=rng) < 0.15] = float("-inf")
    scores[torch.rand(rows, cols, generator=rng) < 0.05] = float("nan")
    return scores


# ------------------------------------------------------------------------------------- mean pool
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("seq,block", [(64, 16), (70, 16), (5, 8), (33, 1)])
def test_block_mean_pool_matches_slices(rng, dtype, seq, block):
    keys = torch.randn(2, 3, seq, 8, generator=rng).to(dtype)
    pooled = sparse_attn.block_mean_pool(keys, block)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert pooled.dtype == acc and pooled.shape == (2, 3, -(-seq // block), 8)
    for i in range(pooled.shape[2]):
        expected = keys[:, :, i * block : (i + 1) * block].double().mean(dim=2)
        torch.testing.assert_close(pooled[:, :, i].double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, reference.block_mean_pool_reference(keys, block))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_block_mean_pool_of_a_view_equals_pooling_a_copy(rng, dtype):
    """A window of a larger cache (strided along heads and sequence; one sequence of a padded batch) pools,
    bit for bit, as its contiguous copy does."""
    big = torch.randn(3, 4, 300, 16, generator=rng).to(dtype)
    for view in (big[1:2, :, 37:], big[:, ::2, 5:205], big[..., 3:11]):
        assert torch.equal(sparse_attn.block_mean_pool(view, 32), sparse_attn.block_mean_pool(view.contiguous(), 32))


@needs_native  # without the extension the package runs the reference itself
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_block_mean_pool_divides_exact_sums_like_the_reference(rng, dtype):
    """Integer keys sum exactly; the mean is then one correctly rounded division, bit-identical to the
    reference's even where 1/len is inexact (blocks of 3 and 5, ragged last blocks)."""
    for seq, block in ((70, 3), (73, 5), (31, 7)):
        keys = torch.randint(-40, 41, (2, 3, seq, 8), generator=rng).to(dtype)
        assert torch.equal(sparse_attn.block_mean_pool(keys, block), reference.block_mean_pool_reference(keys, block))


def test_block_mean_pool_rejects_bad_input():
    with pytest.raises(ValueError, match="keys"):
        sparse_attn.block_mean_pool(torch.randn(3, 4, 5), 2)
    with pytest.raises(TypeError, match="keys"):
        sparse_attn.block_mean_pool(torch.ones(1, 1, 4, 2, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="block_size"):
        sparse_attn.block_mean_pool(torch.randn(1, 1, 4, 2), 0)


def test_block_mean_pool_block_longer_than_the_keys(rng):
    keys = torch.randn(1, 2, 50, 8, generator=rng)
    for block_size in (50, 64, 2**40, 2**63 - 1):  # one block of every key, whatever the size (no overflow)
        means = sparse_attn.block_mean_pool(keys, block_size)
        torch.testing.assert_close(means, keys.mean(dim=2, keepdim=True))


@needs_native  # without the extension the package runs the reference itself
# ------------------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("k", [0, 1, 3, 12, 40])
def test_topk_rows_matches_reference_with_ties(rng, k):
    scores = tied_scores(rng, 64, 12)
    got = sparse_attn.topk_rows(scores, k)
    assert got.dtype == torch.int32 and got.shape == (64, k)
    torch.testing.assert_close(got, reference.topk_rows_reference(scores, k), rtol=0, atol=0)


def test_topk_rows_rules(rng):
    scores = tied_scores(rng, 200, 16).double()
    got = sparse_attn.topk_rows(scores, 5)
    for row, picked in zip(scores, got):
        chosen = picked[picked >= 0].long()
        selectable = ~(torch.isnan(row) | torch.isinf(row))
        assert len(chosen) == min(5, int(selectable.sum()))
        assert bool(selectable[chosen].all())
        # Rank order: descending scores, ties to the lower index.
        pairs = [(-row[i].item(), i.item()) for i in chosen]
        assert pairs == sorted(pairs)
        if len(chosen):
            kth = row[chosen[-1]]
            unchosen = selectable.clone()
            unchosen[chosen] = False
            assert bool((row[unchosen] <= kth).all())
            # Among equal scores, every unchosen tie sits at a higher index than the chosen ones.
            tied_out = torch.nonzero(unchosen & (row == kth)).flatten()
            assert bool((tied_out > chosen[row[chosen] == kth].max()).all())


def test_topk_rows_leading_dims_and_errors(rng):
    scores = torch.randn(2, 3, 4, 9, generator=rng)
    assert sparse_attn.topk_rows(scores, 2).shape == (2, 3, 4, 2)
    with pytest.raises(TypeError, match="scores"):
        sparse_attn.topk_rows(scores.half(), 2)
    with pytest.raises(ValueError, match="k"):
        sparse_attn.topk_rows(scores, -1)


def test_topk_rows_without_columns_or_rows():
    # No candidates (a decode row before any block is complete): all padding, never a reshape error.
    assert torch.equal(sparse_attn.topk_rows(torch.empty(2, 3, 0), 2), torch.full((2, 3, 2), -1, dtype=torch.int32))
    assert sparse_attn.topk_rows(torch.empty(0, 5), 2).shape == (0, 2)


# ------------------------------------------------------------------------------------- threshold
def random_masses(rng, rows, cols):
    scores = torch.rand(rows, cols, generator=rng) ** 3
    forced = torch.rand(rows, cols, generator=rng) < 0.1
    allowed = torch.rand(rows, cols, generator=rng) < 0.8
    return scores, forced, allowed


@needs_native  # without the extension the package runs the reference itself
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threshold_select_matches_reference(rng, dtype):
    scores, forced, allowed = random_masses(rng, 300, 24)
    scores = scores.to(dtype)
    tau = torch.rand(300, generator=rng, dtype=torch.float64)
    tau[:20] = 0.0
    tau[20:40] = 1.0
    count, indices = sparse_attn.threshold_select(scores, tau, forced=forced, allowed=allowed)
    ref_count, ref_indices = reference.threshold_select_reference(scores, tau, forced, allowed)
    torch.testing.assert_close(count, ref_count, rtol=0, atol=0)
    torch.testing.assert_close(indices, ref_indices, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_threshold_select_rejects_masses_without_an_order(bad):
    scores = torch.rand(2, 5)
    scores[1, 3] = bad
    with pytest.raises(ValueError, match="finite, non-negative"):
        sparse_attn.threshold_select(scores, 0.5)
    allowed = torch.ones(2, 5, dtype=torch.bool)
    allowed[1, 3] = False  # a masked-out entry may hold anything
    sparse_attn.threshold_select(scores, 0.5, allowed=allowed)


def test_selections_of_rows_without_entries():
    count, indices = sparse_attn.threshold_select(torch.zeros(3, 0), 0.9)
    assert count.tolist() == [0, 0, 0] and indices.shape == (3, 0)


def test_threshold_select_rules(rng):
    scores, forced, allowed = random_masses(rng, 100, 20)
    scores = scores.double()
    for tau in (0.0, 0.3, 0.8, 0.95, 1.0):
        count, indices = sparse_attn.threshold_select(scores, tau, forced=forced, allowed=allowed)
        for r in range(100):
            kept = torch.zeros(20, dtype=torch.bool)
            kept[indices[r, : count[r]].long()] = True
            assert bool((indices[r, count[r] :] == -1).all())
            assert bool(kept[forced[r]].all()), "forced entries are always kept"
            assert not bool((kept & ~allowed[r] & ~forced[r]).any()), "disallowed entries are never chosen"
            total = scores[r][allowed[r]].sum()
            mass = scores[r][kept & allowed[r]].sum()
            if tau == 1.0:
                assert bool(kept[allowed[r]].all())
                continue
            assert mass >= tau * total - 1e-12
            unforced = kept & ~forced[r]
            if unforced.any():
                # The last (smallest) unforced entry is the one that crossed the threshold.
                smallest = scores[r][unforced].min()
                assert mass - smallest < tau * total + 1e-12
            if tau == 0.0:
                assert torch.equal(kept, forced[r])


def test_threshold_select_nested_in_tau(rng):
    scores, forced, allowed = random_masses(rng, 50, 16)
    previous = None
    for tau in torch.linspace(0, 1, 11).tolist():
        _, indices = sparse_attn.threshold_select(scores, tau, forced=forced, allowed=allowed)
        kept = reference._kv_lists_to_dense((indices >= 0).sum(-1, dtype=torch.int32), indices, 16)
        if previous is not None:
            assert bool((previous <= kept).all())
        previous = kept


def test_threshold_select_errors(rng):
    scores = torch.rand(4, 6, generator=rng)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            sparse_attn.threshold_select(scores, bad)
    with pytest.raises(ValueError, match="threshold"):
        sparse_attn.threshold_select(scores, torch.full((5,), 0.5))
    with pytest.raises(ValueError, match="forced"):
        sparse_attn.threshold_select(scores, 0.5, forced=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="allowed"):
        sparse_attn.threshold_select(scores, 0.5, allowed=torch.ones(4, 6))
    for bad in ("0.5", None, True, torch.ones(4, dtype=torch.bool)):
        with pytest.raises(TypeError, match="threshold must be a float"):
            sparse_attn.threshold_select(scores, bad)


# ------------------------------------------------------------------------------------- transpose
def random_lists(rng, batch, heads, mq, n, density):
    mask = torch.rand(batch, heads, mq, n, generator=rng) < density
    return mask, reference._mask_to_sorted_lists(mask)


@needs_native  # without the extension the package runs the reference itself
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_layout_transpose_matches_reference_and_round_trips(rng, density):
    mask, (counts, indices) = random_lists(rng, 2, 3, 7, 5, density)
    q_counts, q_indices = sparse_attn.layout_transpose(counts, indices, 5)
    ref = reference.layout_transpose_reference(counts, indices, 5)
    torch.testing.assert_close((q_counts, q_indices), ref, rtol=0, atol=0)
    assert torch.equal(reference._kv_lists_to_dense(q_counts, q_indices, 7), mask.transpose(-1, -2))
    back = sparse_attn.layout_transpose(q_counts, q_indices, 7)
    torch.testing.assert_close(back, (counts, indices), rtol=0, atol=0)


@needs_native
def test_native_transpose_rejects_out_of_range():
    counts = torch.tensor([[[2]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="outside"):
        torch.ops.sparse_attn.layout_transpose(counts, torch.tensor([[[[0, 9]]]], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="unique"):
        torch.ops.sparse_attn.layout_transpose(counts, torch.tensor([[[[1, 1]]]], dtype=torch.int32), 4)


# ------------------------------------------------------------------------------------- op registration
@needs_native
def test_opcheck_every_op(rng):
    scores, forced, allowed = random_masses(rng, 8, 10)
    _, (counts, indices) = random_lists(rng, 1, 2, 4, 6, 0.5)
    cases = [
        (torch.ops.sparse_attn.block_mean_pool.default, (torch.randn(1, 2, 10, 4, generator=rng), 4)),
        (torch.ops.sparse_attn.topk_rows.default, (scores, 3)),
        (
            torch.ops.sparse_attn.threshold_select.default,
            (scores, torch.full((8,), 0.7, dtype=torch.float64), forced, allowed),
        ),
        (torch.ops.sparse_attn.layout_transpose.default, (counts, indices, 6)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@needs_native
def test_ops_trace_under_compile(rng):
    keys = torch.randn(1, 2, 12, 4, generator=rng)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def route(keys, queries):
        means = sparse_attn.block_mean_pool(keys, 4)
        scores = torch.einsum("bhsd,bhnd->bhsn", queries, means).reshape(-1, means.shape[2])
        return torch.ops.sparse_attn.topk_rows(scores, 2)

    queries = torch.randn(1, 2, 12, 4, generator=rng)
    means = reference.block_mean_pool_reference(keys, 4)
    expected = reference.topk_rows_reference(torch.einsum("bhsd,bhnd->bhsn", queries, means).reshape(-1, 3), 2)
    torch.testing.assert_close(route(keys, queries), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------- CUDA ops
@pytest.mark.gpu
def test_cuda_ops_match_reference(rng):
    assert sparse_attn.native_available("cuda"), "the CUDA ops were not built"
    dev = torch.device("cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        keys = torch.randn(2, 8, 1000, 128, generator=rng).to(dtype)
        torch.testing.assert_close(
            sparse_attn.block_mean_pool(keys.to(dev), 64).cpu(),
            reference.block_mean_pool_reference(keys, 64),
            rtol=1e-5,
            atol=1e-5,
        )
    for n, k in ((12, 3), (1024, 16), (8192, 64)):
        scores = tied_scores(rng, 257, n)
        torch.testing.assert_close(
            sparse_attn.topk_rows(scores.to(dev), k).cpu(), reference.topk_rows_reference(scores, k), rtol=0, atol=0
        )
        masses, forced, allowed = random_masses(rng, 257, n)
        tau = torch.rand(257, generator=rng, dtype=torch.float64)
        got = sparse_attn.threshold_select(masses.to(dev), tau.to(dev), forced=forced.to(dev), allowed=allowed.to(dev))
        ref = reference.threshold_select_reference(masses, tau, forced, allowed)
        torch.testing.assert_close(tuple(t.cpu() for t in got), ref, rtol=0, atol=0)
    _, (counts, indices) = random_lists(rng, 2, 4, 300, 300, 0.1)
    got = sparse_attn.layout_transpose(counts.to(dev), indices.to(dev), 300)
    torch.testing.assert_close(
        tuple(t.cpu() for t in got), reference.layout_transpose_reference(counts, indices, 300), rtol=0, atol=0
    )
    torch.library.opcheck(torch.ops.sparse_attn.topk_rows.default, (tied_scores(rng, 8, 10).to(dev), 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_block_mean_pool_is_differentiable_on_every_path(rng, dtype):
    """The native op's registered backward equals the reference's autograd: each key of block j gets
    grad[j] over the block's real length (a ragged last block too)."""
    keys = torch.randn(2, 3, 37, 8, generator=rng).to(dtype).requires_grad_()
    pooled = sparse_attn.block_mean_pool(keys, 16)
    grad = torch.randn(pooled.shape, generator=rng, dtype=pooled.dtype)
    (got,) = torch.autograd.grad(pooled, keys, grad)
    lengths = torch.tensor([16.0, 16.0, 5.0], dtype=torch.float64)
    want = (grad.double() / lengths[:, None]).repeat_interleave(torch.tensor([16, 16, 5]), dim=2)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(
            lambda x: sparse_attn.block_mean_pool(x, 8), (keys[:1, :1, :20].detach().requires_grad_(),)
        )
