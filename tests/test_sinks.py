"""Learned attention sinks (`attn_sink`, GPT-OSS's `sinks`) on every attention function, against the fp64
oracle that appends the sink as one more softmax column with no value (`reference.masked_attention`).

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (conftest.py) on small fp16/fp32 shapes.
"""

import pytest
import torch

import sparse_attn
from sparse_attn.engine import triton_available
from sparse_attn.reference import block_sparse_attention_reference, causal_token_mask, masked_attention
from sparse_attn.testing import assert_flash_rule_with_grads, random_block_layout

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="triton is not installed")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv("SPARSE_ATTN_POISON_OUTPUTS", "1")


def make_inputs(rng, batch, hq, hkv, seq_q, seq_kv, dim, dtype):
    """q, k, v in `dtype` and a sink per query head in fp32 (a model parameter's dtype), all requiring grad.
    Sinks spread over [-2, 4] so that some rows give the sink most of their mass and others little."""
    shapes = ((batch, hq, seq_q, dim), (batch, hkv, seq_kv, dim), (batch, hkv, seq_kv, dim))
    q, k, v = (torch.randn(s, generator=rng).to(DEVICE, dtype).requires_grad_() for s in shapes)
    sink = (torch.rand(hq, generator=rng) * 6 - 2).to(DEVICE).requires_grad_()
    return q, k, v, sink


def dense_causal_oracle(q, k, v, sink, compute_dtype=torch.float64):
    allowed = causal_token_mask(q.shape[2], k.shape[2], q.device)
    return masked_attention(q, k, v, allowed, attn_sink=sink, compute_dtype=compute_dtype)[0]


def test_oracle_sink_column_equals_the_lse_form(rng):
    """The oracle's sink column and sigmoid(lse - sink) are two forms of one softmax; rows with no key give 0."""
    q, k, v, sink = make_inputs(rng, 2, 4, 2, 9, 13, 8, torch.float64)
    allowed = torch.rand(2, 4, 9, 13, generator=rng).to(DEVICE) < 0.5
    allowed[0, 1, 3] = False
    out, lse = masked_attention(q, k, v, allowed)
    with_sink, lse_with_sink = masked_attention(q, k, v, allowed, attn_sink=sink)
    torch.testing.assert_close(with_sink, out * torch.sigmoid(lse - sink.double()[:, None])[..., None])
    assert torch.equal(lse_with_sink, lse)
    assert bool((with_sink[0, 1, 3] == 0).all())


BACKENDS = [
    ("triton", torch.float16),
    ("triton", torch.float32),
    ("torch", torch.float32),
    ("reference", torch.float32),
    pytest.param("triton", torch.bfloat16, marks=pytest.mark.gpu),  # the interpreter's bf16 tl.dot is wrong
]


@pytest.mark.parametrize(
    "backend, dtype", BACKENDS, ids=["triton-fp16", "triton-fp32", "torch-fp32", "reference-fp32", "triton-bf16"]
)
def test_block_sparse_attn_with_sink(rng, backend, dtype):
    """GQA, Sq < Skv, a ragged last block and rows without any block, forward and gradients (sink included)."""
    q, k, v, sink = make_inputs(rng, 2, 4, 2, 40, 56, 32, dtype)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    layout = random_block_layout(2, 4, 40, 56, 16, 16, 0.5, seed=seed, device=DEVICE)
    layout.kv_num_blocks[1, 2, 1] = 0  # an empty row block: output 0 whatever the sink
    out = sparse_attn.block_sparse_attn(q, k, v, layout, attn_sink=sink, backend=backend)
    ref, _ = block_sparse_attention_reference(q, k, v, layout, attn_sink=sink)
    same, _ = block_sparse_attention_reference(q, k, v, layout, attn_sink=sink, compute_dtype=dtype)
    assert bool((out[1, 2, 16:32] == 0).all())
    assert_flash_rule_with_grads(out, ref, same, (q, k, v, sink), rng)


