"""Triton kernels of MoBA attention with per-token routing: FlashMoBA's gather-and-densify.

Routing gives every query row (query head h, row r) its own KV blocks. The host turns the routes
into *pair lists*: for each (batch, KV head hk, KV block j, logical query block lb) the rows that
chose block j, stored contiguously (`PAIR_ROWS`, row id h * seq_len_q + r) with segment starts
`SEG_START` over (((b * Hkv + hk) * num_kv_blocks + j) * num_logical + lb). The rows of one GQA
group share their KV head's lists, so K/V tiles are loaded once for all of the group's heads.

* Forward and dQ (one kernel, `BACKWARD` picks the tile body) are query-major and persistent: a
  program takes one (b, hk, lb) item at a time,
  i.e. the LOGICAL_ROWS rows of each of the group's heads, walks the KV blocks and, for each,
  gathers the item's rows that chose it into dense BLOCK_M tiles. Their running softmax state
  (or dQ) lives in a per-program fp32 scratch of group * LOGICAL_ROWS rows, so the scratch is sized
  by the number of programs, never by the output.
* dK/dV is KV-major: a program owns one key tile and gathers every row that chose its block, with
  the group's heads reduced in registers (no atomics, no K/V repeats).

The current block (a row's own block) is one more pair with the token-level causal mask, so no
LSE merge is needed. Query row r of a sequence sits at key r + len_k - len_q (bottom-right).
Softmax runs in base 2 with log2(e) folded into the scale; the LSE is stored in natural log.
"""

import triton
import triton.language as tl

from .block_sparse_attn import (
    _batch_head,
    _dq_step,
    _load_key_tile,
    _lse_log2,
    _normalize,
    _seq_tile,
    _sequence_bounds,
    _softmax_step,
    _store_key_tile,
    _widen,
)


@triton.jit
def _item_coords(item, num_logical, num_kv_heads):
    """(b, hk, lb) of a work item; the last logical blocks (the most pairs under causality) come first."""
    lb = num_logical - 1 - item % num_logical
    bhk = item // num_logical
    return bhk // num_kv_heads, bhk % num_kv_heads, lb


@triton.jit
def _gathered_rows(PAIR_ROWS, start, end, seq_len_q, BLOCK_M: tl.constexpr):
    """The next BLOCK_M pairs of a segment: (in-segment mask, query head, query row)."""
    idx = start + tl.arange(0, BLOCK_M)
    ok = idx < end
    row = tl.load(PAIR_ROWS + idx, mask=ok, other=0)
    return ok, row // seq_len_q, row % seq_len_q


