"""MoBA routing (native CPU/CUDA ops against the reference, and the routing rules) and KeyShortConv."""

import pytest
import torch
import torch.nn.functional as F

import sparse_attn
from sparse_attn import reference
from sparse_attn._native import _has_kernel
from sparse_attn.methods.moba import (
    KeyShortConv,
    moba_route,
    moba_route_reference,
    moba_route_varlen,
    moba_route_varlen_reference,
)

NATIVE_CPU = _has_kernel("moba_route", "CPU")
needs_native = pytest.mark.skipif(not NATIVE_CPU, reason="native CPU moba_route not built")
needs_native_varlen = pytest.mark.skipif(
    not _has_kernel("moba_route_varlen", "CPU"), reason="native CPU moba_route_varlen not built"
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def small_int_qk(rng, batch, q_heads, kv_heads, q_len, kv_len, dim, dtype=torch.float32):
    """q and k with integer entries in [-3, 3]: with power-of-two block lengths, block means and
    scores are exact in every dtype and summation order, so implementations must agree bit for
    bit, and equal scores (ties) are frequent."""
    q = torch.randint(-3, 4, (batch, q_heads, q_len, dim), generator=rng).to(dtype)
    k = torch.randint(-3, 4, (batch, kv_heads, kv_len, dim), generator=rng).to(dtype)
    return q, k


def routing_scores(q, k, block_size):
    """float64 [B, Hq, Sq, N] scores against float64 block means."""
    means = reference.block_mean_pool_reference(k.double(), block_size)
    means = means.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return torch.einsum("bhsd,bhnd->bhsn", q.double(), means)


def check_routing_rules(q, k, routes, *, block_size, topk, causal, rel_eps=1e-4):
    """Tie-tolerant check of a routing against the rules, with float64 scores.

    Rows ascend and pad with -1 at the end; causal rows hold their current block and otherwise
    only blocks entirely in the past; every row holds min(topk, 1 + |eligible|) blocks (causal) or
    min(topk, N); and no unselected candidate outscores a selected one by more than eps.
    """
    batch, q_heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    scores = routing_scores(q, k, block_size)
    num_blocks = scores.shape[-1]
    routes = routes.to(device=scores.device, dtype=torch.int64)
    assert routes.shape == (batch, q_heads, q_len, topk)

    valid = routes >= 0
    assert bool((valid[..., 1:] <= valid[..., :-1]).all()), "-1 padding must come last"
    both = valid[..., 1:] & valid[..., :-1]
    assert bool((routes[..., 1:] > routes[..., :-1])[both].all()), "indices must be strictly ascending"
    assert bool((routes[valid] < num_blocks).all())

    selected = torch.zeros(*routes.shape[:3], num_blocks + 1, dtype=torch.bool, device=scores.device)
    selected.scatter_(-1, torch.where(valid, routes, num_blocks), True)
    selected = selected[..., :num_blocks]
    block = torch.arange(num_blocks, device=scores.device)
    position = torch.arange(q_len, device=scores.device) + kv_len - q_len
    if causal:
        current = position // block_size
        candidate = (block[None, :] + 1) * block_size <= position[:, None]
        is_current = block[None, :] == current[:, None]
        assert bool(selected[..., is_current].all()), "the current block must be selected"
        assert not bool((selected & ~(candidate | is_current)).any()), "a block outside the past was selected"
        expected_count = torch.clamp(candidate.sum(-1) + 1, max=topk)
    else:
        candidate = torch.ones(q_len, num_blocks, dtype=torch.bool, device=scores.device)
        expected_count = torch.full((q_len,), min(topk, num_blocks), device=scores.device)
    assert bool((valid.sum(-1) == expected_count).all()), "wrong number of selected blocks"

    ranked = selected & candidate
    eps = rel_eps * scores.abs().amax().clamp(min=1.0)
    lowest_selected = torch.where(ranked, scores, torch.inf).amin(-1)
    best_unselected = torch.where(candidate & ~selected, scores, -torch.inf).amax(-1)
    assert bool((lowest_selected >= best_unselected - eps).all()), "a selected block is outscored"


# ---------------------------------------------------------------------------------- exact agreement
@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (4, 1)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize(
    "q_len,kv_len,block_size,topk",
    [
        (64, 64, 8, 3),  # prefill
        (37, 100, 16, 4),  # Sq < Skv, ragged last block of 4 keys
        (1, 132, 16, 3),  # decode row, ragged last block
        (50, 64, 16, 9),  # topk > number of blocks
    ],
)
def test_native_matches_reference_exactly(rng, dtype, heads, causal, q_len, kv_len, block_size, topk):
    q, k = small_int_qk(rng, 2, heads[0], heads[1], q_len, kv_len, 8, dtype)
    expected = moba_route_reference(q, k, block_size=block_size, topk=topk, causal=causal)
    got = torch.ops.sparse_attn.moba_route(q, k, block_size, topk, causal)
    assert got.dtype == torch.int32 and got.shape == (2, heads[0], q_len, topk)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(moba_route(q, k, block_size=block_size, topk=topk, causal=causal), expected)
    check_routing_rules(q, k, got, block_size=block_size, topk=topk, causal=causal, rel_eps=0)


@pytest.mark.parametrize("block_size,topk", [(16, 4), (7, 3), (16, 1)])
def test_ties_go_to_the_lower_block(block_size, topk):
    # Every key equal: every past block scores the same, so the earliest ones win.
    q = torch.ones(1, 1, 80, 4)
    k = torch.ones(1, 1, 80, 4)
    routes = moba_route(q, k, block_size=block_size, topk=topk)
    for row in range(80):
        current = row // block_size
        earliest = list(range(min(topk - 1, current)))
        want = earliest + [current] + [-1] * (topk - 1 - len(earliest))
        assert routes[0, 0, row].tolist() == want
    torch.testing.assert_close(routes, moba_route_reference(q, k, block_size=block_size, topk=topk))


def test_topk_covering_every_block_is_dense_causal(rng):
    q, k = small_int_qk(rng, 1, 2, 1, 40, 70, 4)
    routes = moba_route(q, k, block_size=16, topk=5)  # 5 blocks: every past block fits
    for row in range(40):
        current = (row + 30) // 16
        assert routes[:, :, row].tolist() == [[list(range(current + 1)) + [-1] * (4 - current)] * 2]


def test_noncausal_routes_the_ragged_block_on_its_real_mean():
    # Block 1 holds a single key of 8 (mean 8), block 0 keys of 1: a zero-padded mean would be 1.
    k = torch.cat([torch.ones(1, 1, 8, 2), torch.full((1, 1, 1, 2), 8.0)], dim=2)
    q = torch.ones(1, 1, 9, 2)
    routes = moba_route(q, k, block_size=8, topk=1, causal=False)
    assert bool((routes == 1).all())
    torch.testing.assert_close(routes, moba_route_reference(q, k, block_size=8, topk=1, causal=False))


def test_nan_scores_are_never_selected(rng):
    q, k = small_int_qk(rng, 1, 1, 1, 64, 64, 4)
    k[0, 0, 3, 0] = float("nan")  # block 0's mean and scores become NaN
    for causal in (True, False):
        routes = moba_route(q, k, block_size=8, topk=3, causal=causal)
        rows_past_block_0 = slice(8, None) if causal else slice(None)  # causal rows 0-7 sit in block 0
        assert not bool((routes[:, :, rows_past_block_0] == 0).any())
        torch.testing.assert_close(routes, moba_route_reference(q, k, block_size=8, topk=3, causal=causal))


# ---------------------------------------------------------------------------------- tie-tolerant rules
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_routing_rules_on_gaussian_inputs(rng, dtype, causal):
    q = torch.randn(2, 4, 300, 32, generator=rng).to(dtype)
    k = torch.randn(2, 2, 333, 32, generator=rng).to(dtype)
    routes = moba_route(q, k, block_size=16, topk=5, causal=causal)
    check_routing_rules(q, k, routes, block_size=16, topk=5, causal=causal)
    expected = moba_route_reference(q, k, block_size=16, topk=5, causal=causal)
    check_routing_rules(q, k, expected, block_size=16, topk=5, causal=causal)
    mismatched_rows = (routes != expected).any(-1).float().mean().item()
    assert mismatched_rows < 0.01


def test_rules_checker_catches_a_wrong_routing(rng):
    q, k = small_int_qk(rng, 1, 1, 1, 64, 64, 8)
    routes = moba_route_reference(q, k, block_size=8, topk=3)
    wrong = routes.clone()
    wrong[0, 0, -1, 0] = 6  # row 63: current block 7, block 6 is in the past ...
    wrong[0, 0, -1, 1] = 7
    wrong[0, 0, -1, 2] = -1  # ... but the row now holds too few blocks
    with pytest.raises(AssertionError):
        check_routing_rules(q, k, wrong, block_size=8, topk=3, causal=True)


# ---------------------------------------------------------------------------------- layouts and registration
@needs_native
def test_noncontiguous_inputs(rng):
    q = torch.randn(2, 48, 4, 8, generator=rng).transpose(1, 2)  # (B, S, H, D) storage
    k = torch.randn(2, 64, 2, 8, generator=rng).transpose(1, 2)
    got = torch.ops.sparse_attn.moba_route(q, k, 16, 3, True)
    torch.testing.assert_close(got, torch.ops.sparse_attn.moba_route(q.contiguous(), k.contiguous(), 16, 3, True))


@needs_native
def test_opcheck(rng):
    q = torch.randn(1, 4, 20, 8, generator=rng)
    k = torch.randn(1, 2, 33, 8, generator=rng)
    for causal in (True, False):
        torch.library.opcheck(torch.ops.sparse_attn.moba_route.default, (q, k, 8, 3, causal))


@needs_native
def test_traces_under_compile(rng):
    q, k = small_int_qk(rng, 1, 2, 1, 24, 40, 4)
    route = torch.compile(lambda q, k: moba_route(q, k, block_size=8, topk=3), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(route(q, k), moba_route_reference(q, k, block_size=8, topk=3), rtol=0, atol=0)


def test_exported_from_the_package():
    assert sparse_attn.moba_route is moba_route and sparse_attn.KeyShortConv is KeyShortConv


def test_empty_inputs():
    q = torch.zeros(1, 2, 0, 4)
    assert moba_route(q, torch.zeros(1, 1, 0, 4), block_size=4, topk=2).shape == (1, 2, 0, 2)
    assert moba_route_reference(q, torch.zeros(1, 1, 5, 4), block_size=4, topk=2).shape == (1, 2, 0, 2)


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"topk": 0}, ValueError, "topk"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"block_size": 2.0}, TypeError, "block_size"),
        ({"k": torch.zeros(1, 4, 16, 4)}, ValueError, "heads"),
        ({"q": torch.zeros(1, 6, 17, 4)}, ValueError, "rows"),
        ({"q": torch.zeros(6, 17, 4)}, ValueError, "q"),
        ({"k": torch.zeros(1, 2, 16)}, ValueError, "k"),
        ({"k": torch.zeros(1, 2, 16, 4, dtype=torch.float64)}, TypeError, "dtype"),
        ({"q": torch.zeros(1, 6, 8, 4, dtype=torch.int32)}, TypeError, "q"),
        ({"k": torch.zeros(2, 2, 16, 4)}, ValueError, "batch"),
        ({"k": torch.zeros(1, 2, 16, 5)}, ValueError, "head dim"),
        ({"causal": 1}, TypeError, "causal"),
    ],
)
def test_bad_arguments(change, error, match):
    args = {"q": torch.zeros(1, 6, 8, 4), "k": torch.zeros(1, 2, 16, 4), "block_size": 4, "topk": 2, "causal": True}
    args.update(change)
    with pytest.raises(error, match=match):
        moba_route(args.pop("q"), args.pop("k"), **args)