def test_varlen_with_sink_equals_each_sequence(rng):
    lengths = [23, 40]
    cu = torch.tensor([0, 23, 63], dtype=torch.int32, device=DEVICE)
    q, k, v, sink = make_inputs(rng, 1, 4, 2, 63, 63, 16, torch.float32)
    packed = [t[0].transpose(0, 1).detach() for t in (q, k, v)]  # (total, H, D)
    layout = random_block_layout(2, 4, 40, 40, 16, 16, 0.6, seed=3, device=DEVICE)
    out = sparse_attn.block_sparse_attn_varlen(*packed, cu, cu, 40, 40, layout, attn_sink=sink)
    start = 0
    for index, length in enumerate(lengths):
        parts = [t[start : start + length].transpose(0, 1)[None] for t in packed]
        blocks = -(-length // 16)
        part_layout = sparse_attn.BlockSparseLayout.from_dense_mask(
            layout.to_dense_mask()[index : index + 1, :, :blocks, :blocks],
            q_block_size=16,
            kv_block_size=16,
            seq_len_q=length,
            seq_len_kv=length,
        )
        ref, _ = block_sparse_attention_reference(*parts, part_layout, attn_sink=sink.detach())
        torch.testing.assert_close(out[start : start + length].double(), ref[0].transpose(0, 1), rtol=1e-4, atol=1e-5)
        start += length


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_moba_varlen_with_sink_equals_each_sequence(rng, backend):
    cu = torch.tensor([0, 23, 63], dtype=torch.int32, device=DEVICE)
    q, k, v, sink = make_inputs(rng, 1, 4, 2, 63, 63, 16, torch.float32)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]  # (total, H, D)
    out = sparse_attn.moba_attn_varlen(*packed, cu, 40, 16, 2, attn_sink=sink, backend=backend)
    want = [
        sparse_attn.moba_attn(*(t[:, :, lo:hi] for t in (q, k, v)), block_size=16, topk=2, attn_sink=sink)
        for lo, hi in ((0, 23), (23, 63))
    ]
    torch.testing.assert_close(out, torch.cat([w[0].transpose(0, 1) for w in want]), rtol=1e-5, atol=1e-5)
    (grad_out,) = torch.autograd.grad(out.sum(), sink)
    (grad_want,) = torch.autograd.grad(sum(w.sum() for w in want), sink)
    torch.testing.assert_close(grad_out, grad_want, rtol=1e-4, atol=1e-5)


def _full_budget_methods():
    """name -> attention at settings where the method is dense causal attention (32 x 48 keys, blocks of 16)."""
    return {
        "moba": lambda q, k, v, sink: sparse_attn.moba_attn(q, k, v, block_size=16, topk=8, attn_sink=sink),
        "xattention": lambda q, k, v, sink: sparse_attn.xattention_attn(
            q, k, v, block_size=16, stride=4, threshold=1.0, attn_sink=sink
        ),
        "proxyattn": lambda q, k, v, sink: sparse_attn.proxy_attn(
            q, k, v, block_size=16, stride=4, gamma=1.0, attn_sink=sink
        ),
        "s2o": lambda q, k, v, sink: sparse_attn.s2o_attention(
            q, k, v, segment_len=16, block_m=16, block_n=16, tau=0.0, attn_sink=sink
        ),
    }


@pytest.mark.parametrize("method", sorted(_full_budget_methods()))
def test_methods_at_full_budget_equal_dense_attention_with_sink(rng, method):
    q, k, v, sink = make_inputs(rng, 2, 4, 2, 32, 48, 16, torch.float32)
    out = _full_budget_methods()[method](q, k, v, sink)
    ref = dense_causal_oracle(q, k, v, sink)
    same = dense_causal_oracle(q, k, v, sink, compute_dtype=torch.float32)
    assert_flash_rule_with_grads(out, ref, same, (q, k, v, sink), rng, what=method)


