"""The block-sparse attention engine against the fp64 oracle, with FlashAttention's error rule.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py) on small fp16/fp32
shapes; the `gpu` tests run bf16/fp16 at real sizes on the H100.
"""

import contextlib

import pytest
import torch

from sparse_attn import BlockSparseLayout
from sparse_attn.engine import block_sparse_attn, block_sparse_attn_varlen, triton_available
from sparse_attn.reference import block_sparse_attention_reference
from sparse_attn.testing import assert_flash_rule, assert_flash_rule_with_grads, max_err, random_block_layout

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="triton is not installed")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv("SPARSE_ATTN_POISON_OUTPUTS", "1")


def random_layout(rng, batch, heads, seq_q, seq_kv, q_block, kv_block, density, *, causal=True):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    return random_block_layout(
        batch, heads, seq_q, seq_kv, q_block, kv_block, density, causal=causal, seed=seed, device=DEVICE
    )


def make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, dim, dtype):
    shapes = ((batch, hq, seq_q, dim), (batch, hkv, seq_kv, dim), (batch, hkv, seq_kv, dim))
    return [torch.randn(s, generator=rng).to(DEVICE, dtype).requires_grad_() for s in shapes]


def check_against_reference(q, k, v, layout, causal=True, scale=None):
    out, lse = block_sparse_attn(q, k, v, layout, causal=causal, softmax_scale=scale, return_lse=True)
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, layout, causal=causal, softmax_scale=scale)
    same_out, _ = block_sparse_attention_reference(
        q, k, v, layout, causal=causal, softmax_scale=scale, compute_dtype=q.dtype
    )
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten (poisoned) output"
    assert_flash_rule(out, ref_out, same_out, 2, "output")
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert bool((out[empty] == 0).all())
    assert max_err(lse[~empty], ref_lse[~empty]) < 1e-3

    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), grad.double())
    same_grads = torch.autograd.grad(same_out, (q, k, v), grad.to(same_out.dtype))
    for name, g, r, s in zip("qkv", grads, ref_grads, same_grads):
        assert g.dtype == q.dtype and not torch.isnan(g).any(), f"d{name} has unwritten elements"
        assert_flash_rule(g, r, s, 3, f"d{name}")
    return out, lse


CASES = {
    # name: (batch, hq, hkv, seq_q, seq_kv, dim, q_block, kv_block, density, layout heads)
    "mha": (1, 2, 2, 64, 64, 32, 32, 32, 0.5, "q"),
    "gqa4_ragged": (2, 4, 1, 83, 83, 32, 16, 32, 0.5, "kv"),
    "gqa8_shared_layout": (1, 8, 1, 48, 48, 16, 16, 16, 0.6, "one"),
    "q_shorter_than_kv": (1, 4, 2, 37, 100, 32, 16, 32, 0.5, "q"),
    "dense_full": (1, 2, 1, 64, 64, 64, 32, 16, 1.0, "q"),
    "head_dim_96": (1, 2, 2, 48, 48, 96, 16, 16, 0.7, "q"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(rng, case, dtype):
    batch, hq, hkv, seq_q, seq_kv, dim, qb, kb, density, heads = CASES[case]
    layout_heads = {"q": hq, "kv": hkv, "one": 1}[heads]
    layout = random_layout(rng, batch, layout_heads, seq_q, seq_kv, qb, kb, density)
    q, k, v = make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, dim, dtype)
    check_against_reference(q, k, v, layout)


# Small tiles (16 x 16) under 64-wide blocks: every block spans several tiles, so the flat loop over
# full blocks and the partial blocks (diagonal, ragged end) both run with more than one tile each.
# batch, Hq, Hkv, Sq, Skv, q block, kv block, density, layout drawn causal
MULTI_TILE_CASES = {
    "causal_gqa_ragged": (2, 4, 2, 150, 150, 64, 64, 0.7, True),
    "q_shorter_wide_kv_blocks": (1, 2, 1, 70, 200, 32, 64, 0.8, True),
    # A layout with blocks past the diagonal under a causal mask: long runs of partial blocks at a
    # list's end (rows) and start (columns), past the 4 entries that one probe of them reads.
    "future_blocks_masked": (1, 2, 2, 256, 256, 32, 32, 1.0, False),
}


@pytest.mark.parametrize("kv_block", [16, 32])
def test_every_causal_shift_within_a_block(rng, kv_block):
    """Bottom-right causality at every offset Skv - Sq modulo the KV block: the full/partial block split
    and the diagonal mask depend on it, and a shift of one key off is invisible at block-aligned offsets."""
    for shift in range(kv_block):
        seq_q = 24
        q, k, v = make_qkv(rng, 1, 2, 1, seq_q, seq_q + shift, 16, torch.float32)
        density = 1.0 if shift % 2 else 0.6
        check_against_reference(q, k, v, random_layout(rng, 1, 1, seq_q, seq_q + shift, 16, kv_block, density))


@pytest.mark.parametrize("case", list(MULTI_TILE_CASES))
def test_blocks_spanning_several_tiles(rng, case):
    from sparse_attn import tiles

    batch, hq, hkv, seq_q, seq_kv, qb, kb, density, causal_layout = MULTI_TILE_CASES[case]
    layout = random_layout(rng, batch, hq, seq_q, seq_kv, qb, kb, density, causal=causal_layout)
    q, k, v = make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, 16, torch.float32)
    small = tiles.Tile(16, 16, 4, 1)
    with tiles.override("engine_fwd", 64, small), tiles.override("engine_dq", 64, small):
        with tiles.override("engine_dkdv", 64, small):
            check_against_reference(q, k, v, layout)


