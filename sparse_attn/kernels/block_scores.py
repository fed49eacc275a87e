"""Block scores of a softmax, one fused kernel: XAttention's antidiagonal estimator and ProxyAttn's proxy.

Both methods score a key block by softmax probabilities of some query rows against every key, reduced
over (query-row group x key block) tiles: XAttention sums them, ProxyAttn takes their maximum. A
program owns BLOCK_M score rows of one (batch, head); it never materialises the logits: every tile
is recomputed in two passes over the key columns -- the first finds each row's max and normaliser
(online), the second reduces the normalised probabilities over ROWS_PER_BLOCK x COLS_PER_BLOCK
tiles and writes them to A. Softmax runs in base 2 (log2(e) in the scale).

Rows and columns. With STRIDE S > 1 (XAttention, spec section 1, B = block size, R = B / S) score
row i is the reshaped query row Q[iS+S-1], ..., Q[iS] (reversed), column j the reshaped key K[jS],
..., K[jS+S-1]; their product is the antidiagonal sum of the S x S tile (i, j) of QK^T, and
R x R tiles are summed. With S = 1 rows are rows of q and columns are keys. Score row i sits at
position (i // ROWS_PER_BLOCK) * ROW_SPAN + (i % ROWS_PER_BLOCK) * ROW_STEP in column units:
XAttention's rows are their own positions (ROW_SPAN = ROWS_PER_BLOCK, ROW_STEP = 1); ProxyAttn's
are the sampled queries 0, s, 2s, ... of each query block (ROW_SPAN = B, ROW_STEP = s, padded to a
power of two per block), gathered beforehand. A row is real iff its in-block offset is below
ROW_SPAN and its position below `num_row_positions`; other rows contribute nothing.

Causality (row at position p, bottom-right aligned): column j is allowed iff j <= p + col_shift.
Zero padding: q or k rows past the tensors load as zeros; columns past `num_cols` are masked.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .block_sparse_attn import LOG2E, _pair_mask, _widen
from .launch import batch_head_grid, launcher, wide_index


@triton.jit
def _antidiagonal_logits(
    q_base,
    k_base,
    offs_m,
    offs_n,
    offs_d,
    stride_qs,
    stride_ks,
    seq_len_q,
    seq_len_kv,
    STRIDE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] fp32 sums of the S antidiagonal logits: sum_t Q[iS+S-1-t] . K[jS+t]."""
    d_ok = offs_d[None, :] < HEAD_DIM
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for t in range(STRIDE):
        q_pos = offs_m * STRIDE + (STRIDE - 1 - t)
        k_pos = offs_n * STRIDE + t
        q = tl.load(
            q_base + q_pos[:, None] * stride_qs + offs_d[None, :], mask=(q_pos[:, None] < seq_len_q) & d_ok, other=0.0
        )
        k = tl.load(
            k_base + k_pos[:, None] * stride_ks + offs_d[None, :], mask=(k_pos[:, None] < seq_len_kv) & d_ok, other=0.0
        )
        acc += tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _masked_logits(
    q_base,
    k_base,
    offs_m,
    row_pos,
    start_n,
    stride_qs,
    stride_ks,
    seq_len_q,
    seq_len_kv,
    num_cols,
    col_shift,
    scale_log2,
    STRIDE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Base-2 scaled logits of the score rows against columns start_n + [0, BLOCK_N); -inf where masked."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    z = _antidiagonal_logits(
        q_base, k_base, offs_m, offs_n, tl.arange(0, HEAD_DIM_PAD), stride_qs, stride_ks, seq_len_q, seq_len_kv,
        STRIDE, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    return tl.where(_pair_mask(row_pos, offs_n, num_cols, col_shift, CAUSAL), z * scale_log2, float("-inf"))


@triton.jit
def _block_scores_kernel(
    Q,
    K,
    A,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_ab,
    stride_ah,
    stride_am,
    group_size,
    seq_len_q,
    seq_len_kv,
    num_rows,
    num_row_positions,
    num_cols,
    num_q_blocks,
    num_kv_blocks,
    col_shift,
    scale_log2,
    STRIDE: tl.constexpr,
    ROWS_PER_BLOCK: tl.constexpr,
    ROW_SPAN: tl.constexpr,
    ROW_STEP: tl.constexpr,
    COLS_PER_BLOCK: tl.constexpr,
    REDUCE_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
):
    stride_qb, stride_qh, stride_qs = _widen(stride_qb, stride_qh, stride_qs, WIDE_INDEX)
    stride_kb, stride_kh, stride_ks = _widen(stride_kb, stride_kh, stride_ks, WIDE_INDEX)
    stride_ab, stride_ah, stride_am = _widen(stride_ab, stride_ah, stride_am, WIDE_INDEX)
    tile = tl.program_id(0)
    # Read directly: through `_batch_head`'s flat index, triton 3.9 spills 40 B in the D=256 128x128 tile.
    b, h = tl.program_id(2), tl.program_id(1)
    hk = h // group_size
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    in_block = (offs_m % ROWS_PER_BLOCK) * ROW_STEP
    row_pos = (offs_m // ROWS_PER_BLOCK) * ROW_SPAN + in_block
    row_ok = (offs_m < num_rows) & (in_block < ROW_SPAN) & (row_pos < num_row_positions)
    # Key columns past the last allowed one of this program's last real row are skipped.
    col_end = num_cols
    if CAUSAL:
        last_pos = tl.max(tl.where(row_ok, row_pos, -1), 0)
        col_end = tl.minimum(num_cols, last_pos + 1 + col_shift)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, col_end, BLOCK_N):
        z = _masked_logits(
            q_base, k_base, offs_m, row_pos, start_n, stride_qs, stride_ks, seq_len_q, seq_len_kv, num_cols,
            col_shift, scale_log2, STRIDE, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, BLOCK_N, CAUSAL, DOT_PRECISION,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(z - m_safe[:, None]), 1)
        m_i = m_new

    # Rows that are not real (or, defensively, without any allowed column) contribute nothing.
    keep = row_ok & (l_i > 0.0)
    m_safe = tl.where(keep, m_i, 0.0)
    inv_l = tl.where(keep, 1.0 / tl.where(keep, l_i, 1.0), 0.0)
    offs_mb = tile * (BLOCK_M // ROWS_PER_BLOCK) + tl.arange(0, BLOCK_M // ROWS_PER_BLOCK)
    a_rows = A + b * stride_ab + h * stride_ah + offs_mb[:, None] * stride_am
    for start_n in range(0, col_end, BLOCK_N):
        z = _masked_logits(
            q_base, k_base, offs_m, row_pos, start_n, stride_qs, stride_ks, seq_len_q, seq_len_kv, num_cols,
            col_shift, scale_log2, STRIDE, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, BLOCK_N, CAUSAL, DOT_PRECISION,
        )  # fmt: skip
        p = tl.where(keep[:, None], tl.math.exp2(z - m_safe[:, None]) * inv_l[:, None], 0.0)
        # Tile reductions: the columns of each key block first, then the rows of each query block.
        p = tl.reshape(p, [BLOCK_M, BLOCK_N // COLS_PER_BLOCK, COLS_PER_BLOCK])
        p = tl.max(p, 2) if REDUCE_MAX else tl.sum(p, 2)
        p = tl.reshape(p, [BLOCK_M // ROWS_PER_BLOCK, ROWS_PER_BLOCK, BLOCK_N // COLS_PER_BLOCK])
        p = tl.max(p, 1) if REDUCE_MAX else tl.sum(p, 1)
        offs_nb = start_n // COLS_PER_BLOCK + tl.arange(0, BLOCK_N // COLS_PER_BLOCK)
        tl.store(
            a_rows + offs_nb[None, :],
            p,
            mask=(offs_mb[:, None] < num_q_blocks) & (offs_nb[None, :] < num_kv_blocks),
        )


# Score rows and columns per program: starting points for the H100, to be tuned there. fp32 dots
# run without tensor cores ("ieee"), and 64 x 64 fp32 tiles spill at head dim 128. A tile holds
# whole blocks, so a larger block widens it. The interpreter (CPU tensors) has no registers to
# spill, and fewer programs run faster there.
_TILE = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32}
_INTERPRETER_TILES = dict.fromkeys(_TILE, 64)


def _launch_config(q, rows_per_block: int, cols_per_block: int):
    head_dim = q.shape[-1]
    tile = (_TILE if q.device.type == "cuda" else _INTERPRETER_TILES)[q.dtype]
    block_m, block_n = max(tile, rows_per_block), max(tile, cols_per_block)
    # Eight warps where four would spill: 128 x 128 tiles, 128-key blocks at D=256.
    wide = block_m * block_n >= 128 * 128 or block_n * head_dim > 128 * 128
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "HEAD_DIM": head_dim,
        "HEAD_DIM_PAD": triton.next_power_of_2(max(head_dim, 16)),
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "num_warps": 8 if wide else 4,
        "num_stages": 1 if block_m * block_n * head_dim > 128 * 128 * 128 else 2,  # 128 x 128 at D=256: shared memory
    }


# A program keeps its BLOCK_M x D query rows and BLOCK_N x D keys in shared memory: past an A100's 163 KB
# a block the launch fails (fp32 at D = 256 with 128 x 128 tiles; ProxyAttn's 1024-key blocks).
_SHARED_BYTES = 160 * 1024


def kernel_supports(q, rows_per_block: int, cols_per_block: int) -> bool:
    """Whether the kernel takes these blocks of q: the in-kernel tile sums reshape by the rows and columns
    per block, which Triton needs as powers of two, and the tile they widen must fit shared memory."""
    if any(n < 1 or n & (n - 1) for n in (rows_per_block, cols_per_block)):
        return False
    config = _launch_config(q, rows_per_block, cols_per_block)
    return (config["BLOCK_M"] + config["BLOCK_N"]) * config["HEAD_DIM_PAD"] * q.element_size() <= _SHARED_BYTES


def _launch(q, k, num_out_rows, cols_per_block, *, num_row_positions, num_cols, col_shift, scale, **constexprs):
    """fp32 scores [B, Hq, num_out_rows, ceil(num_cols / cols_per_block)] of q (B, Hq, *, D) against
    k (B, Hkv, *, D); columns the kernel skips (causally invisible) stay zero."""
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    batch, num_q_heads, _, head_dim = q.shape
    num_kv_blocks = triton.cdiv(num_cols, cols_per_block)
    scores = torch.zeros(batch, num_q_heads, num_out_rows, num_kv_blocks, dtype=torch.float32, device=q.device)
    rows_per_block = constexprs["ROWS_PER_BLOCK"]
    config = _launch_config(q, rows_per_block, cols_per_block)
    grid = batch_head_grid(triton.cdiv(num_out_rows * rows_per_block, config["BLOCK_M"]), num_q_heads, batch)
    launcher(_block_scores_kernel)[grid](
        q,
        k,
        scores,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        scores.stride(0),
        scores.stride(1),
        scores.stride(2),
        num_q_heads // k.shape[1],
        q.shape[2],
        k.shape[2],
        num_out_rows * rows_per_block,
        num_row_positions,
        num_cols,
        num_out_rows,
        num_kv_blocks,
        col_shift,
        LOG2E * scale,
        COLS_PER_BLOCK=cols_per_block,
        WIDE_INDEX=wide_index(q, k, scores),
        **constexprs,
        **config,
    )
    return scores


@triton_op("sparse_attn::xattention_estimate", mutates_args={})
def xattention_estimate_op(
    q: torch.Tensor, k: torch.Tensor, stride: int, block_size: int, causal: bool
) -> torch.Tensor:
    """fp32 block scores [B, Hq, ceil(Sq/B), ceil(Skv/B)] of q (B, Hq, Sq, D) against k (B, Hkv, Skv, D)."""
    seq_len_q, seq_len_kv = q.shape[2], k.shape[2]
    rows_per_block = block_size // stride
    num_rows = triton.cdiv(seq_len_q, stride)
    return _launch(
        q,
        k,
        triton.cdiv(seq_len_q, block_size),
        rows_per_block,
        num_row_positions=num_rows,
        num_cols=triton.cdiv(seq_len_kv, stride),
        col_shift=(seq_len_kv - seq_len_q) // stride,
        scale=1.0 / (math.sqrt(q.shape[-1]) * stride),
        STRIDE=stride,
        ROWS_PER_BLOCK=rows_per_block,
        ROW_SPAN=rows_per_block,
        ROW_STEP=1,
        REDUCE_MAX=False,
        CAUSAL=causal,
    )


@triton_op("sparse_attn::sampled_block_scores", mutates_args={})
def sampled_block_scores_op(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    rows_per_block: int,
    row_span: int,
    row_step: int,
    block_size: int,
    seq_len_q: int,
    reduce_max: bool,
    causal: bool,
) -> torch.Tensor:
    """Per group of `rows_per_block` query rows and key block: the max (or sum) of their causal
    softmax(q k^T / sqrt(D)) probabilities, fp32 [B, Hq, ceil(R / rows_per_block), ceil(Skv / block_size)].

    q_rows (B, Hq, R, D): row i is the query at position (i // rows_per_block) * row_span +
    (i % rows_per_block) * row_step of a sequence of `seq_len_q` queries, bottom-right aligned to
    k (B, Hkv, Skv, D); rows at in-group offsets >= row_span or positions >= seq_len_q are padding.
    `rows_per_block` and `block_size` are powers of two.
    """
    return _launch(
        q_rows,
        k,
        triton.cdiv(q_rows.shape[2], rows_per_block),
        block_size,
        num_row_positions=seq_len_q,
        num_cols=k.shape[2],
        col_shift=k.shape[2] - seq_len_q,
        scale=1.0 / math.sqrt(q_rows.shape[-1]),
        STRIDE=1,
        ROWS_PER_BLOCK=rows_per_block,
        ROW_SPAN=row_span,
        ROW_STEP=row_step,
        REDUCE_MAX=reduce_max,
        CAUSAL=causal,
    )
