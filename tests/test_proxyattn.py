"""ProxyAttn: the test properties of shared/specs/proxyattn.md section 7.

On the CPU the estimator and budget kernels run under the Triton interpreter (fp16/fp32) and the
PyTorch path is checked against the same float64 references; the GPU tests run bf16 at real sizes.
"""

import math

import pytest
import torch

import sparse_attn.methods.proxyattn as proxy_module
from sparse_attn.engine import triton_available
from sparse_attn.layout import causal_block_mask
from sparse_attn.methods.proxyattn import (
    proxy_attn,
    proxy_attn_varlen,
    proxy_budget,
    proxy_budget_reference,
    proxy_estimate,
    proxy_estimate_reference,
    proxy_select,
)
from sparse_attn.methods.xattention import xattention_estimate, xattention_select
from sparse_attn.reference import block_sparse_attention_reference, causal_token_mask, masked_attention
from sparse_attn.testing import assert_flash_rule, assert_flash_rule_with_grads, max_err, structured_qkv

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, dim, dtype, spread=2.0):
    # A larger spread than N(0, 1) makes attention peaked, so scores and budgets differ between heads.
    q = (spread * torch.randn(batch, hq, seq_q, dim, generator=rng)).to(DEVICE, dtype)
    k = torch.randn(batch, hkv, seq_kv, dim, generator=rng).to(DEVICE, dtype)
    v = torch.randn(batch, hkv, seq_kv, dim, generator=rng).to(DEVICE, dtype)
    return q, k, v


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    """Both implementations of the estimator and the budget: the fused kernel and the PyTorch path."""
    if request.param == "kernel" and not triton_available(DEVICE):
        pytest.skip("triton is not installed")
    if request.param == "torch":
        monkeypatch.setattr(proxy_module, "block_scores_kernel_runs", lambda *args: False)
    return request.param


# ---------------------------------------------------------------------------------- 6-7: estimator
ESTIMATE_CASES = {
    # name: (batch, hq, hkv, seq_q, seq_kv, dim, block, stride, groups, causal)
    "aligned": (1, 4, 2, 128, 128, 32, 32, 4, 1, True),
    "ragged_offset_gqa_batch": (2, 8, 4, 100, 300, 32, 32, 4, 2, True),
    "groups_equal_kv_heads": (1, 8, 2, 96, 96, 16, 16, 4, 2, True),
    "stride_not_dividing_block": (1, 2, 1, 90, 110, 16, 16, 3, 1, True),
    "stride_equals_block": (1, 2, 2, 64, 80, 16, 16, 16, 1, True),
    "stride_one": (1, 2, 2, 48, 48, 16, 16, 1, 2, True),
    "several_tiles": (1, 2, 1, 300, 330, 16, 16, 4, 1, True),
    "non_causal": (2, 4, 2, 40, 90, 32, 32, 4, 1, False),
    "block_not_power_of_two": (1, 2, 1, 100, 100, 16, 48, 4, 1, True),  # the PyTorch path
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(ESTIMATE_CASES))
def test_estimate_matches_float64_reference(rng, path, case, dtype):
    batch, hq, hkv, seq_q, seq_kv, dim, block, stride, groups, causal = ESTIMATE_CASES[case]
    q, k, _ = make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, dim, dtype)
    options = dict(num_proxy_groups=groups, stride=stride, block_size=block, causal=causal)
    scores = proxy_estimate(q, k, **options)
    ref = proxy_estimate_reference(q, k, **options)
    assert scores.dtype == torch.float32 and scores.shape == ref.shape
    # fp16: the pooled proxy queries are rounded to fp16 for the product (measured up to 2.3e-4 here);
    # fp32 accumulates exactly rounded products on the CPU, the GPU's tensor cores round more.
    bound = 2e-3 if dtype == torch.float16 else 1e-5 if DEVICE.type == "cpu" else 1e-3
    assert max_err(scores, ref) <= bound
    if causal:  # fully future blocks score exactly 0
        hidden = ~causal_block_mask(seq_q, seq_kv, block, block, DEVICE)
        assert not bool(scores[..., hidden].any())