def test_zero_density_gives_zero_and_neg_inf(rng):
    layout = random_layout(rng, 1, 2, 64, 64, 16, 16, 0.0)
    q, k, v = make_qkv(rng, 1, 2, 2, 64, 64, 16, torch.float32)
    out, lse = check_against_reference(q, k, v, layout)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())


def test_rows_emptied_by_causality(rng):
    # Each query block selects only KV blocks in its future, so every row ends up empty or partial.
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0, 1] = mask[0, 0, 1, 1] = mask[0, 0, 2, 3] = True
    layout = BlockSparseLayout.from_dense_mask(
        mask.to(DEVICE), q_block_size=16, kv_block_size=16, seq_len_q=64, seq_len_kv=64
    )
    q, k, v = make_qkv(rng, 1, 2, 1, 64, 64, 16, torch.float32)
    _, lse = check_against_reference(q, k, v, layout)
    assert bool(torch.isneginf(lse[0, :, :16]).all())


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_unattended_outputs_stay_in_the_graph_and_empty_heads_are_empty(rng, backend):
    """Nothing to attend (an empty layout, or zero query heads) gives output 0 with zero gradients, not a
    detached tensor (backward would fail) nor a crash in a kernel."""
    empty = BlockSparseLayout.from_kv_blocks(
        torch.zeros(1, 1, 2, dtype=torch.int32, device=DEVICE),
        torch.zeros(1, 1, 2, 0, dtype=torch.int32, device=DEVICE),
        q_block_size=16, kv_block_size=16, seq_len_q=32, seq_len_kv=32,
    )  # fmt: skip
    q, k, v = make_qkv(rng, 1, 2, 1, 32, 32, 16, torch.float32)
    out = block_sparse_attn(q, k, v, empty, backend=backend)
    out.sum().backward()
    assert not out.any() and all(t.grad is not None and not t.grad.any() for t in (q, k, v))
    headless = torch.zeros(1, 0, 32, 16, device=DEVICE)
    assert block_sparse_attn(headless, k.detach(), v.detach(), empty, backend=backend).shape == headless.shape


def test_rows_see_nan_as_nan_not_as_no_key(rng):
    """A NaN score makes its row's output and LSE NaN (as the reference), never a keyless row's 0 and -inf."""
    layout = random_layout(rng, 1, 1, 32, 32, 16, 16, 1.0)
    q, k, v = (t.detach() for t in make_qkv(rng, 1, 1, 1, 32, 32, 16, torch.float32))
    k[0, 0, 3] = float("nan")
    for backend in ("triton", "torch", "reference"):  # rows 0..2 never see key 3: they stay finite
        out, lse = block_sparse_attn(q, k, v, layout, backend=backend, return_lse=True)
        assert bool(lse[0, 0, 3:].isnan().all()) and bool(lse[0, 0, :3].isfinite().all()), backend
        assert bool(out[0, 0, :3].isfinite().all()), backend
    # GQA with lists per query head: an infinite key in a block only head 0 lists leaves head 1 finite.
    q, k, v = (t.detach() for t in make_qkv(rng, 1, 2, 1, 32, 32, 16, torch.float32))
    k[0, 0, 20] = float("inf")
    mask = torch.tensor([[True, True], [True, False]], device=DEVICE)[None, :, None].expand(1, 2, 2, 2)
    layout = BlockSparseLayout.from_dense_mask(mask, q_block_size=16, kv_block_size=16, seq_len_q=32, seq_len_kv=32)
    for backend in ("triton", "torch", "reference"):
        out = block_sparse_attn(q, k, v, layout, causal=False, backend=backend)
        assert bool(out[0, 1].isfinite().all()), backend


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's bfloat16 dot")
def test_explicit_triton_refuses_bfloat16_under_the_interpreter(rng):
    layout = random_layout(rng, 1, 1, 32, 32, 16, 16, 1.0)
    q, k, v = (t.detach().bfloat16() for t in make_qkv(rng, 1, 1, 1, 32, 32, 16, torch.float32))
    with pytest.raises(ValueError, match="not bfloat16 under the interpreter"):
        block_sparse_attn(q, k, v, layout, backend="triton")