@needs_native
def test_native_op_rejects_bad_arguments():
    q, k = torch.zeros(1, 4, 8, 4), torch.zeros(1, 2, 16, 4)
    for args in ((q, k, 4, 0, True), (q, k, 0, 2, True), (q, k[:, :1].expand(1, 3, 16, 4), 4, 2, True)):
        with pytest.raises(ValueError):
            torch.ops.sparse_attn.moba_route(*args)
    with pytest.raises(ValueError, match="more rows"):
        torch.ops.sparse_attn.moba_route(torch.zeros(1, 2, 17, 4), k, 4, 2, True)


# ---------------------------------------------------------------------------------- packed sequences
# (query length, key length) per sequence: an empty sequence, Lq < Lk (chunked prefill), keys
# without queries, a decode row, ragged last blocks, and one sequence longer than the rest. Every
# ragged block of block sizes 2 to 16 has a power-of-two length, so block means are exact.
PACKED_LENGTHS = [(5, 20), (0, 0), (17, 17), (40, 66), (0, 18), (1, 33), (2, 2)]


def packed_int_qk(rng, lengths, q_heads, kv_heads, dim, dtype):
    """Packed small-integer q (total_q, Hq, D), k (total_k, Hkv, D) and int32 offsets of `lengths`."""
    q_lens, k_lens = zip(*lengths)
    q = torch.randint(-3, 4, (sum(q_lens), q_heads, dim), generator=rng).to(dtype)
    k = torch.randint(-3, 4, (sum(k_lens), kv_heads, dim), generator=rng).to(dtype)

    def offsets(lens):
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)

    return q, k, offsets(q_lens), offsets(k_lens), max(q_lens)


