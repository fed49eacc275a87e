"""Gathered-block attention in PyTorch ops: the engine's path where Triton does not run.

Query rows are cut into tiles that share one list of KV blocks (a layout's query block). Tiles are
sorted by list length and taken a chunk at a time; the chunk's listed keys and values are gathered
and attended by torch's CPU flash-attention kernel with an additive mask (float32, or float64 for
float64 inputs). Work and memory follow the selected blocks instead of S x S: a chunk holds about
`CHUNK_ELEMENTS` gathered scores or key elements, and under autograd each chunk is checkpointed
(recomputed in backward), so the backward keeps no S x S buffer either. Where one list serves a
GQA group, the group's query heads share one gather: no K/V copies beyond the gathered blocks.

That kernel's log-sum-exp has no gradient, so when the caller differentiates the returned LSE the
chunks run `reference.masked_attention` (the same masked softmax in plain ops) instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import reference

__all__ = [
    "CHUNK_ELEMENTS",
    "gathered_attention",
    "layout_attention",
    "layout_tile_blocks",
]

# Gathered elements per chunk (scores, or keys): 16M float32 values, 64 MB per buffer.
CHUNK_ELEMENTS = 1 << 24


def layout_attention(q, k, v, layout, causal, scale, lse_grad=False):
    """The engine's path: each query block over the KV blocks its `BlockSparseLayout` lists."""
    blocks = layout_tile_blocks(layout, q.shape[0], q.shape[1], k.shape[1])
    return gathered_attention(q, k, v, blocks, layout.q_block_size, layout.kv_block_size, causal, scale, lse_grad)


