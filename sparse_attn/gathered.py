"""Gathered-block attention in PyTorch ops: the engine's path where Triton does not run.

Query rows are cut into tiles that share one list of KV blocks (a layout's query block). Tiles are
sorted by list length and taken a chunk at a time; the chunk's listed keys and values are gathered
and attended by torch's CPU flash-attention kernel with an additive mask (float32, or float64 for
float64 inputs). Work and memory follow the selected blocks instead of S x S: a chunk holds about
`CHUNK_ELEMENTS` gathered scores or key elements, and under autograd each chunk is checkpointed
(recomputed in backward) once what the chunks would keep exceeds `SAVED_ELEMENTS`, so the
backward keeps no S x S buffer either. Where one list serves a
GQA group, the group's query heads share one gather: no K/V copies beyond the gathered blocks.
Lists per query head that are nearly the same across a group are merged into one union per KV
head, each head masked to its own blocks, where a cost model says the saved gathers pay for the
extra scores. In inference the group's heads stay heads (K, V and the mask broadcast over them);
under autograd they are folded into the rows of one head, so the kernel's backward sums dK and dV.

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
    "SAVED_ELEMENTS",
    "gathered_attention",
    "layout_attention",
    "layout_tile_blocks",
]

# Gathered elements per chunk (scores, or keys): 16M float32 values, 64 MB per buffer.
CHUNK_ELEMENTS = 1 << 24
# What autograd may keep of all chunks (masks, gathered K/V) before they are recomputed in backward
# instead: 128M values, 512 MB in float32. Below it, keeping them saves a forward pass (25% of
# forward + backward at S=8K on the CPU); above it, checkpoints keep memory at one chunk's.
SAVED_ELEMENTS = 1 << 27


def records_gradients(*inputs) -> bool:
    """Whether autograd records a computation on `inputs`."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def chunk_runner(differentiable: bool, kept_elements: int):
    """How a chunked PyTorch path runs each chunk: as is, or checkpointed (recomputed in backward) when
    autograd would otherwise keep `kept_elements` > SAVED_ELEMENTS of all chunks."""
    if differentiable and kept_elements > SAVED_ELEMENTS:
        return lambda fn, *args: checkpoint(fn, *args, use_reentrant=False)
    return lambda fn, *args: fn(*args)


def layout_attention(q, k, v, layout, causal, scale, lse_grad=False):
    """The engine's path: each query block over the KV blocks its `BlockSparseLayout` lists."""
    blocks = layout_tile_blocks(layout, q.shape[0], q.shape[1], k.shape[1])
    return gathered_attention(q, k, v, blocks, layout.q_block_size, layout.kv_block_size, causal, scale, lse_grad)


