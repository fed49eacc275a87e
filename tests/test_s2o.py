"""S2O: spec shared/specs/s2o.md section 5 (test properties 1-8).

Each backend (the Triton kernels, under the interpreter on the CPU; the PyTorch path) is held to
FlashAttention's rule against float64 oracles: dense causal attention at tau = 0 whatever the plan, and
dense attention over the processed set the call reports (`s2o_reference`) at tau > 0, forward and
backward, with GQA, a chunk of prefill (Sq < Skv), a ragged last segment and batch > 1.
"""

import math

import pytest
import torch

from sparse_attn import reference
from sparse_attn.engine import triton_available
from sparse_attn.methods.s2o import S2OPlan, s2o_attention, s2o_plan, s2o_processed_mask, s2o_reference
from sparse_attn.testing import assert_flash_rule, assert_flash_rule_with_grads, structured_qkv

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not triton_available(DEVICE), reason="triton is not installed")


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    if request.param == "triton" and not triton_available(DEVICE):
        pytest.skip("triton is not installed")
    return request.param


CASES = {
    # name: (batch, hq, hkv, seq_q, seq_kv, dim, segment_len, block_m, block_n)
    "gqa_chunk_ragged": (2, 4, 2, 100, 140, 32, 32, 16, 16),
    "mha_prefill": (1, 2, 2, 90, 90, 16, 32, 16, 16),
    "mqa_odd_dim": (1, 4, 1, 70, 81, 24, 32, 32, 16),
}


def make_qkv(rng, case, dtype, structured=False):
    """Gaussian q, k, v of a case; `structured`: sinks, local windows and heavy hitters (testing.structured_qkv),
    where the stop rule fires at a moderate tau."""
    batch, hq, hkv, seq_q, seq_kv, dim = CASES[case][:6]
    if structured:
        seed = int(torch.randint(1 << 30, (1,), generator=rng))
        inputs = structured_qkv(batch, hq, hkv, seq_kv, dim, seq_len_q=seq_q, seed=seed, num_retrieval_spans=0,
                                local_window=16, num_heavy_hitters=4)  # fmt: skip
        return tuple(t.to(DEVICE, dtype).requires_grad_() for t in (inputs.q, inputs.k, inputs.v))

    def draw(*shape):
        return torch.randn(*shape, generator=rng).to(DEVICE, dtype).requires_grad_()

    return draw(batch, hq, seq_q, dim), draw(batch, hkv, seq_kv, dim), draw(batch, hkv, seq_kv, dim)


def options(case, **extra):
    segment_len, block_m, block_n = CASES[case][6:]
    return dict(segment_len=segment_len, block_m=block_m, block_n=block_n, **extra)


def random_plan(rng, q, k, segment_len) -> S2OPlan:
    """Arbitrary loading orders: every pi_g and sigma_g a random permutation."""
    bare = S2OPlan(torch.zeros(0), torch.zeros(q.shape[:3]), segment_len, k.shape[2])

    def perms(heads, size, lo=0):
        rows = [torch.randperm(size, generator=rng) + lo for _ in range(q.shape[0] * heads)]
        return torch.stack(rows).view(q.shape[0], heads, size)

    keys = [perms(k.shape[1], bare.history_len(g)) for g in range(bare.num_segments)]
    rows = [bare.rows(g) for g in range(bare.num_segments)]
    queries = [perms(q.shape[1], len(r), r.start) for r in rows]
    key_order = torch.cat(keys, dim=-1).to(DEVICE, torch.int32)
    return S2OPlan(key_order, torch.cat(queries, dim=-1).to(DEVICE, torch.int32), segment_len, k.shape[2])


def dense_causal(q, k, v, compute_dtype=torch.float64):
    allowed = reference.causal_token_mask(q.shape[2], k.shape[2], q.device)
    return reference.masked_attention(q, k, v, allowed, compute_dtype=compute_dtype)[0]


