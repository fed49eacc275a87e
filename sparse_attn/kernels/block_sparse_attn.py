"""Triton kernels of the block-sparse attention engine: forward and dQ (one row-parallel kernel,
`BACKWARD` picks the tile body) and dK/dV (column-parallel over the transposed layout, with the GQA
group reduced in-kernel).

Geometry shared by the three kernels. A program owns one tile of BLOCK_M queries (or BLOCK_N
keys); tiles never straddle a layout block because the tile sizes divide the layout's block
sizes. Each (batch, query head) reads layout head `h // LAYOUT_HEAD_DIV` (strides are 0 for a
broadcast batch or head). Sequences are either batched ([B, H, S, D] strides) or packed varlen
(cu_seqlens, batch stride 0); in both, query i of a sequence sits at key i + len_k - len_q.
Softmax runs in base 2 with log2(e) folded into the scale; the LSE is stored in natural log.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _widen(a, b, c, WIDE_INDEX: tl.constexpr):
    """Three strides as int64 when WIDE_INDEX (the launch's tensors span 2^31 elements or more), so
    that every index * stride product is int64 and cannot wrap; unchanged otherwise, where int32
    offsets keep the registers the tuned tiles were chosen with."""
    if WIDE_INDEX:
        a, b, c = tl.cast(a, tl.int64), tl.cast(b, tl.int64), tl.cast(c, tl.int64)
    return a, b, c


@triton.jit
def _batch_head():
    """(batch or packed sequence, head) of a program on a `launch.batch_head_grid` (tiles, heads, batch).

    Taken through one flat index: with the two axes read directly, triton 3.6 holds both for the
    whole kernel (the D=128 varlen dK/dV tile went from 253 registers to 255 and 24 B of spills)."""
    flat = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
    return flat // tl.num_programs(1), flat % tl.num_programs(1)


@triton.jit
def _sequence_bounds(CU_Q, CU_K, b, seq_len_q, seq_len_kv, VARLEN: tl.constexpr):
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b)
        len_q = tl.load(CU_Q + b + 1) - q_start
        len_k = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = 0
        k_start = 0
        len_q = seq_len_q
        len_k = seq_len_kv
    return q_start, k_start, len_q, len_k


@triton.jit
def _seq_tile(
    DESC, base, stride_s, desc_batch, head, seq_start, start, seq_len,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    """Rows start .. start + ROWS of one sequence and head (keys, values, queries or dO):
    [ROWS, HEAD_DIM_PAD]. Pointer loads from `base` (the sequence's first row) zero the rows past
    seq_len. A descriptor (USE_TMA) over (batch, head, seq, dim) reads the next sequence's rows
    there (zeros past the tensor and the head dim), so callers mask rows past seq_len in any case."""
    if USE_TMA:
        tile = DESC.load([desc_batch, head, seq_start + start, 0]).reshape(ROWS, HEAD_DIM_PAD)
    else:
        offs = start + tl.arange(0, ROWS)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        ok = (offs[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
        tile = tl.load(base + offs[:, None] * stride_s + offs_d[None, :], mask=ok, other=0.0)
    return tile


@triton.jit
def _pair_mask(offs_m, offs_n, len_k, causal_shift, CAUSAL: tl.constexpr):
    """Keys inside the sequence, and (causal) not after the query's bottom-right-aligned position."""
    valid = offs_n[None, :] < len_k
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
    return valid


@triton.jit
def _softmax_step(s, m_i, l_i):
    """One online-softmax step over base-2 scores s: (p, rescale of the old state, new max, new sum)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays at p = 0
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _lse_log2(lse):
    """A saved natural-log LSE in base 2, 0 for rows without keys (their P is masked to 0 anyway)."""
    return tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)


@triton.jit
def _normalize(acc, m_i, l_i):
    """(output, natural-log LSE) of a finished softmax state; a row without keys gives 0 and -inf."""
    has_key = l_i != 0.0  # NaN scores make a NaN row (as the reference), not a keyless one
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    return out, lse


@triton.jit
def _selected_key_range(kv_list, j, len_k, last_visible, KV_BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys [lo, hi) of the j-th selected block, cut at the last key the query tile may see."""
    kv_lo = tl.load(kv_list + j) * KV_BLOCK
    kv_hi = tl.minimum(kv_lo + KV_BLOCK, len_k)
    if CAUSAL:
        kv_hi = tl.minimum(kv_hi, last_visible + 1)
    return kv_lo, kv_hi


@triton.jit
def _count_below(indices, count, bound, FROM_END: tl.constexpr):
    """How many of the ascending `indices[:count]` lie below `bound`. The answer is expected within
    a few entries of the list's end (FROM_END) or start: one vector load of 4 entries there settles
    it, and a scalar walk goes on only when all 4 fell on the far side of `bound`."""
    if FROM_END:
        slots = count - 1 - tl.arange(0, 4)
        n = count - tl.sum((tl.load(indices + slots, mask=slots >= 0, other=-1) >= bound).to(tl.int32))
        if n == count - 4:
            while tl.load(indices + n - 1, mask=n > 0, other=-1) >= bound:
                n -= 1
    else:
        slots = tl.arange(0, 4)
        n = tl.sum((tl.load(indices + slots, mask=slots < count, other=bound) < bound).to(tl.int32))
        if n == 4:
            while tl.load(indices + n, mask=n < count, other=bound) < bound:
                n += 1
    return n


@triton.jit
def _dq_step(q, do, k, v, lse_log2, delta, visible, scale_log2, DOT_PRECISION: tl.constexpr):
    """One key tile's share of dQ / scale: P * (dP - delta) K, with P from the saved LSE (base 2)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    p = tl.where(visible, tl.math.exp2(s - lse_log2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    return tl.dot((p * (dp - delta[:, None])).to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _rows_step(acc, m_i, l_i, q, do, lse_log2, delta, k, v, offs_m, start_n, len_k, causal_shift, scale_log2,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BACKWARD: tl.constexpr,
               DOT_PRECISION: tl.constexpr):  # fmt: skip
    """One key tile of a query tile. Forward: the online-softmax state (acc, m_i, l_i) takes the tile
    in. BACKWARD: acc (dQ / scale) adds the tile's share. MASKED applies the causal and sequence-end
    mask, which only partial blocks need."""
    visible = True
    if MASKED:
        visible = _pair_mask(offs_m, start_n + tl.arange(0, BLOCK_N), len_k, causal_shift, CAUSAL)
    if BACKWARD:
        acc += _dq_step(q, do, k, v, lse_log2, delta, visible, scale_log2, DOT_PRECISION)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        if MASKED:
            s = tl.where(visible, s, float("-inf"))
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _sequence_descriptor(base, seq_len, stride_s, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HEAD_DIM_PAD: tl.constexpr):  # fmt: skip
    """A device-side tensor descriptor over one sequence and head ([seq_len, HEAD_DIM] from `base`),
    read in [ROWS, HEAD_DIM_PAD] boxes: TMA fills the rows past seq_len and the padded dims with 0.
    An empty sequence gets one row (TMA takes no empty axis): its callers point `base` at a row that
    exists and never keep what it reads."""
    return tl.make_tensor_descriptor(base, [tl.maximum(seq_len, 1), HEAD_DIM], [stride_s, 1], [ROWS, HEAD_DIM_PAD])


@triton.jit
def _warp_specialized_rows(acc, m_i, l_i, q, do, lse_log2, delta, k_base, v_base, stride_ks, stride_vs, kv_list,
                           count, offs_m, len_k, causal_shift, scale_log2, KV_BLOCK: tl.constexpr,
                           BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                           CAUSAL: tl.constexpr, BACKWARD: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """A query tile over every selected key tile in one loop that Hopper's warp specialisation splits
    into a TMA producer warpgroup and two consumer warpgroups of BLOCK_M / 2 rows each (FA3's
    layout; it takes 4 warps, device-side descriptors, and a loop body without branches, so every
    tile is masked: full blocks pay a compare and select, and a tile past the query tile's last key
    computes nothing it keeps). Forward or BACKWARD (dQ), as `_rows_step`."""
    k_desc = _sequence_descriptor(k_base, len_k, stride_ks, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD)
    v_desc = _sequence_descriptor(v_base, len_k, stride_vs, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD)
    TILES: tl.constexpr = KV_BLOCK // BLOCK_N
    for it in tl.range(count * TILES, warp_specialize=True):
        start_n = tl.load(kv_list + it // TILES) * KV_BLOCK + (it % TILES) * BLOCK_N
        k = k_desc.load([start_n, 0])
        v = v_desc.load([start_n, 0])
        acc, m_i, l_i = _rows_step(acc, m_i, l_i, q, do, lse_log2, delta, k, v, offs_m, start_n, len_k, causal_shift,
                                   scale_log2, BLOCK_N, True, CAUSAL, BACKWARD, DOT_PRECISION)  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def _stats_tile(base, extent, start, ROWS: tl.constexpr):
    """ROWS fp32 entries from `start` of one head's row (`base`, `extent` entries) of a contiguous LSE
    or delta, through a device-side descriptor: 0 past the row; a packed row's next sequence there."""
    return tl.make_tensor_descriptor(base, [extent], [1], [ROWS]).load([start])


@triton.jit
def _row_stats(l_head, d_head, stride_ls, offs_m, len_q):
    """The saved LSE (base 2) and delta of rows offs_m of one sequence and head, 0 past len_q."""
    row_ok = offs_m < len_q
    lse_log2 = _lse_log2(tl.load(l_head + offs_m * stride_ls, mask=row_ok, other=0.0))
    return lse_log2, tl.load(d_head + offs_m * stride_ls, mask=row_ok, other=0.0)


@triton.jit
def _row_tile(BASE, b, h, seq_start, tile, seq_len, stride_b, stride_h, stride_s, ROWS: tl.constexpr,
              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):  # fmt: skip
    """Rows tile * ROWS + [0, ROWS) of one sequence and head of Q, dO, K or V, 0 past seq_len and the
    head dim: through a device-side descriptor under WARP_SPECIALIZE (that pass rejects a loop after
    a masked pointer load of a tile), else a masked load."""
    base = BASE + b * stride_b + h * stride_h + seq_start * stride_s
    if WARP_SPECIALIZE:
        base = tl.where(seq_len > 0, base, BASE)  # an empty sequence's one row: any row (this one may end it)
        return _sequence_descriptor(base, seq_len, stride_s, ROWS, HEAD_DIM, HEAD_DIM_PAD).load([tile * ROWS, 0])
    return _seq_tile(None, base, stride_s, 0, h, seq_start, tile * ROWS, seq_len, ROWS, HEAD_DIM, HEAD_DIM_PAD, False)


@triton.jit
def _block_sparse_rows_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    DELTA,
    DQ,
    KV_COUNT,
    KV_IDX,
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
    stride_cb,
    stride_ch,
    stride_cm,
    stride_ib,
    stride_ih,
    stride_im,
    group_size,
    seq_len_q,
    seq_len_kv,
    scale_log2,
    scale,
    K_DESC,
    V_DESC,
    LAYOUT_HEAD_DIV: tl.constexpr,
    Q_BLOCK: tl.constexpr,
    KV_BLOCK: tl.constexpr,
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
    WARP_SPECIALIZE: tl.constexpr = False,
):
    """One query tile over its selected blocks. Forward: O and LSE (written) from Q, K, V.
    BACKWARD: DQ = scale * sum of P * (dP - delta) K from Q, K, V, O = dO, LSE and DELTA (DQ shares
    Q's strides). USE_TMA: K and V tiles come through the tensor descriptors K_DESC, V_DESC
    (`_seq_tile`; TMA on Hopper). WARP_SPECIALIZE (forward): `_warp_specialized_rows`."""
    stride_qb, stride_qh, stride_qs = _widen(stride_qb, stride_qh, stride_qs, WIDE_INDEX)
    stride_kb, stride_kh, stride_ks = _widen(stride_kb, stride_kh, stride_ks, WIDE_INDEX)
    stride_vb, stride_vh, stride_vs = _widen(stride_vb, stride_vh, stride_vs, WIDE_INDEX)
    stride_ob, stride_oh, stride_os = _widen(stride_ob, stride_oh, stride_os, WIDE_INDEX)
    stride_lb, stride_lh, stride_ls = _widen(stride_lb, stride_lh, stride_ls, WIDE_INDEX)
    stride_cb, stride_ch, stride_cm = _widen(stride_cb, stride_ch, stride_cm, WIDE_INDEX)
    stride_ib, stride_ih, stride_im = _widen(stride_ib, stride_ih, stride_im, WIDE_INDEX)
    tile = tl.program_id(0)
    b, h = _batch_head()
    hk = h // group_size
    q_start, k_start, len_q, len_k = _sequence_bounds(CU_Q, CU_K, b, seq_len_q, seq_len_kv, VARLEN)
    if not WARP_SPECIALIZE:  # that pass rejects a kernel with an early return: its tiles past the end store nothing
        if tile * BLOCK_M >= len_q:
            return
    causal_shift = len_k - len_q
    lh = h // LAYOUT_HEAD_DIV
    q_block = tile * BLOCK_M // Q_BLOCK
    count = tl.load(KV_COUNT + b * stride_cb + lh * stride_ch + q_block * stride_cm)
    kv_list = KV_IDX + b * stride_ib + lh * stride_ih + q_block * stride_im

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d[None, :] < HEAD_DIM
    row_ok = offs_m < len_q
    rows = (q_start + offs_m)[:, None]
    q = _row_tile(Q, b, h, q_start, tile, len_q, stride_qb, stride_qh, stride_qs, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD,
                  WARP_SPECIALIZE)  # fmt: skip
    if WARP_SPECIALIZE:  # tiles past the sequence end (no early return there) and empty key sequences walk no block
        count = tl.where((tile * BLOCK_M < len_q) & (len_k > 0), count, 0)
    stats = b * stride_lb + h * stride_lh + (q_start + offs_m) * stride_ls
    # One accumulator: dQ / scale in the backward, the unnormalised output in the forward; the
    # softmax state (m_i, l_i) and the backward's inputs (do, lse_log2, delta) stand in for each other.
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    do, lse_log2, delta = q, m_i, l_i
    if BACKWARD:
        do = _row_tile(O, b, h, q_start, tile, len_q, stride_ob, stride_oh, stride_os, BLOCK_M, HEAD_DIM,
                       HEAD_DIM_PAD, WARP_SPECIALIZE)  # fmt: skip
        head_stats = b * stride_lb + h * stride_lh
        if WARP_SPECIALIZE:  # that pass splits the rows between two warpgroups only for descriptor loads
            lse_log2 = _lse_log2(_stats_tile(LSE + head_stats, stride_lh, q_start + tile * BLOCK_M, BLOCK_M))
            delta = _stats_tile(DELTA + head_stats, stride_lh, q_start + tile * BLOCK_M, BLOCK_M)
        else:
            sequence_stats = head_stats + q_start * stride_ls
            lse_log2, delta = _row_stats(LSE + sequence_stats, DELTA + sequence_stats, stride_ls, offs_m, len_q)
    k_base = K + b * stride_kb + hk * stride_kh + k_start * stride_ks
    v_base = V + b * stride_vb + hk * stride_vh + k_start * stride_vs
    desc_batch = 0 if VARLEN else b  # packed sequences are one batch row, offset by k_start

    if WARP_SPECIALIZE:
        acc, m_i, l_i = _warp_specialized_rows(acc, m_i, l_i, q, do, lse_log2, delta, k_base, v_base, stride_ks,
                                               stride_vs, kv_list, count, offs_m, len_k, causal_shift, scale_log2,
                                               KV_BLOCK, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, CAUSAL, BACKWARD,
                                               DOT_PRECISION)  # fmt: skip
    else:
        # Blocks below full_end lie inside the sequence and wholly before every row's position: no
        # mask. The list ascends, so they are its first num_full entries, and the partial ones (the
        # diagonal, the ragged end, any block past the tile) the rest.
        full_end = len_k // KV_BLOCK
        if CAUSAL:
            full_end = tl.minimum(full_end, tl.maximum(tile * BLOCK_M + causal_shift + 1, 0) // KV_BLOCK)
        num_full = _count_below(kv_list, count, full_end, True)
        # Full blocks in one flat loop over their key tiles, so loads pipeline across blocks.
        TILES: tl.constexpr = KV_BLOCK // BLOCK_N
        for it in range(num_full * TILES):
            start_n = tl.load(kv_list + it // TILES) * KV_BLOCK + (it % TILES) * BLOCK_N
            k = _seq_tile(K_DESC, k_base, stride_ks, desc_batch, hk, k_start, start_n, len_k,
                          BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, USE_TMA)  # fmt: skip
            v = _seq_tile(V_DESC, v_base, stride_vs, desc_batch, hk, k_start, start_n, len_k,
                          BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, USE_TMA)  # fmt: skip
            acc, m_i, l_i = _rows_step(acc, m_i, l_i, q, do, lse_log2, delta, k, v, offs_m, start_n, len_k,
                                       causal_shift, scale_log2, BLOCK_N, False, CAUSAL, BACKWARD,
                                       DOT_PRECISION)  # fmt: skip
        # Partial blocks, cut at the last key any row of the tile may see (tiles wholly after it are skipped).
        last_visible = tl.minimum(tile * BLOCK_M + BLOCK_M - 1, len_q - 1) + causal_shift
        for j in range(num_full, count):
            kv_lo, kv_hi = _selected_key_range(kv_list, j, len_k, last_visible, KV_BLOCK, CAUSAL)
            for start_n in range(kv_lo, kv_hi, BLOCK_N):
                k = _seq_tile(K_DESC, k_base, stride_ks, desc_batch, hk, k_start, start_n, len_k,
                              BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, USE_TMA)  # fmt: skip
                v = _seq_tile(V_DESC, v_base, stride_vs, desc_batch, hk, k_start, start_n, len_k,
                              BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, USE_TMA)  # fmt: skip
                acc, m_i, l_i = _rows_step(acc, m_i, l_i, q, do, lse_log2, delta, k, v, offs_m, start_n, len_k,
                                           causal_shift, scale_log2, BLOCK_N, True, CAUSAL, BACKWARD,
                                           DOT_PRECISION)  # fmt: skip

    if BACKWARD:
        out_ptrs = DQ + b * stride_qb + h * stride_qh + rows * stride_qs + offs_d[None, :]
        tl.store(out_ptrs, (acc * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok)
    else:
        out, lse = _normalize(acc, m_i, l_i)
        out_ptrs = O + b * stride_ob + h * stride_oh + rows * stride_os + offs_d[None, :]
        tl.store(out_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok)
        tl.store(LSE + stats, lse, mask=row_ok)


@triton.jit
def _load_key_tile(BASE, b, hk, k_start, offs_n, len_k, stride_b, stride_h, stride_s, offs_d,
                   HEAD_DIM: tl.constexpr):  # fmt: skip
    """Keys offs_n of one (batch, KV head) of K or V: [BLOCK_N, HEAD_DIM_PAD], 0 past len_k and the head dim."""
    ok = (offs_n[:, None] < len_k) & (offs_d[None, :] < HEAD_DIM)
    offsets = b * stride_b + hk * stride_h + (k_start + offs_n)[:, None] * stride_s + offs_d[None, :]
    return tl.load(BASE + offsets, mask=ok, other=0.0)


@triton.jit
def _store_key_tile(BASE, value, b, hk, k_start, offs_n, len_k, stride_b, stride_h, stride_s, offs_d,
                    HEAD_DIM: tl.constexpr):  # fmt: skip
    """Stores a dK or dV tile: keys offs_n of one (batch, KV head). The offsets are summed in another
    order than the key tile's load, so the compiler cannot reuse the load's [BLOCK_N, D] index tile
    and keep it live through the loops over queries (at D=128 that spilled the 16x128 dK/dV tile)."""
    ok = (offs_n < len_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = BASE + (b * stride_b + hk * stride_h + k_start * stride_s) + offs_d[None, :]
    tl.store(rows + offs_n[:, None] * stride_s, value.to(BASE.dtype.element_ty), mask=ok)


@triton.jit
def _dkdv_update(dk, dv, k, v, q, do, lse_log2, delta, offs_m, len_q, offs_n, len_k, causal_shift, scale_log2,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """One query tile's share of a key tile's dK / scale and dV, with P from the saved LSE (base 2).
    MASKED applies the causal mask and drops rows past len_q, which only partial blocks need."""
    # Transposed scores [BLOCK_N, BLOCK_M] keep dK/dV rows in registers.
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2
    p_t = tl.math.exp2(s_t - lse_log2[None, :])
    if MASKED:
        pair_ok = tl.trans(_pair_mask(offs_m, offs_n, len_k, causal_shift, CAUSAL)) & (offs_m < len_q)[None, :]
        p_t = tl.where(pair_ok, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dk += tl.dot((p_t * (dp_t - delta[None, :])).to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_step(dk, dv, k, v, Q_DESC, q_rows, stride_qs, DO_DESC, o_rows, stride_os, l_head, d_head, stride_ls,
               desc_batch, h, q_start, start_m, len_q, len_k, offs_n, causal_shift, scale_log2,
               BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """`_dkdv_update` for the query tile at start_m of head h, loaded by pointers or host descriptors."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _seq_tile(Q_DESC, q_rows, stride_qs, desc_batch, h, q_start, start_m, len_q,
                  BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, USE_TMA)  # fmt: skip
    do = _seq_tile(DO_DESC, o_rows, stride_os, desc_batch, h, q_start, start_m, len_q,
                   BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, USE_TMA)  # fmt: skip
    lse_log2, delta = _row_stats(l_head, d_head, stride_ls, offs_m, len_q)
    return _dkdv_update(dk, dv, k, v, q, do, lse_log2, delta, offs_m, len_q, offs_n, len_k, causal_shift, scale_log2,
                        MASKED, CAUSAL, DOT_PRECISION)  # fmt: skip


@triton.jit
def _group_descriptor(base, group_size, seq_len, stride_h, stride_s, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      HEAD_DIM_PAD: tl.constexpr):  # fmt: skip
    """A device-side descriptor over one sequence of a GQA group's query heads ([group_size,
    seq_len, HEAD_DIM] from `base`), read in [1, ROWS, HEAD_DIM_PAD] boxes, 0 past seq_len."""
    return tl.make_tensor_descriptor(base, [group_size, tl.maximum(seq_len, 1), HEAD_DIM], [stride_h, stride_s, 1],
                                     [1, ROWS, HEAD_DIM_PAD])  # fmt: skip


@triton.jit
def _warp_specialized_keys(dk, dv, k, v, q_group, do_group, l_group, d_group, stride_qh, stride_qs, stride_oh,
                           stride_os, stride_lh, stride_ls, head_counts, head_lists, stride_ch, stride_ih, first_head,
                           group_size, active, len_q, len_k, offs_n, causal_shift, scale_log2,
                           LAYOUT_HEAD_DIV: tl.constexpr, Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                           HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP_PAD: tl.constexpr,
                           CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """A key tile's dK / scale and dV over every (query head of its GQA group, selected query tile)
    in one loop that Hopper's warp specialisation splits into a TMA producer and consumer warpgroups
    (it takes one loop, so the group's heads are flattened into it: iteration `it` belongs to the
    head whose running tile count first exceeds it). Every tile is masked, as in the forward's
    `_warp_specialized_rows`. `head_counts`, `head_lists`: the transposed lists of this key tile's
    block, indexed by layout head; q_group, do_group, l_group, d_group: the group's first head."""
    TILES: tl.constexpr = Q_BLOCK // BLOCK_M
    heads = tl.arange(0, GROUP_PAD)
    layout_heads = (first_head + heads) // LAYOUT_HEAD_DIV
    counts = tl.load(head_counts + layout_heads * stride_ch, mask=heads < group_size, other=0)
    counts = tl.where(active, counts, 0) * TILES
    # Running tile counts, as a masked sum: that pass rejects the loop after a tl.cumsum.
    ends = tl.sum(tl.where(heads[None, :] <= heads[:, None], counts[None, :], 0), 1)
    q_desc = _group_descriptor(q_group, group_size, len_q, stride_qh, stride_qs, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD)
    do_desc = _group_descriptor(do_group, group_size, len_q, stride_oh, stride_os, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD)
    for it in tl.range(tl.sum(counts, 0), warp_specialize=True):
        g = tl.sum((ends <= it).to(tl.int32), 0)
        local = it - tl.sum(tl.where(heads < g, counts, 0), 0)
        entry = head_lists + ((first_head + g) // LAYOUT_HEAD_DIV) * stride_ih + local // TILES
        start_m = tl.load(entry) * Q_BLOCK + (local % TILES) * BLOCK_M
        q = q_desc.load([g, start_m, 0]).reshape(BLOCK_M, HEAD_DIM_PAD)
        do = do_desc.load([g, start_m, 0]).reshape(BLOCK_M, HEAD_DIM_PAD)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        lse_log2, delta = _row_stats(l_group + g * stride_lh, d_group + g * stride_lh, stride_ls, offs_m, len_q)
        dk, dv = _dkdv_update(dk, dv, k, v, q, do, lse_log2, delta, offs_m, len_q, offs_n, len_k, causal_shift,
                              scale_log2, True, CAUSAL, DOT_PRECISION)  # fmt: skip
    return dk, dv


@triton.jit
def _block_sparse_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    Q_COUNT,
    Q_IDX,
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
    stride_cb,
    stride_ch,
    stride_cn,
    stride_ib,
    stride_ih,
    stride_in,
    group_size,
    seq_len_q,
    seq_len_kv,
    scale_log2,
    scale,
    Q_DESC,
    DO_DESC,
    LAYOUT_HEAD_DIV: tl.constexpr,
    Q_BLOCK: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
    GROUP_PAD: tl.constexpr = 1,
    WARP_SPECIALIZE: tl.constexpr = False,
):
    """dK, dV of one key tile, summed over the query heads of its GQA group and the query blocks
    that selected its layout block (the transposed lists); k, dk share strides, as do v, dv.
    USE_TMA: Q and dO tiles through Q_DESC, DO_DESC (`_seq_tile`). WARP_SPECIALIZE:
    `_warp_specialized_keys` (GROUP_PAD: the group size rounded up to a power of two)."""
    stride_qb, stride_qh, stride_qs = _widen(stride_qb, stride_qh, stride_qs, WIDE_INDEX)
    stride_kb, stride_kh, stride_ks = _widen(stride_kb, stride_kh, stride_ks, WIDE_INDEX)
    stride_vb, stride_vh, stride_vs = _widen(stride_vb, stride_vh, stride_vs, WIDE_INDEX)
    stride_ob, stride_oh, stride_os = _widen(stride_ob, stride_oh, stride_os, WIDE_INDEX)
    stride_lb, stride_lh, stride_ls = _widen(stride_lb, stride_lh, stride_ls, WIDE_INDEX)
    stride_cb, stride_ch, stride_cn = _widen(stride_cb, stride_ch, stride_cn, WIDE_INDEX)
    stride_ib, stride_ih, stride_in = _widen(stride_ib, stride_ih, stride_in, WIDE_INDEX)
    tile = tl.program_id(0)
    b, hk = _batch_head()
    q_start, k_start, len_q, len_k = _sequence_bounds(CU_Q, CU_K, b, seq_len_q, seq_len_kv, VARLEN)
    if not WARP_SPECIALIZE:  # that pass rejects a kernel with an early return: its tiles past the end store nothing
        if tile * BLOCK_N >= len_k:
            return
    causal_shift = len_k - len_q
    kv_block = tile * BLOCK_N // KV_BLOCK
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    if WARP_SPECIALIZE:
        k = _row_tile(K, b, hk, k_start, tile, len_k, stride_kb, stride_kh, stride_ks, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD,
                      True)  # fmt: skip
        v = _row_tile(V, b, hk, k_start, tile, len_k, stride_vb, stride_vh, stride_vs, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD,
                      True)  # fmt: skip
        h = hk * group_size  # the group's first query head
        stats = b * stride_lb + h * stride_lh + q_start * stride_ls
        dk, dv = _warp_specialized_keys(
            dk, dv, k, v, Q + b * stride_qb + h * stride_qh + q_start * stride_qs,
            DO + b * stride_ob + h * stride_oh + q_start * stride_os, LSE + stats, DELTA + stats, stride_qh, stride_qs,
            stride_oh, stride_os, stride_lh, stride_ls, Q_COUNT + b * stride_cb + kv_block * stride_cn,
            Q_IDX + b * stride_ib + kv_block * stride_in, stride_ch, stride_ih, h, group_size,
            (tile * BLOCK_N < len_k) & (len_q > 0), len_q, len_k, offs_n, causal_shift, scale_log2, LAYOUT_HEAD_DIV,
            Q_BLOCK, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, GROUP_PAD, CAUSAL, DOT_PRECISION,
        )  # fmt: skip
    else:
        k = _load_key_tile(K, b, hk, k_start, offs_n, len_k, stride_kb, stride_kh, stride_ks, offs_d, HEAD_DIM)
        v = _load_key_tile(V, b, hk, k_start, offs_n, len_k, stride_vb, stride_vh, stride_vs, offs_d, HEAD_DIM)
        desc_batch = 0 if VARLEN else b  # packed sequences are one batch row, offset by q_start
        # Query blocks from full_start on see every key of this tile; those from full_end on are ragged
        # (rows past len_q). The lists ascend, so the blocks needing the mask are a prefix (the
        # diagonal) and a suffix (the ragged end) of each list, and the full ones lie in between.
        full_start = 0
        if CAUSAL:
            full_start = tl.cdiv(tl.maximum(tile * BLOCK_N + BLOCK_N - 1 - causal_shift, 0), Q_BLOCK)
        full_end = len_q // Q_BLOCK
        # Under causality, queries before this key tile see none of it.
        first_query = 0
        if CAUSAL:
            first_query = tl.maximum(tile * BLOCK_N - causal_shift, 0)
        TILES: tl.constexpr = Q_BLOCK // BLOCK_M
        for g in range(group_size):
            h = hk * group_size + g
            lh = h // LAYOUT_HEAD_DIV
            count = tl.load(Q_COUNT + b * stride_cb + lh * stride_ch + kv_block * stride_cn)
            q_list = Q_IDX + b * stride_ib + lh * stride_ih + kv_block * stride_in
            q_rows = Q + b * stride_qb + h * stride_qh + q_start * stride_qs
            o_rows = DO + b * stride_ob + h * stride_oh + q_start * stride_os
            l_head = LSE + b * stride_lb + h * stride_lh + q_start * stride_ls
            d_head = DELTA + b * stride_lb + h * stride_lh + q_start * stride_ls
            partial_head = _count_below(q_list, count, full_start, False)
            partial_tail = tl.maximum(partial_head, _count_below(q_list, count, full_end, True))
            # Full blocks in one flat loop over their query tiles, so loads pipeline across blocks.
            for it in range((partial_tail - partial_head) * TILES):
                start_m = tl.load(q_list + partial_head + it // TILES) * Q_BLOCK + (it % TILES) * BLOCK_M
                dk, dv = _dkdv_step(dk, dv, k, v, Q_DESC, q_rows, stride_qs, DO_DESC, o_rows, stride_os, l_head, d_head,
                                    stride_ls, desc_batch, h, q_start, start_m, len_q, len_k, offs_n, causal_shift,
                                    scale_log2, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, False, CAUSAL, USE_TMA,
                                    DOT_PRECISION)  # fmt: skip
            # Partial blocks: the head of the list, then its tail; rows before first_query are skipped.
            for t in range(partial_head + count - partial_tail):
                j = tl.where(t < partial_head, t, t - partial_head + partial_tail)
                block_start = tl.load(q_list + j) * Q_BLOCK
                q_lo = tl.maximum(block_start, first_query // BLOCK_M * BLOCK_M)
                q_hi = tl.minimum(block_start + Q_BLOCK, len_q)
                for start_m in range(q_lo, q_hi, BLOCK_M):
                    dk, dv = _dkdv_step(dk, dv, k, v, Q_DESC, q_rows, stride_qs, DO_DESC, o_rows, stride_os, l_head,
                                        d_head, stride_ls, desc_batch, h, q_start, start_m, len_q, len_k, offs_n,
                                        causal_shift, scale_log2, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, True, CAUSAL,
                                        USE_TMA, DOT_PRECISION)  # fmt: skip
    _store_key_tile(DK, dk * scale, b, hk, k_start, offs_n, len_k, stride_kb, stride_kh, stride_ks, offs_d, HEAD_DIM)
    _store_key_tile(DV, dv, b, hk, k_start, offs_n, len_k, stride_vb, stride_vh, stride_vs, offs_d, HEAD_DIM)


@triton.jit
def _backward_delta_kernel(
    O, DO, DLSE, DELTA, n1, n2, so0, so1, so2, sd0, sd1, sd2, sl0, sl1, sl2,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
):  # fmt: skip
    """DELTA[i0, i1, i2] = sum_d O * dO - dLSE in fp32 for rows (i0, i1, i2) of [n0, n1, n2, D]
    tensors with any strides; DELTA contiguous. Rows in tiles of BLOCK_R along i2."""
    so0, so1, so2 = _widen(so0, so1, so2, WIDE_INDEX)
    sd0, sd1, sd2 = _widen(sd0, sd1, sd2, WIDE_INDEX)
    sl0, sl1, sl2 = _widen(sl0, sl1, sl2, WIDE_INDEX)
    i0, i1 = _batch_head()
    i2 = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    ok = i2 < n2
    mask = ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + i0 * so0 + i1 * so1 + i2[:, None] * so2 + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + i0 * sd0 + i1 * sd1 + i2[:, None] * sd2 + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + i0 * sl0 + i1 * sl1 + i2 * sl2, mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + (tl.cast(i0, tl.int64) * n1 + i1) * n2 + i2, delta, mask=ok)