def test_non_causal_and_custom_scale(rng):
    layout = random_layout(rng, 1, 2, 40, 72, 16, 16, 0.5, causal=False)
    q, k, v = make_qkv(rng, 1, 2, 2, 40, 72, 32, torch.float32)
    check_against_reference(q, k, v, layout, causal=False, scale=0.3)


def test_batch_broadcast_layout(rng):
    layout = random_layout(rng, 1, 2, 32, 32, 16, 16, 0.5)
    q, k, v = make_qkv(rng, 3, 2, 2, 32, 32, 16, torch.float32)
    check_against_reference(q, k, v, layout)


def test_varlen_matches_per_sequence_runs(rng):
    lengths = [37, 64, 5]
    hq, hkv, dim, block = 4, 2, 32, 16
    max_len = max(lengths)
    layout = random_layout(rng, len(lengths), hkv, max_len, max_len, block, block, 0.6)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(lengths), hq, dim, generator=rng).to(DEVICE).requires_grad_()
    k = torch.randn(sum(lengths), hkv, dim, generator=rng).to(DEVICE).requires_grad_()
    v = torch.randn(sum(lengths), hkv, dim, generator=rng).to(DEVICE).requires_grad_()
    out, lse = block_sparse_attn_varlen(q, k, v, cu, cu, max_len, max_len, layout, return_lse=True)
    ref_out, ref_lse = block_sparse_attn_varlen(
        q, k, v, cu, cu, max_len, max_len, layout, return_lse=True, backend="reference"
    )
    assert out.shape == q.shape and lse.shape == (hq, sum(lengths))
    assert max_err(out, ref_out) < 1e-5
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    grad = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref_out, (q, k, v), grad)):
        assert max_err(g, r) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_chunked_prefill_against_a_per_sequence_oracle(rng, dtype):
    """Query and key lengths of their own per sequence (chunked prefill: Lq < Lk, one query, no query with
    keys, equal lengths): each sequence's rows against the fp64 oracle of that sequence alone, its blocks
    anchored at its own starts and its causality bottom-right, on FlashAttention's rule."""
    lengths_q, lengths_k = [1, 0, 37, 16, 9], [40, 7, 37, 70, 9]
    hq, hkv, dim, max_q, max_k = 4, 2, 32, max(lengths_q), max(lengths_k)
    layout = random_layout(rng, len(lengths_q), hkv, max_q, max_k, 16, 16, 0.6)
    cu_q, cu_k = (
        torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        for lengths in (lengths_q, lengths_k)
    )
    q = torch.randn(sum(lengths_q), hq, dim, generator=rng).to(DEVICE, dtype).requires_grad_()
    k, v = (torch.randn(sum(lengths_k), hkv, dim, generator=rng).to(DEVICE, dtype).requires_grad_() for _ in "kv")
    out = block_sparse_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, layout)
    assert not torch.isnan(out).any(), "unwritten (poisoned) output"
    blocks = layout.to_dense_mask()

    def oracle(compute_dtype):
        parts = []
        for i, (len_q, len_k) in enumerate(zip(lengths_q, lengths_k)):
            rows, keys = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
            if len_q == 0:
                parts.append(q.new_zeros(0, hq, dim, dtype=compute_dtype))
                continue
            own = BlockSparseLayout.from_dense_mask(
                blocks[i : i + 1, :, : -(-len_q // 16), : -(-len_k // 16)].contiguous(),
                q_block_size=16, kv_block_size=16, seq_len_q=len_q, seq_len_kv=len_k,
            )  # fmt: skip
            seq_q, seq_k, seq_v = (t[s].transpose(0, 1)[None] for t, s in ((q, rows), (k, keys), (v, keys)))
            o, _ = block_sparse_attention_reference(seq_q, seq_k, seq_v, own, compute_dtype=compute_dtype)
            parts.append(o[0].transpose(0, 1))
        return torch.cat(parts)

    assert_flash_rule_with_grads(out, oracle(torch.float64), oracle(dtype), (q, k, v), rng)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_backward_delta_kernel(rng, dtype):
    """The backward's row statistic rowsum(O * dO) - dLSE from one kernel, for strided, packed and
    broadcast operands (the engine and MoBA backward tests cover it only through the gradients)."""
    from sparse_attn._engine_ops import _row_delta

    out = torch.randn(2, 37, 3, 24, generator=rng).to(dtype).transpose(1, 2)  # (B, H, S, D) view of (B, S, H, D)
    grad_out = torch.randn(2, 3, 37, 24, generator=rng).to(dtype)
    packed_out, packed_grad = (torch.randn(50, 3, 24, generator=rng).to(dtype) for _ in range(2))
    cases = [
        (out, grad_out, None),
        (out, grad_out, torch.randn(2, 3, 37, generator=rng)),
        (out, grad_out, torch.randn(1, 3, 1, generator=rng).expand(2, 3, 37)),
        (packed_out, packed_grad, torch.randn(50, 3, generator=rng)),
    ]
    for o, do, dlse in cases:
        expected = (o.double() * do.double()).sum(-1) - (0 if dlse is None else dlse.double())
        got = _row_delta(o, do, dlse)
        assert got.dtype == torch.float32 and got.shape == o.shape[:-1] and got.is_contiguous()
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_lse_gradient(rng):
    """The returned LSE is differentiable like the output (it once gave a zero gradient): GQA, empty rows."""
    mask = torch.rand(2, 4, 3, 4, generator=rng) < 0.5
    mask[:, :, 0] = False  # the first query block selects nothing
    mask[:, :, 1:, -1] = True  # the others see at least their last KV block (bottom-right causal)
    layout = BlockSparseLayout.from_dense_mask(
        mask.to(DEVICE), q_block_size=16, kv_block_size=16, seq_len_q=40, seq_len_kv=64
    )
    q, k, v = make_qkv(rng, 2, 4, 2, 40, 64, 32, torch.float32)
    out, lse = block_sparse_attn(q, k, v, layout, return_lse=True)
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, layout)
    empty = torch.isneginf(ref_lse)
    assert bool(empty.any()) and bool((~empty).any()), "the layout should leave some rows empty"
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * grad_out).sum() + (lse * grad_lse).where(~empty, 0).sum(), (q, k, v))
    loss = (ref_out * grad_out.double()).sum() + (ref_lse * grad_lse.double()).where(~empty, 0).sum()
    for name, g, r in zip("qkv", grads, torch.autograd.grad(loss, (q, k, v), retain_graph=True)):
        assert max_err(g, r) < 1e-4, f"d{name}"
    lse_only = torch.autograd.grad(block_sparse_attn(q, k, v, layout, return_lse=True)[1].where(~empty, 0).sum(), q)
    assert max_err(lse_only[0], torch.autograd.grad(ref_lse.where(~empty, 0).sum(), q)[0]) < 1e-4


