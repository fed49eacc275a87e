"""torch.library registration of MoBA's gathered attention kernels, and the pair lists they read.

`routed_attention` turns per-token routes into pair lists (the rows that chose each KV block,
grouped per logical query block) and runs `sparse_attn::moba_attn_fwd`, whose autograd runs
`sparse_attn::moba_attn_bwd`. Both are `triton_op`s, so torch.compile traces through them.
"""

from __future__ import annotations

import functools

import torch
import triton
from torch.library import triton_op

from ._engine_ops import (
    _backward_inputs,
    _forward_outputs,
    _geometry,
    _index_tensors,
    _tensor_strides,
    _unit_last_stride,
)
from .kernels.block_sparse_attn import LOG2E
from .kernels.launch import batch_head_grid, descriptor_args, launcher, wide_index
from .kernels.moba_attn import _moba_dkdv_kernel, _moba_rows_kernel
from .tiles import launch_config

# Rows (over the GQA group's heads) of one forward/dQ work item: large enough that the rows
# choosing a block fill dense tiles, small enough that the per-program scratch stays in L2.
_ITEM_ROWS_CUDA = 1024
_ITEM_ROWS_INTERPRETER = 64
_PROGRAMS_PER_SM = 2
_INTERPRETER_PROGRAMS = 3  # fewer than the items of most test shapes, so the persistent loop is exercised


