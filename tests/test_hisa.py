"""DSA indexer and HISA: the test oracles of shared/specs/hisa_dsa.md section 5 (1-6).

On the CPU the score kernel runs under the Triton interpreter (fp16/fp32) and the PyTorch path is
checked against the same float64 references; the GPU tests run bf16 and fp8 at real sizes.
"""

import pytest
import torch

import sparse_attn.methods.hisa as hisa_module
from sparse_attn.engine import triton_available
from sparse_attn.methods.hisa import (
    HISABlockMeans,
    _pool_segments,
    dsa_indexer,
    dsa_indexer_logits,
    dsa_indexer_logits_reference,
    dsa_select,
    hisa_indexer,
    hisa_indexer_reference,
    hisa_segments,
    hisa_select,
    topk_indices,
)
from sparse_attn.testing import planted_indexer_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TIE_EPS = 1e-4


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv("SPARSE_ATTN_POISON_OUTPUTS", "1")


def _pooled(k, ks, ke, block_size, k_scale):
    """HISA's batch pooling of k's blocks for the sequences that ks and ke draw."""
    return _pool_segments(k, hisa_segments(ks, ke, k.shape[0], block_size=block_size), k_scale)[0]


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    """Both implementations of the scores: the fused kernel and the PyTorch path."""
    if request.param == "kernel" and not triton_available(DEVICE):
        pytest.skip("triton is not installed")
    if request.param == "torch":
        monkeypatch.setattr(hisa_module, "_kernel_runs", lambda *args: False)
    return request.param


def packed_inputs(rng, seq_lens, heads=4, dim=32, dtype=torch.float32, queries=None):
    """Packed causal prefill: q (M, H, D), k (N, D), weights (M, H), ks/ke per row; `queries` keeps only
    the last that many rows of each sequence."""
    total = sum(seq_lens)
    k = torch.randn(total, dim, generator=rng)
    ks, ke, rows = [], [], []
    start = 0
    for length in seq_lens:
        first = length - min(length, queries or length)
        for t in range(first, length):
            ks.append(start)
            ke.append(start + t + 1)
            rows.append(start + t)
        start += length
    q = torch.randn(len(rows), heads, dim, generator=rng) + 0.5 * k[rows][:, None, :]
    weights = torch.rand(len(rows), heads, generator=rng) + 0.1
    as_device = lambda t, dt=None: t.to(DEVICE, dt) if dt else t.to(DEVICE)  # noqa: E731
    return (
        as_device(q, dtype),
        as_device(k, dtype),
        as_device(weights),
        torch.tensor(ks, device=DEVICE),
        torch.tensor(ke, device=DEVICE),
    )


def scores64(q, k, weights, k_scale=None):
    """fp64 DSA scores of every row against every key, without masks: the scale inside the ReLU (spec)."""
    logits = torch.einsum("mhd,nd->mhn", q.double(), k.double())
    if k_scale is not None:
        logits = logits * k_scale.double()
    return (logits.relu() * weights.double()[:, :, None]).sum(1)


def assert_top_of(selected, pool, scores, count, what):
    """Tie-safe top-k: `selected` is `count` distinct members of `pool` and no unselected member scores higher."""
    chosen = set(selected)
    assert len(chosen) == len(selected) == count, (
        f"{what}: {len(selected)} entries ({len(chosen)} distinct), want {count}"
    )
    assert chosen <= set(pool), f"{what}: selection leaves its candidates"
    scores = scores.detach().double().cpu()
    picked, pool = torch.tensor(selected, dtype=torch.long), torch.tensor(pool, dtype=torch.long)
    rest = pool[~torch.isin(pool, picked)]
    if picked.numel() and rest.numel():
        low, high = float(scores[picked].min()), float(scores[rest].max())
        assert low >= high - TIE_EPS * max(1.0, abs(high)), f"{what}: unselected score {high} beats selected {low}"


def valid_entries(row):
    values = row.tolist()
    valid = [v for v in values if v >= 0]
    assert values[len(valid) :] == [-1] * (len(values) - len(valid)), "-1 padding must come last"
    return valid


