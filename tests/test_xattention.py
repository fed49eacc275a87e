"""XAttention against the oracles of shared/specs/xattention.md section 6.

The fused estimator is checked against a float64 reference built literally from the strided
reshape; on the CPU its Triton kernel runs under TRITON_INTERPRET=1 (conftest.py) in fp32/fp16, and
the `gpu` tests run bf16 at real sizes. Selection is checked against the threshold rule itself,
end-to-end attention against dense attention with FlashAttention's error rule (test_engine.py).
"""

import itertools
import json
import math

import pytest
import torch

from sparse_attn.engine import triton_available
from sparse_attn.layout import causal_block_mask
from sparse_attn.methods.xattention import (
    _estimate_chunked,
    _tile_sums,
    calibrate_xattention,
    default_chunk_size,
    load_thresholds,
    save_thresholds,
    xattention_attn,
    xattention_estimate,
    xattention_estimate_reference,
    xattention_select,
)
from sparse_attn.reference import block_sparse_attention_reference, causal_token_mask, masked_attention
from sparse_attn.testing import assert_flash_rule, assert_flash_rule_with_grads, max_err, structured_qkv

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_qk(rng, batch, hq, hkv, seq_q, seq_kv, dim, dtype, spread=2.0):
    # A larger spread than N(0, 1) makes the block scores far from uniform, so selections differ.
    q = (spread * torch.randn(batch, hq, seq_q, dim, generator=rng)).to(DEVICE, dtype)
    k = torch.randn(batch, hkv, seq_kv, dim, generator=rng).to(DEVICE, dtype)
    return q, k