@triton.jit
def _load_rows(BASE, b, h, rows, ok, stride_b, stride_h, stride_s, offs_d, HEAD_DIM: tl.constexpr):
    """Gathered [BLOCK_M, HEAD_DIM_PAD] rows of a (batch, head, seq, dim) tensor, 0 outside."""
    ptrs = BASE + b * stride_b + h[:, None] * stride_h + rows[:, None] * stride_s + offs_d[None, :]
    return tl.load(ptrs, mask=ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _store_rows(BASE, value, b, h, rows, ok, stride_b, stride_h, stride_s, offs_d, HEAD_DIM: tl.constexpr):
    ptrs = BASE + b * stride_b + h[:, None] * stride_h + rows[:, None] * stride_s + offs_d[None, :]
    tl.store(ptrs, value.to(BASE.dtype.element_ty), mask=ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _scratch_tile(BASE, slot, offs_d, HEAD_DIM_PAD: tl.constexpr):
    """Pointers to the [BLOCK_M, HEAD_DIM_PAD] fp32 scratch rows `slot`."""
    return BASE + slot[:, None] * HEAD_DIM_PAD + offs_d[None, :]


@triton.jit
def _visible(rows, ok, offs_n, len_k, causal_shift, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N]: the pair is real and the key exists and (causal) is not after the row."""
    valid = ok[:, None] & (offs_n[None, :] < len_k)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= rows[:, None] + causal_shift)
    return valid


@triton.jit
def _key_range(j, rows, ok, len_k, causal_shift, KV_BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys [lo, hi) of block j that any gathered row may see, and whether a mask is needed at all."""
    lo = j * KV_BLOCK
    hi = tl.minimum(lo + KV_BLOCK, len_k)
    first_row = tl.min(tl.where(ok, rows, 2147483647), 0)
    if CAUSAL:
        hi = tl.minimum(hi, tl.max(tl.where(ok, rows, 0), 0) + causal_shift + 1)
    return lo, hi, first_row + causal_shift


@triton.jit
def _scratch_rows(h, rows, hk, lb, group_size, LOGICAL_ROWS: tl.constexpr):
    """A gathered row's slot in its item's scratch: head-in-group major, then row in the logical block."""
    return (h - hk * group_size) * LOGICAL_ROWS + rows - lb * LOGICAL_ROWS


@triton.jit
def _item_rows(start, hk, lb, group_size, len_q, LOGICAL_ROWS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Scratch slots [start, start + BLOCK_M) of an item: (slot, query head, query row, real row)."""
    slot = start + tl.arange(0, BLOCK_M)
    rows = lb * LOGICAL_ROWS + slot % LOGICAL_ROWS
    h = hk * group_size + slot // LOGICAL_ROWS
    return slot, h, rows, (slot < group_size * LOGICAL_ROWS) & (rows < len_q)


@triton.jit
def _forward_tile(
    q, rows, ok, slot, ROW_MAX, ROW_SUM, ACC, K_DESC, V_DESC, k_base, v_base, stride_ks, stride_vs, desc_batch, hk,
    k_start, j, len_k, causal_shift, scale_log2, KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    """Online softmax of gathered rows over block j, resumed from and saved to their scratch state."""
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    m_i = tl.load(ROW_MAX + slot, mask=ok, other=float("-inf"))
    l_i = tl.load(ROW_SUM + slot, mask=ok, other=0.0)
    acc_ptrs = _scratch_tile(ACC, slot, offs_d, HEAD_DIM_PAD)
    acc = tl.load(acc_ptrs, mask=ok[:, None], other=0.0)
    kv_lo, kv_hi, first_visible = _key_range(j, rows, ok, len_k, causal_shift, KV_BLOCK, CAUSAL)
    for start_n in range(kv_lo, kv_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _seq_tile(K_DESC, k_base, stride_ks, desc_batch, hk, k_start, start_n, len_k,
                     BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, USE_TMA)  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        # Past blocks are wholly visible: only the own block and the ragged end pay for a mask.
        needs_mask = start_n + BLOCK_N > len_k
        if CAUSAL:
            needs_mask = needs_mask | (start_n + BLOCK_N - 1 > first_visible)
        if needs_mask:
            s = tl.where(_visible(rows, ok, offs_n, len_k, causal_shift, CAUSAL), s, float("-inf"))
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
        v = _seq_tile(V_DESC, v_base, stride_vs, desc_batch, hk, k_start, start_n, len_k,
                     BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, USE_TMA)  # fmt: skip
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    tl.store(ROW_MAX + slot, m_i, mask=ok)
    tl.store(ROW_SUM + slot, l_i, mask=ok)
    tl.store(acc_ptrs, acc, mask=ok[:, None])


@triton.jit
def _dq_tile(
    q, do, lse, delta, rows, ok, slot, ACC, K_DESC, V_DESC, k_base, v_base, stride_ks, stride_vs, desc_batch, hk,
    k_start, j, len_k, causal_shift, scale_log2, KV_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    """Adds block j's share of dQ / scale, sum of P * (dP - delta) K, to the gathered rows' scratch."""
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    lse_log2 = _lse_log2(lse)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    kv_lo, kv_hi, _ = _key_range(j, rows, ok, len_k, causal_shift, KV_BLOCK, CAUSAL)
    for start_n in range(kv_lo, kv_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _seq_tile(K_DESC, k_base, stride_ks, desc_batch, hk, k_start, start_n, len_k,
                     BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, USE_TMA)  # fmt: skip
        v = _seq_tile(V_DESC, v_base, stride_vs, desc_batch, hk, k_start, start_n, len_k,
                     BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, USE_TMA)  # fmt: skip
        visible = _visible(rows, ok, offs_n, len_k, causal_shift, CAUSAL)
        dq += _dq_step(q, do, k, v, lse_log2, delta, visible, scale_log2, DOT_PRECISION)
    acc_ptrs = _scratch_tile(ACC, slot, offs_d, HEAD_DIM_PAD)
    tl.store(acc_ptrs, tl.load(acc_ptrs, mask=ok[:, None], other=0.0) + dq, mask=ok[:, None])


@triton.jit
def _moba_rows_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    DELTA,
    DQ,
    ACC,
    ROW_MAX,
    ROW_SUM,
    SEG_START,
    PAIR_ROWS,
    CU_Q,
    CU_K,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_ls,
    num_items,
    num_kv_heads,
    group_size,
    num_kv_blocks,
    num_logical,
    seq_len_q,
    seq_len_kv,
    scale_log2,
    scale,
    K_DESC,
    V_DESC,
    KV_BLOCK: tl.constexpr,
    LOGICAL_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BACKWARD: tl.constexpr,
    USE_TMA: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
):
    """The persistent query-major walk. Forward: O and LSE (written) from Q, K, V, with the softmax
    state in ACC, ROW_MAX, ROW_SUM. BACKWARD: DQ from Q, K, V, O = dO, LSE and DELTA, with dQ in
    ACC (DQ shares Q's strides; ROW_MAX, ROW_SUM unused). USE_TMA: K/V tiles through K_DESC, V_DESC."""
    stride_qb, stride_qh, stride_qs = _widen(stride_qb, stride_qh, stride_qs, WIDE_INDEX)
    stride_kb, stride_kh, stride_ks = _widen(stride_kb, stride_kh, stride_ks, WIDE_INDEX)
    stride_vb, stride_vh, stride_vs = _widen(stride_vb, stride_vh, stride_vs, WIDE_INDEX)
    stride_ob, stride_oh, stride_os = _widen(stride_ob, stride_oh, stride_os, WIDE_INDEX)
    stride_lb, stride_lh, stride_ls = _widen(stride_lb, stride_lh, stride_ls, WIDE_INDEX)
    pid = tl.program_id(0)
    scratch = pid * group_size * LOGICAL_ROWS
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    for item in range(pid, num_items, tl.num_programs(0)):
        b, hk, lb = _item_coords(item, num_logical, num_kv_heads)
        q_start, k_start, len_q, len_k = _sequence_bounds(CU_Q, CU_K, b, seq_len_q, seq_len_kv, VARLEN)
        if lb * LOGICAL_ROWS < len_q:
            causal_shift = len_k - len_q
            for start in range(0, group_size * LOGICAL_ROWS, BLOCK_M):
                slot = scratch + start + tl.arange(0, BLOCK_M)
                tl.store(_scratch_tile(ACC, slot, offs_d, HEAD_DIM_PAD), tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32))
                if not BACKWARD:
                    tl.store(ROW_MAX + slot, tl.full([BLOCK_M], float("-inf"), tl.float32))
                    tl.store(ROW_SUM + slot, tl.zeros([BLOCK_M], tl.float32))
            tl.debug_barrier()
            k_base = K + b * stride_kb + hk * stride_kh + k_start * stride_ks
            v_base = V + b * stride_vb + hk * stride_vh + k_start * stride_vs
            desc_batch = 0 if VARLEN else b  # packed sequences are one batch row, offset by k_start
            for j in range(0, num_kv_blocks):
                seg = ((b * num_kv_heads + hk) * num_kv_blocks + j) * num_logical + lb
                seg_end = tl.load(SEG_START + seg + 1)
                for start in range(tl.load(SEG_START + seg), seg_end, BLOCK_M):
                    ok, h, rows = _gathered_rows(PAIR_ROWS, start, seg_end, seq_len_q, BLOCK_M)
                    q = _load_rows(Q, b, h, q_start + rows, ok, stride_qb, stride_qh, stride_qs, offs_d, HEAD_DIM)
                    slot = scratch + _scratch_rows(h, rows, hk, lb, group_size, LOGICAL_ROWS)
                    if BACKWARD:
                        do = _load_rows(O, b, h, q_start + rows, ok, stride_ob, stride_oh, stride_os, offs_d, HEAD_DIM)
                        stat = b * stride_lb + h * stride_lh + (q_start + rows) * stride_ls
                        _dq_tile(
                            q, do, tl.load(LSE + stat, mask=ok, other=0.0), tl.load(DELTA + stat, mask=ok, other=0.0),
                            rows, ok, slot, ACC, K_DESC, V_DESC, k_base, v_base, stride_ks, stride_vs, desc_batch,
                            hk, k_start, j, len_k, causal_shift, scale_log2, KV_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM,
                            HEAD_DIM_PAD, CAUSAL, DOT_PRECISION, USE_TMA,
                        )  # fmt: skip
                    else:
                        _forward_tile(
                            q, rows, ok, slot, ROW_MAX, ROW_SUM, ACC, K_DESC, V_DESC, k_base, v_base, stride_ks,
                            stride_vs, desc_batch, hk, k_start, j, len_k, causal_shift, scale_log2, KV_BLOCK, BLOCK_N,
                            HEAD_DIM, HEAD_DIM_PAD, CAUSAL, DOT_PRECISION, USE_TMA,
                        )  # fmt: skip
                    # The next tile may hold the same rows in other threads: make the stores visible.
                    tl.debug_barrier()
            for start in range(0, group_size * LOGICAL_ROWS, BLOCK_M):
                slot, h, rows, ok = _item_rows(start, hk, lb, group_size, len_q, LOGICAL_ROWS, BLOCK_M)
                acc = tl.load(_scratch_tile(ACC, scratch + slot, offs_d, HEAD_DIM_PAD), mask=ok[:, None], other=0.0)
                if BACKWARD:
                    _store_rows(
                        DQ, acc * scale, b, h, q_start + rows, ok, stride_qb, stride_qh, stride_qs, offs_d, HEAD_DIM
                    )
                else:
                    m_i = tl.load(ROW_MAX + scratch + slot, mask=ok, other=float("-inf"))
                    l_i = tl.load(ROW_SUM + scratch + slot, mask=ok, other=0.0)
                    out, lse = _normalize(acc, m_i, l_i)
                    _store_rows(O, out, b, h, q_start + rows, ok, stride_ob, stride_oh, stride_os, offs_d, HEAD_DIM)
                    tl.store(LSE + b * stride_lb + h * stride_lh + (q_start + rows) * stride_ls, lse, mask=ok)
            tl.debug_barrier()  # the next item reuses the scratch


@triton.jit
def _moba_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    SEG_START,
    PAIR_ROWS,
    CU_Q,
    CU_K,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_ls,
    num_kv_heads,
    num_kv_blocks,
    num_logical,
    seq_len_q,
    seq_len_kv,
    scale_log2,
    scale,
    KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
):
    """dK, dV of one key tile over every row (all of the group's heads) that chose its block;
    k, dk share strides, as do v, dv."""
    stride_qb, stride_qh, stride_qs = _widen(stride_qb, stride_qh, stride_qs, WIDE_INDEX)
    stride_kb, stride_kh, stride_ks = _widen(stride_kb, stride_kh, stride_ks, WIDE_INDEX)
    stride_vb, stride_vh, stride_vs = _widen(stride_vb, stride_vh, stride_vs, WIDE_INDEX)
    stride_ob, stride_oh, stride_os = _widen(stride_ob, stride_oh, stride_os, WIDE_INDEX)
    stride_lb, stride_lh, stride_ls = _widen(stride_lb, stride_lh, stride_ls, WIDE_INDEX)
    tile = tl.program_id(0)
    b, hk = _batch_head()
    q_start, k_start, len_q, len_k = _sequence_bounds(CU_Q, CU_K, b, seq_len_q, seq_len_kv, VARLEN)
    if tile * BLOCK_N >= len_k:
        return
    causal_shift = len_k - len_q
    j = tile * BLOCK_N // KV_BLOCK
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    k = _load_key_tile(K, b, hk, k_start, offs_n, len_k, stride_kb, stride_kh, stride_ks, offs_d, HEAD_DIM)
    v = _load_key_tile(V, b, hk, k_start, offs_n, len_k, stride_vb, stride_vh, stride_vs, offs_d, HEAD_DIM)
    # Every logical block's rows of block j are contiguous: one range over the whole sequence.
    seg = ((b * num_kv_heads + hk) * num_kv_blocks + j) * num_logical
    seg_end = tl.load(SEG_START + seg + num_logical)

    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    for start in range(tl.load(SEG_START + seg), seg_end, BLOCK_M):
        ok, h, rows = _gathered_rows(PAIR_ROWS, start, seg_end, seq_len_q, BLOCK_M)
        q = _load_rows(Q, b, h, q_start + rows, ok, stride_qb, stride_qh, stride_qs, offs_d, HEAD_DIM)
        do = _load_rows(DO, b, h, q_start + rows, ok, stride_ob, stride_oh, stride_os, offs_d, HEAD_DIM)
        stat = b * stride_lb + h * stride_lh + (q_start + rows) * stride_ls
        lse = tl.load(LSE + stat, mask=ok, other=0.0)
        lse_log2 = _lse_log2(lse)
        delta = tl.load(DELTA + stat, mask=ok, other=0.0)
        # Transposed scores [BLOCK_N, BLOCK_M] keep dK/dV rows in registers.
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2
        visible = tl.trans(_visible(rows, ok, offs_n, len_k, causal_shift, CAUSAL))
        p_t = tl.where(visible, tl.math.exp2(s_t - lse_log2[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    _store_key_tile(DK, dk * scale, b, hk, k_start, offs_n, len_k, stride_kb, stride_kh, stride_ks, offs_d, HEAD_DIM)
    _store_key_tile(DV, dv, b, hk, k_start, offs_n, len_k, stride_vb, stride_vh, stride_vs, offs_d, HEAD_DIM)