def test_varlen_reference_routes_each_sequence_alone(rng):
    q, k, cu_q, cu_k, max_q = packed_int_qk(rng, PACKED_LENGTHS, 4, 2, 8, torch.float32)
    routes = moba_route_varlen_reference(q, k, cu_q, cu_k, max_q + 2, block_size=4, topk=3)
    assert routes.shape == (len(PACKED_LENGTHS), 4, max_q + 2, 3)
    for i, (q_len, _) in enumerate(PACKED_LENGTHS):
        seq_q = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)[None]
        seq_k = k[cu_k[i] : cu_k[i + 1]].transpose(0, 1)[None]
        if q_len:  # the checker needs at least one row
            check_routing_rules(
                seq_q, seq_k, routes[i : i + 1, :, :q_len], block_size=4, topk=3, causal=True, rel_eps=0
            )
        assert bool((routes[i, :, q_len:] == -1).all()), "rows past a sequence must be -1"


@needs_native_varlen
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (4, 1)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("block_size,topk", [(4, 3), (16, 2), (2, 20), (8, 1)])
def test_varlen_native_matches_reference_exactly(rng, dtype, heads, causal, block_size, topk):
    q, k, cu_q, cu_k, max_q = packed_int_qk(rng, PACKED_LENGTHS, *heads, 8, dtype)
    expected = moba_route_varlen_reference(q, k, cu_q, cu_k, max_q, block_size=block_size, topk=topk, causal=causal)
    poisoned = torch.ops.sparse_attn.moba_route_varlen(q, k, cu_q, cu_k, max_q, block_size, topk, causal)
    torch.testing.assert_close(poisoned, expected, rtol=0, atol=0)
    got = moba_route_varlen(q, k, cu_q.long(), cu_k.long(), max_q, block_size=block_size, topk=topk, causal=causal)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@needs_native_varlen
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_varlen_native_routes_as_the_batched_op_on_each_sequence(rng, causal):
    # Block size 3: inexact means, so this also pins the summation order to the batched op's.
    q, k, cu_q, cu_k, max_q = packed_int_qk(rng, [(7, 10), (0, 4), (29, 29), (2, 41)], 4, 2, 8, torch.float32)
    got = torch.ops.sparse_attn.moba_route_varlen(q, k, cu_q, cu_k, max_q, 3, 4, causal)
    for i in range(cu_q.numel() - 1):
        seq_q = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)[None]
        seq_k = k[cu_k[i] : cu_k[i + 1]].transpose(0, 1)[None]
        batched = torch.ops.sparse_attn.moba_route(seq_q, seq_k, 3, 4, causal)[0]
        torch.testing.assert_close(got[i, :, : seq_q.shape[2]], batched, rtol=0, atol=0)


