"""MoBA attention: routed attention against the dense-mask oracle (FlashAttention's error rule)."""

import pytest
import torch
import torch.nn.functional as F

from sparse_attn.engine import triton_available
from sparse_attn.methods.moba import (
    moba_attention_reference,
    moba_attn,
    moba_attn_varlen,
    moba_attn_varlen_qk,
    moba_route,
)
from sparse_attn.reference import causal_token_mask
from sparse_attn.testing import assert_flash_rule, max_err, structured_qkv

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="triton is not installed")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv("SPARSE_ATTN_POISON_OUTPUTS", "1")


def make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, dim, dtype):
    shapes = ((batch, hq, seq_q, dim), (batch, hkv, seq_kv, dim), (batch, hkv, seq_kv, dim))
    return [torch.randn(s, generator=rng).to(DEVICE, dtype).requires_grad_() for s in shapes]


def check(q, k, v, *, block_size, topk, causal=True):
    out = moba_attn(q, k, v, block_size=block_size, topk=topk, causal=causal)
    routes = moba_route(q.detach(), k.detach(), block_size=block_size, topk=topk, causal=causal)
    ref, _ = moba_attention_reference(q, k, v, routes, block_size=block_size, causal=causal)
    same, _ = moba_attention_reference(q, k, v, routes, block_size=block_size, causal=causal, compute_dtype=q.dtype)
    assert not torch.isnan(out).any(), "unwritten (poisoned) output"
    assert_output_and_grads(out, ref, same, (q, k, v))
    return out


def assert_output_and_grads(out, ref, same, inputs):
    """FlashAttention's rule for the output (2x) and the gradients of `inputs` (3x) against the fp64 oracle."""
    assert_flash_rule(out, ref, same, 2, "output")
    grad = torch.randn_like(out)
    for name, g, r, s in zip(
        "qkv",
        torch.autograd.grad(out, inputs, grad),
        torch.autograd.grad(ref, inputs, grad.double()),
        torch.autograd.grad(same, inputs, grad.to(same.dtype)),
    ):
        assert_flash_rule(g, r, s, 3, f"d{name}")