# ---------------------------------------------------------------------------------- properties 1, 5
@pytest.mark.parametrize("plan_kind", ["computed", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_tau_zero_is_dense_causal(rng, backend, case, dtype, plan_kind, monkeypatch):
    monkeypatch.setenv("SPARSE_ATTN_POISON_OUTPUTS", "1")
    q, k, v = make_qkv(rng, case, dtype)
    plan = random_plan(rng, q, k, CASES[case][6]) if plan_kind == "random" else None
    out, stats = s2o_attention(q, k, v, tau=0.0, plan=plan, return_stats=True, backend=backend, **options(case))
    assert out.shape == q.shape and out.dtype == dtype
    assert stats.density.item() == pytest.approx(1.0)
    assert_flash_rule_with_grads(out, dense_causal(q, k, v), dense_causal(q, k, v, dtype), (q, k, v), rng)


def test_output_does_not_depend_on_the_query_order_at_tau_zero(rng, backend):
    q, k, v = make_qkv(rng, "gqa_chunk_ragged", torch.float32)
    outs = [
        s2o_attention(q, k, v, tau=0.0, plan=random_plan(rng, q, k, 32), backend=backend, **options("gqa_chunk_ragged"))
        for _ in range(2)
    ]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=2e-6)


def stop_rule_oracle(q, k, plan, block_m, block_n, tau, stop_rule):
    """n_blocks [B, Hq, segments, tiles] from spec 4.2 written out in float64, one tile at a time, and per
    tile the statistic at its deciding block (its distance from tau says whether rounding may flip it).
    Tiles past a segment's rows keep -1 (no decision)."""
    batch, num_q_heads, _, dim = q.shape
    group, tiles = num_q_heads // k.shape[1], plan.segment_len // block_m
    q64, k64 = q.detach().double() / dim**0.5, k.detach().double()
    n_blocks = torch.full((batch, num_q_heads, plan.num_segments, tiles), -1, dtype=torch.long)
    margin = torch.full(n_blocks.shape, float("inf"), dtype=torch.float64)
    for b in range(batch):
        for h in range(num_q_heads):
            for g in range(plan.num_segments):
                order, history = plan.queries(g)[b, h].long().cpu(), plan.history_len(g)
                pi = plan.keys(g)[b, h // group].long().cpu()
                for t in range(-(-len(order) // block_m)):
                    rows = order[t * block_m : (t + 1) * block_m]
                    absolute = rows + plan.seq_offset
                    logits_all = q64[b, h, rows] @ k64[b, h // group].T  # [rows, Skv]
                    peak = logits_all.max(dim=-1, keepdim=True).values
                    own = torch.arange(k.shape[2])
                    local = (own >= history) & (own[None, :] <= absolute[:, None])
                    mass = torch.where(local, (logits_all - peak).exp(), 0).sum(-1)
                    processed = 0
                    for start in range(0, history, block_n):
                        block = pi[start : start + block_n]
                        delta = (logits_all[:, block] - peak).exp().sum(-1)
                        mass = mass + delta
                        ratio = delta / mass
                        statistic = ratio.max() if stop_rule == "max" else ratio.mean()
                        processed += 1
                        margin[b, h, g, t] = min(margin[b, h, g, t], abs(float(statistic) - tau))
                        if statistic < tau:
                            break
                    n_blocks[b, h, g, t] = processed
    return n_blocks, margin


@pytest.mark.parametrize("stop_rule", ["max", "mean"])
@pytest.mark.parametrize("case", ["gqa_chunk_ragged", "mqa_odd_dim"])
def test_stop_decisions_follow_the_rule_written_out(rng, backend, case, stop_rule):
    """Property 2's other half: the processed block counts themselves, against the stop rule recomputed in
    float64 from the plan alone (not from the counts the call reports); a tile may differ only where its
    statistic lies within rounding of tau."""
    q, k, v = make_qkv(rng, case, torch.float32, structured=True)
    opts = options(case, stop_rule=stop_rule)
    for tau in (0.05, 0.3):
        _, stats = s2o_attention(q, k, v, tau=tau, return_stats=True, backend=backend, **opts)
        expected, margin = stop_rule_oracle(q, k, stats.plan, opts["block_m"], opts["block_n"], tau, stop_rule)
        decided = expected >= 0
        got = stats.n_blocks.long().cpu()
        assert 0 < int((expected[decided] < expected[decided].max()).sum()), "the rule never stopped early"
        differs = decided & (got != expected)
        assert bool((margin[differs] < 1e-4).all()), f"tau={tau}: {int(differs.sum())} tiles decided otherwise"


# ---------------------------------------------------------------------------------- property 2
@pytest.mark.parametrize("stop_rule", ["max", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_reference_over_its_processed_set(rng, backend, case, dtype, stop_rule, monkeypatch):
    monkeypatch.setenv("SPARSE_ATTN_POISON_OUTPUTS", "1")
    q, k, v = make_qkv(rng, case, dtype, structured=True)
    opts = options(case, stop_rule=stop_rule)
    out, stats = s2o_attention(q, k, v, tau=0.3, return_stats=True, backend=backend, **opts)
    assert 0.0 < stats.density.item() < 1.0  # the rule fired somewhere, and not everywhere
    blocks = dict(block_m=opts["block_m"], block_n=opts["block_n"])
    ref, _ = s2o_reference(q, k, v, stats.plan, stats.n_blocks, **blocks)
    same, _ = s2o_reference(q, k, v, stats.plan, stats.n_blocks, compute_dtype=dtype, **blocks)
    assert_flash_rule_with_grads(out, ref, same, (q, k, v), rng)


@needs_triton
def test_kernels_in_parts_of_a_tile(rng, monkeypatch):
    """A forward step may take part of a pi block (the block's gain then sums over its steps) and a
    backward program part of a tile's rows and of a block's keys (wide heads)."""
    from sparse_attn.kernels import s2o_attn

    monkeypatch.setitem(s2o_attn.FORWARD_STEP_ELEMENTS, 4, 32 * 16 * 32)
    monkeypatch.setitem(s2o_attn.BACKWARD_STEP_ELEMENTS, 4, 16 * 16 * 32)
    q, k, v = make_qkv(rng, "gqa_chunk_ragged", torch.float32, structured=True)
    assert s2o_attn._forward_tiles(q, 32, 32)["SUB_N"] == 16 and s2o_attn._backward_tiles(q, 32, 32)["SUB_M"] == 16
    opts = dict(segment_len=64, block_m=32, block_n=32, tau=0.1)
    out, stats = s2o_attention(q, k, v, return_stats=True, backend="triton", **opts)
    _, torch_stats = s2o_attention(q, k, v, return_stats=True, backend="torch", **opts)
    assert (stats.n_blocks == torch_stats.n_blocks).float().mean().item() >= 0.98
    assert stats.density.item() < 1.0
    ref, _ = s2o_reference(q, k, v, stats.plan, stats.n_blocks, block_m=32, block_n=32)
    same, _ = s2o_reference(q, k, v, stats.plan, stats.n_blocks, block_m=32, block_n=32, compute_dtype=torch.float32)
    assert_flash_rule_with_grads(out, ref, same, (q, k, v), rng)


@needs_triton
@pytest.mark.parametrize("stop_rule", ["max", "mean"])
def test_backends_make_the_same_stop_decisions(rng, stop_rule):
    """The kernel's running-max ratios and the PyTorch path's float64 ones agree (up to rare ties at tau)."""
    q, k, v = make_qkv(rng, "gqa_chunk_ragged", torch.float32, structured=True)
    runs = [
        s2o_attention(
            q, k, v, tau=0.1, stop_rule=stop_rule, return_stats=True, backend=backend, **options("gqa_chunk_ragged")
        )[1]  # fmt: skip
        for backend in ("triton", "torch")
    ]
    agree = (runs[0].n_blocks == runs[1].n_blocks).float().mean().item()
    assert agree >= 0.98, f"stop decisions agree on {agree:.1%} of the tiles"


def test_stop_ratio_of_a_block_far_above_the_rest(backend):
    """A pi block whose logit is 1000 above every other: its ratio is near 1 and later blocks' near 0, at
    any reference max. With one max over all of them, exp underflows to 0/0 and the tile would never stop."""
    dim, seq, segment = 16, 64, 32
    q = torch.zeros(1, 1, seq, dim)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, seq, dim)
    k[0, 0, :, 0] = torch.linspace(-1, 1, seq)
    k[0, 0, 20, 0] = 4000.0  # logit 1000 (scale 1/4), in pi block 1 of segment 1's history
    v = torch.randn(1, 1, seq, dim, generator=torch.Generator().manual_seed(0))
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    orders = (torch.arange(n, dtype=torch.int32, device=DEVICE).view(1, 1, -1) for n in (segment, seq))
    identity = S2OPlan(*orders, segment, seq)  # pi_1 and sigma the identity: pi block 0 is keys 0..15
    _, stats = s2o_attention(
        q, k, v, segment_len=segment, block_m=16, block_n=16, tau=0.5, plan=identity, return_stats=True,
        backend=backend,
    )  # fmt: skip
    # Block 0 (keys 0..15) holds under half of local + block 0 mass for rows 48..63: their tile stops there.
    assert stats.n_blocks[0, 0, 1].tolist() == [2, 1]


# ---------------------------------------------------------------------------------- properties 3, 4
def test_monotone_in_tau(rng, backend):
    q, k, v = make_qkv(rng, "gqa_chunk_ragged", torch.float32, structured=True)
    plan = s2o_plan(q, k, segment_len=32, block_n=16)
    previous = None
    for tau in (0.0, 1e-2, 1e-1, 1.0):
        _, stats = s2o_attention(q, k, v, tau=tau, plan=plan, return_stats=True, backend=backend,
                                 **options("gqa_chunk_ragged"))  # fmt: skip
        _, mean_stats = s2o_attention(q, k, v, tau=tau, plan=plan, stop_rule="mean", return_stats=True,
                                      backend=backend, **options("gqa_chunk_ragged"))  # fmt: skip
        assert bool((mean_stats.n_blocks <= stats.n_blocks).all())  # mean <= max: it stops no later
        if previous is not None:
            assert bool((stats.n_blocks <= previous.n_blocks).all())
            assert stats.density.item() <= previous.density.item()
        previous = stats
    # tau = 1 keeps only the first block (the ratio is < 1); the last segment has one tile.
    last = previous.n_blocks[:, :, -1]
    assert bool((previous.n_blocks[:, :, :-1] == 1).all() & (last[..., 0] == 1).all() & (last[..., 1] == 0).all())


def test_tau_one_stops_after_the_first_block_with_peaked_logits(rng, backend):
    """A block far above a row's local logits makes its fp32 gain ratio round to exactly 1; the exact ratio
    is below 1 (the row's own key is in l), so tau = 1 still stops every tile after one block."""
    q = 8 * torch.randn(8, 1, 48, 16, generator=rng).to(DEVICE)
    k, v = (torch.randn(8, 1, 48, 16, generator=rng).to(DEVICE) for _ in "kv")
    _, stats = s2o_attention(q, k, v, tau=1.0, return_stats=True, backend=backend, segment_len=32, block_m=16,
                             block_n=16)  # fmt: skip
    assert bool((stats.n_blocks[:, :, 1, 0] == 1).all())  # segment 1: one tile of 16 rows
    # One history key 100 nats above segment 1's own logits: the ratio rounds to 1 in fp64 too.
    q, k = torch.zeros(1, 1, 64, 16, device=DEVICE), torch.randn(1, 1, 64, 16, generator=rng).to(DEVICE)
    q[..., 32:, 0], k[..., 3, :], k[..., 32:, 0] = 20.0, 0.0, -1.0
    k[..., 3, 0] = 20.0
    _, stats = s2o_attention(q, k, k, tau=1.0, return_stats=True, backend=backend, segment_len=32, block_m=16,
                             block_n=16)  # fmt: skip
    assert stats.n_blocks[0, 0, 1].tolist() == [1, 1]


def test_error_bound_from_the_skipped_mass(rng, backend):
    """||o - o_dense|| <= 2 R / (l + R) max ||v_j||, R / (l + R) the dense probability mass skipped."""
    q, k, v = make_qkv(rng, "gqa_chunk_ragged", torch.float32, structured=True)
    out, stats = s2o_attention(q, k, v, tau=0.1, return_stats=True, backend=backend, **options("gqa_chunk_ragged"))
    causal = reference.causal_token_mask(q.shape[2], k.shape[2], q.device)
    group = q.shape[1] // k.shape[1]
    logits = q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2) / q.shape[-1] ** 0.5
    probs, _ = reference.masked_softmax(logits, causal)
    processed = s2o_processed_mask(stats.plan, stats.n_blocks, block_m=16, block_n=16)
    picked = torch.tensor([0, 5, 31, 32, 70, 99], device=DEVICE)
    subset = s2o_processed_mask(stats.plan, stats.n_blocks, block_m=16, block_n=16, rows=picked)
    assert torch.equal(subset, processed[:, :, picked])
    skipped = (probs * ~processed).sum(-1)
    assert float(skipped.detach().max()) > 1e-3  # the bound is exercised
    err = (out.double() - dense_causal(q, k, v)).norm(dim=-1)
    bound = 2 * skipped * v.double().norm(dim=-1).amax(-1).repeat_interleave(group, 1)[..., None]
    assert bool((err <= bound + 1e-5).all())


# ---------------------------------------------------------------------------------- property 7
def test_plan_orders(rng):
    """pi_g sorts the history by its score against the segment's mean query (GQA group shared, one pi per
    KV head) and sigma_g the segment's rows by q . u_g, both permutations, stable."""
    q, k, _ = make_qkv(rng, "gqa_chunk_ragged", torch.float32)
    q, k = q.detach(), k.detach()
    plan = s2o_plan(q, k, segment_len=32, block_n=16)
    assert plan.key_order.shape == (2, 2, sum(plan.history_len(g) for g in range(plan.num_segments)))
    assert plan.query_order.shape == q.shape[:3] and plan.num_segments == 4
    group = q.shape[1] // k.shape[1]
    for g in range(plan.num_segments):
        rows, history = plan.rows(g), plan.history_len(g)
        pi, sigma = plan.keys(g).long(), plan.queries(g).long()
        assert torch.equal(pi.sort(-1).values, torch.arange(history, device=DEVICE).expand_as(pi))
        assert torch.equal(sigma.sort(-1).values, torch.arange(rows.start, rows.stop, device=DEVICE).expand_as(sigma))
        mean_q = q[:, :, rows.start : rows.stop].double().unflatten(1, (-1, group)).mean((2, 3))
        key_scores = (k.double()[:, :, :history] @ mean_q[..., None])[..., 0].gather(2, pi)
        assert bool((key_scores[..., 1:] <= key_scores[..., :-1] + 1e-5).all())
        guide = k.double().gather(2, pi[..., :16, None].expand(-1, -1, -1, k.shape[-1])).mean(2)
        row_scores = (q.double() @ guide.repeat_interleave(group, 1)[..., None])[..., 0].gather(2, sigma)
        assert bool((row_scores[..., 1:] <= row_scores[..., :-1] + 1e-5).all())


@pytest.mark.parametrize("case", ["gqa_chunk_ragged", "mqa_odd_dim"])
def test_keep_frac_walks_the_top_keys_of_each_history(rng, backend, case, monkeypatch):
    """Spec 4.1's option: pi_g names only the top ceil(keep_frac * s_g) keys of the history by their score
    against the segment's mean query (a partial top-k, descending), then -1. At tau = 0 each row attends
    to its segment's keys up to itself and exactly those; the counts and the density follow."""
    monkeypatch.setenv("SPARSE_ATTN_POISON_OUTPUTS", "1")
    batch, hq, hkv, seq_q, seq_kv, dim, _, _, block_n = CASES[case]
    q, k, v = make_qkv(rng, case, torch.float32)
    out, stats = s2o_attention(q, k, v, tau=0.0, keep_frac=0.3, return_stats=True, backend=backend, **options(case))
    plan, group = stats.plan, hq // hkv
    allowed = reference.causal_token_mask(seq_q, seq_kv, DEVICE).expand(batch, hq, -1, -1).clone()
    for g in range(plan.num_segments):
        rows, history = plan.rows(g), plan.history_len(g)
        kept = math.ceil(0.3 * history)
        pi = plan.keys(g).long()
        assert plan.kept_len(g) == kept and bool((pi[..., kept:] == -1).all())
        mean_q = q[:, :, rows.start : rows.stop].detach().double().unflatten(1, (-1, group)).mean((2, 3))
        scores = (k.detach().double()[:, :, :history] @ mean_q[..., None])[..., 0]
        named = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, pi[..., :kept], True)
        picked = scores.gather(-1, pi[..., :kept])
        assert bool((picked[..., 1:] <= picked[..., :-1] + 1e-5).all())  # in descending order
        if kept < history:  # a top-k: no key left out scores above a named one
            low = picked.amin(-1)
            high = scores.masked_fill(named, float("-inf")).amax(-1)
            assert bool((low >= high - 1e-5).all())
        allowed[:, :, rows.start : rows.stop, :history] = named.repeat_interleave(group, 1)[:, :, None]
        tiles = -(-len(rows) // CASES[case][7])
        assert bool((stats.n_blocks[:, :, g, :tiles] == -(-kept // block_n)).all())
    causal = reference.causal_token_mask(seq_q, seq_kv, DEVICE).sum() * batch * hq
    assert stats.density.item() == pytest.approx(allowed.sum().item() / causal.item())
    expected = reference.masked_attention(q, k, v, allowed)[0]
    same = reference.masked_attention(q, k, v, allowed, compute_dtype=torch.float32)[0]
    assert_flash_rule_with_grads(out, expected, same, (q, k, v), rng)


def test_degenerate_segments(rng, backend):
    """Segment 0 of a full prefill has no history (dense causal whatever tau); a segment as long as the
    sequence makes the whole call dense."""
    q, k, v = make_qkv(rng, "mha_prefill", torch.float32, structured=True)
    dense = dense_causal(q, k, v)
    out, stats = s2o_attention(q, k, v, tau=1.0, return_stats=True, backend=backend, **options("mha_prefill"))
    assert bool((stats.n_blocks[:, :, 0] == 0).all()) and stats.plan.keys(0).shape[-1] == 0
    same = dense_causal(q, k, v, torch.float32)
    assert_flash_rule(out[:, :, :32], dense[:, :, :32], same[:, :, :32], 2, "segment 0")
    whole, stats = s2o_attention(
        q, k, v, tau=1.0, segment_len=128, block_m=16, block_n=16, return_stats=True, backend=backend
    )
    assert stats.plan.key_order.shape[-1] == 0 and stats.density.item() == 1.0
    assert_flash_rule(whole, dense, same, 2, "one segment")


def test_gradcheck_float64_torch_path(rng):
    q, k, v = (t.detach().double().requires_grad_() for t in make_qkv(rng, "gqa_chunk_ragged", torch.float64))
    q, k, v = q[:1, :2, :24, :8], k[:1, :1, :40, :8], v[:1, :1, :40, :8]
    q, k, v = (t.detach().requires_grad_() for t in (q * 3, k, v))

    def run(q, k, v):
        return s2o_attention(q, k, v, tau=0.1, segment_len=16, block_m=16, block_n=16, backend="torch")

    torch.autograd.gradcheck(run, (q, k, v))


def test_structured_inputs_stop_early_at_a_small_error():
    """On sinks, local windows and planted retrieval spans (a fixed draw), a moderate tau skips half of the
    causal pairs while the output stays within 10% of dense attention on average."""
    inputs = structured_qkv(1, 4, 2, 1024, 64, device=DEVICE, seed=5)
    q, k, v = inputs.q, inputs.k, inputs.v
    out, stats = s2o_attention(
        q, k, v, tau=0.03, segment_len=128, block_m=64, block_n=64, stop_rule="mean", return_stats=True
    )
    dense = dense_causal(q, k, v)
    assert stats.density.item() < 0.7
    rel = ((out.double() - dense).norm(dim=-1) / dense.norm(dim=-1)).mean().item()
    assert rel < 0.1, f"mean relative error {rel:.3f} at density {stats.density.item():.2f}"


# ---------------------------------------------------------------------------------- property 8
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(segment_len=24), ValueError, "multiple of block_m"),
        (dict(tau=-0.1), ValueError, "tau"),
        (dict(tau=float("nan")), ValueError, "tau"),
        (dict(tau=torch.tensor(0.1)), TypeError, "tau must be a float"),
        (dict(tau="0.1"), TypeError, "tau must be a float"),
        (dict(block_m=48), ValueError, "block_m"),
        (dict(block_n=8), ValueError, "block_n"),
        (dict(stop_rule="median"), ValueError, "stop_rule"),
        (dict(keep_frac=0.0), ValueError, "keep_frac"),
        (dict(keep_frac=1.5), ValueError, "keep_frac"),
        (dict(keep_frac=float("nan")), ValueError, "keep_frac"),
        (dict(keep_frac="0.5"), TypeError, "keep_frac"),
        (dict(backend="fast"), ValueError, "backend"),
        (dict(plan="pi"), TypeError, "S2OPlan"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    q, k = torch.zeros(1, 4, 40, 16, device=DEVICE), torch.zeros(1, 2, 40, 16, device=DEVICE)
    opts = dict(segment_len=32, block_m=16, block_n=16) | kwargs
    with pytest.raises(error, match=match):
        s2o_attention(q, k, k, **opts)


def test_bad_shapes_and_plans(rng):
    q, k = torch.zeros(1, 3, 40, 16, device=DEVICE), torch.zeros(1, 2, 40, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of the number of KV heads"):
        s2o_attention(q, k, k, segment_len=32, block_m=16, block_n=16)
    with pytest.raises(ValueError, match="causal prefill"):
        s2o_attention(torch.zeros(1, 2, 50, 16), torch.zeros(1, 2, 40, 16), torch.zeros(1, 2, 40, 16))
    q = torch.randn(1, 2, 40, 16, generator=rng).to(DEVICE)
    k = torch.randn(1, 2, 40, 16, generator=rng).to(DEVICE)
    plan = s2o_plan(q, k, segment_len=16, block_n=16)
    for check_plan in (True, False):  # the geometry is checked either way: the kernels index by it
        with pytest.raises(ValueError, match="segment_len"):
            s2o_attention(q, k, k, segment_len=32, block_m=16, block_n=16, plan=plan, check_plan=check_plan)
    broken = S2OPlan(plan.key_order.clone(), plan.query_order, 16, 40)
    broken.key_order[0, 0, 0] = broken.key_order[0, 0, 1]
    with pytest.raises(ValueError, match="key_order of segment 1 must hold 16 distinct keys .* permutation"):
        s2o_attention(q, k, k, segment_len=16, block_m=16, block_n=16, plan=broken)
    # keep_frac < 1: the named keys, then -1 only; and the plan's keep_frac must be the call's.
    partial = s2o_plan(q, k, segment_len=16, block_n=16, keep_frac=0.5)
    with pytest.raises(ValueError, match="keep_frac"):
        s2o_attention(q, k, k, segment_len=16, block_m=16, block_n=16, plan=partial)
    holed = S2OPlan(partial.key_order.clone(), partial.query_order, 16, 40, 0.5)
    holed.key_order[0, 0, 16 + 8] = 3  # segment 2 names 16 keys: a seventeenth where -1 belongs
    with pytest.raises(ValueError, match="key_order of segment 2 must hold 16 distinct keys"):
        s2o_attention(q, k, k, segment_len=16, block_m=16, block_n=16, keep_frac=0.5, plan=holed)
    with pytest.raises(ValueError, match="query_order must be int32"):
        s2o_attention(
            q,
            k,
            k,
            segment_len=16,
            block_m=16,
            block_n=16,
            plan=S2OPlan(plan.key_order, plan.query_order[..., :8], 16, 40),
        )


def test_torch_path_recomputes_segments_above_the_saved_budget(rng, monkeypatch):
    """Under autograd the PyTorch path keeps each segment's logits while all of them fit SAVED_ELEMENTS
    and recomputes them in backward beyond it (they grow as S^2 / 2): the same numbers and decisions."""
    import sparse_attn.gathered as gathered

    q, k, v = (t.detach().double().requires_grad_() for t in make_qkv(rng, "gqa_chunk_ragged", torch.float32))
    results = []
    for budget in (1 << 40, 0):
        monkeypatch.setattr(gathered, "SAVED_ELEMENTS", budget)
        out, stats = s2o_attention(q, k, v, tau=0.1, return_stats=True, backend="torch", **options("gqa_chunk_ragged"))
        results.append((stats.n_blocks, out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for kept, again in zip(*results):
        torch.testing.assert_close(kept, again, rtol=0, atol=1e-12)


def test_empty_query_chunk():
    q = torch.zeros(2, 2, 0, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 1, 8, 16, device=DEVICE, requires_grad=True)
    out, stats = s2o_attention(q, k, k, segment_len=32, block_m=16, block_n=16, return_stats=True)
    assert out.shape == q.shape and stats.n_blocks.shape == (2, 2, 0, 2)
    out.sum().backward()  # still in the graph, with zero gradients
    assert q.grad.shape == q.shape and not k.grad.any()


def test_inspection_helpers_check_their_inputs(rng):
    q = torch.randn(1, 2, 40, 16, generator=rng).to(DEVICE)
    k = torch.randn(1, 2, 40, 16, generator=rng).to(DEVICE)
    _, stats = s2o_attention(q, k, k, segment_len=16, block_m=16, block_n=16, tau=0.1, return_stats=True)
    plan, n_blocks = stats.plan, stats.n_blocks
    for rows, error in [(torch.tensor([40]), ValueError), (torch.tensor([-1]), ValueError), ([1, 2], TypeError)]:
        with pytest.raises(error, match="rows"):
            s2o_processed_mask(plan, n_blocks, block_m=16, block_n=16, rows=rows)
    with pytest.raises(TypeError, match="rows must have dtype"):
        s2o_processed_mask(plan, n_blocks, block_m=16, block_n=16, rows=torch.tensor([1.5]))
    with pytest.raises(TypeError, match="plan must be an S2OPlan"):
        s2o_processed_mask("plan", n_blocks, block_m=16, block_n=16)
    with pytest.raises(ValueError, match="query_order must be int32"):
        s2o_reference(q[:, :, :30], k, k, plan, n_blocks, block_m=16, block_n=16)


@needs_triton
def test_opcheck_s2o_ops(rng):
    from sparse_attn.kernels.s2o_attn import s2o_attn_fwd

    q, k, v = (t.detach() for t in make_qkv(rng, "gqa_chunk_ragged", torch.float32))
    plan = s2o_plan(q, k, segment_len=32, block_n=16)
    args = (q, k, v, plan.key_order, plan.query_order, 32, 16, 16, 0.05, False, 0.2)
    # The Triton interpreter executes kernels even on fake tensors: fake/compile checks run on the GPU.
    utils = ("test_schema", "test_autograd_registration")
    if DEVICE.type == "cuda":
        utils += ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(s2o_attn_fwd, args, test_utils=utils)


# ---------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama_shapes(rng, dtype):
    """Llama-3.1-8B's heads (32 / 8, D = 128) at 8K in 16-bit: all heads at tau = 0 against dense causal
    attention (SDPA as the same-precision implementation); one GQA group at tau = 1e-2 against the
    processed-set reference, forward and backward."""
    inputs = structured_qkv(1, 32, 8, 8192, 128, dtype=dtype, device="cuda", seed=3)
    q, k, v = inputs.q, inputs.k, inputs.v
    out = s2o_attention(q, k, v, tau=0.0, backend="triton")
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_flash_rule(out[:, :4], dense_causal(q[:, :4], k[:, :1], v[:, :1]), sdpa[:, :4], 2, "tau = 0")
    _, stats = s2o_attention(q, k, v, tau=1e-2, return_stats=True, backend="triton")
    assert stats.density.item() < 0.9
    group = [t[:, :n].detach().requires_grad_() for t, n in ((q, 4), (k, 1), (v, 1))]
    out, stats = s2o_attention(*group, tau=1e-2, return_stats=True, backend="triton")
    ref, _ = s2o_reference(*group, stats.plan, stats.n_blocks)
    same, _ = s2o_reference(*group, stats.plan, stats.n_blocks, compute_dtype=dtype)
    assert_flash_rule_with_grads(out, ref, same, group, rng, "tau = 1e-2")