def test_strided_inputs_and_index_tensors(rng, strided_views):
    """Kernels address the head dim contiguously and write gradients with their input's strides: a
    transposed, expanded or sliced input, non-contiguous block lists and strided offsets must give the
    contiguous inputs' results (the wrong strides once gave NaN gradients and out-of-bounds writes)."""
    q, k, v = make_qkv(rng, 2, 4, 2, 48, 48, 16, torch.float32)
    k, v = (t.detach()[:1].expand_as(t).contiguous().requires_grad_() for t in (k, v))  # one batch row, as expanded
    layout = random_layout(rng, 2, 4, 48, 48, 16, 16, 0.6)
    indices = layout.kv_indices.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, last stride != 1
    strided_layout = BlockSparseLayout(
        layout.kv_num_blocks, indices, layout.q_block_size, layout.kv_block_size, layout.seq_len_q, layout.seq_len_kv
    )
    grad = torch.randn(q.shape, generator=rng).to(DEVICE)
    expected = block_sparse_attn(q, k, v, layout)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    leaves, views = strided_views(q, k, v)
    out = block_sparse_attn(*views, strided_layout)
    grads = torch.autograd.grad(out, leaves, grad)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], expected_grads[0].transpose(-1, -2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], expected_grads[1].sum(0, keepdim=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[2][:, :, :48], expected_grads[2], rtol=1e-5, atol=1e-5)
    assert bool((grads[2][:, :, 48:] == 0).all())

    cu = torch.tensor([0, 99, 30, 99, 48], dtype=torch.int32, device=DEVICE)[::2]  # [0, 30, 48], stride 2
    packed = [t.detach()[0].transpose(0, 1).contiguous() for t in (q, k, v)]
    varlen_layout = random_layout(rng, 2, 4, 30, 30, 16, 16, 0.6)
    strided = block_sparse_attn_varlen(*packed, cu, cu, 30, 30, varlen_layout)
    contiguous = block_sparse_attn_varlen(*packed, cu.contiguous(), cu.contiguous(), 30, 30, varlen_layout)
    assert torch.equal(strided, contiguous)