@needs_native_varlen
def test_varlen_native_on_gaussian_inputs_and_many_sequences(rng):
    # 300 sequences: more (sequence, head) tasks than threads, lengths from 0 to 64.
    lengths = [(int(n) // 2, int(n)) for n in torch.randint(0, 65, (300,), generator=rng)]
    q_lens, k_lens = zip(*lengths)
    q = torch.randn(sum(q_lens), 4, 16, generator=rng).to(torch.bfloat16)
    k = torch.randn(sum(k_lens), 2, 16, generator=rng).to(torch.bfloat16)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    got = moba_route_varlen(q, k, cu_q, cu_k, 32, block_size=8, topk=3, causal=False)
    expected = moba_route_varlen_reference(q, k, cu_q, cu_k, 32, block_size=8, topk=3, causal=False)
    assert (got != expected).any(-1).float().mean().item() < 0.01


@needs_native_varlen
def test_varlen_opcheck(rng):
    q, k, cu_q, cu_k, max_q = packed_int_qk(rng, PACKED_LENGTHS, 4, 2, 8, torch.float32)
    for causal in (True, False):
        torch.library.opcheck(torch.ops.sparse_attn.moba_route_varlen.default, (q, k, cu_q, cu_k, max_q, 4, 3, causal))


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"q": torch.zeros(1, 6, 8, 4)}, ValueError, "q"),
        ({"k": torch.zeros(30, 4, 4)}, ValueError, "heads"),
        (
            {"cu_seqlens_q": torch.tensor([0, 11, 12], dtype=torch.int32), "max_seqlen_q": 11},
            ValueError,
            "more queries",
        ),
        ({"cu_seqlens_q": torch.tensor([0, 4, 11], dtype=torch.int32)}, ValueError, "cu_seqlens_q"),
        ({"cu_seqlens_q": torch.tensor([0, 12], dtype=torch.int32), "max_seqlen_q": 12}, ValueError, "same number"),
        ({"cu_seqlens_q": torch.tensor([0.0, 4.0, 12.0])}, TypeError, "cu_seqlens_q"),
        ({"max_seqlen_q": 7}, ValueError, "max_seqlen"),
        ({"max_seqlen_q": -1}, ValueError, "max_seqlen_q"),
        ({"block_size": 0}, ValueError, "block_size"),
    ],
)
def test_varlen_bad_arguments(change, error, match):
    args = {
        "q": torch.zeros(12, 6, 4),
        "k": torch.zeros(30, 2, 4),
        "cu_seqlens_q": torch.tensor([0, 4, 12], dtype=torch.int32),
        "cu_seqlens_k": torch.tensor([0, 10, 30], dtype=torch.int32),
        "max_seqlen_q": 8,
        "block_size": 4,
        "topk": 2,
    }
    args.update(change)
    positional = [args.pop(name) for name in ("q", "k", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q")]
    with pytest.raises(error, match=match):
        moba_route_varlen(*positional, **args)


@needs_native_varlen
def test_varlen_native_op_rejects_bad_offsets():
    q, k = torch.zeros(12, 4, 4), torch.zeros(30, 2, 4)
    cu_k = torch.tensor([0, 10, 30], dtype=torch.int32)
    for cu_q, match in (
        (torch.tensor([0, 11, 12], dtype=torch.int32), "Lq <= Lk"),
        (torch.tensor([0, 4, 13], dtype=torch.int32), "end at 12"),
        (torch.tensor([0, 8, 4, 12], dtype=torch.int32), "same number"),
        (torch.tensor([0, 4, 12]), "int32"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            torch.ops.sparse_attn.moba_route_varlen(q, k, cu_q, cu_k, 8, 4, 2, True)


# ---------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
def test_cuda_route_at_flashmoba_benchmark_shape(rng):
    assert _has_kernel("moba_route", "CUDA"), "the CUDA moba_route op was not built"
    dev = torch.device("cuda")
    shape = dict(batch=2, q_heads=16, kv_heads=4, q_len=8192, kv_len=8192, dim=128)
    # Exact: small integers make every mean and score exact whatever the summation order.
    for dtype in (torch.bfloat16, torch.float32):
        q, k = small_int_qk(rng, *shape.values(), dtype=dtype)
        q, k = q.to(dev), k.to(dev)
        got = moba_route(q, k, block_size=128, topk=8)
        check_routing_rules(q, k, got, block_size=128, topk=8, causal=True, rel_eps=0)
        torch.testing.assert_close(got, moba_route_reference(q, k, block_size=128, topk=8), rtol=0, atol=0)
    # Gaussian bf16: scores round differently from the reference's matmul, so only near-ties may differ.
    q = torch.randn(2, 16, 8192, 128, generator=rng).to(dev, torch.bfloat16)
    k = torch.randn(2, 4, 8192, 128, generator=rng).to(dev, torch.bfloat16)
    got = moba_route(q, k, block_size=128, topk=8)
    check_routing_rules(q, k, got, block_size=128, topk=8, causal=True)
    expected = moba_route_reference(q, k, block_size=128, topk=8)
    assert (got != expected).any(-1).float().mean().item() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_reference_on_odd_shapes(rng, dtype):
    assert _has_kernel("moba_route", "CUDA"), "the CUDA moba_route op was not built"
    # Head dims across the 128-wide tile, rows not a multiple of the CTA, Sq < Skv, ragged blocks,
    # the longest top-k list (64 ranked blocks), non-causal routing.
    cases = [
        (2, 4, 2, 300, 520, 200, 8, 9, True),
        (1, 3, 1, 129, 520, 64, 4, 65, True),
        (1, 2, 2, 77, 1028, 1, 16, 64, False),
        (1, 2, 1, 1, 147, 59, 16, 5, True),
    ]
    for batch, q_heads, kv_heads, q_len, kv_len, dim, block_size, topk, causal in cases:
        q, k = small_int_qk(rng, batch, q_heads, kv_heads, q_len, kv_len, dim, dtype)
        got = moba_route(q.cuda(), k.cuda(), block_size=block_size, topk=topk, causal=causal).cpu()
        check_routing_rules(q, k, got, block_size=block_size, topk=topk, causal=causal, rel_eps=0)
        expected = moba_route_reference(q, k, block_size=block_size, topk=topk, causal=causal)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    q, k = small_int_qk(rng, 1, 2, 1, 64, 100, 8, dtype)
    q, k = q.cuda(), k.cuda()
    torch.library.opcheck(torch.ops.sparse_attn.moba_route.default, (q, k, 4, 5, True))
    for causal, topk in ((True, 66), (False, 65)):  # 65 ranked blocks
        with pytest.raises(ValueError, match="at most 64"):
            moba_route(q, k, block_size=1, topk=topk, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_varlen_matches_reference(rng, dtype):
    assert _has_kernel("moba_route_varlen", "CUDA"), "the CUDA moba_route_varlen op was not built"
    # Head dims across the 128-wide tile, sequences longer than a CTA's rows, empty sequences.
    lengths = PACKED_LENGTHS + [(300, 520), (129, 129), (0, 4)]
    for q_heads, kv_heads, dim, block_size, topk, causal in ((4, 2, 8, 4, 3, True), (3, 1, 200, 16, 9, False)):
        q, k, cu_q, cu_k, max_q = packed_int_qk(rng, lengths, q_heads, kv_heads, dim, dtype)
        expected = moba_route_varlen_reference(q, k, cu_q, cu_k, max_q, block_size=block_size, topk=topk, causal=causal)
        dev = [t.cuda() for t in (q, k, cu_q, cu_k)]
        got = moba_route_varlen(*dev, max_q, block_size=block_size, topk=topk, causal=causal).cpu()
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.sparse_attn.moba_route_varlen.default, (*dev, max_q, 16, 9, False))


# ---------------------------------------------------------------------------------- KeyShortConv
def conv1d_reference(k, weight):
    """F.conv1d over tokens with width - 1 zeros of left padding; weight [H * D, width]."""
    b, h, s, d = k.shape
    x = k.permute(0, 1, 3, 2).reshape(b, h * d, s)
    y = F.conv1d(F.pad(x, (weight.shape[1] - 1, 0)), weight[:, None, :], groups=h * d)
    return y.reshape(b, h, d, s).permute(0, 1, 3, 2)


@pytest.mark.parametrize("width", [3, 5])
@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared_heads"])
def test_key_conv_equals_left_padded_conv1d(rng, width, shared):
    k = torch.randn(2, 3, 11, 4, generator=rng)
    conv = KeyShortConv(4 if shared else 12, width)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=rng))
    weight = conv.weight.detach().repeat(3, 1) if shared else conv.weight.detach()
    torch.testing.assert_close(conv(k), conv1d_reference(k, weight))


def test_key_conv_is_causal(rng):
    conv = KeyShortConv(8, 5)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=rng))
    k = torch.randn(1, 2, 10, 4, generator=rng)
    changed = k.clone()
    changed[:, :, 6:] += 1.0
    torch.testing.assert_close(conv(k)[:, :, :6], conv(changed)[:, :, :6])