def sink_and_diagonal(seq_q, seq_kv, block):
    """Bool [Mq, Nk] by brute force: key block 0 and the key block of every real query's position."""
    mask = torch.zeros(-(-seq_q // block), -(-seq_kv // block), dtype=torch.bool)
    mask[:, 0] = True
    for r in range(seq_q):
        mask[r // block, (r + seq_kv - seq_q) // block] = True
    return mask


# ---------------------------------------------------------------------------------- 1-4: scoring
ESTIMATE_CASES = {
    # name: (batch, hq, hkv, seq_q, seq_kv, dim, block, stride, causal)
    "aligned": (1, 2, 2, 128, 128, 32, 32, 8, True),
    "offset_unaligned_gqa_batch": (2, 4, 2, 100, 300, 32, 32, 8, True),  # off = 200, 200 % 32 = 8
    "offset_below_stride": (1, 2, 1, 61, 64, 16, 16, 4, True),  # off = 3: off % S != 0 as well
    "stride16_ragged": (1, 2, 1, 75, 75, 32, 32, 16, True),
    "stride_equals_block": (1, 2, 2, 64, 96, 16, 16, 16, True),
    "several_tiles": (1, 1, 1, 300, 330, 16, 16, 4, True),  # 75 x 83 reshaped: two row and column tiles
    "non_causal": (2, 2, 1, 40, 90, 32, 32, 8, False),
    "rows_per_block_not_power_of_two": (1, 2, 1, 100, 100, 16, 48, 8, True),  # the PyTorch path
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(ESTIMATE_CASES))
def test_estimate_matches_float64_reference(rng, case, dtype):
    batch, hq, hkv, seq_q, seq_kv, dim, block, stride, causal = ESTIMATE_CASES[case]
    q, k = make_qk(rng, batch, hq, hkv, seq_q, seq_kv, dim, dtype)
    scores = xattention_estimate(q, k, stride=stride, block_size=block, causal=causal)
    ref = xattention_estimate_reference(q, k, stride=stride, block_size=block, causal=causal)
    assert scores.dtype == torch.float32 and scores.shape == (batch, hq, -(-seq_q // block), -(-seq_kv // block))
    # fp32 accumulation of exact products on the CPU (the interpreter); the GPU's tensor cores round more.
    bound = (1e-5 if DEVICE.type == "cpu" else 1e-3) * (block // stride)
    assert max_err(scores, ref) <= bound
    # The PyTorch path (used without Triton) must agree as well, with chunks cutting through the rows.
    assert max_err(_estimate_chunked(q, k, stride, block, causal, block), ref) <= bound


def test_bf16_matches_float64_reference(rng):
    """bf16 runs the kernel on the GPU and the PyTorch path on the CPU (the interpreter's bf16 dot is wrong)."""
    q, k = make_qk(rng, 2, 4, 2, 100, 300, 32, torch.bfloat16)
    scores = xattention_estimate(q, k, stride=8, block_size=32)
    ref = xattention_estimate_reference(q, k, stride=8, block_size=32)
    assert max_err(scores, ref) <= 1e-2 * 4


def test_antidiagonal_identity(rng):
    """Qr[i].Kr[j] is the sum of the S logits on the antidiagonal of tile (i, j) of QK^T."""
    stride, block, seq_q, seq_kv, dim = 4, 16, 40, 56, 16
    q, k = (t.double().cpu() for t in make_qk(rng, 1, 1, 1, seq_q, seq_kv, dim, torch.float32))
    q_reshaped = torch.cat([q[..., stride - 1 - t :: stride, :] for t in range(stride)], dim=-1)
    k_reshaped = torch.cat([k[..., t::stride, :] for t in range(stride)], dim=-1)
    logits = q @ k.transpose(-1, -2)
    antidiagonal = torch.zeros(1, 1, seq_q // stride, seq_kv // stride, dtype=torch.float64)
    for i, j, t in itertools.product(range(seq_q // stride), range(seq_kv // stride), range(stride)):
        antidiagonal[..., i, j] += logits[..., i * stride + stride - 1 - t, j * stride + t]
    assert max_err(q_reshaped @ k_reshaped.transpose(-1, -2), antidiagonal) < 1e-10

    # The estimator is the block-summed causal softmax of exactly those sums / (sqrt(D) S).
    rows, cols = torch.arange(seq_q // stride)[:, None], torch.arange(seq_kv // stride)[None, :]
    z = (antidiagonal / (math.sqrt(dim) * stride)).masked_fill(
        cols * stride > rows * stride + seq_kv - seq_q, -math.inf
    )
    expected = _tile_sums(z.softmax(-1), block // stride, -(-seq_q // block), -(-seq_kv // block))
    scores = xattention_estimate(q.float().to(DEVICE), k.float().to(DEVICE), stride=stride, block_size=block)
    assert max_err(scores.cpu(), expected) <= 1e-3 * (block // stride)


def test_chunk_size_does_not_change_scores(rng):
    stride, block = 4, 16
    q, k = make_qk(rng, 2, 4, 2, 200, 330, 16, torch.float32)
    chunks = [block, 3 * block, 64, 208, None]
    torch_path = [_estimate_chunked(q, k, stride, block, True, c or default_chunk_size(330, block)) for c in chunks]
    public = [xattention_estimate(q, k, stride=stride, block_size=block, chunk_size=c) for c in chunks]
    for scores in torch_path[1:] + public:
        assert max_err(scores, torch_path[0]) < 1e-5


def test_default_chunk_size_follows_upstream():
    for seq_len, chunk in ((1000, 2048), (16384, 16384), (32768, 8192), (65536, 4096), (131072, 2048), (1 << 20, 2048)):
        assert default_chunk_size(seq_len) == chunk
    assert default_chunk_size(1000, block_size=48) == 2064  # whole query blocks


@pytest.mark.parametrize("causal", [True, False])
def test_row_sums(rng, causal):
    """A full query-block row sums to B/S; a ragged one to its number of real reshaped rows."""
    stride, block, seq_q, seq_kv = 8, 32, 150, 230
    q, k = make_qk(rng, 2, 2, 1, seq_q, seq_kv, 16, torch.float32)
    real_rows = torch.tensor([-(-min(block, seq_q - start) // stride) for start in range(0, seq_q, block)])
    assert real_rows.tolist() == [4, 4, 4, 4, 3]
    for scores in (
        xattention_estimate(q, k, stride=stride, block_size=block, causal=causal),
        _estimate_chunked(q, k, stride, block, causal, 64),
    ):
        assert max_err(scores.sum(-1).cpu(), real_rows.double().expand(2, 2, -1)) < 1e-4
        if causal:  # nothing outside the causally visible blocks
            assert not bool(scores[..., ~causal_block_mask(seq_q, seq_kv, block, block, DEVICE)].any())


# ---------------------------------------------------------------------------------- 5-7: selection
def check_threshold_rule(scores, layout, tau, forced, allowed):
    """Per row: forced and allowed respected, kept mass >= tau * total, and minimal in the rule's order."""
    kept = layout.to_dense_mask().cpu()
    scores = scores.double().cpu()
    batch, heads, num_q_blocks, _ = scores.shape
    for b, h, m in itertools.product(range(batch), range(heads), range(num_q_blocks)):
        a, keep, f, al = scores[b, h, m], kept[b, h, m], forced[m], allowed[m]
        assert bool((keep <= al).all()) and bool((f <= keep).all())
        required = float(tau[h]) * a[al].sum().item()
        assert a[keep].sum().item() >= required * (1 - 1e-12)
        optional = keep & ~f
        if bool(optional.any()):
            # The last optional block in the order: the lowest score, ties to the higher index.
            last = max(torch.nonzero(optional).flatten().tolist(), key=lambda n: (-a[n].item(), n))
            assert a[keep].sum().item() - a[last].item() < required
            dropped = al & ~keep
            if bool(dropped.any()):
                assert a[optional].min() >= a[dropped].max()


@pytest.mark.parametrize("seq_q,seq_kv", [(96, 96), (100, 300)])
def test_selection_follows_the_threshold_rule(rng, seq_q, seq_kv):
    stride, block = 8, 16
    q, k = make_qk(rng, 2, 3, 1, seq_q, seq_kv, 16, torch.float32)
    scores = xattention_estimate(q, k, stride=stride, block_size=block)
    forced = sink_and_diagonal(seq_q, seq_kv, block)
    allowed = causal_block_mask(seq_q, seq_kv, block, block)
    for tau in (torch.full((3,), 0.5), torch.tensor([0.3, 0.8, 0.95])):
        layout = xattention_select(scores, tau.to(DEVICE), seq_len_q=seq_q, seq_len_kv=seq_kv, block_size=block)
        assert (layout.num_heads, layout.seq_len_q, layout.seq_len_kv) == (3, seq_q, seq_kv)
        check_threshold_rule(scores, layout, tau, forced, allowed)


def test_causal_selection_measures_the_whole_row_then_meets_causality(rng):
    """Spec 2: required = tau * the row's whole mass, every block ranked, then the kept set intersected
    with causal validity; scores with mass past the diagonal (a non-causal estimate) show the order."""
    seq_q, seq_kv, block = 64, 96, 16
    q, k = make_qk(rng, 1, 2, 1, seq_q, seq_kv, 16, torch.float32)
    scores = xattention_estimate(q, k, stride=8, block_size=block, causal=False).double()
    forced, allowed = sink_and_diagonal(seq_q, seq_kv, block), causal_block_mask(seq_q, seq_kv, block, block)
    for tau in (0.3, 0.6):
        kept = xattention_select(scores, tau, seq_len_q=seq_q, seq_len_kv=seq_kv, block_size=block).to_dense_mask()
        for h, m in itertools.product(range(2), range(seq_q // block)):
            row, ours = scores[0, h, m].cpu().tolist(), kept[0, h, m].cpu()
            first = sorted(torch.nonzero(forced[m]).flatten().tolist())
            order = first + sorted(set(range(len(row))) - set(first), key=lambda n: (-row[n], n))
            expected, before = torch.zeros_like(ours), 0.0
            for n in order:
                expected[n] = n in first or before < tau * sum(row)
                before += row[n]
            assert torch.equal(ours, expected & allowed[m].cpu()), (tau, h, m)


def test_threshold_limits_and_nesting(rng):
    stride, block, seq_q, seq_kv = 8, 16, 100, 300
    q, k = make_qk(rng, 1, 2, 2, seq_q, seq_kv, 16, torch.float32)
    scores = xattention_estimate(q, k, stride=stride, block_size=block)
    select = lambda tau: xattention_select(scores, tau, seq_len_q=seq_q, seq_len_kv=seq_kv, block_size=block)
    masks = [select(tau).to_dense_mask().cpu() for tau in (0.0, 0.3, 0.6, 0.9, 0.99, 1.0)]
    assert torch.equal(masks[0], sink_and_diagonal(seq_q, seq_kv, block).expand_as(masks[0]))
    assert torch.equal(masks[-1], causal_block_mask(seq_q, seq_kv, block, block).expand_as(masks[0]))
    for smaller, larger in zip(masks, masks[1:]):
        assert bool((smaller <= larger).all())
    assert any(not torch.equal(a, b) for a, b in zip(masks, masks[1:]))


def test_non_causal_selection_forces_nothing(rng):
    q, k = make_qk(rng, 1, 2, 1, 64, 80, 16, torch.float32)
    scores = xattention_estimate(q, k, stride=8, block_size=16, causal=False)
    empty = xattention_select(scores, 0.0, causal=False, seq_len_q=64, seq_len_kv=80, block_size=16)
    full = xattention_select(scores, 1.0, causal=False, seq_len_q=64, seq_len_kv=80, block_size=16)
    assert not bool(empty.to_dense_mask().any()) and bool(full.to_dense_mask().all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_threshold_one_equals_dense_attention(rng, dtype):
    seq_q, seq_kv = 80, 120
    q, k = make_qk(rng, 2, 4, 2, seq_q, seq_kv, 32, dtype, spread=1.0)
    v = torch.randn(k.shape, generator=rng).to(DEVICE, dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, layout = xattention_attn(q, k, v, stride=4, threshold=1.0, block_size=16, return_layout=True)
    assert torch.equal(layout.to_dense_mask()[0, 0].cpu(), causal_block_mask(seq_q, seq_kv, 16, 16))
    allowed = causal_token_mask(seq_q, seq_kv, DEVICE)
    ref, _ = masked_attention(q, k, v, allowed)
    same, _ = masked_attention(q, k, v, allowed, compute_dtype=dtype)
    assert out.dtype == dtype
    assert_flash_rule_with_grads(out, ref, same, (q, k, v), rng)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the kernel's estimate, the PyTorch one
def test_nan_inputs_reach_the_output_on_both_paths(rng, dtype):
    q, k, v = (torch.randn(1, h, 64, 16, generator=rng).to(DEVICE, dtype) for h in (4, 2, 2))
    q[0, 0, 5, 0] = float("nan")
    out = xattention_attn(q, k, v, stride=4, block_size=16, threshold=0.9)
    nan_rows = out.isnan().any(dim=-1)
    assert bool(nan_rows[0, 0, 5]) and int(nan_rows.sum()) == 1


def test_per_head_thresholds(rng):
    """A tau = 0 head (sink + diagonal) beside a tau = 1 head (every causal block), in one call."""
    seq_q, seq_kv, block = 64, 112, 16
    q, k = make_qk(rng, 2, 2, 1, seq_q, seq_kv, 16, torch.float32)
    v = torch.randn(k.shape, generator=rng).to(DEVICE)
    streaming = sink_and_diagonal(seq_q, seq_kv, block)
    causal = causal_block_mask(seq_q, seq_kv, block, block)
    scores = xattention_estimate(q, k, stride=8, block_size=block)
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    by_table = xattention_select(scores, table, seq_len_q=seq_q, seq_len_kv=seq_kv, block_size=block, layer_idx=1)
    out, layout = xattention_attn(
        q, k, v, stride=8, threshold=torch.tensor([0.0, 1.0]), block_size=block, return_layout=True
    )
    for selected in (by_table.to_dense_mask().cpu(), layout.to_dense_mask().cpu()):
        assert torch.equal(selected[:, 0], streaming.expand(2, -1, -1))
        assert torch.equal(selected[:, 1], causal.expand(2, -1, -1))
    ref, _ = block_sparse_attention_reference(q, k, v, layout)
    assert max_err(out, ref) < 1e-4


# ---------------------------------------------------------------------------------- 8: calibration
def planted_qk(logits, seq_len=32, dim=16):
    """q (B, 2, L, D), k (B, 1, L, D): head h of text b gives key block 0 the logit logits[b][h], block 1 logit 0."""
    batch = len(logits)
    k = torch.zeros(batch, 1, seq_len, dim)
    k[:, :, :16, 0] = 1.0
    q = torch.zeros(batch, 2, seq_len, dim)
    q[..., 0] = torch.tensor(logits)[:, :, None] * math.sqrt(dim)
    return q.to(DEVICE), k.to(DEVICE)


def test_calibration_reproduces_hand_computed_thresholds(tmp_path):
    """Two blocks of 16, S = 16: reshaped rows are blocks, and with key block 0 at logit x, block 1 at 0,
    A[1] = (e^x / (e^x + 1), 1 / (e^x + 1)). True mass on block 0 of row 1 is mean_r 16e^x / (16e^x + r + 1):
    >= 0.9 for e^x in {9, 14, 19}, < 0.9 for e^x = 4. If block 0 alone covers 90%, the cutoff is A[1, 0]
    and tau = (A[0, 0] + A[1, 0]) / 2 = (1 + e^x / (e^x + 1)) / 2; otherwise the cutoff is A[1, 1] and tau = 1.
    """
    ln = math.log
    layer0 = planted_qk([[ln(9), ln(9)], [ln(19), ln(14)]])  # head 0: max(0.95, 0.975); head 1: max(0.95, 29/30)
    layer1 = planted_qk([[ln(4), ln(9)]])  # head 0 needs both blocks: tau = 1
    samples = [[layer0], [layer1]]
    expected = torch.tensor([[0.975, 29 / 30], [1.0, 0.95]])
    table = calibrate_xattention(samples, stride=16, block_size=16)
    assert table.dtype == torch.float32 and table.shape == (2, 2)
    assert max_err(table, expected) < 1e-5
    lazy = calibrate_xattention(lambda layer: samples[layer], stride=16, block_size=16, num_layers=2)
    assert torch.equal(lazy, table)
    # At 99% coverage no row is covered by block 0 alone.
    assert torch.equal(calibrate_xattention(samples, stride=16, block_size=16, coverage=0.99), torch.ones(2, 2))

    path = tmp_path / "thresholds.json"
    save_thresholds(path, table, {"stride": 16, "block_size": 16})
    loaded, meta = load_thresholds(path)
    assert torch.equal(loaded, table) and meta == {"stride": 16, "block_size": 16}


# ---------------------------------------------------------------------------------- 9: bad input
def _qkv(rng):
    q, k = make_qk(rng, 1, 2, 1, 64, 64, 16, torch.float32)
    return q, k, torch.randn(k.shape, generator=rng).to(DEVICE)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"stride": 12, "block_size": 32}, "stride=12"),
        ({"stride": 0}, "stride"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": torch.tensor([0.5, 0.5, 0.5])}, "threshold"),
        ({"threshold": torch.tensor([0.5, 1.01])}, "threshold"),
        ({"threshold": "0.9"}, "threshold"),
        ({"threshold": torch.full((4, 2), 0.9)}, "by layer"),
        ({"chunk_size": 24, "block_size": 16}, "chunk_size"),
    ],
)
def test_bad_input_raises(rng, kwargs, match):
    q, k, v = _qkv(rng)
    with pytest.raises(ValueError, match=match):
        xattention_attn(q, k, v, **{"block_size": 16, **kwargs})


def test_bad_selection_and_calibration_input_raises(rng, tmp_path):
    q, k, v = _qkv(rng)
    scores = xattention_estimate(q, k, stride=8, block_size=16)
    with pytest.raises(ValueError, match="layer_idx"):
        xattention_select(scores, torch.full((3, 2), 0.5), block_size=16, layer_idx=3)
    with pytest.raises(ValueError, match="blocks"):
        xattention_select(scores, 0.5, block_size=16, seq_len_q=100)
    with pytest.raises(ValueError, match="seq_len_q <= seq_len_kv"):
        xattention_estimate(q, k[:, :, :32], stride=8, block_size=16)
    with pytest.raises(ValueError, match="stride"):
        xattention_estimate(q, k, stride=3, block_size=16)
    with pytest.raises(ValueError, match="inputs"):
        calibrate_xattention(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="inputs are token ids"):
        calibrate_xattention([[(q, k)]], block_size=16, inputs=[torch.zeros(1, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match="coverage"):
        calibrate_xattention([[(q, k)]], block_size=16, coverage=1.5)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        save_thresholds(tmp_path / "bad.json", torch.full((2, 2), 1.2))
    (tmp_path / "other.json").write_text('{"thresholds": [[0.5]]}')
    with pytest.raises(ValueError, match="format"):
        load_thresholds(tmp_path / "other.json")
    save_thresholds(tmp_path / "good.json", torch.full((2, 2), 0.9))
    good = json.loads((tmp_path / "good.json").read_text())
    broken = [({k: v for k, v in good.items() if k != "thresholds"}, "must hold 'thresholds'"),
              ({**good, "meta": [1]}, "'meta' object"),
              ({**good, "thresholds": [[0.5, 0.6], [0.7]]}, "array of numbers"),
              ({**good, "thresholds": [["high"]]}, "array of numbers")]  # fmt: skip
    for payload, match in broken:
        (tmp_path / "broken.json").write_text(json.dumps(payload))
        with pytest.raises(ValueError, match=match):
            load_thresholds(tmp_path / "broken.json")


@pytest.mark.skipif(not triton_available(DEVICE), reason="triton is not installed")
def test_opcheck_estimate_op(rng):
    from sparse_attn.kernels.block_scores import xattention_estimate_op

    q, k = make_qk(rng, 1, 2, 1, 48, 64, 16, torch.float32)
    # The Triton interpreter executes kernels even on fake tensors: fake/compile checks run on the GPU.
    utils = ("test_schema",) + (("test_faketensor", "test_aot_dispatch_dynamic") if DEVICE.type == "cuda" else ())
    torch.library.opcheck(xattention_estimate_op, (q, k, 8, 16, True), test_utils=utils)


# ---------------------------------------------------------------------------------- 10: quality
def dense_block_mass(q, k, block):
    """float64 [B, Hq, Mq, Nk]: causal softmax attention mass per block."""
    seq_q, seq_kv = q.shape[2], k.shape[2]
    keys = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = q.double() @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    probs = logits.masked_fill(~causal_token_mask(seq_q, seq_kv, q.device), -math.inf).softmax(-1)
    return _tile_sums(probs, block, -(-seq_q // block), -(-seq_kv // block))


def test_quality_on_structured_inputs():
    """Density, attention-mass recall and output error against dense at the default block of 128.

    Measured (seed 0, L = 2048, Hq = 4, Hkv = 2, D = 64; density / recall / output relative error):
      S = 8:  tau 0.8: 0.557 / 0.869 / 0.288;  0.9: 0.752 / 0.938 / 0.179;  0.95: 0.882 / 0.974 / 0.111
      S = 16: tau 0.8: 0.590 / 0.883 / 0.264;  0.9: 0.778 / 0.946 / 0.162;  0.95: 0.904 / 0.983 / 0.077
    """
    block, seq_len = 128, 2048
    inputs = structured_qkv(1, 4, 2, seq_len, 64, seed=0, device=DEVICE)
    q, k, v = inputs.q, inputs.k, inputs.v
    mass = dense_block_mass(q, k, block)
    dense, _ = masked_attention(q, k, v, causal_token_mask(seq_len, seq_len, DEVICE))
    for stride in (8, 16):
        scores = xattention_estimate(q, k, stride=stride, block_size=block)
        previous = None
        for tau in (0.8, 0.9, 0.95):
            layout = xattention_select(scores, tau, block_size=block)
            recall = ((mass * layout.to_dense_mask()).sum() / mass.sum()).item()
            density = layout.density()
            out, _ = block_sparse_attention_reference(q, k, v, layout)
            error = ((out - dense).norm() / dense.norm()).item()
            print(f"S={stride} tau={tau}: density {density:.3f} recall {recall:.4f} output error {error:.4f}")
            assert density < 0.95 and recall >= tau - 0.03
            # Far better than a selection blind to the attention, whose recall would be its density.
            assert 1 - recall <= 0.5 * (1 - density)
            if previous is not None:
                assert density > previous[0] and recall > previous[1] and error < previous[2]
            previous = (density, recall, error)
        assert error < 0.15


# ---------------------------------------------------------------------------------- GPU, real sizes
@pytest.mark.gpu
@pytest.mark.parametrize("stride", [8, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_estimate_real_sizes(rng, dtype, stride):
    for batch, hq, hkv, seq_q, seq_kv in ((2, 8, 2, 4096, 4096), (1, 8, 1, 1000, 5000)):
        q, k = make_qk(rng, batch, hq, hkv, seq_q, seq_kv, 128, dtype, spread=1.0)
        scores = xattention_estimate(q, k, stride=stride, block_size=128)
        ref = xattention_estimate_reference(q, k, stride=stride, block_size=128)
        assert max_err(scores, ref) <= 1e-2 * (128 // stride)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_end_to_end_real_sizes(rng, dtype):
    inputs = structured_qkv(2, 8, 2, 4096, 128, seed=1, dtype=dtype, device=DEVICE)
    q, k, v = inputs.q, inputs.k, inputs.v
    out, layout = xattention_attn(q, k, v, threshold=0.9, return_layout=True)
    assert out.dtype == dtype and layout.density() < 1
    ref, _ = block_sparse_attention_reference(q, k, v, layout)
    assert max_err(out, ref) < 2e-2
    full = xattention_attn(q, k, v, threshold=1.0)
    dense, _ = masked_attention(q, k, v, causal_token_mask(4096, 4096, DEVICE))
    same, _ = masked_attention(q, k, v, causal_token_mask(4096, 4096, DEVICE), compute_dtype=dtype)
    assert_flash_rule(full, dense, same, 2, "output")