def test_proxy_of_one_head_is_the_heads_block_max(rng, path):
    """Spec 7.6: MHA, one head per proxy and stride 1 give each head's own block-max causal attention."""
    seq_len, block = 72, 16
    q, k, _ = make_qkv(rng, 2, 3, 3, seq_len, seq_len, 16, torch.float32)
    scores = proxy_estimate(q, k, num_proxy_groups=3, stride=1, block_size=block)
    logits = q.double() @ k.double().transpose(-1, -2) / 4.0
    probs = logits.masked_fill(~causal_token_mask(seq_len, seq_len, DEVICE), -math.inf).softmax(-1)
    for m in range(-(-seq_len // block)):
        for n in range(m + 1):
            tile = probs[:, :, m * block : (m + 1) * block, n * block : (n + 1) * block]
            assert max_err(scores[:, :, m, n], tile.amax(dim=(-2, -1))) < 1e-5


def test_permuting_heads_inside_a_group_keeps_the_scores(rng, path):
    """Spec 7.8: the proxy pools its heads, so their order does not matter."""
    q, k, _ = make_qkv(rng, 1, 8, 4, 80, 80, 16, torch.float32)
    options = dict(num_proxy_groups=2, stride=4, block_size=16)
    scores = proxy_estimate(q, k, **options)
    permuted = proxy_estimate(q[:, [2, 0, 3, 1, 7, 5, 4, 6]], k[:, [1, 0, 3, 2]], **options)
    assert max_err(scores, permuted) < 1e-6


# ---------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seq_q,seq_kv,block", [(100, 100, 16), (40, 130, 16), (10, 75, 32), (64, 64, 64), (12, 21, 2)])
def test_budget_matches_float64_reference(rng, path, dtype, seq_q, seq_kv, block):
    q, k, _ = make_qkv(rng, 2, 4, 2, seq_q, seq_kv, 32, dtype)
    for gamma in (0.5, 0.9, 0.95, 1.0):
        budget = proxy_budget(q, k, gamma=gamma, block_size=block)
        ref = proxy_budget_reference(q, k, gamma=gamma, block_size=block)
        assert budget.dtype == torch.int64 and budget.shape == (2, 4)
        # Random inputs put no tie on the gamma boundary: the counts agree exactly.
        assert torch.equal(budget, ref), f"gamma={gamma}: {budget.tolist()} vs {ref.tolist()}"
    assert bool((budget == -(-seq_kv // block)).all())  # gamma = 1: every key block


def test_budget_reads_only_the_heads_last_query_block(rng):
    """Spec 7.8: a head's budget depends on its own last block of queries (and its keys) only."""
    q, k, _ = make_qkv(rng, 1, 4, 2, 96, 96, 16, torch.float32)
    budget = proxy_budget(q, k, gamma=0.9, block_size=16)
    changed = q.clone()
    changed[:, 1:] = torch.randn(changed[:, 1:].shape, generator=rng).to(DEVICE)  # other heads
    changed[:, 0, :80] = 0.0  # head 0's earlier queries
    again = proxy_budget(changed, k, gamma=0.9, block_size=16)
    assert again[0, 0] == budget[0, 0]


# ---------------------------------------------------------------------------------- 2-5: selection
def brute_force_selection(scores, head_blocks, seq_q, seq_kv, block, floor_tokens, causal=True):
    """Bool [B, Hq, Mq, Nk] from spec sections 4-5, one row at a time in Python."""
    batch, groups, num_q_blocks, num_kv_blocks = scores.shape
    heads = head_blocks.shape[1]
    allowed = causal_block_mask(seq_q, seq_kv, block, block) if causal else torch.ones(num_q_blocks, num_kv_blocks)
    offset = seq_kv - seq_q
    mask = torch.zeros(batch, heads, num_q_blocks, num_kv_blocks, dtype=torch.bool)
    n_last = int(allowed[-1].sum())
    for b in range(batch):
        for h in range(heads):
            group = h // (heads // groups)
            for m in range(num_q_blocks):
                forced = set()
                if causal:
                    last_query = min((m + 1) * block, seq_q) - 1
                    forced = {0} | set(range((m * block + offset) // block, (last_query + offset) // block + 1))
                visible = [n for n in range(num_kv_blocks) if allowed[m, n]]
                rest = sorted(set(visible) - forced, key=lambda n: (-float(scores[b, group, m, n]), n))
                n_m = len(visible)
                keep = min(n_m, max(-(-int(head_blocks[b, h]) * n_m // n_last), -(-floor_tokens // block)))
                ranking = sorted(forced) + rest
                mask[b, h, m, ranking[: max(keep, len(forced))]] = True
    return mask


@pytest.mark.parametrize("seq_q,seq_kv,causal", [(128, 128, True), (70, 150, True), (70, 157, True), (60, 100, False)])
@pytest.mark.parametrize("ties", [False, True])
def test_selection_equals_brute_force(rng, seq_q, seq_kv, causal, ties):
    """Including offsets Skv - Sq off the block grid, and scores rounded to a few values: ties go low."""
    block, batch, heads, groups = 16, 2, 6, 2
    num_kv_blocks = -(-seq_kv // block)
    q, k, _ = make_qkv(rng, batch, heads, 2, seq_q, seq_kv, 16, torch.float32)
    scores = proxy_estimate(q, k, num_proxy_groups=groups, stride=4, block_size=block, causal=causal)
    if ties:
        scores = (scores * 20).round() / 20
    head_blocks = torch.randint(1, num_kv_blocks + 1, (batch, heads), generator=rng).to(DEVICE)
    for floor_tokens in (0, 16, 48):
        layout = proxy_select(
            scores, head_blocks, causal=causal, seq_len_q=seq_q, seq_len_kv=seq_kv, block_size=block,
            min_budget_tokens=floor_tokens,
        )  # fmt: skip
        expected = brute_force_selection(scores.cpu(), head_blocks.cpu(), seq_q, seq_kv, block, floor_tokens, causal)
        assert torch.equal(layout.to_dense_mask().cpu(), expected), f"min_budget_tokens={floor_tokens}"


def test_selection_invariants_and_nesting(rng):
    """Spec 7.2-7.5: forced blocks, no future block, no empty row, the floor, nesting in gamma and in a group."""
    seq_q, seq_kv, block = 120, 200, 16
    q, k, _ = make_qkv(rng, 2, 4, 2, seq_q, seq_kv, 16, torch.float32, spread=3.0)
    allowed = causal_block_mask(seq_q, seq_kv, block, block)
    previous = None
    scores = proxy_estimate(q, k, block_size=block)
    for gamma in (0.3, 0.6, 0.9, 0.99, 1.0):
        budget = proxy_budget(q, k, gamma=gamma, block_size=block)
        layout = proxy_select(
            scores, budget, seq_len_q=seq_q, seq_len_kv=seq_kv, block_size=block, min_budget_tokens=32
        )
        mask = layout.to_dense_mask().cpu()
        assert not bool((mask & ~allowed).any())  # no future block
        assert bool(mask[..., 0].all())  # the sink
        for m in range(mask.shape[2]):  # the diagonal block of the row's last query
            assert bool(mask[:, :, m, (min((m + 1) * block, seq_q) - 1 + seq_kv - seq_q) // block].all())
        counts = mask.sum(-1)
        assert bool((counts >= torch.minimum(allowed.sum(-1), torch.tensor(2))).all())  # floor of 32 tokens
        if previous is not None:
            assert not bool((previous & ~mask).any()), f"gamma={gamma} dropped a block"
        previous = mask
        # Heads 0 and 1 share the proxy: per text, the smaller selection lies inside the larger, row by row.
        for text in mask:
            small, large = sorted((text[0], text[1]), key=lambda t: int(t.sum()))
            assert not bool((small & ~large).any())
    assert torch.equal(previous, allowed.expand_as(previous))  # gamma = 1 keeps every causal block


def test_rows_within_the_floor_are_dense(rng):
    """Spec 7.4: with the default 2048-token floor at B = 128, every row with at most 16 visible blocks is dense."""
    q, k, _ = make_qkv(rng, 1, 2, 1, 2048, 2048, 16, torch.float32)
    layout = proxy_select(proxy_estimate(q, k), proxy_budget(q, k, gamma=0.1))
    assert layout.density() == 1.0
    q, k, _ = make_qkv(rng, 1, 2, 1, 2560, 2560, 16, torch.float32)  # 20 blocks: rows past 16 go sparse
    layout = proxy_select(proxy_estimate(q, k), proxy_budget(q, k, gamma=0.1))
    counts = layout.kv_num_blocks[0, :, 16:]
    assert bool((counts >= 16).all()) and bool((counts < torch.arange(17, 21)).any())


# ---------------------------------------------------------------------------------- 1: attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gamma_one_equals_dense_attention(rng, dtype):
    seq_q, seq_kv = 80, 120
    q, k, v = make_qkv(rng, 2, 4, 2, seq_q, seq_kv, 32, dtype, spread=1.0)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, layout = proxy_attn(q, k, v, gamma=1.0, block_size=16, min_budget_tokens=0, return_layout=True)
    assert torch.equal(layout.to_dense_mask()[0, 0].cpu(), causal_block_mask(seq_q, seq_kv, 16, 16))
    allowed = causal_token_mask(seq_q, seq_kv, DEVICE)
    ref, _ = masked_attention(q, k, v, allowed)
    same, _ = masked_attention(q, k, v, allowed, compute_dtype=dtype)
    assert out.dtype == dtype
    assert_flash_rule_with_grads(out, ref, same, (q, k, v), rng)


def test_sparse_attention_matches_the_reference_on_its_layout(rng):
    q, k, v = make_qkv(rng, 2, 4, 2, 100, 140, 32, torch.float16, spread=3.0)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, layout = proxy_attn(q, k, v, gamma=0.8, block_size=16, min_budget_tokens=16, return_layout=True)
    assert layout.density() < 0.9
    ref, _ = block_sparse_attention_reference(q, k, v, layout)
    same, _ = block_sparse_attention_reference(q, k, v, layout, compute_dtype=torch.float16)
    assert_flash_rule_with_grads(out, ref, same, (q, k, v), rng)


def test_varlen_equals_each_sequence_alone(rng):
    lengths_q, lengths_k = [50, 0, 96, 20], [70, 0, 96, 33]
    block, hq, hkv, dim = 16, 4, 2, 16
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = (3 * torch.randn(sum(lengths_q), hq, dim, generator=rng)).to(DEVICE)
    k, v = (torch.randn(sum(lengths_k), hkv, dim, generator=rng).to(DEVICE) for _ in range(2))
    options = dict(gamma=0.7, block_size=block, min_budget_tokens=16, num_proxy_groups=2)
    out, layout = proxy_attn_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), **options, return_layout=True)
    assert layout.batch_size == len(lengths_q)
    for index, (q0, q1, k0, k1) in enumerate(zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:])):
        if q1 == q0:
            assert int(layout.kv_num_blocks[index].sum()) == 0
            continue
        alone, seq_layout = proxy_attn(
            *(t[a:b].transpose(0, 1)[None] for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1))),
            **options,
            return_layout=True,
        )
        mask = seq_layout.to_dense_mask()[0]
        assert torch.equal(layout.to_dense_mask()[index, :, : mask.shape[1], : mask.shape[2]], mask)
        assert max_err(out[q0:q1], alone[0].transpose(0, 1)) < 1e-5


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"gamma": 0.0}, ValueError, "gamma"),
        ({"gamma": 1.5}, ValueError, "gamma"),
        ({"gamma": True}, ValueError, "gamma"),
        ({"gamma": float("nan")}, ValueError, "gamma"),
        ({"num_proxy_groups": 3}, ValueError, "num_proxy_groups=3"),
        ({"num_proxy_groups": 0}, ValueError, "num_proxy_groups"),
        ({"stride": 0}, ValueError, "stride"),
        ({"stride": 17}, ValueError, "stride=17"),
        ({"stride": 2.0}, TypeError, "stride"),
        ({"min_budget_tokens": -1}, ValueError, "min_budget_tokens"),
        ({"block_size": 0}, ValueError, "block_size"),
    ],
)
def test_bad_input_raises(rng, kwargs, error, match):
    q, k, v = make_qkv(rng, 1, 4, 2, 64, 64, 16, torch.float32)
    with pytest.raises(error, match=match):
        proxy_attn(q, k, v, **{"block_size": 16, **kwargs})


def test_bad_selection_input_raises(rng):
    q, k, v = make_qkv(rng, 1, 4, 2, 64, 64, 16, torch.float32)
    scores = proxy_estimate(q, k, block_size=16)
    blocks = torch.full((1, 4), 2)
    with pytest.raises(ValueError, match="seq_len_q <= seq_len_kv"):
        proxy_estimate(q, k[:, :, :32], block_size=16)
    with pytest.raises(TypeError, match="head_blocks"):
        proxy_select(scores, blocks.float(), block_size=16)
    with pytest.raises(ValueError, match="head_blocks"):
        proxy_select(scores, torch.full((2, 4), 2), block_size=16)
    with pytest.raises(ValueError, match="head_blocks values"):
        proxy_select(scores, torch.full((1, 4), 5), block_size=16)
    with pytest.raises(ValueError, match="blocks"):
        proxy_select(scores, blocks, block_size=16, seq_len_q=100)
    with pytest.raises(TypeError, match="float32 or float64"):
        proxy_select(scores.half(), blocks, block_size=16)
    with pytest.raises(ValueError, match="NaN"):
        proxy_select(scores.clone().fill_(float("nan")), blocks, block_size=16)
    # Scores outside [0, 1] (a caller's own) rank among themselves: forced blocks still come first, hidden last.
    expected = proxy_select(scores, blocks, block_size=16).to_dense_mask()
    for shifted in (scores * 10 + 5, scores - 3):
        assert torch.equal(proxy_select(shifted, blocks, block_size=16).to_dense_mask(), expected)
    with pytest.raises(ValueError, match="same number of sequences"):
        cu = torch.tensor([0, 64], dtype=torch.int32)
        proxy_attn_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu,
                          torch.tensor([0, 32, 64], dtype=torch.int32), 64, 32, block_size=16)  # fmt: skip


@pytest.mark.skipif(not triton_available(DEVICE), reason="triton is not installed")
def test_opcheck_sampled_block_scores_op(rng):
    from sparse_attn.kernels.block_scores import sampled_block_scores_op

    q, k, _ = make_qkv(rng, 1, 2, 1, 48, 64, 16, torch.float32)
    # The Triton interpreter executes kernels even on fake tensors: fake/compile checks run on the GPU.
    utils = ("test_schema",) + (("test_faketensor", "test_aot_dispatch_dynamic") if DEVICE.type == "cuda" else ())
    torch.library.opcheck(sampled_block_scores_op, (q, k, 4, 16, 4, 16, 48, True, True), test_utils=utils)


# ---------------------------------------------------------------------------------- 9: quality
def test_quality_on_structured_inputs():
    """Density, attention-mass recall and output error against dense, beside XAttention (stride 8) at
    about the same density. Block 64 and a 256-token floor (at block 128 the default 2048-token
    floor keeps every row of a CPU-sized sequence dense); g = 1, stride 4.

    Measured (seed 0, L = 2048, Hq = 4, Hkv = 2, D = 64; density / recall / output relative error):
      printed per gamma (run with -s), with XAttention at the closest tau beside it.
    """
    block, seq_len = 64, 2048
    inputs = structured_qkv(1, 4, 2, seq_len, 64, seed=0, device=DEVICE)
    q, k, v = inputs.q, inputs.k, inputs.v
    allowed = causal_token_mask(seq_len, seq_len, DEVICE)
    keys = k.double().repeat_interleave(2, dim=1)
    probs = (q.double() @ keys.transpose(-1, -2) / 8.0).masked_fill(~allowed, -math.inf).softmax(-1)
    blocks = seq_len // block
    mass = probs.view(1, 4, blocks, block, blocks, block).sum(dim=(-3, -1))
    dense, _ = masked_attention(q, k, v, allowed)

    def measure(layout):
        recall = ((mass * layout.to_dense_mask()).sum() / mass.sum()).item()
        out, _ = block_sparse_attention_reference(q, k, v, layout)
        return layout.density(), recall, ((out - dense).norm() / dense.norm()).item()

    xattention_scores = xattention_estimate(q, k, stride=8, block_size=block)
    peers = {tau: measure(xattention_select(xattention_scores, tau, block_size=block)) for tau in (0.6, 0.8, 0.9, 0.95)}
    proxy_scores = proxy_estimate(q, k, block_size=block)
    previous = None
    for gamma in (0.8, 0.9, 0.95):
        budget = proxy_budget(q, k, gamma=gamma, block_size=block)
        layout = proxy_select(proxy_scores, budget, block_size=block, min_budget_tokens=256)
        density, recall, error = measure(layout)
        tau, peer = min(peers.items(), key=lambda item: abs(item[1][0] - density))
        print(
            f"gamma={gamma}: density {density:.3f} recall {recall:.4f} error {error:.4f} | "
            f"XAttention tau={tau}: density {peer[0]:.3f} recall {peer[1]:.4f} error {peer[2]:.4f}"
        )
        assert density < 0.95
        assert 1 - recall <= 0.5 * (1 - density)  # far better than a selection blind to the attention
        if previous is not None:
            assert density >= previous[0] and recall >= previous[1]
        previous = (density, recall, error)


# ---------------------------------------------------------------------------------- GPU, real sizes
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_estimate_and_budget_real_sizes(rng, dtype):
    for batch, hq, hkv, seq_q, seq_kv, groups in ((2, 8, 2, 4096, 4096, 1), (1, 8, 4, 1000, 5000, 4)):
        q, k, _ = make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, 128, dtype, spread=1.0)
        scores = proxy_estimate(q, k, num_proxy_groups=groups)
        assert max_err(scores, proxy_estimate_reference(q, k, num_proxy_groups=groups)) <= 1e-2
        budget, ref = proxy_budget(q, k, gamma=0.9), proxy_budget_reference(q, k, gamma=0.9)
        assert bool(((budget - ref).abs() <= 1).all())  # bf16 rounding may move the gamma crossing by a block


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_end_to_end_real_sizes(rng, dtype):
    inputs = structured_qkv(2, 8, 2, 8192, 128, seed=1, dtype=dtype, device=DEVICE)
    q, k, v = inputs.q, inputs.k, inputs.v
    out, layout = proxy_attn(q, k, v, gamma=0.9, return_layout=True)
    assert out.dtype == dtype and layout.density() < 1
    ref, _ = block_sparse_attention_reference(q, k, v, layout)
    assert max_err(out, ref) < 2e-2
    full = proxy_attn(q, k, v, gamma=1.0)
    dense, _ = masked_attention(q, k, v, causal_token_mask(8192, 8192, DEVICE))
    same, _ = masked_attention(q, k, v, causal_token_mask(8192, 8192, DEVICE), compute_dtype=dtype)
    assert_flash_rule(full, dense, same, 2, "output")
