"""Token-sparse attention: every query row attends to the keys its index list names (FlashMLA's sparse
prefill and DSA's selected-token attention), forward and backward.

A program owns one query position and up to BLOCK_H query heads of one KV head (the heads of a GQA
group, or a slice of MLA's 128 heads sharing one latent): the gathered key rows are loaded once per
tile of TILE_K indices and serve all of its heads, so each tile is a [BLOCK_H, D] x [D, TILE_K]
product. Indices < 0 or >= Skv are skipped; the head dim splits into a power-of-two main part and a
rest (MLA: 512 + 64), and V may be the main part of K itself (MLA's latent, V_IS_K). Softmax runs in
base 2; the LSE is stored in natural log, -inf for a row with no valid index (output 0).

The backward recomputes the probabilities per tile, accumulates dQ in registers and scatters dK and
dV into fp32 buffers with atomic adds (rows chosen by many queries collect from all of them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from torch.multiprocessing.reductions import StorageWeakRef

from .._engine_ops import _poisoned, _row_delta, _unit_last_stride, _with_gradient
from .block_sparse_attn import LOG2E, _batch_head, _widen
from .launch import batch_head_grid, launcher, wide_index


@triton.jit
def _gather_rows(base, rows, valid, stride_s, col0, COLS, WIDTH: tl.constexpr):
    """[len(rows), WIDTH] elements col0 + [0, WIDTH) of the given rows; zeros where invalid or past COLS."""
    offs = col0 + tl.arange(0, WIDTH)
    mask = valid[:, None] & (offs[None, :] < COLS)
    return tl.load(base + rows[:, None] * stride_s + offs[None, :], mask=mask, other=0.0)


@triton.jit
def _scatter_add(base, rows, valid, stride_s, col0, values, COLS, WIDTH: tl.constexpr):
    """Atomically adds values [len(rows), WIDTH] to elements col0 + [0, WIDTH) of the given rows."""
    offs = col0 + tl.arange(0, WIDTH)
    mask = valid[:, None] & (offs[None, :] < COLS)
    tl.atomic_add(base + rows[:, None] * stride_s + offs[None, :], values, mask=mask)


@triton.jit
def _head_rows(base, offs, heads_ok, col0, COLS, WIDTH: tl.constexpr):
    """Pointers and mask of elements col0 + [0, WIDTH) of this program's head rows (offsets `offs`)."""
    cols = col0 + tl.arange(0, WIDTH)
    return base + offs[:, None] + cols[None, :], heads_ok[:, None] & (cols[None, :] < COLS)


@triton.jit
def _tile_rows(IDX, idx_base, start, num_indices, seq_len_kv, TILE_K: tl.constexpr):
    """(safe key rows, valid) of index tile [start, start + TILE_K): indices < 0 or >= Skv are skipped."""
    offs = start + tl.arange(0, TILE_K)
    rows = tl.load(IDX + idx_base + offs, mask=offs < num_indices, other=-1)
    valid = (rows >= 0) & (rows < seq_len_kv)
    return tl.where(valid, rows, 0), valid