def logical_rows(q, num_kv_heads: int, seq_len_q: int) -> int:
    """Query rows per head of one work item: a multiple of the forward's and dQ's row tiles, at most the sequence."""
    block_m = max(launch_config(kernel, q, None, 16)["BLOCK_M"] for kernel in ("moba_fwd", "moba_dq"))
    target = _ITEM_ROWS_CUDA if q.device.type == "cuda" else _ITEM_ROWS_INTERPRETER
    rows = max(target // (q.shape[1] // num_kv_heads), block_m)
    rows = min(rows, max(seq_len_q, 1))
    return triton.cdiv(rows, block_m) * block_m


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _persistent_programs(device: torch.device) -> int:
    return _multiprocessors(device) * _PROGRAMS_PER_SM if device.type == "cuda" else _INTERPRETER_PROGRAMS


def routed_pair_lists(routes, num_kv_heads: int, num_kv_blocks: int, rows_per_item: int):
    """Routes int32 [B, Hq, Sq, K] (ascending, -1 padded) -> (seg_start, pair_rows), both int32.

    pair_rows lists every (query head h, row r) that routed to a block as h * Sq + r, grouped by
    segment ((b * Hkv + hk) * num_kv_blocks + j) * num_logical + lb with lb = r // rows_per_item;
    segment s holds pair_rows[seg_start[s] : seg_start[s + 1]]. Memory is O(routes), never O(blocks * S).
    """
    batch, q_heads, seq_q, topk = routes.shape
    group = q_heads // num_kv_heads
    num_logical = triton.cdiv(seq_q, rows_per_item)
    num_segments = batch * num_kv_heads * num_kv_blocks * num_logical
    if num_segments >= 2**31 or routes.numel() >= 2**31:
        raise ValueError(f"routing of shape {tuple(routes.shape)} is too large for int32 pair lists")
    arange = functools.partial(torch.arange, device=routes.device, dtype=torch.int32)
    kv_head = (arange(batch)[:, None] * num_kv_heads + arange(q_heads)[None, :] // group)[:, :, None, None]
    logical = (arange(seq_q) // rows_per_item)[None, None, :, None]
    segment = (kv_head * num_kv_blocks + routes) * num_logical + logical
    segment = torch.where(routes >= 0, segment, num_segments).view(-1)  # unrouted slots sort last
    order = torch.sort(segment).indices
    counts = torch.bincount(segment, minlength=num_segments + 1)[:num_segments]
    seg_start = torch.zeros(num_segments + 1, dtype=torch.int32, device=routes.device)
    torch.cumsum(counts, 0, out=seg_start[1:])
    num_pairs = int(seg_start[-1]) if num_segments else 0
    pair_rows = (order[:num_pairs] // topk % (q_heads * seq_q)).to(torch.int32)
    return seg_start, pair_rows


def routed_attention(q, k, v, routes, block_size, causal, scale, seq_len_kv, cu_q=None, cu_k=None):
    """(out, fp32 lse) of q (B, Hq, Sq, D), or packed views (1, H, total, D) with cu_q/cu_k, over the
    blocks of its own routes [B or num_seqs, Hq, Sq or max_seqlen_q, K]; seq_len_kv is Skv or
    max_seqlen_k. Differentiable in q, k and v."""
    seq_len_q = routes.shape[2]
    rows = logical_rows(q, k.shape[1], seq_len_q)
    seg_start, pair_rows = routed_pair_lists(routes, k.shape[1], _num_kv_blocks(seq_len_kv, block_size), rows)
    return moba_attn_fwd(
        q, k, v, seg_start, pair_rows, cu_q, cu_k, block_size, rows, seq_len_q, seq_len_kv, causal, scale
    )


def _num_kv_blocks(seq_len_kv: int, block_size: int) -> int:
    return triton.cdiv(max(seq_len_kv, 1), block_size)


def _geometry_args(q, k, block_size, rows, seq_len_q, seq_len_kv, cu_q):
    varlen, batch = _geometry(q, k, cu_q)
    num_kv_blocks = _num_kv_blocks(seq_len_kv, block_size)
    num_logical = triton.cdiv(seq_len_q, rows)
    return varlen, batch, num_kv_blocks, num_logical


def _launch_rows(
    q, k, v, o, lse, delta, dq, seg_start, pair_rows, cu_q, cu_k, block_size, rows_per_item, seq_len_q, seq_len_kv,
    causal, softmax_scale,
):  # fmt: skip
    """The persistent query-major kernel: the forward (o, lse written) or, given delta and dq, dQ (o = dO)."""
    backward = dq is not None
    varlen, batch, num_kv_blocks, num_logical = _geometry_args(
        q, k, block_size, rows_per_item, seq_len_q, seq_len_kv, cu_q
    )
    num_kv_heads = k.shape[1]
    group = q.shape[1] // num_kv_heads
    config = launch_config("moba_dq" if backward else "moba_fwd", q, None, block_size)
    if rows_per_item % config["BLOCK_M"]:  # the kernel clears its scratch a whole tile at a time
        raise ValueError(
            f"MoBA's work items hold {rows_per_item} rows, not a multiple of this launch's {config['BLOCK_M']}-row "
            "tile: the moba_fwd/moba_dq tiles changed between the forward and the backward (run both under one "
            "tiles.override)"
        )
    descriptors = descriptor_args(config, "BLOCK_N", K=k, V=v)
    num_items = batch * num_kv_heads * num_logical
    programs = max(min(num_items, _persistent_programs(q.device)), 1)
    # Scratch per program, never per output row: the item's softmax state (forward) or dQ (backward).
    slots = programs * group * rows_per_item
    acc = torch.empty(slots, config["HEAD_DIM_PAD"], dtype=torch.float32, device=q.device)
    row_max, row_sum = (None, None) if backward else torch.empty(2, slots, dtype=torch.float32, device=q.device)
    launcher(_moba_rows_kernel)[(programs,)](
        q, k, v, o, lse, delta, dq, acc, row_max, row_sum, seg_start, pair_rows, cu_q, cu_k,
        *_tensor_strides(varlen, q, k, v, o, lse.unsqueeze(-1)),
        num_items, num_kv_heads, group, num_kv_blocks, num_logical, seq_len_q, seq_len_kv,
        softmax_scale * LOG2E, softmax_scale,
        KV_BLOCK=block_size, LOGICAL_ROWS=rows_per_item, CAUSAL=causal, VARLEN=varlen, BACKWARD=backward,
        WIDE_INDEX=wide_index(q, k, v, o, lse, dq), **descriptors, **config,
    )  # fmt: skip


@triton_op("sparse_attn::moba_attn_fwd", mutates_args={})
def moba_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seg_start: torch.Tensor,
    pair_rows: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    block_size: int,
    rows_per_item: int,
    seq_len_q: int,
    seq_len_kv: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    out, lse = _forward_outputs(q)
    lists = _index_tensors(seg_start, pair_rows, cu_seqlens_q, cu_seqlens_k)
    _launch_rows(q, k, v, out, lse, None, None, *lists, block_size, rows_per_item, seq_len_q, seq_len_kv,
                 causal, softmax_scale)  # fmt: skip
    return out, lse


@triton_op("sparse_attn::moba_attn_bwd", mutates_args={})
def moba_attn_bwd(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    seg_start: torch.Tensor,
    pair_rows: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    block_size: int,
    rows_per_item: int,
    seq_len_q: int,
    seq_len_kv: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_out, delta, q, k, v, dq, dk, dv = _backward_inputs(grad_out, grad_lse, out, q, k, v)
    lists = _index_tensors(seg_start, pair_rows, cu_seqlens_q, cu_seqlens_k)
    _launch_rows(q, k, v, grad_out, lse, delta, dq, *lists, block_size, rows_per_item, seq_len_q, seq_len_kv,
                 causal, softmax_scale)  # fmt: skip

    varlen, batch, num_kv_blocks, num_logical = _geometry_args(
        q, k, block_size, rows_per_item, seq_len_q, seq_len_kv, cu_seqlens_q
    )
    config = launch_config("moba_dkdv", q, None, block_size)
    tiles = triton.cdiv(max(seq_len_kv, 1), config["BLOCK_N"])
    launcher(_moba_dkdv_kernel)[batch_head_grid(tiles, k.shape[1], batch)](
        q, k, v, grad_out, lse, delta, dk, dv, *lists,
        *_tensor_strides(varlen, q, k, v, grad_out, lse.unsqueeze(-1)),
        k.shape[1], num_kv_blocks, num_logical, seq_len_q, seq_len_kv, softmax_scale * LOG2E, softmax_scale,
        KV_BLOCK=block_size, CAUSAL=causal, VARLEN=varlen, WIDE_INDEX=wide_index(q, k, v, grad_out, lse, dk, dv),
        **config,
    )  # fmt: skip
    return dq, dk, dv


_FWD_ARGS = (
    "q",
    "k",
    "v",
    "seg_start",
    "pair_rows",
    "cu_seqlens_q",
    "cu_seqlens_k",
    "block_size",
    "rows_per_item",
    "seq_len_q",
    "seq_len_kv",
    "causal",
    "softmax_scale",
)


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FWD_ARGS, inputs))
    tensors = ("q", "k", "v", "seg_start", "pair_rows", "cu_seqlens_q", "cu_seqlens_k")
    ctx.save_for_backward(*(args[name] for name in tensors), *output)
    ctx.sizes = tuple(args[name] for name in _FWD_ARGS[len(tensors) :])


def _backward(ctx, grad_out, grad_lse):
    q, k, v, seg_start, pair_rows, cu_q, cu_k, out, lse = ctx.saved_tensors
    dq, dk, dv = moba_attn_bwd(grad_out, grad_lse, q, k, v, out, lse, seg_start, pair_rows, cu_q, cu_k, *ctx.sizes)
    return (dq, dk, dv) + (None,) * (len(_FWD_ARGS) - 3)


moba_attn_fwd.register_autograd(_backward, setup_context=_setup_context)