@pytest.mark.parametrize("options", [{}, {"residual": True}, {"residual": True, "activation": "silu", "bias": True}])
def test_key_conv_initialises_to_identity(rng, options):
    k = torch.randn(2, 2, 9, 4, generator=rng)
    torch.testing.assert_close(KeyShortConv(8, 3, **options)(k), k)


def test_key_conv_options(rng):
    conv = KeyShortConv(4, 3, bias=True, activation="silu", residual=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=rng))
        conv.bias.copy_(torch.randn(4, generator=rng))
    k = torch.randn(1, 2, 7, 4, generator=rng)
    mixed = conv1d_reference(k, conv.weight.detach().repeat(2, 1)) + conv.bias.detach()
    torch.testing.assert_close(conv(k), k + F.silu(mixed))


def test_key_conv_prefill_then_decode_equals_one_pass(rng):
    conv = KeyShortConv(8, 5)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=rng))
    k = torch.randn(2, 2, 12, 4, generator=rng)
    pieces, state = [conv(k[:, :, :7])], conv.next_state(k[:, :, :7])
    for t in range(7, 12):
        pieces.append(conv(k[:, :, t : t + 1], state))
        state = conv.next_state(k[:, :, t : t + 1], state)
    torch.testing.assert_close(torch.cat(pieces, dim=2), conv(k))


