"""sparse_attn.testing: each planted structure must really show up in dense softmax attention.

Thresholds are set so plain Gaussian q/k fail them (test_gaussian_inputs_fail_the_checks), and the
structured inputs pass with margin (measured values in comments are for the default seed).
"""

import math
import re

import pytest
import torch

from sparse_attn.testing import RetrievalSpan, StructuredInputs, apply_rope, structured_qkv

SEQ, DIM, HQ, HKV, WINDOW = 2048, 64, 4, 2, 64


def dense_probs(q, k, kv_of_head=None):
    """Causal softmax(q k^T / sqrt(D)) in float64, bottom-right aligned, shape (B, Hq, Sq, S)."""
    q, k = q.double(), k.double()
    hq, hkv = q.shape[1], k.shape[1]
    if kv_of_head is None:
        kv_of_head = torch.arange(hq) // (hq // hkv)
    k = k[:, kv_of_head]
    sq, s = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    rows = torch.arange(sq)[:, None] + (s - sq)  # each query's key position
    scores = scores.masked_fill(torch.arange(s)[None, :] > rows, float("-inf"))
    return scores.softmax(dim=-1)


def late_rows(p):
    """Key positions of the queries in the second half of the key sequence, and their row ids."""
    sq, s = p.shape[-2], p.shape[-1]
    pos = torch.arange(sq) + (s - sq)
    keep = pos >= s // 2
    return pos[keep], torch.nonzero(keep).flatten()


def sink_mass(p, num_sinks=4):
    return p[..., :num_sinks].sum(-1).mean().item()


def local_ratio(p, window):
    """Mass on keys [t - window, t] over that window's share of the visible keys, late queries."""
    pos, rows = late_rows(p)
    dist = pos[:, None] - torch.arange(p.shape[-1])[None, :]
    in_window = (dist >= 0) & (dist <= window)
    mass = (p[..., rows, :] * in_window).sum(-1).mean()
    share = (in_window.sum(-1).double() / (pos + 1)).mean()
    return (mass / share).item(), mass.item()