@triton.jit
def _program(stride_ib, stride_is, stride_ig, head_chunks, group_size,
             SHARED_INDICES: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    """(query position, batch, KV head, query heads of this program, which of them are real, index offset)."""
    pos = tl.program_id(0)
    b, pid = _batch_head()
    chunk = pid % head_chunks
    hk = pid // head_chunks
    offs_h = chunk * BLOCK_H + tl.arange(0, BLOCK_H)
    idx_base = b * stride_ib + pos * stride_is
    if not SHARED_INDICES:
        idx_base += hk * stride_ig
    return pos, b, hk, hk * group_size + offs_h, offs_h < group_size, idx_base


@triton.jit
def _load_queries(Q, q_off, heads_ok, HEAD_DIM, MAIN: tl.constexpr, REST: tl.constexpr):
    """This program's query rows: the main part [BLOCK_H, MAIN] and the rest (the main part again if none)."""
    ptrs, mask = _head_rows(Q, q_off, heads_ok, 0, HEAD_DIM, MAIN)
    q_main = tl.load(ptrs, mask=mask, other=0.0)
    q_rest = q_main
    if REST > 0:
        ptrs, mask = _head_rows(Q, q_off, heads_ok, MAIN, HEAD_DIM, REST)
        q_rest = tl.load(ptrs, mask=mask, other=0.0)
    return q_main, q_rest


@triton.jit
def _scores(q_main, q_rest, k_base, rows, valid, stride_ks, HEAD_DIM,
            MAIN: tl.constexpr, REST: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """[BLOCK_H, TILE_K] logits q . k of the gathered key rows, and K's gathered main part."""
    k_main = _gather_rows(k_base, rows, valid, stride_ks, 0, HEAD_DIM, MAIN)
    s = tl.dot(q_main, tl.trans(k_main), input_precision=DOT_PRECISION)
    if REST > 0:
        k_rest = _gather_rows(k_base, rows, valid, stride_ks, MAIN, HEAD_DIM, REST)
        s += tl.dot(q_rest, tl.trans(k_rest), input_precision=DOT_PRECISION)
    return s, k_main


@triton.jit
def _values(v_base, k_main, rows, valid, stride_vs, VALUE_DIM, VALUE_PAD: tl.constexpr, V_IS_K: tl.constexpr):
    """The gathered value rows: K's main part itself when V is K's leading dims (MLA)."""
    if V_IS_K:
        return k_main
    return _gather_rows(v_base, rows, valid, stride_vs, 0, VALUE_DIM, VALUE_PAD)


@triton.jit
def _online_softmax_step(s, v, allowed, m_i, l_i, acc, scale_log2, DOT_PRECISION: tl.constexpr):
    """One key tile of the base-2 online softmax over logits s (unscaled): (running max, running sum,
    accumulator, the tile's exp-sum at the new max, the factor that moved the old state to the new max).
    A row with nothing allowed yet keeps max -inf and sum 0, without NaN."""
    s = tl.where(allowed, s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    gain = tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i * alpha + gain, acc, gain, alpha


@triton.jit
def _token_sparse_fwd_kernel(
    Q, K, V, IDX, O, LSE,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_ls,
    stride_ib, stride_is, stride_ig,
    head_chunks, group_size, seq_len_kv, num_indices, scale_log2,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, MAIN: tl.constexpr, REST: tl.constexpr,
    VALUE_PAD: tl.constexpr, BLOCK_H: tl.constexpr, TILE_K: tl.constexpr, SHARED_INDICES: tl.constexpr,
    V_IS_K: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_INDEX: tl.constexpr,
):  # fmt: skip
    stride_qb, stride_qh, stride_qs = _widen(stride_qb, stride_qh, stride_qs, WIDE_INDEX)
    stride_kb, stride_kh, stride_ks = _widen(stride_kb, stride_kh, stride_ks, WIDE_INDEX)
    stride_vb, stride_vh, stride_vs = _widen(stride_vb, stride_vh, stride_vs, WIDE_INDEX)
    stride_ob, stride_oh, stride_os = _widen(stride_ob, stride_oh, stride_os, WIDE_INDEX)
    pos, b, hk, heads, heads_ok, idx_base = _program(
        stride_ib, stride_is, stride_ig, head_chunks, group_size, SHARED_INDICES, BLOCK_H
    )
    q_main, q_rest = _load_queries(
        Q, b * stride_qb + heads * stride_qh + pos * stride_qs, heads_ok, HEAD_DIM, MAIN, REST
    )
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, VALUE_PAD], tl.float32)
    for start in range(0, num_indices, TILE_K):
        rows, valid = _tile_rows(IDX, idx_base, start, num_indices, seq_len_kv, TILE_K)
        s, k_main = _scores(q_main, q_rest, k_base, rows, valid, stride_ks, HEAD_DIM, MAIN, REST, DOT_PRECISION)
        v = _values(v_base, k_main, rows, valid, stride_vs, VALUE_DIM, VALUE_PAD, V_IS_K)
        m_i, l_i, acc, _, _ = _online_softmax_step(s, v, valid[None, :], m_i, l_i, acc, scale_log2, DOT_PRECISION)

    has_key = l_i != 0.0  # NaN scores make a NaN row (as the reference), not a keyless one
    l_safe = tl.where(has_key, l_i, 1.0)
    ptrs, mask = _head_rows(O, b * stride_ob + heads * stride_oh + pos * stride_os, heads_ok, 0, VALUE_DIM, VALUE_PAD)
    tl.store(ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=mask)
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # base 2 -> natural
    tl.store(LSE + b * stride_lb + heads * stride_lh + pos * stride_ls, lse, mask=heads_ok)


@triton.jit
def _token_sparse_bwd_kernel(
    Q, K, V, IDX, DO, LSE, DELTA, DQ, DK, DV,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_ls,
    stride_db, stride_dh, stride_ds,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    stride_ib, stride_is, stride_ig,
    head_chunks, group_size, seq_len_kv, num_indices, scale_log2, scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, MAIN: tl.constexpr, REST: tl.constexpr,
    VALUE_PAD: tl.constexpr, BLOCK_H: tl.constexpr, TILE_K: tl.constexpr, SHARED_INDICES: tl.constexpr,
    V_IS_K: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_INDEX: tl.constexpr,
):  # fmt: skip
    """DQ has Q's strides, DO the o strides, LSE the l strides and DELTA the d strides; DK and DV are fp32
    buffers (for V_IS_K, DV collects the value gradient of K's main part)."""
    stride_qb, stride_qh, stride_qs = _widen(stride_qb, stride_qh, stride_qs, WIDE_INDEX)
    stride_kb, stride_kh, stride_ks = _widen(stride_kb, stride_kh, stride_ks, WIDE_INDEX)
    stride_vb, stride_vh, stride_vs = _widen(stride_vb, stride_vh, stride_vs, WIDE_INDEX)
    stride_ob, stride_oh, stride_os = _widen(stride_ob, stride_oh, stride_os, WIDE_INDEX)
    stride_dkb, stride_dkh, stride_dks = _widen(stride_dkb, stride_dkh, stride_dks, WIDE_INDEX)
    stride_dvb, stride_dvh, stride_dvs = _widen(stride_dvb, stride_dvh, stride_dvs, WIDE_INDEX)
    pos, b, hk, heads, heads_ok, idx_base = _program(
        stride_ib, stride_is, stride_ig, head_chunks, group_size, SHARED_INDICES, BLOCK_H
    )
    q_off = b * stride_qb + heads * stride_qh + pos * stride_qs
    q_main, q_rest = _load_queries(Q, q_off, heads_ok, HEAD_DIM, MAIN, REST)
    ptrs, mask = _head_rows(DO, b * stride_ob + heads * stride_oh + pos * stride_os, heads_ok, 0, VALUE_DIM, VALUE_PAD)
    do = tl.load(ptrs, mask=mask, other=0.0)
    lse = tl.load(LSE + b * stride_lb + heads * stride_lh + pos * stride_ls, mask=heads_ok, other=float("-inf"))
    # Rows without keys (LSE -inf) get probabilities exp2(s - inf) = 0, hence zero gradients.
    lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + b * stride_db + heads * stride_dh + pos * stride_ds, mask=heads_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dk_base = DK + b * stride_dkb + hk * stride_dkh
    dv_base = DV + b * stride_dvb + hk * stride_dvh

    dq_main = tl.zeros([BLOCK_H, MAIN], tl.float32)
    dq_rest = tl.zeros([BLOCK_H, REST if REST > 0 else 16], tl.float32)
    for start in range(0, num_indices, TILE_K):
        rows, valid = _tile_rows(IDX, idx_base, start, num_indices, seq_len_kv, TILE_K)
        s, k_main = _scores(q_main, q_rest, k_base, rows, valid, stride_ks, HEAD_DIM, MAIN, REST, DOT_PRECISION)
        p = tl.where(valid[None, :], tl.math.exp2(s * scale_log2 - lse_log2[:, None]), 0.0)
        v = _values(v_base, k_main, rows, valid, stride_vs, VALUE_DIM, VALUE_PAD, V_IS_K)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(q_main.dtype)
        dv_tile = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        _scatter_add(dv_base, rows, valid, stride_dvs, 0, dv_tile, VALUE_DIM, VALUE_PAD)
        dq_main += tl.dot(ds, k_main, input_precision=DOT_PRECISION)
        dk_main = tl.dot(tl.trans(ds), q_main, input_precision=DOT_PRECISION) * scale
        _scatter_add(dk_base, rows, valid, stride_dks, 0, dk_main, HEAD_DIM, MAIN)
        if REST > 0:
            k_rest = _gather_rows(k_base, rows, valid, stride_ks, MAIN, HEAD_DIM, REST)
            dq_rest += tl.dot(ds, k_rest, input_precision=DOT_PRECISION)
            dk_rest = tl.dot(tl.trans(ds), q_rest, input_precision=DOT_PRECISION) * scale
            _scatter_add(dk_base, rows, valid, stride_dks, MAIN, dk_rest, HEAD_DIM, REST)

    ptrs, mask = _head_rows(DQ, q_off, heads_ok, 0, HEAD_DIM, MAIN)
    tl.store(ptrs, (dq_main * scale).to(DQ.dtype.element_ty), mask=mask)
    if REST > 0:
        ptrs, mask = _head_rows(DQ, q_off, heads_ok, MAIN, HEAD_DIM, REST)
        tl.store(ptrs, (dq_rest * scale).to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------- launch
def head_dim_split(head_dim: int) -> tuple[int, int]:
    """(MAIN, REST): a power-of-two main part of at least 16 dims and the (padded) rest, 0 if none."""
    main = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - main
    return main, (triton.next_power_of_2(max(rest, 16)) if rest > 0 else 0)


def _v_is_k(k, v, main: int) -> bool:
    """Whether v is k's leading `main` dims (MLA's latent), which the kernel then loads once. k must hold
    them all: below 16 dims `main` exceeds k's width, and a v wider than k over the same storage is not k."""
    # Storage identity and offset rather than data_ptr: torch.compile traces with storage-less fake tensors.
    same_storage = StorageWeakRef(v.untyped_storage()) == StorageWeakRef(k.untyped_storage())
    same_rows = same_storage and v.storage_offset() == k.storage_offset() and v.stride() == k.stride()
    return same_rows and v.shape[-1] == main <= k.shape[-1]


def _config(q, k, v):
    """Tiles and flags: heads per program and indices per tile are starting points for the H100, to be tuned there."""
    head_dim, group_size = q.shape[-1], q.shape[1] // k.shape[1]
    main, rest = head_dim_split(head_dim)
    wide = head_dim >= 256
    block_h = min(triton.next_power_of_2(max(group_size, 16)), 32 if wide else 64)
    v_is_k = _v_is_k(k, v, main)
    return {
        "MAIN": main,
        "REST": rest,
        "VALUE_PAD": main if v_is_k else triton.next_power_of_2(max(v.shape[-1], 16)),
        "BLOCK_H": block_h,
        "TILE_K": 32 if wide else 64,
        "SHARED_INDICES": None,  # set per launch
        "V_IS_K": v_is_k,
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "num_warps": 8 if head_dim > 256 or block_h * main > 64 * 128 else 4,
        "num_stages": 1 if wide else 2,
    }


def _outputs_like(q, value_dim: int):
    """(out [B, Hq, Sq, Dv], fp32 lse [B, Hq, Sq]) laid out like q: the outputs of a (B, S, H, D) view are too."""
    batch, heads, seq, _ = q.shape
    if q.stride(1) >= q.stride(2):
        out = torch.empty(batch, heads, seq, value_dim, dtype=q.dtype, device=q.device)
        return out, torch.empty(batch, heads, seq, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, seq, heads, value_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    return out, torch.empty(batch, seq, heads, dtype=torch.float32, device=q.device).transpose(1, 2)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _launch(kernel, tensors, strided, q, k, v, indices, scales):
    """One kernel over (query position, batch x KV head x head chunk): `tensors` first, then the strides
    of `strided`, the indices' strides and the shared sizes."""
    config = _config(q, k, v)
    config["SHARED_INDICES"] = indices.shape[2] == 1
    num_kv_heads = k.shape[1]
    group_size = q.shape[1] // num_kv_heads
    head_chunks = triton.cdiv(group_size, config["BLOCK_H"])
    grid = batch_head_grid(q.shape[2], num_kv_heads * head_chunks, q.shape[0])
    launcher(kernel)[grid](
        *tensors, *(stride for t in strided for stride in _strides(t)), *_strides(indices),
        head_chunks, group_size, k.shape[2], indices.shape[3], *scales,
        HEAD_DIM=q.shape[-1], VALUE_DIM=v.shape[-1], WIDE_INDEX=wide_index(*tensors), **config,
    )  # fmt: skip


@triton_op("sparse_attn::token_sparse_attn_fwd", mutates_args={})
def token_sparse_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, softmax_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Sq, Dv], natural-log lse fp32 [B, Hq, Sq]) of q (B, Hq, Sq, D) over the rows of k (B, Hkv,
    Skv, D) and v (B, Hkv, Skv, Dv) that indices int32 [B, Sq, G, K] (G = Hkv or 1) name."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    indices = indices.contiguous()
    out, lse = _poisoned(*_outputs_like(q, v.shape[-1]))
    strided = (q, k, v, out, lse.unsqueeze(-1))
    _launch(_token_sparse_fwd_kernel, (q, k, v, indices, out, lse), strided, q, k, v, indices, (softmax_scale * LOG2E,))
    return out, lse


@triton_op("sparse_attn::token_sparse_attn_bwd", mutates_args={})
def token_sparse_attn_bwd(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    indices: torch.Tensor,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of token_sparse_attn_fwd; the LSE's gradient folds into delta (see _engine_ops._backward_inputs)."""
    grad_out = _unit_last_stride(grad_out)
    delta = _row_delta(_unit_last_stride(out), grad_out, grad_lse)
    q, dq = _with_gradient(q)
    k, v = _unit_last_stride(k), _unit_last_stride(v)
    indices = indices.contiguous()
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    tensors = (q, k, v, indices, grad_out, lse, delta, _poisoned(dq)[0], dk, dv)
    strided = (q, k, v, grad_out, lse.unsqueeze(-1), delta.unsqueeze(-1), dk, dv)
    scales = (softmax_scale * LOG2E, softmax_scale)
    _launch(_token_sparse_bwd_kernel, tensors, strided, q, k, v, indices, scales)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, indices, softmax_scale = inputs
    ctx.save_for_backward(q, k, v, indices, *output)
    ctx.softmax_scale = softmax_scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, indices, out, lse = ctx.saved_tensors
    dq, dk, dv = token_sparse_attn_bwd(grad_out, grad_lse, q, k, v, out, lse, indices, ctx.softmax_scale)
    return dq, dk, dv, None, None


token_sparse_attn_fwd.register_autograd(_backward, setup_context=_setup_context)