# ---------------------------------------------------------------------------------- 1: DSA logits
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_scale", [False, True])
def test_dsa_logits_match_reference(rng, path, dtype, with_scale):
    q, k, weights, ks, ke = packed_inputs(rng, [70, 1, 133], heads=5, dim=24, dtype=dtype)
    ke[3] = ks[3]  # an empty row
    # Scales of both signs: the spec's ReLU(q . k s) differs from s ReLU(q . k) for s < 0.
    k_scale = (torch.rand(k.shape[0], generator=rng) * 2 - 0.5).to(DEVICE) if with_scale else None
    got = dsa_indexer_logits(q, k, weights, ks, ke, k_scale)
    ref = dsa_indexer_logits_reference(q, k, weights, ks, ke, k_scale)
    inside = torch.isfinite(ref)
    assert torch.allclose(ref[inside], scores64(q, k, weights, k_scale)[inside], rtol=0, atol=1e-9)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.equal(torch.isfinite(got), inside) and bool((got[~inside] == float("-inf")).all())
    assert not bool(inside[3].any())
    # fp32 accumulation of exact products of the inputs: error relative to the largest score.
    assert float((got[inside] - ref[inside]).abs().max()) <= 1e-5 * float(ref[inside].abs().max())


def test_strided_weights_and_key_scales(rng, path):
    """weights and k_scale given as strided views (a transposed (H, M) weights, every other entry of a
    scale vector) score as their contiguous copies do."""
    q, k, weights, ks, ke = packed_inputs(rng, [48], heads=4, dim=16)
    strided_weights = weights.t().contiguous().t()
    scales = (torch.rand(2 * k.shape[0], generator=rng) + 0.5).to(DEVICE)
    strided_scale = scales[::2]
    expected = dsa_indexer_logits(q, k, weights.contiguous(), ks, ke, strided_scale.contiguous())
    got = dsa_indexer_logits(q, k, strided_weights, ks, ke, strided_scale)
    assert torch.equal(got, expected)
    options = dict(block_size=8, block_topk=3, topk=12, k_scale=strided_scale)
    assert torch.equal(
        hisa_indexer(q, k, strided_weights, ks, ke, **options),
        hisa_indexer(q, k, weights.contiguous(), ks, ke, **options),
    )


def test_dsa_logits_fp8_inputs_are_exact_widenings(rng, path):
    q, k, weights, ks, ke = packed_inputs(rng, [96], heads=4, dim=32)
    q8, k8 = q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn)
    k_scale = (torch.rand(k.shape[0], generator=rng) + 0.5).to(DEVICE)
    got = dsa_indexer_logits(q8, k8, weights, ks, ke, k_scale)
    ref = dsa_indexer_logits_reference(q8.float(), k8.float(), weights, ks, ke, k_scale)
    inside = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), inside)
    assert float((got[inside] - ref[inside]).abs().max()) <= 1e-5 * float(ref[inside].abs().max())


def test_dsa_logits_beyond_the_keys_and_before_them(rng, path):
    q, k, weights, _, _ = packed_inputs(rng, [40], heads=2, dim=16)
    ks = torch.full((40,), -5, device=DEVICE)
    ke = torch.full((40,), 1000, device=DEVICE)  # past the keys: every key is visible, no out-of-range read
    got = dsa_indexer_logits(q, k, weights, ks, ke)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), scores64(q, k, weights), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- topk_indices
def test_topk_indices_pads_last_and_skips_masked():
    logits = torch.tensor([[0.5, float("-inf"), 2.0, 1.0], [float("-inf")] * 4, [3.0, 3.0, 3.0, 3.0]])
    out = topk_indices(logits, 6)
    assert out.dtype == torch.int32 and out.shape == (3, 6)
    assert out[0].tolist() == [2, 3, 0, -1, -1, -1]
    assert out[1].tolist() == [-1] * 6
    assert sorted(out[2, :4].tolist()) == [0, 1, 2, 3] and out[2, 4:].tolist() == [-1, -1]


# ---------------------------------------------------------------------------------- 2-4: HISA
HISA_CASES = {
    # name: (sequence lengths, block, block_topk, topk)
    "prunes": ([300], 16, 4, 32),
    "ragged_packed": ([77, 5, 190], 16, 5, 40),
    "block_not_power_of_two": ([150], 24, 3, 30),  # the PyTorch path for stage 2
}