@reference.eager_under_compile  # block arithmetic on `arange`, which Inductor's CPU code gets wrong
def gathered_attention(q, k, v, blocks, tile_rows, kv_block_size, causal, scale, lse_grad=False):
    """Each query tile over the KV blocks listed for it: (out in q's dtype, fp32 LSE (B, Hq, Sq)).

    q (B, Hq, Sq, D); k, v (B, Hkv, Skv, D). `blocks` int [B, Hs, M, N]: the KV blocks of each tile
    of `tile_rows` query rows (M = ceil(Sq / tile_rows)), -1 padded at the end, one list per query
    head (Hs = Hq) or per KV head (Hs = Hkv, shared by its query heads). `lse_grad`: the returned
    LSE will be differentiated. Causality is bottom-right aligned; a row with no key gets
    output 0 and LSE -inf.
    """
    batch, num_q_heads, seq_q, dim = q.shape
    if seq_q == 0 or k.shape[2] == 0 or blocks.numel() == 0:  # no pair to attend
        return q.new_zeros(q.shape), torch.full(q.shape[:3], float("-inf"), device=q.device)
    list_heads, num_tiles = blocks.shape[1], blocks.shape[2]
    group = num_q_heads // list_heads  # query heads per list: 1, or the GQA ratio
    # Cast once up front, so that the gradients of blocks gathered by several tiles add up in the
    # compute precision and round to q's dtype once.
    compute = reference.working_dtype(q.dtype)
    inputs = (q, k, v)
    q = q.to(compute)
    k_blocks, v_blocks = (_as_blocks(t.to(compute), kv_block_size) for t in (k, v))  # [B, Hkv, N, size, D]
    tiles = _query_tiles(q, list_heads, num_tiles, tile_rows).flatten(0, 2)  # [T, R, D]
    blocks = blocks.flatten(0, 2)  # [T, N]
    # Per tile: its batch entry, KV head and first query position.
    tile = torch.arange(blocks.shape[0], device=q.device)
    heads = tile // num_tiles % list_heads
    where = _TileSpots(tile // (num_tiles * list_heads), heads // (list_heads // k.shape[1]), tile % num_tiles)
    geometry = _Geometry(tile_rows, kv_block_size, seq_q, k.shape[2], causal, scale, lse_grad)
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    widths = (blocks >= 0).sum(dim=-1)
    order = torch.sort(widths, stable=True).indices  # similar lengths share a chunk: little padding
    outs, lses = [], []
    for chosen, width in _chunks(order, widths, kv_block_size * max(dim, tiles.shape[1])):
        args = (tiles[chosen], k_blocks, v_blocks, blocks[chosen, :width].long(), where.take(chosen), geometry)
        out, lse = checkpoint(_attend_chunk, *args, use_reentrant=False) if recompute else _attend_chunk(*args)
        outs.append(out)
        lses.append(lse)
    inverse = torch.empty_like(order).scatter_(0, order, tile)
    out = _untile(torch.cat(outs)[inverse], batch, list_heads, group, seq_q)
    lse = _untile(torch.cat(lses)[inverse, :, None], batch, list_heads, group, seq_q)[..., 0]
    return out.to(inputs[0].dtype), lse.float()


class _Geometry:
    def __init__(self, tile_rows, kv_block_size, seq_q, seq_kv, causal, scale, lse_grad):
        self.tile_rows, self.kv_block_size = tile_rows, kv_block_size
        self.seq_q, self.seq_kv, self.causal, self.scale, self.lse_grad = seq_q, seq_kv, causal, scale, lse_grad


class _TileSpots:
    """Per tile: batch entry, KV head, and tile index along the queries (each int64 [T])."""

    def __init__(self, batch, kv_head, index):
        self.batch, self.kv_head, self.index = batch, kv_head, index

    def take(self, chosen):
        return _TileSpots(self.batch[chosen], self.kv_head[chosen], self.index[chosen])


def _query_tiles(q, list_heads, num_tiles, tile_rows):
    """q (B, Hq, Sq, D) as [B, Hs, M, group * tile_rows, D], zero rows past Sq."""
    batch, num_q_heads, seq_q, dim = q.shape
    group = num_q_heads // list_heads
    q = F.pad(q, (0, 0, 0, num_tiles * tile_rows - seq_q)).view(batch, list_heads, group, num_tiles, tile_rows, dim)
    return q.transpose(2, 3).reshape(batch, list_heads, num_tiles, group * tile_rows, dim)


def _untile(tiles, batch, list_heads, group, seq_q):
    """[B * Hs * M, group * tile_rows, X] back to (B, Hq, Sq, X)."""
    rows, width = tiles.shape[1:]
    tiles = tiles.view(batch, list_heads, -1, group, rows // group, width).transpose(2, 3)
    return tiles.reshape(batch, list_heads * group, -1, width)[:, :, :seq_q]


def _chunks(order, widths, elements_per_listed_block):
    """(tiles, list width) runs of `order` (ascending widths) of about CHUNK_ELEMENTS gathered elements."""
    sorted_widths = widths[order].clamp(min=1).tolist()
    first = 0
    for end, width in enumerate(sorted_widths, start=1):
        last = end == len(sorted_widths)
        if last or (end + 1 - first) * sorted_widths[end] * elements_per_listed_block > CHUNK_ELEMENTS:
            yield order[first:end], width
            first = end


def _attend_chunk(tiles, k_blocks, v_blocks, blocks, where, geometry):
    """tiles [C, R, D] over their blocks [C, N] of k_blocks, v_blocks: (out [C, R, D], lse [C, R])."""
    size, seq_kv = geometry.kv_block_size, geometry.seq_kv
    keys = (blocks.clamp(min=0)[..., None] * size + torch.arange(size, device=blocks.device)).flatten(-2)  # [C, L]
    # Whole blocks at a time: one contiguous (size, D) copy per listed block.
    spots = (where.batch[:, None], where.kv_head[:, None], blocks.clamp(min=0))
    gathered_k, gathered_v = (t[spots].flatten(1, 2) for t in (k_blocks, v_blocks))  # [C, L, D]
    # One comparison masks everything: unlisted slots and keys past the end sit after every row's
    # last visible key, padding rows before the first key.
    listed = (blocks >= 0).repeat_interleave(size, dim=-1) & (keys < seq_kv)
    keys = torch.where(listed, keys, seq_kv)
    allowed = keys[:, None, :] <= _last_visible_key(tiles.shape[1], where.index, geometry)[..., None]  # [C, R, L]
    compute = tiles.dtype
    q4, k4, v4 = (t[:, None] for t in (tiles, gathered_k, gathered_v))
    if geometry.lse_grad or _FLASH_CPU is None or tiles.device.type != "cpu":
        out, lse = reference.masked_attention(
            q4, k4, v4, allowed[:, None], softmax_scale=geometry.scale, compute_dtype=compute
        )
        return out[:, 0], lse[:, 0]
    bias = torch.where(allowed, 0.0, float("-inf")).to(compute)
    out, lse = _FLASH_CPU(q4, k4, v4, attn_mask=bias[:, None], scale=geometry.scale)
    missing = ~allowed.any(dim=-1)  # rows without a key: 0 and -inf by convention, whatever the kernel gave
    return out[:, 0].masked_fill(missing[..., None], 0.0), lse[:, 0].masked_fill(missing, float("-inf"))


def _as_blocks(t, size):
    """(B, H, S, D) as [B, H, ceil(S / size), size, D]: a view unless S is ragged (then zero-padded)."""
    ragged = -t.shape[2] % size
    return (F.pad(t, (0, 0, 0, ragged)) if ragged else t).unflatten(2, (-1, size))


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _last_visible_key(rows, tile_index, geometry):
    """int64 [C, R]: each row's last visible key position (-1 for padding rows)."""
    tile_rows = geometry.tile_rows
    row = torch.arange(rows, device=tile_index.device) % tile_rows  # rows of a GQA group repeat the tile
    position = tile_index[:, None] * tile_rows + row
    if geometry.causal:
        last = position + (geometry.seq_kv - geometry.seq_q)
    else:
        last = torch.full_like(position, geometry.seq_kv - 1)
    return torch.where(position < geometry.seq_q, last, -1)


def layout_tile_blocks(layout, batch: int, num_q_heads: int, num_kv_heads: int) -> torch.Tensor:
    """A layout's lists as `gathered_attention` blocks: int32 [B, Hs, Mq, Nmax], -1 past each count.

    A layout per KV head (or one shared by every head) gives one list per KV head, so the group's
    query heads share a gather; a layout per query head keeps its heads.
    """
    slot = torch.arange(layout.kv_indices.shape[-1], device=layout.device)
    blocks = torch.where(slot < layout.kv_num_blocks[..., None], layout.kv_indices, -1)
    if layout.num_heads != num_q_heads:
        blocks = blocks.expand(-1, num_kv_heads, -1, -1)  # per KV head already, or one list for all
    return blocks.expand(batch, -1, -1, -1)