# batch, Hq, Hkv, Sq, Skv, head dim, block, density. Head dim 40: descriptors zero-fill the padded
# dims 40..63; ragged Skv: the last block's keys run past the sequence (zero-filled, masked).
TMA_CASES = {
    "gqa_ragged_q_shorter": (2, 4, 2, 40, 72, 40, 16, 0.6),
    "mha_dense": (1, 2, 2, 64, 64, 32, 32, 1.0),
}


@pytest.mark.parametrize("case", list(TMA_CASES))
def test_tensor_descriptor_path_matches_reference(rng, kernels_with_tma, case):
    batch, hq, hkv, seq_q, seq_kv, dim, block, density = TMA_CASES[case]
    layout = random_layout(rng, batch, hq, seq_q, seq_kv, block, block, density)
    q, k, v = make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, dim, torch.float16)
    check_against_reference(q, k, v, layout)
    assert kernels_with_tma.made == [True, True, True]  # forward, dQ (K/V tiles) and dK/dV (Q/dO tiles)


def test_tensor_descriptor_varlen_equals_pointer_loads(rng, kernels_with_tma):
    lengths, hq, hkv, dim, block = [37, 64, 5], 4, 2, 32, 16
    layout = random_layout(rng, len(lengths), hkv, max(lengths), max(lengths), block, block, 0.6)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(sum(lengths), h, dim, generator=rng).to(DEVICE, torch.float16) for h in (hq, hkv, hkv))
    q.requires_grad_()
    grad = torch.randn(q.shape, generator=rng).to(DEVICE, torch.float16)

    def run():
        out = block_sparse_attn_varlen(q, k, v, cu, cu, max(lengths), max(lengths), layout)
        return out, torch.autograd.grad(out, (q,), grad)[0]

    kernels_with_tma.assert_bit_identical_to_pointer_loads(run)


def test_tensor_descriptor_falls_back_when_tma_cannot_address(rng, kernels_with_tma):
    """Head dim 36 in fp16 gives 72-byte rows, not a multiple of 16: the pointer loads run instead."""
    layout = random_layout(rng, 1, 2, 48, 48, 16, 16, 0.7)
    q, k, v = make_qkv(rng, 1, 2, 1, 48, 48, 36, torch.float16)
    check_against_reference(q, k, v, layout)
    assert kernels_with_tma.made == [False, False, False]


# The warp-specialised kernels mask every tile in one loop (dK/dV: one loop over the GQA group's
# heads too): layouts with blocks past the diagonal, q shorter than k, ragged ends, head dim 96
# (padded to 128), empty rows, query heads whose lists are empty between others, a layout per KV
# head and one broadcast over heads.
WS_CASES = {
    # batch, Hq, Hkv, layout heads, Sq, Skv, dim, q block, kv block, density, layout drawn causal
    "gqa_ragged_q_shorter": (2, 4, 2, 4, 40, 72, 32, 16, 16, 0.6, True),
    "future_blocks_multi_tile": (1, 2, 1, 2, 96, 96, 32, 32, 32, 1.0, False),
    "head_dim_96_sparse": (1, 2, 2, 2, 64, 64, 96, 16, 16, 0.3, True),
    "group_of_4_sparse_heads": (1, 8, 2, 8, 64, 80, 32, 16, 16, 0.25, True),
    "layout_per_kv_head": (2, 4, 1, 1, 48, 48, 32, 16, 16, 0.5, True),
    "layout_broadcast_wide_blocks": (1, 4, 2, 1, 64, 64, 32, 32, 16, 0.5, True),
}