@pytest.mark.parametrize("forced", ["slots", "union"])
@pytest.mark.parametrize("case", list(HISA_CASES))
def test_hisa_is_exact_top_k_of_reference_candidates(rng, path, case, forced):
    seq_lens, block, block_topk, topk = HISA_CASES[case]
    q, k, weights, ks, ke = packed_inputs(rng, seq_lens, heads=8, dim=32, dtype=torch.float16)
    got = hisa_indexer(q, k, weights, ks, ke, block_size=block, block_topk=block_topk, topk=topk, forced=forced)
    _, candidates = hisa_indexer_reference(
        q, k, weights, ks, ke, block_size=block, block_topk=block_topk, topk=topk, forced=forced
    )
    scores = scores64(q, k, weights)
    for t in range(q.shape[0]):
        start, end = int(ks[t]), int(ke[t])
        omega = [s for b in candidates[t] for s in range(b, min(b + block, end))]
        selected = valid_entries(got[t])
        assert_top_of(selected, omega, scores[t], min(topk, len(omega)), f"row {t}")
        # Structure: the first and last eligible blocks are candidates; short prefixes keep every token.
        last_block = start + (end - 1 - start) // block * block
        assert {start, last_block} <= set(candidates[t])
        if end - start <= topk:
            assert sorted(selected) == list(range(start, end))


@pytest.mark.parametrize("forced", ["slots", "union"])
def test_hisa_equals_dsa_while_every_block_is_a_candidate(rng, path, forced):
    block, topk = 16, 24
    q, k, weights, ks, ke = packed_inputs(rng, [100, 64], heads=4, dim=16)
    # 'slots' covers 7 blocks with m = 7, 'union' with m = 5 (plus the first and last).
    block_topk = 7 if forced == "slots" else 5
    got = hisa_indexer(q, k, weights, ks, ke, block_size=block, block_topk=block_topk, topk=topk, forced=forced)
    flat = dsa_indexer(q, k, weights, ks, ke, topk=topk)
    scores = scores64(q, k, weights)
    for t in range(q.shape[0]):
        visible = list(range(int(ks[t]), int(ke[t])))
        assert_top_of(valid_entries(got[t]), visible, scores[t], min(topk, len(visible)), f"HISA row {t}")
        assert_top_of(valid_entries(flat[t]), visible, scores[t], min(topk, len(visible)), f"DSA row {t}")


def test_hisa_relative_offsets(rng, path):
    q, k, weights, ks, ke = packed_inputs(rng, [50, 70], heads=4, dim=16)
    absolute = hisa_indexer(q, k, weights, ks, ke, block_size=16, block_topk=3, topk=20)
    relative = hisa_indexer(q, k, weights, ks, ke, block_size=16, block_topk=3, topk=20, relative=True)
    assert torch.equal(torch.where(absolute >= 0, absolute - ks[:, None].int(), -1), relative)


def test_hisa_planted_spans_match_dsa_at_paper_settings(rng, monkeypatch):
    """Spec oracle 5: keys planted in contiguous spans that outscore the rest; HISA (B=128, m=64, k=2048)
    keeps DSA's selection (IoU >= 0.99) on a 32K prefix, and its IoU does not fall as m grows."""
    monkeypatch.setattr(hisa_module, "_kernel_runs", lambda *args: False)  # the interpreter is too slow here
    q, k, weights, ks, ke = planted_indexer_inputs(32768, 4, 2, 16, spans=24, generator=rng, device=DEVICE)
    flat = dsa_indexer(q, k, weights, ks, ke, topk=2048)

    def iou(block_topk):
        got = hisa_indexer(q, k, weights, ks, ke, block_size=128, block_topk=block_topk, topk=2048)
        values = [len(set(valid_entries(a)) & set(valid_entries(b))) / 2048 for a, b in zip(got, flat)]
        return min(values)

    ious = [iou(m) for m in (16, 32, 64)]
    assert ious[2] >= 0.99
    assert ious[0] <= ious[1] <= ious[2]