def test_key_conv_packed_sequences_do_not_leak(rng):
    conv = KeyShortConv(8, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=rng))
    lengths = [5, 1, 0, 9]
    packed = torch.randn(sum(lengths), 2, 4, generator=rng)
    cu_seqlens = torch.tensor([0, 5, 6, 6, 15], dtype=torch.int32)
    got = conv(packed, cu_seqlens=cu_seqlens)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        alone = conv(packed[start:end].transpose(0, 1)[None])[0].transpose(0, 1)
        torch.testing.assert_close(got[start:end], alone)


def test_key_conv_gradients_reach_the_weights(rng):
    conv = KeyShortConv(8, 3, bias=True)
    k = torch.randn(1, 2, 6, 4, generator=rng, requires_grad=True)
    conv(k).square().sum().backward()
    assert conv.weight.grad is not None and conv.bias.grad is not None and k.grad is not None


def test_key_conv_rejects_bad_arguments():
    with pytest.raises(ValueError, match="width"):
        KeyShortConv(8, 4)
    with pytest.raises(ValueError, match="activation"):
        KeyShortConv(8, activation="gelu")
    with pytest.raises(ValueError, match="channels"):
        KeyShortConv(6)(torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="state"):
        KeyShortConv(8)(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        KeyShortConv(8)(torch.zeros(5, 2, 4), cu_seqlens=torch.tensor([0, 4]))
    # Integer keys would truncate the float taps (0.4 -> 0): refused on every entry point.
    keys = torch.ones(1, 2, 3, 4, dtype=torch.int64)
    for call in (lambda: KeyShortConv(8)(keys), lambda: KeyShortConv(8).next_state(keys),
                 lambda: KeyShortConv(8)(keys[0].transpose(0, 1), cu_seqlens=torch.tensor([0, 3]))):  # fmt: skip
        with pytest.raises(TypeError, match="k must have dtype"):
            call()
    # Options are what they say: no truthy strings, no float widths, and a state that is float keys.
    for options, error, match in [
        ({"residual": "False"}, TypeError, "residual must be a bool"),
        ({"bias": 1}, TypeError, "bias must be a bool"),
        ({"width": 3.0}, TypeError, "width must be an int"),
    ]:
        with pytest.raises(error, match=match):
            KeyShortConv(8, **options)
    for state, error in [([0], TypeError), (torch.zeros(1, 2, 2, 4, dtype=torch.int64), TypeError)]:
        with pytest.raises(error, match="state"):
            KeyShortConv(8)(torch.zeros(1, 2, 3, 4), state)
