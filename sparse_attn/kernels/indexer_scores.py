"""DSA lightning-indexer scores, one kernel for the flat scan and both HISA stages.

score(t, s) = sum_j w[t, j] * ReLU(q[t, j] . k[s] * k_scale[s]) over the index heads j (MQA: one key per
position). A program owns one query row t: it loads q[t] as a [heads, D] matrix once, so every key
tile is a [heads, D] x [D, BLOCK_N] tensor-core product, then ReLU, weighted head sum. Scores of keys
outside [ks[t], ke[t]) are -inf, and tiles entirely outside that range are not computed.

Tiles. Dense mode: tile j is keys j * BLOCK_N + [0, BLOCK_N), written at those columns (the flat DSA
scan over k, and HISA's stage 1 over the pooled block keys of one sequence). Gathered mode (HISA stage
2, and stage 1 over a window of each row's own sequence where several are packed): tile j of row t
starts at key TILE_STARTS[t, j] (-1: no tile) and is written at columns j * BLOCK_N + [0, BLOCK_N),
so a row's candidate blocks come out side by side, whatever their positions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .._engine_ops import _poisoned
from .launch import MAX_GRID_YZ, launcher, wide_index


@triton.jit
def _indexer_scores_kernel(
    Q,
    K,
    W,
    K_SCALE,
    KS,
    KE,
    TILE_STARTS,
    OUT,
    stride_qm,
    stride_qh,
    stride_kn,
    stride_wm,
    stride_tm,
    stride_om,
    num_heads,
    num_keys,
    num_tiles,
    num_out_cols,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr,
    GATHERED: tl.constexpr,
    HAS_K_SCALE: tl.constexpr,
    FP32_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
):
    row = tl.program_id(0)
    if WIDE_INDEX:
        row = row.to(tl.int64)
    ks = tl.load(KS + row)
    ke = tl.load(KE + row)
    offs_h = tl.arange(0, HEADS_PAD)
    if WIDE_INDEX:
        offs_h = offs_h.to(tl.int64)  # heads may lie 2^31 elements apart (a transposed [H, M, D] buffer)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        Q + row * stride_qm + offs_h[:, None] * stride_qh + offs_d[None, :],
        mask=(offs_h[:, None] < num_heads) & d_ok[None, :],
        other=0.0,
    )
    # Padded heads weigh 0, so their (zero) logits add nothing.
    w = tl.load(W + row * stride_wm + offs_h, mask=offs_h < num_heads, other=0.0).to(tl.float32)
    if FP32_DOT:
        q = q.to(tl.float32)
    for i in range(TILES_PER_PROGRAM):
        tile = tl.program_id(1) * TILES_PER_PROGRAM + i
        if GATHERED:
            start = tl.load(TILE_STARTS + row * stride_tm + tile, mask=tile < num_tiles, other=-1)
            # A missing tile starts past the keys, so its mask is empty (scalar & vector masks
            # would do, but the interpreter mistypes them).
            start = tl.where(start >= 0, start, num_keys)
        else:
            start = tile * BLOCK_N
        keys = start + offs_n
        if WIDE_INDEX:
            keys = keys.to(tl.int64)
        valid = (keys >= ks) & (keys < ke) & (keys < num_keys)
        score = tl.zeros([BLOCK_N], tl.float32)
        if (start < num_keys) & (start < ke) & (start + BLOCK_N > ks):
            k = tl.load(K + keys[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
            if FP32_DOT:
                k = k.to(tl.float32)
            logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            if HAS_K_SCALE:  # inside the ReLU, as the spec writes it: right for a scale of any sign
                logits *= tl.load(K_SCALE + keys, mask=valid, other=0.0).to(tl.float32)[None, :]
            score = tl.sum(tl.maximum(logits, 0.0) * w[:, None], 0)
        cols = tile * BLOCK_N + offs_n
        tl.store(
            OUT + row * stride_om + cols,
            tl.where(valid, score, float("-inf")),
            mask=cols < tl.minimum(num_out_cols, num_tiles * BLOCK_N),  # tile < num_tiles
        )


# Keys per tile and tiles per program: starting points for the H100, to be tuned there.
_DENSE_BLOCK_N = 64
_TILES_PER_PROGRAM = 4


def kernel_supports(heads: int, head_dim: int, tile: int) -> bool:
    """A [heads, D] query matrix in registers (at most 128 heads, D <= 256) and power-of-two tiles of >= 16 keys."""
    return heads <= 128 and head_dim <= 256 and tile >= 16 and tile & (tile - 1) == 0


def _launch(q, k, weights, k_scale, ks, ke, tile_starts, block_n, num_out_cols):
    """fp32 [M, num_out_cols] scores; q (M, H, D), k (N, D), weights (M, H), ks/ke int32 [M]."""
    # The kernel steps q's and k's rows by their strides, but reads a weights row, k_scale, ks, ke and a
    # row of tile starts as dense runs.
    q, k, weights = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, weights))
    k_scale, ks, ke, tile_starts = (None if t is None else t.contiguous() for t in (k_scale, ks, ke, tile_starts))
    rows, heads, head_dim = q.shape
    gathered = tile_starts is not None
    num_tiles = tile_starts.shape[1] if gathered else triton.cdiv(k.shape[0], block_n)
    out = _poisoned(torch.empty(rows, num_out_cols, dtype=torch.float32, device=q.device))[0]
    if out.numel() == 0:
        return out
    tiles_per_program = min(_TILES_PER_PROGRAM, num_tiles)
    # More tiles per program where the flat scan's keys (a packed batch) would overflow grid axis 1.
    tiles_per_program = max(tiles_per_program, triton.next_power_of_2(triton.cdiv(num_tiles, MAX_GRID_YZ)))
    grid = (rows, triton.cdiv(num_tiles, tiles_per_program))
    launcher(_indexer_scores_kernel)[grid](
        q,
        k,
        weights,
        k_scale,
        ks,
        ke,
        tile_starts,
        out,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        weights.stride(0),
        tile_starts.stride(0) if gathered else 0,
        out.stride(0),
        heads,
        k.shape[0],
        num_tiles,
        num_out_cols,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(max(head_dim, 16)),
        HEADS_PAD=triton.next_power_of_2(max(heads, 16)),
        BLOCK_N=block_n,
        TILES_PER_PROGRAM=tiles_per_program,
        GATHERED=gathered,
        HAS_K_SCALE=k_scale is not None,
        FP32_DOT=torch.float32 in (q.dtype, k.dtype),
        # Exact fp32 for fp32 queries; 16-bit queries against fp32 keys (HISA's block means) take tf32
        # tensor cores, since exact fp32 FMAs spill the [heads, D] operands.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        WIDE_INDEX=wide_index(q, k, weights, out, tile_starts),
        num_warps=4,
    )
    return out


@triton_op("sparse_attn::indexer_scores", mutates_args={})
def indexer_scores_op(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    k_scale: torch.Tensor | None,
) -> torch.Tensor:
    """fp32 [M, N]: the DSA scores of q (M, H, D) against every key of k (N, D); -inf outside [ks, ke)."""
    return _launch(q, k, weights, k_scale, ks, ke, None, _DENSE_BLOCK_N, k.shape[0])


@triton_op("sparse_attn::indexer_gathered_scores", mutates_args={})
def indexer_gathered_scores_op(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    k_scale: torch.Tensor | None,
    tile_starts: torch.Tensor,
    tile_size: int,
) -> torch.Tensor:
    """fp32 [M, T * tile_size]: row t's scores against the keys tile_starts[t, j] + [0, tile_size) at
    columns j * tile_size + [0, tile_size); -inf outside [ks, ke) and for tiles starting at -1."""
    return _launch(q, k, weights, k_scale, ks, ke, tile_starts, tile_size, tile_starts.shape[1] * tile_size)