@pytest.mark.parametrize("method", ["xattention", "proxyattn"])
def test_selected_layouts_with_sink(rng, method):
    """Below full budget the sink applies over the selected blocks (the layout the method returns)."""
    q, k, v, sink = make_inputs(rng, 1, 4, 2, 64, 64, 16, torch.float32)
    if method == "xattention":
        out, layout = sparse_attn.xattention_attn(
            q, k, v, block_size=16, stride=4, threshold=0.5, attn_sink=sink, return_layout=True
        )
    else:
        out, layout = sparse_attn.proxy_attn(
            q, k, v, block_size=16, stride=4, gamma=0.5, min_budget_tokens=16, attn_sink=sink, return_layout=True
        )
    assert layout.density(causal=True) < 1
    ref, _ = block_sparse_attention_reference(q, k, v, layout, attn_sink=sink)
    same, _ = block_sparse_attention_reference(q, k, v, layout, attn_sink=sink, compute_dtype=torch.float32)
    assert_flash_rule_with_grads(out, ref, same, (q, k, v, sink), rng, what=method)


def test_decode_with_sink_equals_the_prefill_rows(rng):
    """moba_decode and block_sparse_decode (the native op) apply the sink as the prefill does."""
    q, k, v, sink = make_inputs(rng, 2, 4, 2, 40, 40, 64, torch.float32)
    q, k, v, sink = (t.detach() for t in (q, k, v, sink))
    prefill = sparse_attn.moba_attn(q, k, v, block_size=8, topk=3, attn_sink=sink)
    step = sparse_attn.moba_decode(q[:, :, -1:], k, v, block_size=8, topk=3, attn_sink=sink)
    torch.testing.assert_close(step, prefill[:, :, -1:], rtol=1e-4, atol=1e-5)
    if sparse_attn.decode.decode_available(DEVICE):
        layout = random_block_layout(2, 4, 1, 40, 1, 8, 0.5, seed=5, device=DEVICE)
        out = sparse_attn.block_sparse_decode(q[:, :, -1:], k, v, layout, attn_sink=sink)
        ref, _ = block_sparse_attention_reference(q[:, :, -1:], k, v, layout, attn_sink=sink)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def _calls(q, k, v, sink):
    layout = random_block_layout(1, 4, 32, 32, 16, 16, 1.0, seed=0, device=DEVICE)
    return {
        "block_sparse_attn": lambda: sparse_attn.block_sparse_attn(q, k, v, layout, attn_sink=sink),
        "moba_attn": lambda: sparse_attn.moba_attn(q, k, v, block_size=16, topk=2, attn_sink=sink),
        "moba_decode": lambda: sparse_attn.moba_decode(q[:, :, :1], k, v, block_size=16, topk=2, attn_sink=sink),
        "xattention_attn": lambda: sparse_attn.xattention_attn(q, k, v, block_size=16, stride=4, attn_sink=sink),
        "proxy_attn": lambda: sparse_attn.proxy_attn(q, k, v, block_size=16, stride=4, attn_sink=sink),
        "s2o_attention": lambda: sparse_attn.s2o_attention(
            q, k, v, segment_len=16, block_m=16, block_n=16, attn_sink=sink
        ),
    }


@pytest.mark.parametrize("function", sorted(_calls(None, None, None, None)))
@pytest.mark.parametrize(
    "sink, error, match",
    [
        (torch.zeros(2), ValueError, r"attn_sink must be one logit per query head, \(4,\)"),
        (torch.zeros(1, 4), ValueError, "attn_sink must be 1-D"),
        (torch.zeros(4, dtype=torch.int64), TypeError, "attn_sink must have dtype"),
        ([0.0] * 4, TypeError, "attn_sink must be a torch.Tensor"),
    ],
    ids=["per-kv-head", "2-D", "integer", "list"],
)
def test_bad_sinks_are_named(rng, function, sink, error, match):
    q, k, v, _ = make_inputs(rng, 1, 4, 2, 32, 32, 16, torch.float32)
    sink = sink.to(DEVICE) if isinstance(sink, torch.Tensor) else sink
    with pytest.raises(error, match=match):
        _calls(q, k, v, sink)[function]()


