"""Per-token routed attention (MoBA) in PyTorch ops: FlashMoBA's gather-and-densify where Triton
does not run.

Every (query row, routed block) pair is grouped by its KV block; each block's rows, from every
query head of its GQA group, are cut into tiles of `TILE_ROWS` and attended in dense products
against the block's keys (the own block with the token causal mask). A row's LSE comes from its
pairs' LSEs first; each pair's probabilities are then scaled to their share of the row's softmax,
so the products with V add up to the output with no per-pair normalisation. Work follows the
routed pairs, not S x S.

The backward is FlashAttention's, written out: P is recomputed from the row's final LSE and
dS = P (dP - delta), where delta = rowsum(dO * O) - dLSE, so the LSE's gradient costs nothing
extra. Between the passes only O and the LSE are kept; both passes run a chunk of rows at a time
(about `CHUNK_ELEMENTS` scores), so no buffer grows with S x S or with all the pairs at once.
Compute is float32 (float64 for float64 inputs); gradients are summed in it and rounded once.
"""

from __future__ import annotations

import torch

from . import reference

__all__ = ["CHUNK_ELEMENTS", "TILE_ROWS", "routed_attention"]

TILE_ROWS = 128  # rows of one block's dense product (64: 11% slower at S=8K on the CPU, 512: 21%)
CHUNK_ELEMENTS = 1 << 23  # scores (and partial outputs) per chunk of rows


@reference.eager_under_compile  # index arithmetic that Inductor's CPU code may get wrong; a graph break
def routed_attention(q, k, v, routes, block_size, causal, scale):
    """Each row of q (B, Hq, Sq, D) over the blocks it routed to (`routes` int [B, Hq, Sq, K], -1
    padded) of k, v (B, Hkv, Skv, D): (out in q's dtype, LSE (B, Hq, Sq), fp64 for fp64 else fp32),
    differentiable in q, k, v and through the LSE. Causality is bottom-right aligned; a row with no key
    gets 0 / -inf."""
    return _RoutedAttention.apply(q, k, v, routes, block_size, causal, scale)