CASES = {
    # name: (batch, hq, hkv, seq_q, seq_kv, dim, block, topk)
    "mha": (1, 2, 2, 160, 160, 32, 32, 3),
    "gqa4_ragged": (2, 4, 1, 150, 150, 32, 16, 4),
    "q_shorter_than_kv": (1, 4, 2, 40, 170, 32, 32, 2),
    "head_dim_64": (1, 2, 1, 128, 128, 64, 32, 2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_oracle(rng, case, dtype):
    batch, hq, hkv, seq_q, seq_kv, dim, block, topk = CASES[case]
    q, k, v = make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, dim, dtype)
    check(q, k, v, block_size=block, topk=topk)


def test_every_causal_shift_within_a_block(rng):
    """Bottom-right causality of the own block at every offset Skv - Sq modulo the block size."""
    for shift in range(16):
        q, k, v = make_qkv(rng, 1, 2, 1, 20, 40 + shift, 16, torch.float32)
        check(q, k, v, block_size=16, topk=2)


def test_non_causal(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 96, 96, 32, torch.float32)
    check(q, k, v, block_size=32, topk=2, causal=False)


def test_full_budget_is_dense_causal(rng):
    q, k, v = make_qkv(rng, 1, 4, 2, 128, 128, 32, torch.float32)
    out = moba_attn(q, k, v, block_size=32, topk=4)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_token_mask(128, 128, DEVICE), enable_gqa=True)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    # A topk far above the 4 blocks (set to make short inputs dense) is the same, without topk-wide routes.
    torch.testing.assert_close(moba_attn(q, k, v, block_size=32, topk=2**40), out, rtol=0, atol=0)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]
    cu = torch.tensor([0, 128], dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(moba_attn_varlen(*packed, cu, 128, 32, 2**40), out[0].transpose(0, 1))


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("shape", [(0, 2, 8), (1, 2, 0)], ids=["no-batch", "no-rows"])
def test_empty_inputs_have_empty_outputs_and_zero_gradients(backend, shape):
    batch, heads, seq = shape
    q, k, v = (torch.randn(batch, heads, seq, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    out = moba_attn(q, k, v, block_size=16, topk=2, backend=backend)
    assert out.shape == q.shape
    out.sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape and not t.grad.any() for t in (q, k, v))


def test_structured_inputs_route_to_planted_spans():
    inputs = structured_qkv(batch=1, num_q_heads=2, num_kv_heads=1, seq_len=512, head_dim=32, seed=3, device=DEVICE)
    out = moba_attn(inputs.q, inputs.k, inputs.v, block_size=32, topk=4)
    dense = F.scaled_dot_product_attention(inputs.q, inputs.k, inputs.v, is_causal=True, enable_gqa=True)
    # A quarter of the blocks at most, yet the structured mass (sinks, locality, spans) is mostly kept.
    assert ((out - dense).norm() / dense.norm()).item() < 0.5


def test_block_size_the_kernel_cannot_take(rng):
    q, k, v = (t.detach() for t in make_qkv(rng, 1, 2, 2, 64, 64, 32, torch.float32))
    with pytest.raises(ValueError, match="^block_size=8 must be a multiple of 16"):
        moba_attn(q, k, v, block_size=8, topk=2, backend="triton")
    out = moba_attn(q, k, v, block_size=8, topk=2, backend="reference")
    assert out.shape == q.shape
    with pytest.raises(ValueError, match="topk"):
        moba_attn(q, k, v, block_size=16, topk=0)
    # A block far above the keys is one block of them all (dense causal), sized by the keys, not the block:
    # the PyTorch paths do not pad to it, and the kernels refuse a block past int32.
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for backend in ("torch", "reference"):
        torch.testing.assert_close(moba_attn(q, k, v, block_size=2**40, topk=1, backend=backend), dense)
    with pytest.raises(ValueError, match="int32 block sizes"):
        moba_attn(q, k, v, block_size=2**31, topk=1, backend="triton")


# ---------------------------------------------------------------------------------- gathered kernels
def random_routes(rng, batch, hq, seq_q, seq_kv, block, topk, causal):
    """Random block choices per row (ascending, -1 padded), the own block always in when causal:
    the attention kernels must be exact for any routing, not only for top-k routing."""
    num_blocks = -(-seq_kv // block)
    position = torch.arange(seq_q) + seq_kv - seq_q
    scores = torch.rand(batch, hq, seq_q, num_blocks, generator=rng)
    if causal:
        block_ids = torch.arange(num_blocks)
        eligible = (block_ids + 1) * block <= position[:, None]
        scores = scores.masked_fill(~eligible, -1.0)
        scores = torch.where(block_ids == (position // block)[:, None], 2.0, scores)
    top = scores.topk(min(topk, num_blocks), dim=-1)
    routes = torch.where(top.values >= 0, top.indices, -1).to(torch.int32)
    routes = torch.where(routes < 0, torch.iinfo(torch.int32).max, routes).sort(-1).values
    return torch.where(routes == torch.iinfo(torch.int32).max, -1, routes).to(DEVICE)


GATHER_CASES = {
    # name: (batch, hq, hkv, seq_q, seq_kv, dim, block, topk, causal); items > the interpreter's 3 programs
    "gqa8_many_items": (2, 8, 1, 200, 200, 32, 16, 5, True),
    "mqa_q_shorter": (1, 4, 1, 90, 230, 64, 32, 3, True),
    "non_causal_ragged": (2, 2, 2, 130, 130, 32, 16, 4, False),
}


def check_gathered(rng, case, dtype):
    """routed_attention on random routes against the dense-mask oracle (FlashAttention's rule, LSE)."""
    from sparse_attn._moba_ops import routed_attention

    batch, hq, hkv, seq_q, seq_kv, dim, block, topk, causal = GATHER_CASES[case]
    q, k, v = make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, dim, dtype)
    routes = random_routes(rng, batch, hq, seq_q, seq_kv, block, topk, causal)
    out, lse = routed_attention(q, k, v, routes, block, causal, dim**-0.5, seq_kv)
    ref, ref_lse = moba_attention_reference(q, k, v, routes, block_size=block, causal=causal)
    same, _ = moba_attention_reference(q, k, v, routes, block_size=block, causal=causal, compute_dtype=q.dtype)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    assert_output_and_grads(out, ref, same, (q, k, v))


@pytest.mark.parametrize("case", list(GATHER_CASES))
def test_gathered_kernels_exact_for_any_routing(rng, case):
    check_gathered(rng, case, torch.float32)


@pytest.mark.parametrize("case", ["gqa8_many_items", "mqa_q_shorter"])
def test_gathered_kernels_through_descriptors(rng, kernels_with_tma, case):
    """The forward and dQ with K/V tiles through tensor descriptors (the `tma` tile option)."""
    check_gathered(rng, case, torch.float16)
    assert kernels_with_tma.made == [True, True]  # forward and dQ


def test_pair_lists_follow_their_definition(rng):
    from sparse_attn._moba_ops import routed_pair_lists

    batch, hq, hkv, seq_q, seq_kv, block, rows_per_item = 2, 4, 2, 50, 70, 16, 16
    routes = random_routes(rng, batch, hq, seq_q, seq_kv, block, 3, True).cpu()
    num_blocks, num_logical = -(-seq_kv // block), -(-seq_q // rows_per_item)
    seg_start, pair_rows = routed_pair_lists(routes, hkv, num_blocks, rows_per_item)
    expected = {}
    for b, h, r, t in zip(*torch.nonzero(routes >= 0, as_tuple=True)):
        segment = ((b * hkv + h // (hq // hkv)) * num_blocks + routes[b, h, r, t]) * num_logical + r // rows_per_item
        expected.setdefault(int(segment), []).append(int(h * seq_q + r))
    assert seg_start.dtype == pair_rows.dtype == torch.int32
    assert seg_start.numel() == batch * hkv * num_blocks * num_logical + 1
    for segment in range(seg_start.numel() - 1):
        got = sorted(pair_rows[seg_start[segment] : seg_start[segment + 1]].tolist())
        assert got == sorted(expected.get(segment, [])), f"segment {segment}"


def test_opcheck_moba_ops(rng):
    from sparse_attn import _moba_ops

    q, k, v = make_qkv(rng, 1, 2, 1, 40, 40, 16, torch.float32)
    routes = random_routes(rng, 1, 2, 40, 40, 16, 2, True)
    seg_start, pair_rows = _moba_ops.routed_pair_lists(routes, 1, 3, 64)
    args = (q, k, v, seg_start, pair_rows, None, None, 16, 64, 40, 40, True, 0.25)
    # The interpreter executes kernels even on fake tensors: fake-tensor and compile checks need the GPU.
    utils = ("test_schema", "test_autograd_registration")
    if DEVICE.type == "cuda":
        utils += ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(_moba_ops.moba_attn_fwd, args, test_utils=utils)


# ---------------------------------------------------------------------------------- varlen
def packed_qkv(rng, lengths_q, lengths_k, hq, hkv, dim, dtype):
    shapes = ((sum(lengths_q), hq, dim), (sum(lengths_k), hkv, dim), (sum(lengths_k), hkv, dim))
    tensors = [torch.randn(s, generator=rng).to(DEVICE, dtype).requires_grad_() for s in shapes]
    cu = [torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32) for lengths in (lengths_q, lengths_k)]
    return tensors, cu


def per_sequence_oracle(q, k, v, cu_q, cu_k, block_size, topk, compute_dtype):
    """Each sequence on its own through the dense-mask oracle, packed again: (total_q, Hq, D)."""
    outs = []
    for i in range(cu_q.numel() - 1):
        seq_q = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)[None]
        seq_k, seq_v = (t[cu_k[i] : cu_k[i + 1]].transpose(0, 1)[None] for t in (k, v))
        routes = moba_route(seq_q.detach(), seq_k.detach(), block_size=block_size, topk=topk)
        out, _ = moba_attention_reference(
            seq_q, seq_k, seq_v, routes, block_size=block_size, compute_dtype=compute_dtype
        )
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


VARLEN_CASES = {
    # name: (query lengths, key lengths, hq, hkv, block, topk)
    "prefill_ragged_gqa": ([70, 0, 130, 33], [70, 0, 130, 33], 4, 2, 16, 3),
    "chunked_and_decode": ([1, 20, 50], [147, 40, 64], 2, 1, 32, 2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(VARLEN_CASES))
def test_varlen_matches_per_sequence_oracle(rng, case, dtype):
    lengths_q, lengths_k, hq, hkv, block, topk = VARLEN_CASES[case]
    (q, k, v), (cu_q, cu_k) = packed_qkv(rng, lengths_q, lengths_k, hq, hkv, 32, dtype)
    if lengths_q == lengths_k:
        out = moba_attn_varlen(q, k, v, cu_q, max(lengths_q), block, topk)
    else:
        out = moba_attn_varlen_qk(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), block, topk)
    assert out.shape == q.shape and not torch.isnan(out).any()
    ref = per_sequence_oracle(q, k, v, cu_q, cu_k, block, topk, torch.float64)
    same = per_sequence_oracle(q, k, v, cu_q, cu_k, block, topk, q.dtype)
    assert_output_and_grads(out, ref, same, (q, k, v))


def test_lse_gradient(rng):
    """The returned LSE is differentiable like the output, batched and packed."""
    q, k, v = make_qkv(rng, 2, 4, 2, 70, 70, 16, torch.float32)
    out, lse = moba_attn(q, k, v, block_size=16, topk=2, return_lse=True)
    routes = moba_route(q.detach(), k.detach(), block_size=16, topk=2)
    ref_out, ref_lse = moba_attention_reference(q, k, v, routes, block_size=16)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * grad_out).sum() + (lse * grad_lse).sum(), (q, k, v))
    loss = (ref_out * grad_out.double()).sum() + (ref_lse * grad_lse.double()).sum()
    for name, g, r in zip("qkv", grads, torch.autograd.grad(loss, (q, k, v))):
        assert max_err(g, r) < 1e-4, f"d{name}"

    (pq, pk, pv), (cu, _) = packed_qkv(rng, [30, 50], [30, 50], 4, 2, 16, torch.float32)
    lse = moba_attn_varlen(pq, pk, pv, cu, 50, 16, 2, return_lse=True)[1]
    ref_lse = moba_attn_varlen(pq, pk, pv, cu, 50, 16, 2, return_lse=True, backend="reference")[1]
    grad_lse = torch.randn_like(lse)
    for g, r in zip(
        torch.autograd.grad((lse * grad_lse).sum(), (pq, pk)), torch.autograd.grad((ref_lse * grad_lse).sum(), (pq, pk))
    ):
        assert max_err(g, r) < 1e-4


def test_torch_path_autograd_hygiene(rng):
    """The PyTorch path's backward treats O and the LSE as constants, so it refuses a second derivative (one
    that ran would be wrong); its output is a tensor of its own, and an in-place edit of it before backward
    is caught by autograd's version check rather than corrupting the gradients."""
    q, k, v = make_qkv(rng, 1, 2, 2, 16, 16, 8, torch.float64)
    out = moba_attn(q, k, v, block_size=4, topk=2, backend="torch")
    with pytest.raises(NotImplementedError, match="second derivative"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)
    out = moba_attn(q, k, v, block_size=4, topk=2, backend="torch")
    assert out._base is None
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_strided_inputs_and_offsets(rng, strided_views):
    """A transposed, expanded or sliced q/k/v and strided offsets give the contiguous inputs' results."""
    q, k, v = make_qkv(rng, 2, 4, 2, 96, 96, 16, torch.float32)
    k, v = (t.detach()[:1].expand_as(t).contiguous().requires_grad_() for t in (k, v))
    grad = torch.randn(q.shape, generator=rng).to(DEVICE)
    expected = moba_attn(q, k, v, block_size=16, topk=3)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    leaves, views = strided_views(q, k, v)
    out = moba_attn(*views, block_size=16, topk=3)
    grads = torch.autograd.grad(out, leaves, grad)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], expected_grads[0].transpose(-1, -2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], expected_grads[1].sum(0, keepdim=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[2][:, :, :96], expected_grads[2], rtol=1e-5, atol=1e-5)

    (pq, pk, pv), (cu, _) = packed_qkv(rng, [40, 56], [40, 56], 4, 2, 16, torch.float32)
    strided_cu = torch.stack([cu, torch.full_like(cu, 999)], dim=1).view(-1)[::2]  # same values, stride 2
    assert strided_cu.stride(0) == 2 and torch.equal(strided_cu, cu)
    torch.testing.assert_close(
        moba_attn_varlen(pq, pk, pv, strided_cu, 56, 16, 2), moba_attn_varlen(pq, pk, pv, cu, 56, 16, 2), rtol=0, atol=0
    )


def test_varlen_through_descriptors_equals_pointer_loads(rng, kernels_with_tma):
    lengths_q, lengths_k, hq, hkv, block, topk = VARLEN_CASES["chunked_and_decode"]
    (q, k, v), (cu_q, cu_k) = packed_qkv(rng, lengths_q, lengths_k, hq, hkv, 32, torch.float16)
    grad = torch.randn(q.shape, generator=rng).to(DEVICE, q.dtype)

    def run():
        out = moba_attn_varlen_qk(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), block, topk)
        return out, *torch.autograd.grad(out, (q, k, v), grad)

    kernels_with_tma.assert_bit_identical_to_pointer_loads(run)


def test_varlen_full_budget_is_dense_causal_per_sequence(rng):
    lengths = [96, 50, 128]
    (q, k, v), (cu, _) = packed_qkv(rng, lengths, lengths, 4, 2, 32, torch.float32)
    out, lse = moba_attn_varlen(q, k, v, cu, 128, 32, 4, return_lse=True)
    assert lse.shape == (4, sum(lengths)) and lse.dtype == torch.float32
    for i in range(len(lengths)):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        seq_q, seq_k, seq_v = (t[rows].transpose(0, 1)[None] for t in (q, k, v))
        dense = F.scaled_dot_product_attention(seq_q, seq_k, seq_v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out[rows], dense[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_varlen_reference_backend_agrees(rng):
    (q, k, v), (cu_q, cu_k) = packed_qkv(rng, [1, 20, 50], [147, 40, 64], 2, 1, 32, torch.float32)
    args = (q, k, v, cu_q, cu_k, 50, 147, 32, 2)
    out, lse = moba_attn_varlen_qk(*args, return_lse=True)
    ref_out, ref_lse = moba_attn_varlen_qk(*args, return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_varlen_bad_input(rng):
    (q, k, v), (cu_q, cu_k) = packed_qkv(rng, [10, 30], [20, 20], 2, 1, 32, torch.float32)
    q, k, v = (t.detach() for t in (q, k, v))
    with pytest.raises(ValueError, match="moba_topk"):
        moba_attn_varlen(q, k, v, cu_q, 30, 16, 0)
    with pytest.raises(ValueError, match="moba_chunk_size=8"):
        moba_attn_varlen(q, k, v, cu_q, 30, 8, 2, backend="triton")
    with pytest.raises(ValueError, match="Lq <= Lk"):
        moba_attn_varlen_qk(q, k, v, cu_q, cu_k, 30, 20, 16, 2)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        moba_attn_varlen_qk(q, k, v, cu_q, cu_k[:2], 30, 20, 16, 2)
    with pytest.raises(ValueError, match="^cu_seqlens holds a sequence longer than max_seqlen=16"):
        moba_attn_varlen(q, k, v, cu_q, 16, 16, 2)  # the errors name this signature's arguments
    with pytest.raises(ValueError, match="^cu_seqlens must start at 0"):
        moba_attn_varlen(q, k, v, cu_q + 1, 30, 16, 2)
    for max_seqlen in (None, 30.0):
        with pytest.raises(TypeError, match="max_seqlen"):
            moba_attn_varlen(q, k, v, cu_q, max_seqlen, 16, 2)
        with pytest.raises(TypeError, match="max_seqlen_k"):
            moba_attn_varlen_qk(q, k, v, cu_q, cu_k, 30, max_seqlen, 16, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_gpu_real_sizes(rng, request, dtype, dim, tma):
    if tma:
        request.getfixturevalue("kernels_with_tma")
    q, k, v = make_qkv(rng, 2, 8, 2, 2048, 2048, dim, dtype)
    check(q, k, v, block_size=128, topk=4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_varlen(rng, dtype):
    lengths = [1000, 3000, 77, 2048]
    (q, k, v), (cu, _) = packed_qkv(rng, lengths, lengths, 8, 2, 128, dtype)
    out = moba_attn_varlen(q, k, v, cu, max(lengths), 128, 4)
    ref = per_sequence_oracle(q, k, v, cu, cu, 128, 4, torch.float64)
    same = per_sequence_oracle(q, k, v, cu, cu, 128, 4, dtype)
    assert_flash_rule(out, ref, same, 2, "output")


def test_compiled_reference_path_matches_eager(rng):
    """torch.compile of the CPU fallback (Inductor) with ragged blocks: Inductor's CPU code for
    `arange(n) // c` is wrong in the vector tail, so the oracles run eagerly (outputs were off by 70+)."""
    q, k, v = (torch.randn(1, h, 66, 16, generator=rng).requires_grad_() for h in (4, 2, 2))

    def attend(q, k, v):
        return moba_attn(q, k, v, block_size=32, topk=1, backend="reference")

    eager = attend(q, k, v)
    compiled = torch.compile(attend)(q, k, v)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for got, expected in zip(
        torch.autograd.grad(compiled.sum(), (q, k, v)), torch.autograd.grad(eager.sum(), (q, k, v))
    ):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