@pytest.mark.parametrize("case", list(WS_CASES))
def test_warp_specialized_kernels_match_reference(rng, warp_specialized, case):
    batch, hq, hkv, layout_heads, seq_q, seq_kv, dim, qb, kb, density, causal_layout = WS_CASES[case]
    layout = random_layout(rng, batch, layout_heads, seq_q, seq_kv, qb, kb, density, causal=causal_layout)
    q, k, v = make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, dim, torch.float16)
    with warp_specialized.small_tiles(dim):
        check_against_reference(q, k, v, layout)
    assert warp_specialized.made == [True, True, True]  # forward, dQ, dK/dV


def test_warp_specialized_varlen_matches_pointer_path(rng, warp_specialized):
    """Packed sequences (one empty) through per-sequence descriptors. The forward walks the same tiles
    in the same order as the pointer path, whose masking only adds exact zeros: bit for bit. dK/dV
    sums its query tiles in list order, the pointer path full blocks first: to rounding. dQ takes
    the pointer path (its LSE boxes would start inside a 16-byte unit)."""
    lengths, hq, hkv, dim, block = [37, 64, 0, 7], 4, 2, 32, 16
    layout = random_layout(rng, len(lengths), hkv, max(lengths), max(lengths), block, block, 0.6)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(sum(lengths), h, dim, generator=rng).to(DEVICE, torch.float16) for h in (hq, hkv, hkv))
    grad = torch.randn(q.shape, generator=rng).to(DEVICE, torch.float16)
    results = []
    for ws in (True, False):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with warp_specialized.small_tiles(dim, ws=ws):
            out, lse = block_sparse_attn_varlen(*leaves, cu, cu, max(lengths), max(lengths), layout, return_lse=True)
            results.append((out, lse, *torch.autograd.grad(out, leaves, grad)))
    assert warp_specialized.made == [True, False, True, False, False, False]
    (out, lse, dq, dk, dv), (out_p, lse_p, dq_p, dk_p, dv_p) = results
    for a, b in ((out, out_p), (lse, lse_p), (dq, dq_p)):
        assert torch.equal(a, b)
    for a, b in ((dk, dk_p), (dv, dv_p)):
        assert max_err(a, b) <= 2e-3 * max(1.0, b.abs().max().item())


def test_warp_specialized_falls_back_when_tma_cannot_address(rng, warp_specialized):
    """Head dim 36 in fp16 gives 72-byte rows, not a multiple of 16; and a one-query q sliced from
    wider rows (136-byte row stride on an axis of one row): the pointer loads run instead."""
    layout = random_layout(rng, 1, 2, 48, 48, 16, 16, 0.7)
    q, k, v = make_qkv(rng, 1, 2, 1, 48, 48, 36, torch.float16)
    check_against_reference(q, k, v, layout)
    one_row = random_layout(rng, 1, 1, 1, 48, 16, 16, 1.0)
    wide = torch.randn(1, 1, 1, 68, generator=rng).to(DEVICE, torch.float16)
    q, k, v = wide[..., :64], *make_qkv(rng, 1, 1, 1, 1, 48, 64, torch.float16)[1:]
    expected, _ = block_sparse_attention_reference(q, k, v, one_row)
    assert max_err(block_sparse_attn(q, k.detach(), v.detach(), one_row), expected) < 2e-3
    assert warp_specialized.made == [False, False, False, False]


def test_warp_specialized_dq_falls_back_on_unaligned_row_statistics(rng, warp_specialized):
    """dQ reads LSE and delta rows through descriptors: 42 queries give 168-byte rows, so dQ alone
    takes the pointer path."""
    layout = random_layout(rng, 1, 2, 42, 42, 16, 16, 0.7)
    q, k, v = make_qkv(rng, 1, 2, 1, 42, 42, 32, torch.float16)
    with warp_specialized.small_tiles(32):
        check_against_reference(q, k, v, layout)
    assert warp_specialized.made == [True, False, True]


def test_warp_specialize_args_checks_the_group_head_stride():
    """The dK/dV loop steps a GQA group's query heads by their stride, even a group of one head: a
    stride that is not a multiple of 16 bytes keeps the pointer path (the forward does not step it)."""
    from sparse_attn.kernels import launch

    head_stride = 128 * 32 + 4  # 8200 bytes in fp16
    q = torch.randn(head_stride, device=DEVICE, dtype=torch.float16).as_strided(
        (1, 1, 128, 32), (0, head_stride, 32, 1)
    )
    k = torch.randn(1, 1, 128, 32, device=DEVICE, dtype=torch.float16)
    flags = [launch.warp_specialize_args({"WARP_SPECIALIZE": True}, grouped, Q=q, K=k) for grouped in ((), ("Q",))]
    assert [f["WARP_SPECIALIZE"] for f in flags] == [True, False]