class _Plan:
    """Shapes, precision and the chunking of one call."""

    def __init__(self, q, k, routes, block_size, causal, scale):
        self.batch, self.num_q_heads, self.seq_q, self.dim = q.shape
        self.num_kv_heads, self.seq_kv = k.shape[1], k.shape[2]
        self.causal, self.scale = causal, scale
        self.num_blocks = -(-self.seq_kv // block_size)
        # One block holds every key: its rows are the keys (blocks are padded to block_size rows, and a
        # block_size far above Skv, set to make short inputs dense, would size every tile).
        self.block_size = block_size if self.num_blocks > 1 else max(self.seq_kv, 1)
        self.topk = routes.shape[-1]
        self.compute = reference.working_dtype(q.dtype)

    def rows(self, q):
        """q (or any (B, Hq, Sq, X)) as [B * Hq * Sq, X] rows in the compute precision."""
        return q.to(self.compute).reshape(-1, q.shape[-1])

    def blocks(self, t):
        """k or v as [B * Hkv * N, block_size, D] blocks (zero-padded past Skv)."""
        padded = torch.nn.functional.pad(t.to(self.compute), (0, 0, 0, self.num_blocks * self.block_size - self.seq_kv))
        return padded.reshape(-1, self.block_size, self.dim)

    def row_chunks(self):
        """Runs of flattened rows whose pairs hold about CHUNK_ELEMENTS scores."""
        total = self.batch * self.num_q_heads * self.seq_q
        per_row = self.topk * max(self.block_size, self.dim)
        step = max(1, CHUNK_ELEMENTS // per_row)
        return [slice(start, min(start + step, total)) for start in range(0, total, step)]


class _Tiles:
    """One chunk's (row, block) pairs as tiles: `rows` int64 [C, T] (flattened row, -1 padding) and
    `blocks` [C] (flattened KV block)."""

    def __init__(self, plan: _Plan, routes_rows, chunk: slice):
        chosen = routes_rows[chunk].long()  # [R, K]
        row, slot = (chosen >= 0).nonzero(as_tuple=True)
        block = chosen[row, slot]
        row = row + chunk.start
        kv_head = row // plan.seq_q % plan.num_q_heads // (plan.num_q_heads // plan.num_kv_heads)
        batch = row // (plan.seq_q * plan.num_q_heads)
        group = (batch * plan.num_kv_heads + kv_head) * plan.num_blocks + block
        order = torch.sort(group, stable=True).indices
        group, row = group[order], row[order]
        # Each group's pairs fill ceil(count / T) tiles.
        unique, counts = torch.unique_consecutive(group, return_counts=True)
        tiles_per_group = (counts + TILE_ROWS - 1) // TILE_ROWS
        first_tile = torch.cumsum(tiles_per_group, 0) - tiles_per_group
        first_pair = torch.cumsum(counts, 0) - counts
        within = torch.arange(group.numel(), device=group.device) - torch.repeat_interleave(first_pair, counts)
        tile = torch.repeat_interleave(first_tile, counts) + within // TILE_ROWS
        num_tiles = int(tiles_per_group.sum())
        self.rows = torch.full((num_tiles, TILE_ROWS), -1, dtype=torch.long, device=group.device)
        self.rows[tile, within % TILE_ROWS] = row
        self.blocks = torch.repeat_interleave(unique, tiles_per_group)

    def scores(self, plan: _Plan, scaled_q_rows, keys):
        """Masked, scaled scores [C, T, block_size] against each tile's `keys` [C, block_size, D],
        and the gathered scaled query rows [C, T, D]."""
        queries = scaled_q_rows[self.rows.clamp(min=0)]
        scores = torch.bmm(queries, keys.transpose(1, 2))
        offsets = torch.arange(plan.block_size, device=self.blocks.device)
        key = self.blocks[:, None] % plan.num_blocks * plan.block_size + offsets  # [C, block_size]
        allowed = (self.rows >= 0)[..., None] & (key < plan.seq_kv)[:, None, :]
        if plan.causal:
            position = self.rows.clamp(min=0) % plan.seq_q + (plan.seq_kv - plan.seq_q)
            allowed = allowed & (key[:, None, :] <= position[..., None])
        return scores.masked_fill_(~allowed, float("-inf")), queries


class _RoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, routes, block_size, causal, scale):
        plan = _Plan(q, k, routes, block_size, causal, scale)
        q_rows, k_blocks, v_blocks = plan.rows(q) * scale, plan.blocks(k), plan.blocks(v)
        routes_rows = routes.reshape(-1, plan.topk)
        shape = (plan.batch, plan.num_q_heads, plan.seq_q)
        # Allocated in the output's shape so that, in q's dtype, the output is this tensor and not a view
        # of it: saved for backward, an in-place edit of it then fails there as autograd's version check.
        result = q_rows.new_empty(*shape, plan.dim)
        out = result.view(-1, plan.dim)
        lse = torch.empty(q_rows.shape[0], dtype=plan.compute, device=q.device)
        for chunk in plan.row_chunks():
            tiles = _Tiles(plan, routes_rows, chunk)
            scores, _ = tiles.scores(plan, q_rows, k_blocks[tiles.blocks])
            local = (tiles.rows - chunk.start).clamp(min=0)
            probs, lse[chunk] = _row_softmax(scores, local, chunk.stop - chunk.start)
            pair_out = torch.bmm(probs, v_blocks[tiles.blocks])
            out[chunk].zero_().index_add_(0, local.flatten(), pair_out.flatten(0, 1))
        ctx.save_for_backward(q, k, v, routes, result, lse)
        ctx.plan = plan
        return result.to(q.dtype), lse.view(shape)  # lse in the working precision

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        if torch.is_grad_enabled():  # create_graph: this backward reads O and the LSE as constants
            raise NotImplementedError(
                "moba attention's PyTorch path has no second derivative; backend='reference' has one"
            )
        q, k, v, routes, out, lse = ctx.saved_tensors
        plan = ctx.plan
        out = out.view(-1, plan.dim)
        q_rows, k_blocks, v_blocks = plan.rows(q) * plan.scale, plan.blocks(k), plan.blocks(v)
        grad_rows = plan.rows(grad_out)
        delta = (grad_rows * out).sum(dim=-1)
        if grad_lse is not None:
            delta = delta - grad_lse.to(plan.compute).reshape(-1)
        grad_q = torch.zeros_like(q_rows)
        grad_k, grad_v = torch.zeros_like(k_blocks), torch.zeros_like(v_blocks)
        routes_rows = routes.reshape(-1, plan.topk)
        for chunk in plan.row_chunks():
            tiles = _Tiles(plan, routes_rows, chunk)
            keys, values = k_blocks[tiles.blocks], v_blocks[tiles.blocks]
            scores, queries = tiles.scores(plan, q_rows, keys)
            safe_rows = tiles.rows.clamp(min=0)
            # Padding rows get probability exactly 0, so their borrowed gradient rows add nothing.
            probs = scores.sub_(_finite(lse[safe_rows])[..., None]).exp_()  # [C, T, bs]
            grad_tile = grad_rows[safe_rows]
            grad_v.index_add_(0, tiles.blocks, torch.bmm(probs.transpose(1, 2), grad_tile))
            grad_scores = torch.bmm(grad_tile, values.transpose(1, 2)).sub_(delta[safe_rows][..., None]).mul_(probs)
            # The queries carry the softmax scale, so dK needs no rescaling; dQ does (below).
            grad_k.index_add_(0, tiles.blocks, torch.bmm(grad_scores.transpose(1, 2), queries))
            grad_q.index_add_(0, safe_rows.flatten(), torch.bmm(grad_scores, keys).flatten(0, 1))
        grad_q = grad_q * plan.scale
        return (
            grad_q.view(q.shape).to(q.dtype),
            _unblock(grad_k, k),
            _unblock(grad_v, v),
            None,
            None,
            None,
            None,
        )


def _row_softmax(scores, local, num_rows: int):
    """Scores [C, T, block_size] of a chunk's pairs as probabilities normalised over each row's
    pairs (in place), and the rows' LSE [R] (-inf: no key). `local` [C, T]: each pair's row in the
    chunk (padding pairs point anywhere: they get probability 0)."""
    top = _finite(scores.amax(dim=-1))  # [C, T]
    probs = scores.sub_(top[..., None]).exp_()
    pair_lse = top + torch.log(probs.sum(dim=-1))  # -inf for a padding pair
    row_top = torch.full((num_rows,), float("-inf"), dtype=top.dtype, device=top.device)
    row_top = _finite(row_top.scatter_reduce_(0, local.flatten(), pair_lse.flatten(), "amax"))
    total = torch.zeros_like(row_top).index_add_(0, local.flatten(), torch.exp(pair_lse - row_top[local]).flatten())
    row_lse = row_top + torch.log(total)  # -inf for a row without keys
    # exp(top - row LSE) turns a pair's exp(scores - top) into its share of the row's softmax.
    weights = torch.exp(top - _finite(row_lse)[local]).masked_fill_(torch.isneginf(pair_lse), 0.0)
    return probs.mul_(weights[..., None]), row_lse


def _finite(lse):
    """The LSE with -inf (no key) as 0, so that exp(-inf - lse) is 0 rather than NaN."""
    return torch.where(torch.isneginf(lse), 0.0, lse)


def _unblock(grad_blocks, like):
    """[B * Hkv * N, block_size, D] gradients back to `like`'s (B, Hkv, Skv, D) shape and dtype."""
    if grad_blocks.numel() == 0:  # no batch, head or key: a view with -1 would be ambiguous
        return torch.zeros_like(like)
    batch, heads, seq_kv, dim = like.shape
    return grad_blocks.view(batch, heads, -1, dim)[:, :, :seq_kv].to(like.dtype)