# ---------------------------------------------------------------------------------- decode (oracle 6)
@pytest.mark.parametrize("with_scale", [False, True])
def test_incremental_block_means_equal_batch_pooling(rng, with_scale):
    """The decode state adds each step's keys to their block: the means (a partial last block averaging its
    real rows) equal pooling the whole cache, bit for bit on the CPU, as the cache grows a row or many
    at a time; a cache that shrinks starts over."""
    k = torch.randn(300, 16, generator=rng).to(DEVICE)
    scale = (torch.rand(300, generator=rng) + 0.5).to(DEVICE) if with_scale else None
    cache = HISABlockMeans(32)
    zero = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    for n in (1, 2, 31, 32, 33, 64, 100, 101, 299, 300, 40):
        means = cache.update(k[:n], None if scale is None else scale[:n])
        batch = _pooled(k[:n], zero, zero + n, 32, None if scale is None else scale[:n])
        assert means.shape == (-(-n // 32), 16)
        if DEVICE.type == "cpu":
            assert torch.equal(means, batch), n
        else:
            torch.testing.assert_close(means, batch, rtol=1e-6, atol=1e-6)
    # Keys of another kind than those pooled so far (dtype; scaled or not) start over: no mixed sums.
    half = k.half()
    torch.testing.assert_close(cache.update(half[:50]), _pooled(half[:50].float(), zero, zero + 50, 32, None))
    if scale is not None:
        cache.update(k[:60], scale[:60])
        torch.testing.assert_close(cache.update(k[:70]), _pooled(k[:70], zero, zero + 70, 32, None))


def test_decode_selection_equals_the_prefill_row(rng, path):
    """Decode from the cached block means selects what the prefill selects for the same position."""
    seq, heads, dim, block = 260, 4, 32, 16
    k = torch.randn(seq, dim, generator=rng).to(DEVICE)
    q = torch.randn(8, heads, dim, generator=rng).to(DEVICE)
    weights = torch.rand(8, heads, generator=rng).to(DEVICE)
    positions = torch.tensor([5, 40, 100, 128, 200, 240, 250, 259], device=DEVICE)
    options = dict(block_size=block, block_topk=4, topk=24)
    zeros = torch.zeros(8, dtype=torch.int64, device=DEVICE)
    prefill = hisa_indexer(q, k, weights, zeros, positions + 1, **options)
    cache = HISABlockMeans(block)
    for row, position in enumerate(positions.tolist()):
        cached = k[: position + 1]
        means = cache.update(cached)
        one = slice(row, row + 1)
        decoded = hisa_indexer(
            q[one], cached, weights[one], zeros[one], positions[one] + 1, block_means=means, **options
        )
        assert torch.equal(decoded, prefill[one]), position


@pytest.mark.parametrize("with_scale", [False, True])
def test_batched_block_means_serve_a_batch_of_decode_rows(rng, with_scale, path):
    """A batch of equal-length caches (B, N, D): the batched state's means equal pooling the packed caches,
    and flattened they give every sequence's decode row the selection of the pooled path."""
    batch, dim, block = 3, 16, 16
    k = torch.randn(batch, 120, dim, generator=rng).to(DEVICE)
    scale = (torch.rand(batch, 120, generator=rng) + 0.5).to(DEVICE) if with_scale else None
    q = torch.randn(batch, 4, dim, generator=rng).to(DEVICE)
    weights = torch.rand(batch, 4, generator=rng).to(DEVICE)
    state = HISABlockMeans(block)
    for n in (1, 17, 32, 33, 90, 120):
        cached = k[:, :n].flatten(0, 1)
        cached_scale = None if scale is None else scale[:, :n].flatten()
        ks = torch.arange(batch, device=DEVICE) * n
        means = state.update(k[:, :n], None if scale is None else scale[:, :n])
        assert means.shape == (batch, -(-n // block), dim)
        pooled = _pooled(cached, ks, ks + n, block, cached_scale)
        if DEVICE.type == "cpu":
            assert torch.equal(means.flatten(0, 1), pooled), n
        else:
            torch.testing.assert_close(means.flatten(0, 1), pooled, rtol=1e-6, atol=1e-6)
        options = dict(block_size=block, block_topk=2, topk=16, k_scale=cached_scale)
        expected = hisa_indexer(q, cached, weights, ks, ks + n, **options)
        got = hisa_indexer(q, cached, weights, ks, ks + n, block_means=means.flatten(0, 1), **options)
        assert torch.equal(got, expected), n


def test_keys_between_sequences_are_pooled_by_neither(rng, path):
    """Two sequences packed with a gap between them (the second row's left padding in a batch): each pools only
    up to its rows' furthest ke, so per-sequence decode states, concatenated, serve both rows."""
    dim, block = 16, 16
    k = torch.randn(110, dim, generator=rng).to(DEVICE)
    q = torch.randn(2, 4, dim, generator=rng).to(DEVICE)
    weights = torch.rand(2, 4, generator=rng).to(DEVICE)
    ks, ke = torch.tensor([0, 60], device=DEVICE), torch.tensor([50, 110], device=DEVICE)  # keys 50..59: the gap
    pooled = _pooled(k, ks, ke, block, None)
    means = torch.cat([HISABlockMeans(block).update(k[0:50]), HISABlockMeans(block).update(k[60:110])])
    assert pooled.shape == (4 + 4, dim)
    torch.testing.assert_close(
        pooled, means, rtol=0 if DEVICE.type == "cpu" else 1e-6, atol=0 if DEVICE.type == "cpu" else 1e-6
    )
    options = dict(block_size=block, block_topk=2, topk=16)
    expected = hisa_indexer(q, k, weights, ks, ke, **options)
    assert torch.equal(hisa_indexer(q, k, weights, ks, ke, block_means=means, **options), expected)
    for row in range(2):  # and each row selects as its sequence alone
        alone = hisa_indexer(
            q[row : row + 1], k[ks[row] : ke[row]], weights[row : row + 1], ks[:1] * 0, ke[:1] * 0 + 50, **options
        )
        assert torch.equal(alone + torch.where(alone >= 0, ks[row], 0), expected[row : row + 1])


def test_block_means_must_match_the_cache(rng):
    k = torch.randn(40, 8, generator=rng)
    q, weights = torch.randn(2, 2, 8, generator=rng), torch.rand(2, 2, generator=rng)
    ks, ke = torch.zeros(2, dtype=torch.int64), torch.tensor([39, 40])
    means = HISABlockMeans(16).update(k)
    options = dict(block_size=16, block_topk=2, topk=8)
    with pytest.raises(ValueError, match="block_means must be fp32"):
        hisa_indexer(q, k, weights, ks, ke, block_means=means[:2], **options)
    with pytest.raises(ValueError, match=r"block_means must be fp32 \(2, 8\)"):  # keys 17..39: two blocks
        hisa_indexer(q, k, weights, ks + 17, ke, block_means=means, **options)
    with pytest.raises(ValueError, match="k_scale"):
        HISABlockMeans(16).update(k, torch.ones(3))


def test_rows_that_see_no_key_select_nothing_and_start_no_sequence(rng, path):
    """A row with ke <= ks sees no key: it selects only -1 (every row of a call may be such), and its ks does
    not cut the sequence it falls into (as the flat indexer, which knows no sequences)."""
    q, k, weights, ks, ke = packed_inputs(rng, [48], heads=2, dim=16)
    options = dict(block_size=8, block_topk=3, topk=12)
    assert torch.equal(
        hisa_indexer(q, k, weights, ks * 0, ks * 0, **options), torch.full((48, 12), -1).int().to(DEVICE)
    )
    expected = hisa_indexer(q, k, weights, ks, ke, **options)
    empty_ks, empty_ke = ks.clone(), ke.clone()
    empty_ks[5], empty_ke[5] = 20, 20  # inside the sequence's keys
    got = hisa_indexer(q, k, weights, empty_ks, empty_ke, **options)
    assert bool((got[5] == -1).all())
    rows = torch.arange(48, device=DEVICE) != 5
    assert torch.equal(got[rows], expected[rows])


def test_ranges_that_overlap_the_next_sequence_are_refused(rng):
    """HISA's blocks are anchored at sequence starts: sliding-window rows (each its own ks, overlapping the
    next row's range) have no block grid, and would get duplicate or foreign keys; they get a ValueError."""
    q, k, weights, _, ke = packed_inputs(rng, [40], heads=2, dim=16)
    window = (ke - 16).clamp(min=0)
    with pytest.raises(ValueError, match="reaches past the next sequence"):
        hisa_indexer(q, k, weights, window, ke, block_size=8, block_topk=2, topk=8)
    with pytest.raises(ValueError, match="ks must be >= 0"):
        hisa_indexer(q, k, weights, window - 1, ke, block_size=8, block_topk=2, topk=8)


def test_segments_are_checked_against_the_call(rng, path):
    q, k, weights, ks, ke = packed_inputs(rng, [32, 24], heads=2, dim=16)
    options = dict(block_size=8, block_topk=3, topk=8)  # one free slot: a misread sequence start shows
    segments = hisa_segments(ks, ke, 56, block_size=8)
    expected = hisa_indexer(q, k, weights, ks, ke, **options)
    assert torch.equal(hisa_indexer(q, k, weights, ks, ke, segments=segments, **options), expected)
    # A caller's strided view of the rows' first blocks reads as its values.
    strided = segments._replace(row_first=torch.stack([segments.row_first, segments.row_first], 1)[:, 0])
    assert torch.equal(hisa_indexer(q, k, weights, ks, ke, segments=strided, **options), expected)
    with pytest.raises(ValueError, match="segments were drawn for 56 rows, 56 keys, block_size=16"):
        hisa_indexer(q, k, weights, ks, ke, segments=hisa_segments(ks, ke, 56, block_size=16), **options)
    with pytest.raises(TypeError, match="segments must be a HISASegments"):
        hisa_indexer(q, k, weights, ks, ke, segments=tuple(segments), **options)
    # Equal bounds in other tensors are the same grid; other bounds of the same sizes are not.
    copies = (ks.clone().long(), ke.clone())
    assert torch.equal(hisa_indexer(q, k, weights, *copies, segments=segments, **options), expected)
    other_ks, other_ke = packed_inputs(rng, [24, 32], heads=2, dim=16)[3:]
    with pytest.raises(ValueError, match="drawn from other bounds"):
        hisa_indexer(q, k, weights, ks, ke, segments=hisa_segments(other_ks, other_ke, 56, block_size=8), **options)
    # A serving loop's buffers refilled in place for the next batch: the old grid is refused.
    ks_buffer, ke_buffer = ks.clone(), ke.clone()
    stale = hisa_segments(ks_buffer, ke_buffer, 56, block_size=8)
    ks_buffer.copy_(other_ks), ke_buffer.copy_(other_ke)
    with pytest.raises(ValueError, match="drawn from other bounds"):
        hisa_indexer(q, k, weights, ks_buffer, ke_buffer, segments=stale, **options)


# ---------------------------------------------------------------------------------- batched
def test_batched_selection_matches_packed_and_decode_rows(rng, path):
    batch, seq_q, seq_kv, heads, dim = 2, 40, 90, 4, 16
    q = torch.randn(batch, seq_q, heads, dim, generator=rng).to(DEVICE)
    k = torch.randn(batch, seq_kv, dim, generator=rng).to(DEVICE)
    weights = (torch.rand(batch, seq_q, heads, generator=rng) + 0.1).to(DEVICE)
    options = dict(topk=24, block_size=16, block_topk=3)
    got = hisa_select(q, k, weights, **options)
    assert got.shape == (batch, seq_q, 1, 24) and got.dtype == torch.int32
    for b in range(batch):
        ks = torch.zeros(seq_q, dtype=torch.int64, device=DEVICE)
        ke = torch.arange(seq_kv - seq_q + 1, seq_kv + 1, device=DEVICE)
        packed = hisa_indexer(q[b], k[b], weights[b], ks, ke, **options)
        for t in range(seq_q):
            assert set(valid_entries(got[b, t, 0])) == set(valid_entries(packed[t]))
            assert max(valid_entries(got[b, t, 0])) <= seq_kv - seq_q + t
    # A decode step (one query) selects what the last prefill row selects.
    decode = hisa_select(q[:, -1:], k, weights[:, -1:], **options)
    for b in range(batch):
        assert set(valid_entries(decode[b, 0, 0])) == set(valid_entries(got[b, -1, 0]))
    flat = dsa_select(q, k, weights, topk=24, causal=False)
    assert int(flat.max()) >= seq_kv - seq_q  # non-causal rows see the whole sequence
    # No query rows, or no batch rows: empty selections of the right shape.
    for select in (dsa_select, hisa_select):
        extra = {} if select is dsa_select else dict(block_size=16, block_topk=3)
        assert select(q[:, :0], k, weights[:, :0], topk=24, **extra).shape == (batch, 0, 1, 24)
        assert select(q[:0], k[:0], weights[:0], topk=24, **extra).shape == (0, seq_q, 1, 24)


def test_stage_one_scores_a_row_against_its_own_sequence_only(rng, path, monkeypatch):
    """Packed sequences: stage 1 scores each row against a window of its own sequence's blocks (not every
    sequence's: per-row work would grow with the batch), and selects what each sequence alone selects."""
    lengths, options = [96, 130, 70, 128, 100], dict(block_size=4, block_topk=4, topk=16)
    q, k, weights, ks, ke = packed_inputs(rng, lengths, heads=2, dim=16, queries=3)
    widths, stage_one = [], hisa_module._stage_one_scores

    def recording(q, pooled, *args):
        scores, base = stage_one(q, pooled, *args)
        widths.append((scores.shape[1], pooled.shape[0]))
        return scores, base

    monkeypatch.setattr(hisa_module, "_stage_one_scores", recording)
    got = hisa_indexer(q, k, weights, ks, ke, **options)
    assert widths and all(width == 64 < pooled == 132 for width, pooled in widths)
    # Segments that do not know their longest sequence (max_blocks 0: built by hand) score every block.
    legacy = hisa_segments(ks, ke, k.shape[0], block_size=4)._replace(max_blocks=0)
    assert torch.equal(hisa_indexer(q, k, weights, ks, ke, segments=legacy, **options), got)
    assert widths[-1] == (132, 132)
    start = 0
    for i, length in enumerate(lengths):
        rows, keys = slice(3 * i, 3 * i + 3), slice(start, start + length)
        alone = hisa_indexer(q[rows], k[keys], weights[rows], ks[rows] - start, ke[rows] - start, **options)
        assert torch.equal(torch.where(got[rows] >= 0, got[rows] - start, -1).sort(1).values, alone.sort(1).values)
        start += length


# ---------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors(rng):
    q, k, weights, ks, ke = packed_inputs(rng, [32], heads=2, dim=16)
    with pytest.raises(ValueError, match="block_topk \\* block_size"):
        hisa_indexer(q, k, weights, ks, ke, block_size=16, block_topk=2, topk=64)
    with pytest.raises(ValueError, match="'slots' mode"):
        hisa_indexer(q, k, weights, ks, ke, block_size=64, block_topk=1, topk=16)
    with pytest.raises(ValueError, match="forced"):
        hisa_indexer(q, k, weights, ks, ke, forced="both")
    with pytest.raises(TypeError, match="relative"):
        hisa_indexer(q, k, weights, ks, ke, block_size=16, block_topk=2, topk=8, relative="yes")
    with pytest.raises(ValueError, match="weights"):
        dsa_indexer_logits(q, k, weights[:, :1], ks, ke)
    with pytest.raises(ValueError, match="k must be"):
        dsa_indexer_logits(q, k[:, :8], weights, ks, ke)
    with pytest.raises(TypeError, match="ks"):
        dsa_indexer_logits(q, k, weights, ks.float(), ke)
    with pytest.raises(ValueError, match="ke"):
        dsa_indexer_logits(q, k, weights, ks, ke[:3])
    with pytest.raises(TypeError, match="q"):
        dsa_indexer_logits(q.int(), k, weights, ks, ke)
    with pytest.raises(ValueError, match="Sq <= Skv"):
        hisa_select(torch.zeros(1, 8, 2, 16), torch.zeros(1, 4, 16), torch.zeros(1, 8, 2))
    with pytest.raises(TypeError, match="q and k must share"):
        dsa_indexer_logits(q.half(), k.bfloat16(), weights, ks, ke)  # the kernel's tl.dot takes one 16-bit dtype


def test_non_causal_selection_takes_more_queries_than_keys(rng, path):
    q = torch.randn(1, 8, 2, 16, generator=rng).to(DEVICE)
    k = torch.randn(1, 4, 16, generator=rng).to(DEVICE)
    weights = torch.rand(1, 8, 2, generator=rng).to(DEVICE)
    for select in (dsa_select, hisa_select):
        options = dict(block_size=2, block_topk=2) if select is hisa_select else {}
        got = select(q, k, weights, topk=4, causal=False, **options)
        assert all(sorted(valid_entries(row)) == [0, 1, 2, 3] for row in got[0, :, 0])


@pytest.mark.skipif(not triton_available(DEVICE), reason="triton is not installed")
def test_opcheck_indexer_ops(rng):
    from sparse_attn.kernels.indexer_scores import indexer_gathered_scores_op, indexer_scores_op

    q, k, weights, ks, ke = packed_inputs(rng, [40], heads=4, dim=16)
    ks, ke = ks.int(), ke.int()
    starts = torch.tensor([[0, 16, -1]], dtype=torch.int32, device=DEVICE).expand(40, -1).contiguous()
    # The Triton interpreter executes kernels even on fake tensors: fake/compile checks run on the GPU.
    utils = ("test_schema",) + (("test_faketensor", "test_aot_dispatch_dynamic") if DEVICE.type == "cuda" else ())
    torch.library.opcheck(indexer_scores_op, (q, k, weights, ks, ke, None), test_utils=utils)
    torch.library.opcheck(indexer_gathered_scores_op, (q, k, weights, ks, ke, None, starts, 16), test_utils=utils)


# ---------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_real_sizes(rng, fp8):
    """DeepSeek-V3.2's indexer (64 heads, D=128) in bf16 or fp8 on a 16K prefix: kernel scores against the
    fp32 reference, and HISA (B=128, m=64 > 16K/128 blocks, k=2048) equal to DSA up to ties."""
    seq, queries, heads, dim = 16384, 64, 64, 128
    q, k, weights, ks, ke = packed_inputs(rng, [seq], heads=heads, dim=dim, dtype=torch.bfloat16, queries=queries)
    k_scale = None
    if fp8:
        q, k = q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn)
        k_scale = (torch.rand(seq, generator=rng) + 0.5).to(DEVICE)
    got = dsa_indexer_logits(q, k, weights, ks, ke, k_scale)
    ref = dsa_indexer_logits_reference(q, k, weights, ks, ke, k_scale)
    inside = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), inside)
    assert float((got[inside] - ref[inside]).abs().max()) <= 1e-5 * float(ref[inside].abs().max())
    selected = hisa_indexer(q, k, weights, ks, ke, block_size=128, block_topk=128, topk=2048, k_scale=k_scale)
    scores = ref.masked_fill(~inside, float("-inf"))
    for t in range(queries):
        visible = list(range(int(ks[t]), int(ke[t])))
        assert_top_of(valid_entries(selected[t]), visible, scores[t], min(2048, len(visible)), f"row {t}")


def test_hisa_key_ends_past_the_keys_are_clamped():
    """ke beyond the last key names keys that do not exist: HISA selects as with ke = N, as the flat
    indexer's logits (which have N columns) do."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(40, 2, 16, generator=g).to(DEVICE), torch.randn(40, 16, generator=g).to(DEVICE)
    weights = torch.rand(40, 2, generator=g).to(DEVICE)
    ks = torch.zeros(40, dtype=torch.int32, device=DEVICE)
    past = hisa_indexer(q, k, weights, ks, ks + 1000, topk=8, block_size=8, block_topk=2)
    at_end = hisa_indexer(q, k, weights, ks, ks + 40, topk=8, block_size=8, block_topk=2)
    assert torch.equal(past, at_end)
    # int64 bounds past int32 mean the same (they are clamped, not wrapped, on their way to int32).
    far = ks.long() + 2**32 + 5
    assert torch.equal(hisa_indexer(q, k, weights, ks.long(), far, topk=8, block_size=8, block_topk=2), at_end)
    flat = dsa_indexer_logits(q, k, weights, ks.long(), far)
    assert torch.equal(flat, dsa_indexer_logits(q, k, weights, ks, ks + 40))