def heavy_ratio(p, heavy):
    """Mass of late queries on the visible heavy hitters over what uniform attention would give."""
    hq, hkv = p.shape[1], heavy.shape[1]
    pos, rows = late_rows(p)
    got = want = 0.0
    for b in range(p.shape[0]):
        for h in range(hq):
            cols = heavy[b, h // (hq // hkv)].cpu()
            visible = (pos[:, None] >= cols[None, :]).double()
            got += (p[b, h][rows][:, cols] * visible).sum().item()
            want += (visible / (pos[:, None] + 1)).sum().item()
    return got / want, got / (p.shape[0] * hq * len(rows))


def span_mass(p, span, group):
    heads = slice(span.kv_head * group, (span.kv_head + 1) * group)
    block = p[span.batch, heads, span.q_start : span.q_end, span.k_start : span.k_end]
    return block.sum(-1).mean().item()


def span_ratio(p, span, group):
    """span_mass over the span's share of the keys its queries see."""
    pos = torch.arange(span.q_start, span.q_end) + (p.shape[-1] - p.shape[-2])
    share = ((span.k_end - span.k_start) / (pos + 1.0)).mean().item()
    return span_mass(p, span, group) / share


@pytest.fixture(scope="module")
def default_case():
    x = structured_qkv(1, HQ, HKV, SEQ, DIM, seed=0)
    return x, dense_probs(x.q, x.k)


# ------------------------------------------------------------------------------------ structure
def test_shapes_and_metadata(default_case):
    x, _ = default_case
    assert isinstance(x, StructuredInputs)
    assert x.q.shape == (1, HQ, SEQ, DIM) and x.k.shape == x.v.shape == (1, HKV, SEQ, DIM)
    assert x.sink_positions == [0, 1, 2, 3]
    assert x.heavy_hitters.dtype == torch.int64 and x.heavy_hitters.shape == (1, HKV, 8)
    for row in x.heavy_hitters.reshape(-1, 8):
        assert torch.all(row[1:] > row[:-1]) and row[0] >= 4 and row[-1] < SEQ  # sorted, distinct
    assert len(x.retrieval_spans) == 2
    assert {(s.batch, s.kv_head) for s in x.retrieval_spans} == {(0, 0), (0, 1)}  # spread out
    for s in x.retrieval_spans:
        assert isinstance(s, RetrievalSpan)
        assert s.q_end - s.q_start == 32 and s.k_end - s.k_start == 32
        assert 4 <= s.k_start and s.k_end + 2 * WINDOW <= s.q_start and s.q_end <= SEQ


def test_sinks_draw_a_large_share(default_case):
    _, p = default_case
    assert sink_mass(p) > 0.25  # measured ~0.37 (Gaussian: ~0.01)
    _, rows = late_rows(p)
    assert p[..., rows, :4].sum(-1).mean() > 0.2  # still there for late queries (~0.31)


def test_local_window_carries_far_more_than_its_share(default_case):
    _, p = default_case
    ratio, mass = local_ratio(p, WINDOW)
    assert ratio > 3.0 and mass > 0.15  # measured ~6.4x, ~0.28 (Gaussian: ~1x)


def test_heavy_hitters_are_vertical_lines(default_case):
    x, p = default_case
    ratio, mass = heavy_ratio(p, x.heavy_hitters)
    assert ratio > 10.0 and mass > 0.1  # measured ~39x, ~0.19 (Gaussian: ~1x)


def test_retrieval_queries_find_their_span(default_case):
    x, p = default_case
    masses = [span_mass(p, s, HQ // HKV) for s in x.retrieval_spans]
    assert min(masses) > 0.3 and sum(masses) / len(masses) > 0.5  # measured ~0.47, ~0.66
    assert min(span_ratio(p, s, HQ // HKV) for s in x.retrieval_spans) > 3.0  # ~5x, ~29x


def test_gaussian_inputs_fail_the_checks(default_case):
    x, _ = default_case
    g = torch.Generator().manual_seed(0)
    q = torch.randn(x.q.shape, generator=g)
    k = torch.randn(x.k.shape, generator=g)
    p = dense_probs(q, k)
    assert sink_mass(p) < 0.1
    assert local_ratio(p, WINDOW)[0] < 1.5
    assert heavy_ratio(p, x.heavy_hitters)[0] < 2.0
    assert max(span_mass(p, s, HQ // HKV) for s in x.retrieval_spans) < 0.3
    assert max(span_ratio(p, s, HQ // HKV) for s in x.retrieval_spans) < 2.0


def test_structure_holds_across_seeds_and_shapes():
    for seed, (b, hq, hkv, s, d) in enumerate([(2, 2, 1, 1024, 32), (1, 6, 3, 1024, 128)]):
        x = structured_qkv(b, hq, hkv, s, d, seed=seed + 7)
        p = dense_probs(x.q, x.k)
        assert sink_mass(p) > 0.25
        assert local_ratio(p, WINDOW)[0] > 2.5  # the window is 1/8 of the keys here
        assert heavy_ratio(p, x.heavy_hitters)[0] > 10.0
        masses = [span_mass(p, sp, hq // hkv) for sp in x.retrieval_spans]
        assert min(masses) > 0.3 and sum(masses) / len(masses) > 0.5


@pytest.mark.parametrize(
    "switch",
    ["num_sinks", "local_window", "num_heavy_hitters", "num_retrieval_spans", "strength"],
)
def test_each_structure_switches_off(switch):
    x = structured_qkv(1, 2, 1, 1024, 64, seed=3, **{switch: 0})
    p = dense_probs(x.q, x.k)
    if switch in ("num_sinks", "strength"):
        assert sink_mass(p) < 0.1
        assert x.sink_positions == ([] if switch == "num_sinks" else [0, 1, 2, 3])
    if switch in ("local_window", "strength"):
        assert local_ratio(p, WINDOW)[0] < 1.5
    if switch == "num_heavy_hitters":
        assert x.heavy_hitters.shape == (1, 1, 0)
    if switch == "num_retrieval_spans":
        assert x.retrieval_spans == []
    if switch == "strength":
        assert heavy_ratio(p, x.heavy_hitters)[0] < 2.0
        assert max(span_ratio(p, s, 2) for s in x.retrieval_spans) < 2.0
    else:  # the others stay
        if switch != "num_sinks":
            assert sink_mass(p) > 0.25
        if switch != "local_window":
            assert local_ratio(p, WINDOW)[0] > 2.5


def test_without_rope_the_structure_remains():
    x = structured_qkv(1, 2, 1, 1024, 64, seed=1, rope=False)
    y = structured_qkv(1, 2, 1, 1024, 64, seed=1)
    assert not torch.equal(x.k, y.k)
    p = dense_probs(x.q, x.k)
    # Without RoPE's decorrelation the latent's window is wider and takes some of the sinks' mass.
    assert sink_mass(p) > 0.2 and local_ratio(p, WINDOW)[0] > 2.5
    assert min(span_mass(p, s, 2) for s in x.retrieval_spans) > 0.3


def test_stronger_strength_concentrates_more():
    masses = []
    for strength in (0.5, 1.0, 1.5):
        x = structured_qkv(1, 2, 1, 1024, 64, seed=2, strength=strength)
        masses.append(sink_mass(dense_probs(x.q, x.k)))
    assert masses[0] < masses[1] < masses[2]


# -------------------------------------------------------------------------------- GQA, shapes
def test_gqa_head_mapping():
    hq, hkv = 6, 3
    x = structured_qkv(1, hq, hkv, 1024, 64, seed=4, num_retrieval_spans=3)
    right = dense_probs(x.q, x.k)  # head h reads kv head h // 2
    per_head = right[..., :4].sum(-1).mean(dim=(0, 2))
    assert torch.all(per_head > 0.2), per_head
    # The latent behind the local window is per kv head: with the interleaved (h % Hkv)
    # convention, heads 1..4 read a foreign kv head and their window disappears.
    wrong = dense_probs(x.q, x.k, kv_of_head=torch.arange(hq) % hkv)
    for h in range(hq):
        ratio = local_ratio(right[:, h : h + 1], WINDOW)[0]
        assert ratio > 2.5  # measured 3.5x-4.8x
        if 1 <= h <= 4:
            assert local_ratio(wrong[:, h : h + 1], WINDOW)[0] < min(2.0, 0.5 * ratio)  # <= 1.3x
    assert {s.kv_head for s in x.retrieval_spans} == {0, 1, 2}
    for s in x.retrieval_spans:
        for h in range(hq):
            mass = right[s.batch, h, s.q_start : s.q_end, s.k_start : s.k_end].sum(-1).mean()
            if h // 2 == s.kv_head:
                assert mass > 0.3
            else:  # other groups' queries were not planted there
                assert mass < 0.1


def test_seq_len_q_is_bottom_right_aligned():
    s, sq = 1024, 128
    short = structured_qkv(1, 4, 2, s, 64, seq_len_q=sq, seed=5)
    assert short.q.shape == (1, 4, sq, 64) and short.k.shape == (1, 2, s, 64)
    for sp in short.retrieval_spans:
        assert 0 <= sp.q_start < sp.q_end <= sq
        assert sp.k_end + 2 * WINDOW <= sp.q_start + (s - sq)
    p = dense_probs(short.q, short.k)
    assert sink_mass(p) > 0.2  # only late queries here, which see the most background keys
    assert local_ratio(p, WINDOW)[0] > 2.0  # measured ~3.0x
    assert min(span_mass(p, sp, 2) for sp in short.retrieval_spans) > 0.3
    # RoPE used the queries' true positions: rotating them back to 0..sq-1 breaks the window.
    misplaced = apply_rope(short.q, torch.full((sq,), -(s - sq)))
    assert local_ratio(dense_probs(misplaced, short.k), WINDOW)[0] < 0.5 * local_ratio(p, WINDOW)[0]
    # Keys and values do not depend on seq_len_q (spans aside, which must sit among the queries).
    a = structured_qkv(1, 4, 2, s, 64, seq_len_q=sq, seed=5, num_retrieval_spans=0)
    b = structured_qkv(1, 4, 2, s, 64, seed=5, num_retrieval_spans=0)
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert torch.equal(a.heavy_hitters, b.heavy_hitters)


def test_single_query_decode_shape():
    x = structured_qkv(1, 4, 2, 512, 64, seq_len_q=1, num_retrieval_spans=0, seed=0)
    assert x.q.shape == (1, 4, 1, 64)
    assert sink_mass(dense_probs(x.q, x.k)) > 0.2
    with pytest.raises(ValueError, match="num_retrieval_spans"):
        structured_qkv(1, 4, 2, 512, 64, seq_len_q=1)  # no room for a 32-query span


# ------------------------------------------------------------------- determinism, dtype, device
def test_same_seed_same_tensors_different_seed_different():
    a = structured_qkv(2, 4, 2, 512, 32, seed=11)
    b = structured_qkv(2, 4, 2, 512, 32, seed=11)
    c = structured_qkv(2, 4, 2, 512, 32, seed=12)
    for name in ("q", "k", "v", "heavy_hitters"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.retrieval_spans == b.retrieval_spans
    for name in ("q", "k", "v"):
        assert not torch.equal(getattr(a, name), getattr(c, name))
    assert not torch.equal(a.heavy_hitters, c.heavy_hitters)
    # The generator is local: the global RNG state neither matters nor moves.
    torch.manual_seed(123)
    state = torch.get_rng_state()
    d = structured_qkv(2, 4, 2, 512, 32, seed=11)
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(a.q, d.q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_a_cast_of_float32(dtype):
    ref = structured_qkv(1, 2, 1, 512, 64, seed=6)
    x = structured_qkv(1, 2, 1, 512, 64, seed=6, dtype=dtype, device=torch.device("cpu"))
    for name in ("q", "k", "v"):
        t = getattr(x, name)
        assert t.dtype == dtype and t.device.type == "cpu"
        assert torch.equal(t, getattr(ref, name).to(dtype))
    assert x.heavy_hitters.dtype == torch.int64


def test_values_stay_moderate_for_float16():
    x = structured_qkv(1, 2, 1, 8192, 128, seed=8, dtype=torch.float16, num_retrieval_spans=4)
    for t in (x.q, x.k, x.v):
        assert torch.isfinite(t).all() and t.abs().max() < 50


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device_matches_cpu():
    ref = structured_qkv(1, 2, 1, 512, 64, seed=9)
    x = structured_qkv(1, 2, 1, 512, 64, seed=9, device="cuda", dtype=torch.bfloat16)
    assert x.q.is_cuda and x.heavy_hitters.is_cuda
    assert torch.equal(x.q.cpu(), ref.q.to(torch.bfloat16))


# ---------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        ({"num_q_heads": 3, "num_kv_heads": 2}, ValueError, "num_q_heads"),
        ({"head_dim": 63}, ValueError, "head_dim"),
        ({"head_dim": 0}, ValueError, "head_dim"),
        ({"batch": 0}, ValueError, "batch"),
        ({"batch": True}, TypeError, "batch"),
        ({"num_kv_heads": 0}, ValueError, "num_kv_heads"),
        ({"seq_len": -1}, ValueError, "seq_len"),
        ({"seq_len": 2048.0}, TypeError, "seq_len"),
        ({"seq_len_q": 0}, ValueError, "seq_len_q"),
        ({"seq_len_q": 4096}, ValueError, "seq_len_q"),
        ({"dtype": torch.int32}, ValueError, "dtype"),
        ({"dtype": "float32"}, TypeError, "dtype"),
        ({"device": 3}, TypeError, "device"),
        ({"device": "not-a-device"}, ValueError, "device"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"seed": "0"}, TypeError, "seed"),
        ({"seed": 2**70}, ValueError, "seed"),
        ({"rope": 1}, TypeError, "rope"),
        ({"rope_base": 0.5}, ValueError, "rope_base"),
        ({"num_sinks": -1}, ValueError, "num_sinks"),
        ({"num_sinks": 4096}, ValueError, "num_sinks"),
        ({"local_window": -1}, ValueError, "local_window"),
        ({"num_heavy_hitters": -1}, ValueError, "num_heavy_hitters"),
        ({"num_heavy_hitters": 2045}, ValueError, "num_heavy_hitters"),
        ({"num_retrieval_spans": -1}, ValueError, "num_retrieval_spans"),
        ({"retrieval_span_len": 0}, ValueError, "retrieval_span_len"),
        ({"retrieval_span_len": 1024}, ValueError, "retrieval_span_len"),
        ({"strength": -1.0}, ValueError, "strength"),
        ({"strength": float("nan")}, ValueError, "strength"),
        ({"strength": "1"}, TypeError, "strength"),
    ],
)
def test_bad_arguments(kwargs, exc, name):
    args = {"batch": 1, "num_q_heads": 4, "num_kv_heads": 2, "seq_len": 2048, "head_dim": 64}
    args.update(kwargs)
    pos = [args.pop(n) for n in ("batch", "num_q_heads", "num_kv_heads", "seq_len", "head_dim")]
    with pytest.raises(exc, match=re.escape(name)):
        structured_qkv(*pos, **args)


def test_too_many_spans_for_one_head():
    with pytest.raises(ValueError, match="num_retrieval_spans"):
        structured_qkv(1, 1, 1, 512, 64, num_retrieval_spans=40)


# ----------------------------------------------------------------------------------- apply_rope
def test_apply_rope_rotates_pairs_by_position_times_frequency():
    d, base = 8, 10000.0
    x = torch.zeros(1, 1, 3, d)
    x[..., 1] = 1.0  # pair (1, 1 + d/2), frequency base ** (-2/d)
    pos = torch.tensor([0, 5, 1000])
    out = apply_rope(x, pos, base)
    angle = pos.double() * base ** (-2 / d)
    torch.testing.assert_close(out[0, 0, :, 1].double(), angle.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 0, :, 1 + d // 2].double(), angle.sin(), atol=1e-6, rtol=0)
    others = [i for i in range(d) if i not in (1, 1 + d // 2)]
    assert torch.all(out[..., others] == 0)


def test_apply_rope_is_relative_and_norm_preserving():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 16, 32, generator=g)
    k = torch.randn(2, 3, 16, 32, generator=g)
    pos = torch.arange(16)
    scores = apply_rope(q, pos) @ apply_rope(k, pos).transpose(-1, -2)
    shifted = apply_rope(q, pos + 777) @ apply_rope(k, pos + 777).transpose(-1, -2)
    torch.testing.assert_close(scores, shifted, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(apply_rope(q, pos).norm(dim=-1), q.norm(dim=-1))
    assert torch.equal(apply_rope(q, torch.zeros(16, dtype=torch.long)), q)
    # (B, S) positions: one row per batch entry.
    per_batch = torch.stack([pos, pos + 3])
    out = apply_rope(q, per_batch)
    torch.testing.assert_close(out[1:], apply_rope(q[1:], pos + 3))
    assert apply_rope(q.half(), pos).dtype == torch.float16


def test_apply_rope_rejects_bad_shapes():
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.zeros(1, 1, 4, 7), torch.arange(4))
    with pytest.raises(ValueError, match="positions"):
        apply_rope(torch.zeros(1, 1, 4, 8), torch.arange(5))
    with pytest.raises(ValueError, match="B, H, S, D"):
        apply_rope(torch.zeros(4, 8), torch.arange(4))