@reference.eager_under_compile  # block arithmetic on `arange`, which Inductor's CPU code gets wrong
def gathered_attention(q, k, v, blocks, tile_rows, kv_block_size, causal, scale, lse_grad=False):
    """Each query tile over the KV blocks listed for it: (out in q's dtype, LSE (B, Hq, Sq), fp64 for fp64 else fp32).

    q (B, Hq, Sq, D); k, v (B, Hkv, Skv, D). `blocks` int [B, Hs, M, N]: the KV blocks of each tile
    of `tile_rows` query rows (M = ceil(Sq / tile_rows)), -1 padded at the end, one list per query
    head (Hs = Hq) or per KV head (Hs = Hkv, shared by its query heads). `lse_grad`: the returned
    LSE will be differentiated (ignored when nothing requires grad). Causality is bottom-right
    aligned; a row with no key gets output 0 and LSE -inf.
    """
    batch, num_q_heads, seq_q, dim = q.shape
    if q.numel() == 0 or k.shape[2] == 0 or blocks.numel() == 0:  # no pair to attend
        return unattended(q, k, v), torch.full(q.shape[:3], float("-inf"), device=q.device)
    blocks, members = _kv_head_lists(blocks, k.shape[1], tile_rows)
    list_heads, num_tiles = blocks.shape[1], blocks.shape[2]
    group = num_q_heads // list_heads  # query heads per list: 1, or the GQA ratio
    # Cast once up front, so that the gradients of blocks gathered by several tiles add up in the
    # compute precision and round to q's dtype once.
    compute = reference.working_dtype(q.dtype)
    inputs = (q, k, v)
    q = q.to(compute)
    k_blocks, v_blocks = (_as_blocks(t.to(compute), kv_block_size) for t in (k, v))  # [B, Hkv, N, size, D]
    tiles = _query_tiles(q, list_heads, num_tiles, tile_rows).flatten(0, 2)  # [T, group, R, D]
    blocks = blocks.flatten(0, 2)  # [T, N]
    members = None if members is None else members.flatten(0, 2)  # [T, group, N]
    # Per tile: its batch entry, KV head and first query position.
    tile = torch.arange(blocks.shape[0], device=q.device)
    heads = tile // num_tiles % list_heads
    where = _TileSpots(tile // (num_tiles * list_heads), heads // (list_heads // k.shape[1]), tile % num_tiles)
    differentiable = records_gradients(*inputs)
    geometry = _Geometry(tile_rows, kv_block_size, seq_q, k, causal, scale, lse_grad, differentiable)
    widths = (blocks >= 0).sum(dim=-1)
    # Per listed key: a mask column of the tile's rows, and its key and value rows.
    saved = int(widths.sum()) * kv_block_size * (group * tile_rows + 2 * dim)
    run = chunk_runner(differentiable, saved)
    order = torch.sort(widths, stable=True).indices  # similar lengths share a chunk: little padding
    outs, lses = [], []
    for chosen, width in _chunks(order, widths, kv_block_size * max(dim, group * tile_rows)):
        chunk_members = None if members is None else members[chosen, :, :width]
        chunk_blocks = blocks[chosen, :width].long()
        args = (tiles[chosen], k_blocks, v_blocks, chunk_blocks, chunk_members, where.take(chosen), geometry)
        out, lse = run(_attend_chunk, *args)
        outs.append(out)
        lses.append(lse)
    inverse = torch.empty_like(order).scatter_(0, order, tile)
    out = _untile(torch.cat(outs)[inverse], batch, list_heads, group, seq_q)
    lse = _untile(torch.cat(lses)[inverse, ..., None], batch, list_heads, group, seq_q)[..., 0]
    return out.to(inputs[0].dtype), lse  # lse in the working precision


def unattended(q, k, v) -> torch.Tensor:
    """The output of queries that attend no key: zeros of q's rows and v's width, differentiable with zero
    gradients (plain zeros would leave it outside the graph, and backward() through it would fail)."""
    return _Unattended.apply(q, k, v)


class _Unattended(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        ctx.inputs = [(t.shape, t.dtype, t.device) for t in (q, k, v)]
        return q.new_zeros(*q.shape[:-1], v.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.inputs)


class _Geometry:
    def __init__(self, tile_rows, kv_block_size, seq_q, keys, causal, scale, lse_grad, differentiable):
        self.tile_rows, self.kv_block_size = tile_rows, kv_block_size
        self.seq_q, self.seq_kv, self.causal, self.scale = seq_q, keys.shape[2], causal, scale
        self.lse_grad, self.differentiable = lse_grad and differentiable, differentiable
        # torch's CPU flash kernel (no LSE gradient) takes the mask as an additive -inf: a non-finite key
        # that a row does not attend would still reach it (inf - inf), so such keys take the masked path.
        # A host read: CPU only.
        self.additive_mask = (
            FLASH_CPU is not None and keys.device.type == "cpu" and not self.lse_grad and bool(keys.isfinite().all())
        )


class _TileSpots:
    """Per tile: batch entry, KV head, and tile index along the queries (each int64 [T])."""

    def __init__(self, batch, kv_head, index):
        self.batch, self.kv_head, self.index = batch, kv_head, index

    def take(self, chosen):
        return _TileSpots(self.batch[chosen], self.kv_head[chosen], self.index[chosen])


# A gathered key costs about as much as attending it from this many query rows (2-core CPU, fp32,
# D=128: 20 us to gather a 64-key block of K and V, 5.6 ns per masked score).
GATHER_COST_ROWS = 55


def _kv_head_lists(blocks, num_kv_heads, tile_rows):
    """`blocks` [B, Hs, M, N] as lists a GQA group's tiles share: (blocks, members or None).

    Lists per query head become, where that is cheaper, the union over the group's heads per KV
    head (one gather serves the group) and members bool [B, Hkv, M, G, N'], the union's blocks
    each head lists. Heads of one group usually list nearly the same blocks; independent lists
    would multiply the attended blocks instead, so the union must pay for itself in gathers saved.
    """
    batch, heads, tiles, _ = blocks.shape
    group = heads // num_kv_heads
    if heads == num_kv_heads or not (blocks >= 0).any():
        return blocks, None
    num_kv_blocks = int(blocks.max()) + 1
    listed = blocks.new_zeros(batch, heads, tiles, num_kv_blocks + 1, dtype=torch.bool)
    listed.scatter_(-1, torch.where(blocks >= 0, blocks, num_kv_blocks).long(), True)  # last column: padding
    listed = listed[..., :-1].view(batch, num_kv_heads, group, tiles, -1).transpose(2, 3)  # [B, Hkv, M, G, Nk]
    union = listed.any(dim=3)
    per_head, shared = (blocks >= 0).sum().item(), union.sum().item()
    if shared * (GATHER_COST_ROWS + group * tile_rows) >= per_head * (GATHER_COST_ROWS + tile_rows):
        return blocks, None
    width = int(union.sum(dim=-1).max())
    slot = torch.where(union, union.cumsum(dim=-1) - 1, width)  # compact each union; `width`: discarded
    kv_block = torch.arange(num_kv_blocks, device=blocks.device).expand_as(union)
    lists = torch.full((*union.shape[:-1], width + 1), -1, dtype=torch.long, device=blocks.device)
    lists = lists.scatter_(-1, slot, kv_block)[..., :width]
    per_head_view = lists.clamp(min=0)[:, :, :, None].expand(-1, -1, -1, group, -1)
    padding = (lists < 0)[:, :, :, None]
    members = listed.gather(-1, per_head_view) & ~padding
    if (members | padding).all():  # the group's heads list the same blocks: they share the mask too
        members = None
    return lists.to(blocks.dtype), members


def _query_tiles(q, list_heads, num_tiles, tile_rows):
    """q (B, Hq, Sq, D) as [B, Hs, M, group, tile_rows, D], zero rows past Sq."""
    batch, num_q_heads, seq_q, dim = q.shape
    group = num_q_heads // list_heads
    q = F.pad(q, (0, 0, 0, num_tiles * tile_rows - seq_q)).view(batch, list_heads, group, num_tiles, tile_rows, dim)
    return q.transpose(2, 3)


def _untile(tiles, batch, list_heads, group, seq_q):
    """[B * Hs * M, group, tile_rows, X] back to (B, Hq, Sq, X)."""
    rows, width = tiles.shape[2:]
    tiles = tiles.view(batch, list_heads, -1, group, rows, width).transpose(2, 3)
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


def _attend_chunk(tiles, k_blocks, v_blocks, blocks, members, where, geometry):
    """tiles [C, G, R, D] over their blocks [C, N]: (out [C, G, R, D], lse [C, G, R]).

    The G query heads of a tile share its gathered keys, broadcast over heads (stride 0), never
    copied. `members` bool [C, G, N] says which blocks each head lists (None: all of them, and
    the heads share the mask too). False on padding slots.
    """
    size, seq_kv = geometry.kv_block_size, geometry.seq_kv
    keys = (blocks.clamp(min=0)[..., None] * size + torch.arange(size, device=blocks.device)).flatten(-2)  # [C, L]
    # Whole blocks at a time: one contiguous (size, D) copy per listed block.
    spots = (where.batch[:, None], where.kv_head[:, None], blocks.clamp(min=0))
    gathered_k, gathered_v = (t[spots].flatten(1, 2)[:, None] for t in (k_blocks, v_blocks))  # [C, 1, L, D]
    # One comparison masks everything: unlisted slots and keys past the end sit after every row's
    # last visible key, padding rows before the first key. Blocks that only some of the group's
    # heads list get a second, per-head term (`members`), added rather than compared per row.
    keys = torch.where((blocks >= 0).repeat_interleave(size, dim=-1) & (keys < seq_kv), keys, seq_kv)[:, None]
    last = _last_visible_key(where.index, geometry)[:, None, :, None]  # [C, 1, R, 1]
    visible = keys[:, :, None, :] <= last  # [C, 1, R, L]
    if members is not None:
        members = members.repeat_interleave(size, dim=-1)[:, :, None]  # [C, G, 1, L]
        keys = torch.where(members[:, :, 0], keys, seq_kv)  # [C, G, L]
    if not geometry.additive_mask:
        allowed = visible if members is None else visible & members
        return reference.masked_attention(
            tiles, gathered_k, gathered_v, allowed, softmax_scale=geometry.scale, compute_dtype=tiles.dtype
        )
    group = tiles.shape[1]
    bias = _additive(visible, tiles.dtype)
    bias = (bias if members is None else bias + _additive(members, tiles.dtype)).expand(-1, group, -1, -1)
    if geometry.differentiable:
        # The group's rows as one head: the kernel's backward then sums dK and dV over the group
        # itself (with heads broadcast it returns a copy per head), at the cost of a mask per head.
        out, lse = FLASH_CPU(
            tiles.flatten(1, 2)[:, None],
            gathered_k,
            gathered_v,
            attn_mask=bias.flatten(1, 2)[:, None],
            scale=geometry.scale,
        )
        out, lse = out.view(tiles.shape), lse.view(tiles.shape[:3])
    else:
        k4, v4 = (t.expand(-1, group, -1, -1) for t in (gathered_k, gathered_v))
        out, lse = FLASH_CPU(tiles, k4, v4, attn_mask=bias, scale=geometry.scale)
    # Rows without a key get 0 and -inf by convention, whatever the kernel gave them.
    missing = keys.amin(dim=-1)[..., None] > last[..., 0]  # [C, G|1, R]: the first key comes too late
    return out.masked_fill(missing[..., None], 0.0), lse.masked_fill(missing, float("-inf"))


def _additive(allowed, dtype):
    """A boolean mask as an additive one: 0 where allowed, -inf elsewhere."""
    return torch.where(allowed, 0.0, float("-inf")).to(dtype)


def _as_blocks(t, size):
    """(B, H, S, D) as [B, H, ceil(S / size), size, D]: a view unless S is ragged (then zero-padded)."""
    ragged = -t.shape[2] % size
    return (F.pad(t, (0, 0, 0, ragged)) if ragged else t).unflatten(2, (-1, size))


# torch's CPU flash-attention kernel: (out, LSE), the LSE without a gradient.
FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _last_visible_key(tile_index, geometry):
    """int64 [C, R]: each row's last visible key position (-1 for padding rows)."""
    tile_rows = geometry.tile_rows
    position = tile_index[:, None] * tile_rows + torch.arange(tile_rows, device=tile_index.device)
    if geometry.causal:
        last = position + (geometry.seq_kv - geometry.seq_q)
    else:
        last = torch.full_like(position, geometry.seq_kv - 1)
    return torch.where(position < geometry.seq_q, last, -1)


def layout_tile_blocks(layout, batch: int, num_q_heads: int, num_kv_heads: int) -> torch.Tensor:
    """A layout's lists as `gathered_attention` blocks: int32 [B, Hs, Mq, Nmax], -1 past each count.

    A layout per KV head (or one shared by every head) gives one list per KV head, so the group's
    query heads share a gather; a layout per query head keeps its heads (`gathered_attention` may
    still merge a group's lists, see `_kv_head_lists`).
    """
    slot = torch.arange(layout.kv_indices.shape[-1], device=layout.device)
    blocks = torch.where(slot < layout.kv_num_blocks[..., None], layout.kv_indices, -1)
    if layout.num_heads != num_q_heads:
        blocks = blocks.expand(-1, num_kv_heads, -1, -1)  # per KV head already, or one list for all
    return blocks.expand(batch, -1, -1, -1)
