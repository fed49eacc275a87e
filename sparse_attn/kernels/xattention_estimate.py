"""XAttention's fused antidiagonal estimator: block sums of the strided-reshape softmax, one kernel.

Notation (see the spec, section 1): stride S, block size B, R = B / S reshaped rows (or columns) per
block. Reshaped query row i is Q[iS+S-1], ..., Q[iS] concatenated (reversed), reshaped key column j
is K[jS], ..., K[jS+S-1]; their product is the antidiagonal sum of the S x S tile (i, j) of QK^T.

A program owns BLOCK_M reshaped query rows (whole query blocks: BLOCK_M is a multiple of R) of one
(batch, query head). It never materialises the reshaped Q/K or the logits: every tile of logits is
S strided dot products loaded straight from [B, H, L, D], recomputed in two passes over the key
columns -- the first finds each row's max and normaliser (online), the second sums the normalised
probabilities over R x R tiles and writes them to A. Softmax runs in base 2 (log2(e) in the scale).

Causality in reshaped coordinates (query row r at key position r + off): column j is allowed for
row i iff jS <= iS + off, i.e. j <= i + off // S. Zero padding: query or key positions past the
sequence load as zeros; reshaped columns past the keys are masked, rows past the queries write 0.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .block_sparse_attn import LOG2E, _pair_mask, _widen
from .launch import launcher, wide_index


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
def _xattention_estimate_kernel(
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
    num_q_heads,
    group_size,
    seq_len_q,
    seq_len_kv,
    num_rows,
    num_cols,
    num_q_blocks,
    num_kv_blocks,
    col_shift,
    scale_log2,
    STRIDE: tl.constexpr,
    ROWS_PER_BLOCK: tl.constexpr,
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
    bh = tl.program_id(1)
    b = bh // num_q_heads
    h = bh % num_q_heads
    hk = h // group_size
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = offs_m < num_rows
    # Key columns past the last allowed one of this program's last real row are skipped.
    col_end = num_cols
    if CAUSAL:
        col_end = tl.minimum(num_cols, tl.minimum(tile * BLOCK_M + BLOCK_M, num_rows) + col_shift)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, col_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        z = _antidiagonal_logits(
            q_base, k_base, offs_m, offs_n, offs_d, stride_qs, stride_ks, seq_len_q, seq_len_kv,
            STRIDE, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip
        z = tl.where(_pair_mask(offs_m, offs_n, num_cols, col_shift, CAUSAL), z * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(z - m_safe[:, None]), 1)
        m_i = m_new

    # Rows past the queries (or, defensively, without any allowed column) contribute nothing.
    keep = row_ok & (l_i > 0.0)
    m_safe = tl.where(keep, m_i, 0.0)
    inv_l = tl.where(keep, 1.0 / tl.where(keep, l_i, 1.0), 0.0)
    offs_mb = tile * (BLOCK_M // ROWS_PER_BLOCK) + tl.arange(0, BLOCK_M // ROWS_PER_BLOCK)
    a_rows = A + b * stride_ab + h * stride_ah + offs_mb[:, None] * stride_am
    for start_n in range(0, col_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        z = _antidiagonal_logits(
            q_base, k_base, offs_m, offs_n, offs_d, stride_qs, stride_ks, seq_len_q, seq_len_kv,
            STRIDE, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip
        z = tl.where(_pair_mask(offs_m, offs_n, num_cols, col_shift, CAUSAL), z * scale_log2, float("-inf"))
        p = tl.where(keep[:, None], tl.math.exp2(z - m_safe[:, None]) * inv_l[:, None], 0.0)
        # R x R tile sums: columns first, then the R rows of each query block.
        p = tl.sum(tl.reshape(p, [BLOCK_M, BLOCK_N // ROWS_PER_BLOCK, ROWS_PER_BLOCK]), 2)
        p = tl.sum(tl.reshape(p, [BLOCK_M // ROWS_PER_BLOCK, ROWS_PER_BLOCK, BLOCK_N // ROWS_PER_BLOCK]), 1)
        offs_nb = start_n // ROWS_PER_BLOCK + tl.arange(0, BLOCK_N // ROWS_PER_BLOCK)
        tl.store(
            a_rows + offs_nb[None, :],
            p,
            mask=(offs_mb[:, None] < num_q_blocks) & (offs_nb[None, :] < num_kv_blocks),
        )


# Reshaped rows and columns per program: starting points for the H100, to be tuned there. fp32
# dots run without tensor cores ("ieee"), and 64 x 64 fp32 tiles spill at head dim 128.
# The interpreter (CPU tensors) has no registers to spill, and fewer programs run faster there.
_TILE = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32}
_INTERPRETER_TILES = dict.fromkeys(_TILE, 64)


def _launch_config(q, rows_per_block: int):
    head_dim = q.shape[-1]
    tile = max((_TILE if q.device.type == "cuda" else _INTERPRETER_TILES)[q.dtype], rows_per_block)
    return {
        "BLOCK_M": tile,
        "BLOCK_N": tile,
        "HEAD_DIM": head_dim,
        "HEAD_DIM_PAD": triton.next_power_of_2(max(head_dim, 16)),
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "num_warps": 4,
        "num_stages": 2,
    }


def kernel_supports(block_size: int, stride: int) -> bool:
    """The in-kernel tile sums reshape by R = block_size / stride, which Triton needs as a power of two."""
    rows_per_block = block_size // stride
    return rows_per_block & (rows_per_block - 1) == 0


@triton_op("sparse_attn::xattention_estimate", mutates_args={})
def xattention_estimate_op(
    q: torch.Tensor, k: torch.Tensor, stride: int, block_size: int, causal: bool
) -> torch.Tensor:
    """fp32 block scores [B, Hq, ceil(Sq/B), ceil(Skv/B)] of q (B, Hq, Sq, D) against k (B, Hkv, Skv, D)."""
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    batch, num_q_heads, seq_len_q, head_dim = q.shape
    seq_len_kv = k.shape[2]
    rows_per_block = block_size // stride
    num_q_blocks, num_kv_blocks = triton.cdiv(seq_len_q, block_size), triton.cdiv(seq_len_kv, block_size)
    # Columns the kernel skips (causally invisible) stay zero.
    scores = torch.zeros(batch, num_q_heads, num_q_blocks, num_kv_blocks, dtype=torch.float32, device=q.device)
    config = _launch_config(q, rows_per_block)
    grid = (triton.cdiv(num_q_blocks * rows_per_block, config["BLOCK_M"]), batch * num_q_heads)
    launcher(_xattention_estimate_kernel)[grid](
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
        num_q_heads,
        num_q_heads // k.shape[1],
        seq_len_q,
        seq_len_kv,
        triton.cdiv(seq_len_q, stride),
        triton.cdiv(seq_len_kv, stride),
        num_q_blocks,
        num_kv_blocks,
        (seq_len_kv - seq_len_q) // stride,
        LOG2E / (math.sqrt(head_dim) * stride),
        STRIDE=stride,
        ROWS_PER_BLOCK=rows_per_block,
        CAUSAL=causal,
        WIDE_INDEX=wide_index(q, k, scores),
        **config,
    )
    return scores