def test_infinite_sinks(rng):
    """A sink of -inf is no sink and one of +inf takes every row's whole mass; empty rows stay 0 (no NaN)."""
    q, k, v, _ = make_inputs(rng, 1, 4, 2, 32, 32, 16, torch.float32)
    layout = random_block_layout(1, 4, 32, 32, 16, 16, 0.5, seed=2, device=DEVICE)
    layout.kv_num_blocks[0, 1, 0] = 0
    plain = sparse_attn.block_sparse_attn(q, k, v, layout)
    sink = torch.tensor([float("-inf"), float("inf"), float("-inf"), 0.0], device=DEVICE, requires_grad=True)
    out = sparse_attn.block_sparse_attn(q, k, v, layout, attn_sink=sink)
    torch.testing.assert_close(out[:, [0, 2]], plain[:, [0, 2]])
    assert bool((out[:, 1] == 0).all())
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    # The fp64 oracle keeps the empty row at 0 under a sink of -inf too (no -inf - -inf).
    ref, _ = block_sparse_attention_reference(q, k, v, layout, attn_sink=sink.detach())
    assert bool((ref[:, 1, :16] == 0).all()) and not bool(ref.isnan().any())


@pytest.mark.parametrize("mask_kind", ["causal", "bool", "additive", "none"])
def test_sdpa_with_sink_equals_the_oracle(rng, mask_kind):
    """The dense path (SDPA with a sink key built in) against the oracle, with gradients, in float64: exact."""
    from sparse_attn.sinks import sdpa_with_sink

    q, k, v, sink = make_inputs(rng, 2, 4, 2, 21, 21 if mask_kind == "causal" else 30, 20, torch.float64)
    allowed = torch.rand(2, 1, 21, k.shape[2], generator=rng).to(DEVICE) < 0.6
    if mask_kind == "causal":
        allowed = causal_token_mask(21, 21, DEVICE)
        out = sdpa_with_sink(q, k, v, sink, is_causal=True)
    elif mask_kind == "none":
        allowed = torch.ones_like(allowed)
        out = sdpa_with_sink(q, k, v, sink)
    else:
        mask = (
            allowed if mask_kind == "bool" else torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, -1e30)
        )
        out = sdpa_with_sink(q, k, v, sink, attn_mask=mask.to(DEVICE))
    ref, _ = masked_attention(q, k, v, allowed, attn_sink=sink)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grad = torch.randn(out.shape, generator=rng, dtype=out.dtype).to(DEVICE)
    for got, want in zip(
        torch.autograd.grad(out, (q, k, v, sink), grad), torch.autograd.grad(ref, (q, k, v, sink), grad)
    ):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("function", ["block_sparse_attn", "moba_attn", "token_sparse_attn", "s2o_attention"])
def test_float64_paths_keep_float64_with_a_sink(rng, backend, function):
    """The PyTorch paths carry their fp64 LSE into the sink's factor (an fp32 LSE there left fp64 results
    fp32-accurate, and gradcheck failed); the returned LSE is fp32 on every path."""
    q, k, v, sink = make_inputs(rng, 1, 2, 1, 20, 24, 8, torch.float64)
    sink = sink.detach().double().requires_grad_()
    layout = random_block_layout(1, 2, 20, 24, 8, 8, 0.7, causal=True, seed=2, device=DEVICE)
    indices = torch.stack([torch.randperm(24, generator=rng)[:6] for _ in range(20)]).view(1, 20, 1, 6).to(DEVICE)
    calls = {
        "block_sparse_attn": lambda *t: sparse_attn.block_sparse_attn(*t[:3], layout, attn_sink=t[3], backend=backend),
        "moba_attn": lambda *t: sparse_attn.moba_attn(*t[:3], block_size=8, topk=2, attn_sink=t[3], backend=backend),
        "token_sparse_attn": lambda *t: sparse_attn.token_sparse_attn(*t[:3], indices, attn_sink=t[3], backend=backend),
        "s2o_attention": lambda *t: sparse_attn.s2o_attention(
            *t[:3], segment_len=16, block_m=16, block_n=16, tau=0.0, attn_sink=t[3], backend=backend
        ),  # tau 0: a stop decision would make the function discontinuous for gradcheck
    }
    assert torch.autograd.gradcheck(calls[function], (q, k, v, sink))
    if function == "block_sparse_attn":
        _, lse = sparse_attn.block_sparse_attn(q, k, v, layout, attn_sink=sink, backend=backend, return_lse=True)
        assert lse.dtype == torch.float32
