"""S2O attention (spec shared/specs/s2o.md section 4.2): index-guided permuted loading with early stopping.

A program owns one tile: BLOCK_M consecutive entries of a segment's query order sigma (one query head),
whose rows sit at scattered positions. Pass 1 attends to the segment's own keys in physical order
(causally, per row); pass 2 walks the segment's key order pi (every key before the segment), BLOCK_N
gathered keys at a time, and stops after the first block whose mass gain delta / l (the block's
exp-sum over the running sum, both at the running max) falls below tau for the tile's largest row
(`STOP_MEAN`: the tile's mean row). Each tile records how many pi blocks it processed.

pi of segment g sits in one packed int32 row per (batch, KV head) at offset g * (Skv - Sq) + S * g(g-1)/2
(the histories before it), so the query heads of a GQA group share it. Entries of pi outside the
segment's history and entries of sigma outside the segment are skipped, never dereferenced; a pi
that names only part of the history (keep_frac < 1) ends in -1 entries, and the walk stops at the
first block that starts with one.

The backward treats the processed set as a fixed mask: it recomputes both passes (pass 2 for the
recorded number of blocks), keeps dQ in registers and scatters dK and dV into fp32 buffers with atomic
adds, since every tile of every query head reads the same keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .._engine_ops import _poisoned, _row_delta, _unit_last_stride, _with_gradient
from .block_sparse_attn import LOG2E, _batch_head, _widen
from .launch import batch_head_grid, launcher, wide_index
from .token_sparse_attn import _gather_rows, _online_softmax_step, _outputs_like, _scatter_add

# Rows x keys x padded head dim per step, by element size (see _forward_tiles, _backward_tiles).
FORWARD_STEP_ELEMENTS = {2: 64 * 64 * 128, 4: 64 * 16 * 128}
BACKWARD_STEP_ELEMENTS = {2: 64 * 32 * 128, 4: 32 * 32 * 128}


@triton.jit
def _tile(QO, stride_ob, stride_oh, group_size, seq_len_q, seq_offset, segment_len,
          ROWS: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """(b, query head, KV head, segment, tile, the program's ROWS rows in loading order, which are real,
    history length, the absolute end of the segment's keys). The forward's program is a whole tile
    (ROWS = BLOCK_M); the backward's may be a part of one, which shares the tile's processed set."""
    first = tl.program_id(0) * ROWS
    b, h = _batch_head()
    g = first // segment_len
    seg_lo = g * segment_len
    seg_hi = tl.minimum(seg_lo + segment_len, seq_len_q)
    entries = first + tl.arange(0, ROWS)
    rows = tl.load(QO + b * stride_ob + h * stride_oh + entries, mask=entries < seq_len_q, other=-1)
    row_ok = (rows >= seg_lo) & (rows < seg_hi)
    rows = tl.where(row_ok, rows, 0)
    return b, h, h // group_size, g, first // BLOCK_M, rows, row_ok, seq_offset + seg_lo, seq_offset + seg_hi


@triton.jit
def _history_base(g, seq_offset, segment_len):
    """Offset of segment g's key order in the packed row: the histories of segments 0 .. g-1."""
    g = g.to(tl.int64)
    return g * seq_offset + segment_len * (g * (g - 1) // 2)


@triton.jit
def _local_keys(start, rows, row_ok, seq_offset, seg_end, WIDTH: tl.constexpr):
    """Keys [start, start + WIDTH) of the segment, which exist, and which each row may see (causal)."""
    cols = start + tl.arange(0, WIDTH)
    kv_ok = cols < seg_end
    allowed = row_ok[:, None] & kv_ok[None, :] & (cols[None, :] <= (rows + seq_offset)[:, None])
    return cols, kv_ok, allowed


@triton.jit
def _history_keys(KO, ko_base, first, history, row_ok, WIDTH: tl.constexpr):
    """Key rows of pi entries [first, first + WIDTH), which exist (entries outside [0, history) are
    skipped), and the mask."""
    e = first + tl.arange(0, WIDTH)
    cols = tl.load(KO + ko_base + e, mask=e < history, other=-1)
    kv_ok = (cols >= 0) & (cols < history)
    return tl.where(kv_ok, cols, 0), kv_ok, row_ok[:, None] & kv_ok[None, :]


@triton.jit
def _last_local_key(rows, row_ok, seq_offset):
    """One past the last key position any real row of the tile sees: pass 1 stops there."""
    return tl.max(tl.where(row_ok, rows, 0), 0) + seq_offset + 1


@triton.jit
def _attend(q, k_base, v_base, cols, kv_ok, allowed, m_i, l_i, acc, stride_ks, stride_vs, scale_log2,
            HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """The online-softmax step over key rows `cols`: (max, sum, accumulator, the block's exp-sum)."""
    k = _gather_rows(k_base, cols, kv_ok, stride_ks, 0, HEAD_DIM, HEAD_PAD)
    v = _gather_rows(v_base, cols, kv_ok, stride_vs, 0, HEAD_DIM, HEAD_PAD)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    return _online_softmax_step(s, v, allowed, m_i, l_i, acc, scale_log2, DOT_PRECISION)


@triton.jit
def _s2o_fwd_kernel(
    Q, K, V, KO, QO, O, LSE, NB,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_ls,
    stride_kob, stride_koh, stride_qob, stride_qoh, stride_nbb, stride_nbh,
    group_size, seq_len_q, seq_offset, segment_len, scale_log2, tau,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SUB_N: tl.constexpr, STOP_MEAN: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_INDEX: tl.constexpr,
):  # fmt: skip
    """A program is one whole tile (the stop rule reads all its rows); it takes SUB_N keys (a divisor of
    BLOCK_N) per step."""
    stride_qb, stride_qh, stride_qs = _widen(stride_qb, stride_qh, stride_qs, WIDE_INDEX)
    stride_kb, stride_kh, stride_ks = _widen(stride_kb, stride_kh, stride_ks, WIDE_INDEX)
    stride_vb, stride_vh, stride_vs = _widen(stride_vb, stride_vh, stride_vs, WIDE_INDEX)
    stride_ob, stride_oh, stride_os = _widen(stride_ob, stride_oh, stride_os, WIDE_INDEX)
    b, h, hk, g, tile, rows, row_ok, history, seg_end = _tile(
        QO, stride_qob, stride_qoh, group_size, seq_len_q, seq_offset, segment_len, BLOCK_M, BLOCK_M
    )
    q = _gather_rows(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qs, 0, HEAD_DIM, HEAD_PAD)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    # Pass 1: the segment's own keys, so that l holds the local mass before any history block.
    for start in range(history, _last_local_key(rows, row_ok, seq_offset), SUB_N):
        cols, kv_ok, allowed = _local_keys(start, rows, row_ok, seq_offset, seg_end, SUB_N)
        m_i, l_i, acc, _, _ = _attend(q, k_base, v_base, cols, kv_ok, allowed, m_i, l_i, acc, stride_ks, stride_vs,
                                      scale_log2, HEAD_DIM, HEAD_PAD, DOT_PRECISION)  # fmt: skip

    # Pass 2: pi blocks from most to least important, until one adds less than tau of the mass. A block
    # may take several steps of SUB_N keys: its gain is rescaled with l whenever the max moves.
    ko_base = b.to(tl.int64) * stride_kob + hk * stride_koh + _history_base(g, seq_offset, segment_len)
    num_blocks = tl.cdiv(history, BLOCK_N)
    num_rows = tl.sum(row_ok.to(tl.float32), 0)
    done = num_blocks * 0
    go = done < num_blocks
    while go:
        gain = tl.zeros([BLOCK_M], tl.float32)
        for first in range(done * BLOCK_N, done * BLOCK_N + BLOCK_N, SUB_N):
            cols, kv_ok, allowed = _history_keys(KO, ko_base, first, history, row_ok, SUB_N)
            m_i, l_i, acc, step_gain, alpha = _attend(q, k_base, v_base, cols, kv_ok, allowed, m_i, l_i, acc,
                                                      stride_ks, stride_vs, scale_log2, HEAD_DIM, HEAD_PAD,
                                                      DOT_PRECISION)  # fmt: skip
            gain = gain * alpha + step_gain
        ratio = tl.where(row_ok, gain / tl.where(l_i > 0.0, l_i, 1.0), 0.0)  # in [0, 1]: l includes the gain
        if STOP_MEAN:
            stat = tl.sum(ratio, 0) / num_rows
        else:
            stat = tl.max(ratio, 0)
        done += 1
        # pi ends early where a plan keeps only part of the history (keep_frac < 1): -1 from there on.
        named = tl.load(KO + ko_base + done * BLOCK_N, mask=done < num_blocks, other=-1) >= 0
        go = (done < num_blocks) & (stat >= tau) & named
    tl.store(NB + b * stride_nbb + h * stride_nbh + tile, done)

    cols = tl.arange(0, HEAD_PAD)
    o_rows = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + cols[None, :]
    l_safe = tl.where(row_ok, l_i, 1.0)  # every real row sees at least its own key
    tl.store(o_rows, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < HEAD_DIM))
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453  # base 2 -> natural
    tl.store(LSE + b * stride_lb + h * stride_lh + rows * stride_ls, lse, mask=row_ok)


@triton.jit
def _gradient_step(q, do, lse_log2, delta, k_base, v_base, dk_base, dv_base, cols, kv_ok, allowed, dq,
                   stride_ks, stride_vs, stride_dks, stride_dvs, scale_log2, scale,
                   HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """One key block of the backward: recomputed probabilities, dK and dV scattered, dQ accumulated."""
    k = _gather_rows(k_base, cols, kv_ok, stride_ks, 0, HEAD_DIM, HEAD_PAD)
    v = _gather_rows(v_base, cols, kv_ok, stride_vs, 0, HEAD_DIM, HEAD_PAD)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    p = tl.where(allowed, tl.math.exp2(s * scale_log2 - lse_log2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dv_tile = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
    _scatter_add(dv_base, cols, kv_ok, stride_dvs, 0, dv_tile, HEAD_DIM, HEAD_PAD)
    dk_tile = tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION) * scale
    _scatter_add(dk_base, cols, kv_ok, stride_dks, 0, dk_tile, HEAD_DIM, HEAD_PAD)
    return dq + tl.dot(ds, k, input_precision=DOT_PRECISION)


@triton.jit
def _s2o_bwd_kernel(
    Q, K, V, KO, QO, NB, DO, LSE, DELTA, DQ, DK, DV,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_ls,
    stride_db, stride_dh, stride_ds,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    stride_kob, stride_koh, stride_qob, stride_qoh, stride_nbb, stride_nbh,
    group_size, seq_len_q, seq_offset, segment_len, scale_log2, scale,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SUB_M: tl.constexpr, SUB_N: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_INDEX: tl.constexpr,
):  # fmt: skip
    """DQ has Q's strides, DO the o strides, LSE the l strides and DELTA the d strides; DK and DV are fp32.
    A program takes SUB_M rows of a tile and SUB_N keys at a time (divisors of BLOCK_M and BLOCK_N)."""
    stride_qb, stride_qh, stride_qs = _widen(stride_qb, stride_qh, stride_qs, WIDE_INDEX)
    stride_kb, stride_kh, stride_ks = _widen(stride_kb, stride_kh, stride_ks, WIDE_INDEX)
    stride_vb, stride_vh, stride_vs = _widen(stride_vb, stride_vh, stride_vs, WIDE_INDEX)
    stride_ob, stride_oh, stride_os = _widen(stride_ob, stride_oh, stride_os, WIDE_INDEX)
    stride_dkb, stride_dkh, stride_dks = _widen(stride_dkb, stride_dkh, stride_dks, WIDE_INDEX)
    stride_dvb, stride_dvh, stride_dvs = _widen(stride_dvb, stride_dvh, stride_dvs, WIDE_INDEX)
    b, h, hk, g, tile, rows, row_ok, history, seg_end = _tile(
        QO, stride_qob, stride_qoh, group_size, seq_len_q, seq_offset, segment_len, SUB_M, BLOCK_M
    )
    q_rows = b * stride_qb + h * stride_qh
    q = _gather_rows(Q + q_rows, rows, row_ok, stride_qs, 0, HEAD_DIM, HEAD_PAD)
    do = _gather_rows(DO + b * stride_ob + h * stride_oh, rows, row_ok, stride_os, 0, HEAD_DIM, HEAD_PAD)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + rows * stride_ls, mask=row_ok, other=0.0)
    lse_log2 = lse * 1.4426950408889634
    delta = tl.load(DELTA + b * stride_db + h * stride_dh + rows * stride_ds, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dk_base = DK + b * stride_dkb + hk * stride_dkh
    dv_base = DV + b * stride_dvb + hk * stride_dvh

    dq = tl.zeros([SUB_M, HEAD_PAD], tl.float32)
    for start in range(history, _last_local_key(rows, row_ok, seq_offset), SUB_N):
        cols, kv_ok, allowed = _local_keys(start, rows, row_ok, seq_offset, seg_end, SUB_N)
        dq = _gradient_step(
            q, do, lse_log2, delta, k_base, v_base, dk_base, dv_base, cols, kv_ok, allowed, dq,
            stride_ks, stride_vs, stride_dks, stride_dvs, scale_log2, scale, HEAD_DIM, HEAD_PAD, DOT_PRECISION,
        )  # fmt: skip
    ko_base = b.to(tl.int64) * stride_kob + hk * stride_koh + _history_base(g, seq_offset, segment_len)
    processed = tl.load(NB + b * stride_nbb + h * stride_nbh + tile)
    for first in range(0, processed * BLOCK_N, SUB_N):
        cols, kv_ok, allowed = _history_keys(KO, ko_base, first, history, row_ok, SUB_N)
        dq = _gradient_step(
            q, do, lse_log2, delta, k_base, v_base, dk_base, dv_base, cols, kv_ok, allowed, dq,
            stride_ks, stride_vs, stride_dks, stride_dvs, scale_log2, scale, HEAD_DIM, HEAD_PAD, DOT_PRECISION,
        )  # fmt: skip
    cols = tl.arange(0, HEAD_PAD)
    dq_rows = DQ + q_rows + rows[:, None] * stride_qs + cols[None, :]
    tl.store(dq_rows, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < HEAD_DIM))


# ---------------------------------------------------------------------------------- launch
def _config(q, block_m: int, block_n: int) -> dict:
    """Tile flags; the warp count is a starting point for the H100, to be tuned there."""
    head_pad = triton.next_power_of_2(max(q.shape[-1], 16))
    return {
        "HEAD_DIM": q.shape[-1],
        "HEAD_PAD": head_pad,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "num_warps": 8 if block_m * head_pad >= 128 * 128 or q.dtype == torch.float32 else 4,
    }


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _order_strides(key_order, query_order, n_blocks):
    return (*key_order.stride()[:2], *query_order.stride()[:2], *n_blocks.stride()[:2])


def _sizes(q, k, segment_len):
    group = q.shape[1] // k.shape[1]
    return group, q.shape[2], k.shape[2] - q.shape[2], segment_len


def _grid(q, rows):
    return batch_head_grid(triton.cdiv(q.shape[2], rows), q.shape[1], q.shape[0])


def _forward_tiles(q, block_m: int, block_n: int) -> dict:
    """The forward's keys per step: a part of the block where the tile's rows x keys x head dim would
    not fit (the rows are the whole tile: the stop rule reads them all), and one stage where even the
    smallest part does not (fp32 tiles of 128 rows: at D = 256 two stages need 169 KB of shared memory)."""
    sub_n = _shrink(q, block_m, block_n, FORWARD_STEP_ELEMENTS, shrink_rows=False)[1]
    head_pad = triton.next_power_of_2(max(q.shape[-1], 16))
    fits = block_m * sub_n * head_pad <= FORWARD_STEP_ELEMENTS[q.element_size()]
    return {"SUB_N": sub_n, "num_stages": 2 if fits else 1}


def _backward_tiles(q, block_m: int, block_n: int) -> dict:
    """The backward's rows and keys per step: parts of the tile, so that K, V, dO and the dK/dV products
    fit the registers and shared memory at wide heads."""
    sub_m, sub_n = _shrink(q, block_m, block_n, BACKWARD_STEP_ELEMENTS, shrink_rows=True)
    return {"SUB_M": sub_m, "SUB_N": sub_n, "num_stages": 2}


def _shrink(q, rows: int, keys: int, budgets: dict, shrink_rows: bool) -> tuple[int, int]:
    """Halves keys (and rows, the larger first) down to 16 until rows x keys x padded head dim fits the
    budget of q's element size (starting points for the H100, to be tuned there)."""
    head_pad = triton.next_power_of_2(max(q.shape[-1], 16))
    budget = budgets[q.element_size()]
    while rows * keys * head_pad > budget:
        if keys > 16 and (keys >= rows or not shrink_rows):
            keys //= 2
        elif shrink_rows and rows > 16:
            rows //= 2
        else:
            break
    return rows, keys


def _key_order_arg(key_order):
    """A packed key order with no entry (no segment has a history) still needs an address to pass."""
    return key_order if key_order.numel() else key_order.new_zeros(key_order.shape[:2] + (1,))


@triton_op("sparse_attn::s2o_attn_fwd", mutates_args={})
def s2o_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_order: torch.Tensor,
    query_order: torch.Tensor,
    segment_len: int,
    block_m: int,
    block_n: int,
    tau: float,
    stop_mean: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out like q, natural-log lse fp32 [B, Hq, Sq], processed pi blocks int32 [B, Hq, tiles]) of causal
    S2O attention: q (B, Hq, Sq, D), k and v (B, Hkv, Skv, D), key_order int32 [B, Hkv, packed histories],
    query_order int32 [B, Hq, Sq] (each segment's rows in loading order)."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    key_order, query_order = _key_order_arg(key_order.contiguous()), query_order.contiguous()
    out, lse = _poisoned(*_outputs_like(q, q.shape[-1]))
    n_blocks = torch.empty(q.shape[0], q.shape[1], triton.cdiv(q.shape[2], block_m), dtype=torch.int32, device=q.device)
    tensors = (q, k, v, key_order, query_order, out, lse, n_blocks)
    launcher(_s2o_fwd_kernel)[_grid(q, block_m)](
        *tensors, *(s for t in (q, k, v, out, lse.unsqueeze(-1)) for s in _strides(t)),
        *_order_strides(key_order, query_order, n_blocks), *_sizes(q, k, segment_len), softmax_scale * LOG2E, tau,
        STOP_MEAN=stop_mean, WIDE_INDEX=wide_index(q, k, v, out, key_order), **_config(q, block_m, block_n),
        **_forward_tiles(q, block_m, block_n),
    )  # fmt: skip
    return out, lse, n_blocks


@triton_op("sparse_attn::s2o_attn_bwd", mutates_args={})
def s2o_attn_bwd(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_order: torch.Tensor,
    query_order: torch.Tensor,
    n_blocks: torch.Tensor,
    segment_len: int,
    block_m: int,
    block_n: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of s2o_attn_fwd over the processed set it recorded (n_blocks); the LSE's gradient
    folds into delta."""
    grad_out = _unit_last_stride(grad_out)
    delta = _row_delta(_unit_last_stride(out), grad_out, grad_lse)
    q, dq = _with_gradient(q)
    k, v = _unit_last_stride(k), _unit_last_stride(v)
    key_order, query_order = _key_order_arg(key_order.contiguous()), query_order.contiguous()
    n_blocks = n_blocks.contiguous()
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    tensors = (q, k, v, key_order, query_order, n_blocks, grad_out, lse, delta, _poisoned(dq)[0], dk, dv)
    strided = (q, k, v, grad_out, lse.unsqueeze(-1), delta.unsqueeze(-1), dk, dv)
    tiles = _backward_tiles(q, block_m, block_n)
    launcher(_s2o_bwd_kernel)[_grid(q, tiles["SUB_M"])](
        *tensors, *(s for t in strided for s in _strides(t)), *_order_strides(key_order, query_order, n_blocks),
        *_sizes(q, k, segment_len), softmax_scale * LOG2E, softmax_scale,
        WIDE_INDEX=wide_index(q, k, v, grad_out, dk, key_order), **tiles, **_config(q, block_m, block_n),
    )  # fmt: skip
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, key_order, query_order, segment_len, block_m, block_n, _, _, softmax_scale = inputs
    out, lse, n_blocks = output
    ctx.save_for_backward(q, k, v, key_order, query_order, out, lse, n_blocks)
    ctx.sizes = (segment_len, block_m, block_n, softmax_scale)
    ctx.mark_non_differentiable(n_blocks)


def _backward(ctx, grad_out, grad_lse, _grad_n_blocks):
    q, k, v, key_order, query_order, out, lse, n_blocks = ctx.saved_tensors
    dq, dk, dv = s2o_attn_bwd(grad_out, grad_lse, q, k, v, out, lse, key_order, query_order, n_blocks, *ctx.sizes)
    return dq, dk, dv, None, None, None, None, None, None, None, None


s2o_attn_fwd.register_autograd(_backward, setup_context=_setup_context)