def test_warp_specialized_launch_keeps_a_callers_allocator():
    """The descriptors' scratch comes from Triton's allocator: the launch sets torch's only where none is set."""
    import contextvars

    import triton
    from triton.runtime import _allocation

    from sparse_attn.kernels import launch

    def own(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    def run():  # in a copy of the context: the test leaves the process's allocator as it was
        _allocation._allocator.set(_allocation._NULL_ALLOCATOR)
        launch._ensure_allocator()
        chosen = [_allocation._allocator.get()]
        triton.set_allocator(own)
        launch._ensure_allocator()
        return chosen + [_allocation._allocator.get()]

    assert contextvars.copy_context().run(run) == [launch._scratch, own]


class _OnSecondGPU(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1, for the launch's device choice on a machine without one."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_launch_makes_the_tensors_gpu_current(monkeypatch):
    """Triton launches on the current GPU: a kernel over tensors on another one runs with theirs made
    current for the launch, and the current device is left as it was."""
    from sparse_attn.kernels import launch

    current, seen = [0], []

    @contextlib.contextmanager
    def make_current(device):
        before, current[0] = current[0], device.index
        yield
        current[0] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", make_current)

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((grid, current[0]))

    elsewhere = torch.Tensor._make_subclass(_OnSecondGPU, torch.zeros(4))
    on_cpu = torch.zeros(4)
    kernel = launch._OnTensorsDevice(Kernel())
    kernel[(3,)](None, elsewhere, 7, BLOCK=16)
    kernel[(1,)](on_cpu, elsewhere)  # the first tensor decides: a CPU one (the interpreter) changes nothing
    kernel[(2,)](None, X=elsewhere)
    assert seen == [((3,), 1), ((1,), 0), ((2,), 1)] and current == [0]
    from sparse_attn._engine_ops import _backward_delta_kernel

    assert isinstance(launch.launcher(_backward_delta_kernel), launch._OnTensorsDevice), "every launch goes through it"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_kernels_run_on_a_non_current_gpu(rng):
    """A layer on cuda:1 while cuda:0 is current (a model split over GPUs): same result as with cuda:1 current."""
    layout = random_layout(rng, 1, 2, 256, 256, 64, 64, 0.5).to("cuda:1")
    q, k, v = (t.detach().to("cuda:1").requires_grad_() for t in make_qkv(rng, 1, 4, 2, 256, 256, 64, torch.bfloat16))
    with torch.cuda.device(0):
        out = block_sparse_attn(q, k, v, layout)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    with torch.cuda.device(1):
        expected = block_sparse_attn(q, k, v, layout)
        expected_grads = torch.autograd.grad(expected, (q, k, v), torch.ones_like(expected))
    assert torch.equal(out, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))


def test_opcheck_triton_ops(rng):
    layout = random_layout(rng, 1, 2, 32, 32, 16, 16, 0.5)
    q, k, v = make_qkv(rng, 1, 2, 2, 32, 32, 16, torch.float32)
    from sparse_attn import _engine_ops

    args = (q, k, v, layout.kv_num_blocks, layout.kv_indices, None, None, 16, 16, 32, 32, 1, True, 0.25)
    # The Triton interpreter executes kernels even on fake tensors, so the fake-tensor and compile
    # checks run on the GPU only.
    utils = ("test_schema", "test_autograd_registration")
    if DEVICE.type == "cuda":
        utils += ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(_engine_ops.block_sparse_attn_fwd, args, test_utils=utils)


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda q, k, v: (q, k[:, :, :, :8], v[:, :, :, :8]), ValueError, "head dim"),
        (lambda q, k, v: (torch.cat([q, q[:, :1]], 1), k, v), ValueError, "multiple"),
        (lambda q, k, v: (q.double(), k, v), TypeError, "dtype"),
        (lambda q, k, v: (q[0], k, v), ValueError, "4-D"),
        (lambda q, k, v: (q, k, v[:, :, :16]), ValueError, "same shape"),
        (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), ValueError, "head dim"),  # was 1/sqrt(0)
    ],
)
def test_bad_inputs_raise(rng, mutate, error, match):
    layout = random_layout(rng, 1, 2, 32, 32, 16, 16, 0.5)
    q, k, v = (t.detach() for t in make_qkv(rng, 1, 2, 2, 32, 32, 16, torch.float32))
    with pytest.raises(error, match=match):
        block_sparse_attn(*mutate(q, k, v), layout)


