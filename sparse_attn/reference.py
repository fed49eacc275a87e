"""Pure-PyTorch oracles: dense masked attention and the selection primitives.

Everything here favours obviousness over speed. Attention is computed with dense masks in a
chosen precision (float64 by default) and is differentiable through autograd; every kernel test
compares against these functions.

Conventions: a query row with no allowed key returns output 0 and log-sum-exp -inf. When
`seq_len_q < seq_len_kv`, causality is bottom-right aligned: query i sits at key position
i + seq_len_kv - seq_len_q.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "working_dtype",
    "causal_token_mask",
    "masked_attention",
    "masked_softmax",
    "block_sparse_attention_reference",
    "token_sparse_attention_reference",
    "block_mean_pool_reference",
    "topk_rows_reference",
    "threshold_select_reference",
    "layout_transpose_reference",
]


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the PyTorch paths and fp32 accumulations compute in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def at_working_precision(oracle, q, *args, **kwargs):
    """oracle(q, *args, compute_dtype=..., **kwargs) at q's working precision, as the public functions'
    'reference' backend runs it: (out in q's dtype, LSE in the working precision, for a sink to use)."""
    out, lse = oracle(q, *args, compute_dtype=working_dtype(q.dtype), **kwargs)
    return out.to(q.dtype), lse


def causal_token_mask(seq_len_q: int, seq_len_kv: int, device=None) -> torch.Tensor:
    """Bool [seq_len_q, seq_len_kv], True where key j is visible to query i (bottom-right aligned)."""
    q_pos = torch.arange(seq_len_q, device=device)[:, None] + (seq_len_kv - seq_len_q)
    return torch.arange(seq_len_kv, device=device)[None, :] <= q_pos


# The oracles (and the CPU fallback paths built on them) always run eagerly: Inductor's CPU code for
# `torch.arange(n) // c` is wrong in the vector tail when n is not a multiple of the vector width
# (torch 2.13), which made every ragged block mask wrong under torch.compile (MoBA outputs off by
# 70+, NaN gradients). An oracle must never be wrong; a graph break is the price.
def eager_under_compile(fn):
    """`fn`, run eagerly (a graph break) when torch.compile traces it. The `torch.compiler.disable`
    wrapper is made on the first traced call, so importing the package never imports dynamo (which
    imports triton before the self-check can select its interpreter)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():
            return _disabled(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


@functools.cache
def _disabled(fn):
    return torch.compiler.disable(fn)


@eager_under_compile
def masked_attention(q, k, v, allowed, *, softmax_scale=None, attn_sink=None, compute_dtype=torch.float64):
    """softmax(scale * q k^T restricted to `allowed`) v, with GQA by head repetition.

    q (B, Hq, Sq, D); k, v (B, Hkv, Skv, D); allowed bool broadcastable to (B, Hq, Sq, Skv);
    attn_sink None or one logit per query head, joining every row's softmax as one more column with
    no value. Returns (out (B, Hq, Sq, D), lse (B, Hq, Sq) of the attended logits, without the sink)
    in `compute_dtype`. torch.compile runs it eagerly.
    """
    group = q.shape[1] // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    probs, lse = masked_softmax(logits, allowed)
    if attn_sink is not None:
        sink = attn_sink.to(compute_dtype)[None, :, None, None].expand(*logits.shape[:-1], 1)
        allowed = allowed.expand_as(logits)
        # The sink joins rows that attend a key: a row without one keeps output 0, whatever the sink.
        with_sink = torch.cat([allowed, allowed.any(dim=-1, keepdim=True)], dim=-1)
        probs = masked_softmax(torch.cat([logits, sink], dim=-1), with_sink)[0][..., :-1]
    return torch.matmul(probs, v), lse


def masked_softmax(logits, allowed):
    """(softmax of `logits` over the last axis restricted to `allowed` (broadcastable), lse): a row with
    nothing allowed gets probabilities 0 and lse -inf, and no NaN in either or in their gradients."""
    allowed = allowed.expand_as(logits)
    has_key = allowed.any(dim=-1, keepdim=True)
    logits = logits.masked_fill(~allowed, float("-inf"))
    # Empty rows take a finite stand-in so that neither the lse nor its gradient becomes NaN.
    lse_safe = torch.logsumexp(logits.masked_fill(~has_key, 0.0), dim=-1, keepdim=True)
    return torch.exp(logits - lse_safe), lse_safe.masked_fill(~has_key, float("-inf")).squeeze(-1)


def _layout_token_mask(layout, num_q_heads: int, num_kv_heads: int) -> torch.Tensor:
    block_mask = layout.to_dense_mask()[:, layout.head_map(num_q_heads, num_kv_heads)]
    token_mask = block_mask.repeat_interleave(layout.q_block_size, dim=2).repeat_interleave(layout.kv_block_size, dim=3)
    return token_mask[:, :, : layout.seq_len_q, : layout.seq_len_kv]


@eager_under_compile
def block_sparse_attention_reference(
    q, k, v, layout, *, causal=True, softmax_scale=None, attn_sink=None, compute_dtype=torch.float64
):
    """Attention over the KV blocks that `layout` selects for each query block (and head)."""
    allowed = _layout_token_mask(layout, q.shape[1], k.shape[1])
    if causal:
        allowed = allowed & causal_token_mask(q.shape[2], k.shape[2], q.device)
    return masked_attention(
        q, k, v, allowed, softmax_scale=softmax_scale, attn_sink=attn_sink, compute_dtype=compute_dtype
    )


@eager_under_compile
def token_sparse_attention_reference(q, k, v, indices, *, causal=True, softmax_scale=None, compute_dtype=torch.float64):
    """Attention over per-query token selections.

    indices: int [B, Sq, G, K] key positions padded with -1, G = number of KV heads (each query head
    uses the list of its KV head) or 1 (shared by all heads). Entries < 0 or >= Skv are ignored;
    duplicates are harmless. v may have its own head dim.
    """
    batch, seq_q, groups, _ = indices.shape
    seq_kv = k.shape[2]
    # Ignored entries scatter into an extra column that is dropped afterwards.
    slots = torch.where((indices < 0) | (indices >= seq_kv), seq_kv, indices.long())
    selected = torch.zeros(batch, seq_q, groups, seq_kv + 1, dtype=torch.bool, device=q.device)
    selected.scatter_(-1, slots, True)
    allowed = selected[..., :seq_kv].permute(0, 2, 1, 3)  # [B, G, Sq, Skv]
    if groups != 1:
        allowed = allowed.repeat_interleave(q.shape[1] // groups, dim=1)
    if causal:
        allowed = allowed & causal_token_mask(seq_q, seq_kv, q.device)
    return masked_attention(q, k, v, allowed, softmax_scale=softmax_scale, compute_dtype=compute_dtype)


def block_mean_pool_reference(keys: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each key block over its real length; float32 (float64 for float64 keys)."""
    acc = working_dtype(keys.dtype)
    batch, heads, seq, dim = keys.shape
    num_blocks = -(-seq // block_size)
    padded = torch.zeros(batch, heads, num_blocks * block_size, dim, dtype=acc, device=keys.device)
    padded[:, :, :seq] = keys.to(acc)
    sums = padded.view(batch, heads, num_blocks, block_size, dim).sum(dim=3)
    lengths = (seq - torch.arange(num_blocks, device=keys.device) * block_size).clamp(max=block_size)
    return sums / lengths.to(acc)[:, None]


def _rank_order(scores: torch.Tensor) -> torch.Tensor:
    """Column order per row: descending score, ties to the lower index (a stable sort)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def topk_rows_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [R, k]: the up-to-k largest selectable scores per row in rank order; -inf/NaN never selected, -1 pads."""
    selectable = ~(torch.isnan(scores) | (scores == float("-inf")))
    ranked_scores = scores.masked_fill(~selectable, float("-inf"))
    order = _rank_order(ranked_scores)
    taken = min(k, scores.shape[-1])
    chosen = order[:, :taken]
    chosen = torch.where(torch.gather(selectable, 1, chosen), chosen, -1)
    out = torch.full((scores.shape[0], k), -1, dtype=torch.int32, device=scores.device)
    out[:, :taken] = chosen.to(torch.int32)
    return out


def threshold_select_reference(scores, threshold, forced, allowed):
    """XAttention's cumulative-mass selection (see csrc/ops.cpp).

    Returns (count [R], indices [R, N] ascending, -1 padded)."""
    scores64 = scores.to(torch.float64)
    mass = scores64.masked_fill(~allowed, 0.0)
    required = threshold.to(torch.float64) * mass.sum(dim=-1)
    # Forced entries lead the order; the rest follow by descending score.
    priority = torch.where(forced, float("inf"), scores64.masked_fill(~allowed, float("-inf")))
    order = _rank_order(priority)
    ordered_mass = torch.gather(mass, 1, order)
    inclusive_prefix = torch.cumsum(ordered_mass, dim=-1)
    exclusive_prefix = torch.cat([torch.zeros_like(inclusive_prefix[:, :1]), inclusive_prefix[:, :-1]], dim=-1)
    keep_ordered = (exclusive_prefix < required[:, None]) | (threshold[:, None] >= 1)
    keep_ordered &= torch.gather(allowed, 1, order)
    keep_ordered |= torch.gather(forced, 1, order)
    keep = torch.zeros_like(allowed).scatter(1, order, keep_ordered)
    return _mask_to_sorted_lists(keep)


def _mask_to_sorted_lists(keep: torch.Tensor):
    """bool [..., N] -> (count int32 [...], indices int32 [..., N] ascending, -1 padded)."""
    count = keep.sum(dim=-1, dtype=torch.int32)
    positions = torch.arange(keep.shape[-1], device=keep.device, dtype=torch.int32).expand_as(keep)
    # Unselected entries sort after all selected ones; a stable sort keeps ascending order.
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    indices = torch.gather(positions, -1, order)
    slot = torch.arange(keep.shape[-1], device=keep.device)
    indices = torch.where(slot < count[..., None], indices, -1)
    return count, indices


def layout_transpose_reference(kv_num_blocks, kv_indices, num_kv_blocks: int):
    """For each KV block, the query blocks that selected it: (q_num_blocks [B,H,N], q_indices [B,H,N,Mq])."""
    dense = _kv_lists_to_dense(kv_num_blocks, kv_indices, num_kv_blocks)  # [B, H, Mq, N]
    return _mask_to_sorted_lists(dense.transpose(-1, -2))


def _kv_lists_to_dense(kv_num_blocks, kv_indices, num_kv_blocks: int) -> torch.Tensor:
    nmax = kv_indices.shape[-1]
    valid = torch.arange(nmax, device=kv_indices.device) < kv_num_blocks[..., None]
    slots = torch.where(valid, kv_indices, num_kv_blocks).long()
    dense = torch.zeros(*kv_indices.shape[:-1], num_kv_blocks + 1, dtype=torch.bool, device=kv_indices.device)
    dense.scatter_(-1, slots, True)
    return dense[..., :num_kv_blocks]