def test_layout_mismatch_and_block_size_errors(rng):
    q, k, v = (t.detach() for t in make_qkv(rng, 1, 2, 2, 32, 32, 16, torch.float32))
    with pytest.raises(ValueError, match="seq_len"):
        block_sparse_attn(q, k, v, random_layout(rng, 1, 2, 48, 48, 16, 16, 0.5))
    odd = BlockSparseLayout.from_dense_mask(
        torch.ones(1, 1, 4, 4, dtype=torch.bool, device=DEVICE),
        q_block_size=8,
        kv_block_size=8,
        seq_len_q=32,
        seq_len_kv=32,
    )
    with pytest.raises(ValueError, match="q_block_size=8"):
        block_sparse_attn(q, k, v, odd, backend="triton")
    out = block_sparse_attn(q, k, v, odd, backend="reference")  # the reference takes any block size
    assert out.shape == q.shape
    # 'auto' takes the PyTorch path for inputs the kernels cannot take: a block size of 8, a float64 q.
    torch.testing.assert_close(block_sparse_attn(q, k, v, odd), out)
    wide = block_sparse_attn(q.double(), k.double(), v.double(), odd)
    torch.testing.assert_close(wide, block_sparse_attn(q.double(), k.double(), v.double(), odd, backend="reference"))
    with pytest.raises(TypeError, match="float64 is not supported"):
        block_sparse_attn(q.double(), k.double(), v.double(), odd, backend="triton")
    with pytest.raises(ValueError, match="softmax_scale"):
        block_sparse_attn(q, k, v, odd, softmax_scale=-1.0)
    # A layout on another device: said by both entry points (not a host pointer handed to a kernel).
    elsewhere = BlockSparseLayout.from_dense_mask(
        torch.ones(1, 1, 2, 2, dtype=torch.bool, device="meta"),
        q_block_size=16,
        kv_block_size=16,
        seq_len_q=32,
        seq_len_kv=32,
    )
    cu = torch.tensor([0, 32], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="layout is on meta"):
        block_sparse_attn(q, k, v, elsewhere)
    with pytest.raises(ValueError, match="layout is on meta"):
        block_sparse_attn_varlen(
            q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, 32, 32, elsewhere
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("loads", ["pointers", "tma", "ws"])
def test_gpu_real_sizes(rng, request, dtype, dim, loads):
    fixture = {"tma": "kernels_with_tma", "ws": "warp_specialized"}.get(loads)
    probe = request.getfixturevalue(fixture) if fixture else None
    for batch, hq, hkv, seq_q, seq_kv, density in ((2, 8, 2, 1024, 1024, 0.3), (1, 8, 1, 700, 2100, 0.5)):
        layout = random_layout(rng, batch, hkv, seq_q, seq_kv, 128, 128, density)
        q, k, v = make_qkv(rng, batch, hq, hkv, seq_q, seq_kv, dim, dtype)
        check_against_reference(q, k, v, layout)
    if loads == "ws":  # forward, dQ, dK/dV of each case
        assert probe.made == [True] * 6, "the H100 should take every warp-specialised kernel"


@pytest.mark.gpu
def test_gpu_warp_specialized_kernels_under_torch_compile(rng, warp_specialized):
    """Inductor launches the kernels itself (its own scratch allocator for the device-side descriptors)."""
    layout = random_layout(rng, 1, 2, 2048, 2048, 128, 128, 0.4)
    q, k, v = make_qkv(rng, 1, 8, 2, 2048, 2048, 128, torch.bfloat16)
    grad = torch.randn(q.shape, generator=rng).to(DEVICE, torch.bfloat16)

    def attend_and_differentiate(q, k, v):
        out = block_sparse_attn(q, k, v, layout)
        return out, *torch.autograd.grad(out, (q, k, v), grad)

    eager = attend_and_differentiate(q, k, v)
    compiled = torch.compile(attend_and_differentiate)(q, k, v)
    assert warp_specialized.made and all(warp_specialized.made)
    for a, b in zip(compiled, eager):
        assert max_err(a, b) <= 1e-2 * max(1.0, b.abs().max().item())
