"""ProxyAttn (arXiv 2509.24745): head-pooled proxy block scores, a per-head dynamic budget, block-sparse attention.

The algorithm and the package decisions are specified in shared/specs/proxyattn.md (no code was
published); in short, with block size B, stride s and g proxy groups:

1. `proxy_estimate` pools each group's query heads and key heads by their mean (a group is g-th of
   the heads, a union of whole GQA groups), takes the queries at offsets 0, s, 2s, ... of every
   query block, and scores block (m, n) by the largest causal softmax(q k^T / sqrt(D)) probability
   of those queries of block m on the keys of block n: A_g [B, g, Mq, Nk], fp32.
2. `proxy_budget` gives each query head the fewest key blocks k_h whose share of its own last-query-
   block attention (the last min(B, Sq) queries against every key, pooled by block sums) reaches
   gamma: int64 [B, Hq]. gamma = 1 keeps every block (no floating-point prefix sums).
3. `proxy_select` ranks each query block's key blocks per proxy group (the sink and the diagonal
   blocks first, then by descending A_g, ties to the lower index) and keeps, per head, the first
   K_{h,m} = min(N_m, max(ceil(k_h N_m / N_last), ceil(min_budget_tokens / B))) of the ranking, where
   N_m is the number of causally visible key blocks of row m and N_last that of the last row.
4. `proxy_attn` runs the shared block-sparse engine on that layout.

Conventions follow the engine: q (B, Hq, Sq, D), k and v (B, Hkv, Skv, D), native GQA, Sq <= Skv in
causal mode, bottom-right aligned (query r sits at key position r + Skv - Sq), query blocks anchored
at query 0 and key blocks at key 0. ProxyAttn is a prefill method: decode stays dense.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..engine import _check_cu_seqlens, _check_qkv, block_sparse_attn, block_sparse_attn_varlen
from ..layout import BlockSparseLayout, selectable_blocks
from ..reference import working_dtype
from ..selection import _check_flags, _check_int, block_score_lengths, threshold_select
from ..sinks import check_attn_sink
from .scoring import KERNEL_DTYPES, block_scores_kernel_runs, check_scored_qk

__all__ = [
    "check_options",
    "proxy_attn",
    "proxy_attn_varlen",
    "proxy_budget",
    "proxy_budget_reference",
    "proxy_estimate",
    "proxy_estimate_reference",
    "proxy_select",
]

# The budget kernel reduces the last query block in groups of this many rows (summed afterwards).
_BUDGET_ROWS = 32
# Query rows (times keys) of the PyTorch path's logits at a time.
_TORCH_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------- validation
def check_options(*, gamma=0.95, num_proxy_groups=1, stride=4, block_size=128, min_budget_tokens=2048) -> None:
    """ProxyAttn's scalar options, checked before any tensor is seen (the HF patcher checks at patch time)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ValueError(f"gamma must be a float in (0, 1], got {gamma!r}")
    _check_int(num_proxy_groups, "num_proxy_groups", 1)
    block_size = _check_int(block_size, "block_size", 1)
    stride = _check_int(stride, "stride", 1)
    if stride > block_size:
        raise ValueError(f"stride={stride} must lie in [1, block_size={block_size}]")
    _check_int(min_budget_tokens, "min_budget_tokens", 0)


def _check_qk(q, k, causal: bool, num_proxy_groups=None) -> None:
    check_scored_qk(q, k, causal, "ProxyAttn")
    if num_proxy_groups is not None and k.shape[1] % num_proxy_groups:
        raise ValueError(
            f"num_proxy_groups={num_proxy_groups} must divide the number of KV heads ({k.shape[1]}): "
            "a proxy group is a union of whole GQA groups"
        )


# ---------------------------------------------------------------------------------- references
def _causal_probs(q, k, causal: bool):
    """softmax(q k^T / sqrt(D)) with the bottom-right causal mask; q (..., Sq, D), k (..., Skv, D)."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        seq_q, seq_kv = q.shape[-2], k.shape[-2]
        query_pos = torch.arange(seq_q, device=q.device)[:, None] + (seq_kv - seq_q)
        logits = logits.masked_fill(torch.arange(seq_kv, device=q.device)[None, :] > query_pos, float("-inf"))
    return logits.softmax(dim=-1)


def _block_view(probs, block_size: int):
    """[..., Sq, Skv] zero-padded and viewed as [..., Mq, B, Nk, B]."""
    seq_q, seq_kv = probs.shape[-2:]
    num_q_blocks, num_kv_blocks = -(-seq_q // block_size), -(-seq_kv // block_size)
    padded = F.pad(probs, (0, num_kv_blocks * block_size - seq_kv, 0, num_q_blocks * block_size - seq_q))
    return padded.view(*probs.shape[:-2], num_q_blocks, block_size, num_kv_blocks, block_size)


def _head_means(x, groups: int, dtype):
    """(B, H, S, D) -> (B, groups, S, D): the mean of each run of H / groups consecutive heads."""
    batch, heads, seq, dim = x.shape
    return x.reshape(batch, groups, heads // groups, seq, dim).mean(dim=2, dtype=dtype)


def proxy_estimate_reference(q, k, *, num_proxy_groups=1, stride=4, block_size=128, causal=True):
    """Float64 oracle of spec section 3, built literally: token-level probabilities of the pooled heads,
    the sampled rows kept, blockwise max. Returns float64 A [B, g, ceil(Sq/B), ceil(Skv/B)]."""
    check_options(num_proxy_groups=num_proxy_groups, stride=stride, block_size=block_size)
    _check_qk(q, k, causal, num_proxy_groups)
    probs = _causal_probs(
        _head_means(q, num_proxy_groups, torch.float64), _head_means(k, num_proxy_groups, torch.float64), causal
    )
    sampled = (torch.arange(q.shape[2], device=q.device) % block_size) % stride == 0
    blocks = _block_view(probs * sampled[:, None], block_size)
    return blocks.amax(dim=(-3, -1))


def proxy_budget_reference(q, k, *, gamma=0.95, block_size=128, causal=True):
    """Float64 oracle of spec section 4 steps 1-4: int64 k_h [B, Hq], the fewest key blocks whose pooled
    last-query-block mass reaches gamma (gamma = 1: every key block)."""
    check_options(gamma=gamma, block_size=block_size, stride=1)  # the budget samples no stride
    _check_qk(q, k, causal)
    num_kv_blocks = -(-k.shape[2] // block_size)
    if gamma >= 1:
        return torch.full(q.shape[:2], num_kv_blocks, dtype=torch.int64, device=q.device)
    last = q[:, :, q.shape[2] - min(block_size, q.shape[2]) :].double()
    keys = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    probs = _causal_probs(last, keys, causal)  # rows of the last queries, bottom-right aligned
    probs = F.pad(probs, (0, num_kv_blocks * block_size - k.shape[2]))
    mass = probs.view(*probs.shape[:-1], num_kv_blocks, block_size).sum(dim=-1).mean(dim=-2)
    mass = mass / mass.sum(dim=-1, keepdim=True)
    covered = mass.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    return (covered < gamma).sum(dim=-1) + 1


# ---------------------------------------------------------------------------------- estimation
def _sampled_rows(seq_len_q: int, block_size: int, stride: int, device):
    """The proxy's query rows, padded to a power of two per block: (positions [Mq * R], real [Mq * R], R)."""
    per_block = 1 << (-(-block_size // stride) - 1).bit_length()
    offsets = torch.arange(per_block, device=device) * stride
    positions = torch.arange(0, seq_len_q, block_size, device=device)[:, None] + offsets
    real = (offsets < block_size) & (positions < seq_len_q)
    return positions.clamp(max=seq_len_q - 1).flatten(), real.flatten(), per_block


@torch.no_grad()  # selection scores, as the kernel's: no gradient (and so the steps below may work in place)
def _block_scores_torch(q_rows, k, *, rows_per_block, row_span, row_step, block_size, seq_len_q, reduce_max, causal):
    """The PyTorch path of `sampled_block_scores_op` (same arguments and result), float32 (float64 for
    float64 inputs), a chunk of whole row groups of logits at a time."""
    work = working_dtype(q_rows.dtype)
    batch, num_q_heads, num_rows, dim = q_rows.shape
    num_kv_heads, seq_kv = k.shape[1], k.shape[2]
    num_out_rows, num_kv_blocks = -(-num_rows // rows_per_block), -(-seq_kv // block_size)
    index = torch.arange(num_out_rows * rows_per_block, device=q_rows.device)
    in_block = (index % rows_per_block) * row_step
    position = (index // rows_per_block) * row_span + in_block
    real = (index < num_rows) & (in_block < row_span) & (position < seq_len_q)
    q_grouped = F.pad(q_rows.to(work), (0, 0, 0, len(index) - num_rows))
    q_grouped = q_grouped.reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, len(index), dim)
    keys_t = F.pad(k.to(work), (0, 0, 0, num_kv_blocks * block_size - seq_kv))[:, :, None].transpose(-1, -2)
    key_pos = torch.arange(num_kv_blocks * block_size, device=k.device)
    groups_per_chunk = max(1, _TORCH_CHUNK_ELEMENTS // (batch * num_q_heads * rows_per_block * keys_t.shape[-1]))
    padding = key_pos[None, :] >= seq_kv
    parts = []
    for start in range(0, len(index), groups_per_chunk * rows_per_block):
        rows = slice(start, start + groups_per_chunk * rows_per_block)
        logits = q_grouped[..., rows, :] @ keys_t / math.sqrt(dim)
        hidden = padding
        if causal:
            hidden = hidden | (key_pos[None, :] > position[rows, None] + (seq_kv - seq_len_q))
        probs = logits.masked_fill_(hidden, float("-inf")).softmax(dim=-1).nan_to_num_(0.0)
        probs.mul_(real[rows, None].to(work))  # in place: each step of a chunk would be a copy of its logits
        tiles = probs.reshape(*probs.shape[:-2], -1, rows_per_block, num_kv_blocks, block_size)
        parts.append(tiles.amax(dim=(-3, -1)) if reduce_max else tiles.sum(dim=(-3, -1)))
    scores = torch.cat(parts, dim=-2).reshape(batch, num_q_heads, num_out_rows, num_kv_blocks)
    return scores if work == torch.float64 else scores.float()


def _block_scores(q_rows, k, **options):
    """Sampled-row block scores through the fused kernel where it runs (it reduces whole key blocks, so
    `block_size` must be a power of two; a block's sampled rows are padded to one), else the PyTorch path."""
    if block_scores_kernel_runs(q_rows, options["rows_per_block"], options["block_size"]):
        from ..kernels.block_scores import sampled_block_scores_op

        return sampled_block_scores_op(q_rows, k, **options)
    return _block_scores_torch(q_rows, k, **options)


def proxy_estimate(q, k, *, num_proxy_groups=1, stride=4, block_size=128, causal=True):
    """Proxy block scores A_g: fp32 [B, g, ceil(Sq/B), ceil(Skv/B)] (float64 for float64 inputs).

    A_g[m, n] is the largest causal softmax(Q_g K_g^T / sqrt(D)) probability of the queries at
    offsets 0, s, 2s, ... of query block m on the keys of key block n, where Q_g and K_g are the
    means of the query and key heads of proxy group g (num_proxy_groups must divide Hkv). Causally
    invisible blocks score 0. Runs the fused Triton kernel where Triton runs (CUDA, or fp16/fp32 CPU
    tensors under TRITON_INTERPRET=1) and `block_size` is a power of two; it keeps no logits.
    """
    check_options(num_proxy_groups=num_proxy_groups, stride=stride, block_size=block_size)
    _check_qk(q, k, causal, num_proxy_groups)
    positions, real, per_block = _sampled_rows(q.shape[2], block_size, stride, q.device)
    pool_dtype = working_dtype(q.dtype)
    # Rows are gathered before pooling: the proxy reads 1/s of the queries.
    q_rows = _head_means(q.index_select(2, positions), num_proxy_groups, pool_dtype)
    q_rows = (q_rows * real[:, None]).to(q.dtype if q.dtype in KERNEL_DTYPES else pool_dtype)
    k_proxy = _head_means(k, num_proxy_groups, pool_dtype).to(q_rows.dtype)
    return _block_scores(
        q_rows,
        k_proxy,
        rows_per_block=per_block,
        row_span=block_size,
        row_step=stride,
        block_size=block_size,
        seq_len_q=q.shape[2],
        reduce_max=True,
        causal=causal,
    )


def proxy_budget(q, k, *, gamma=0.95, block_size=128, causal=True):
    """Per-head budgets k_h: int64 [B, Hq], the fewest key blocks whose share of the head's own
    last-query-block attention reaches gamma (spec section 4, steps 1-4).

    The last min(B, Sq) queries of each head attend (causal, bottom-right aligned, full resolution)
    to the keys of its KV head; each key block's mass is its probability sum averaged over those
    queries, and k_h is the shortest descending prefix of those masses reaching gamma of their total
    (`threshold_select`'s rule). gamma = 1 gives every key block without summing.
    """
    check_options(gamma=gamma, block_size=block_size, stride=1)  # the budget samples no stride
    _check_qk(q, k, causal)
    num_kv_blocks = -(-k.shape[2] // block_size)
    if gamma >= 1:
        return torch.full(q.shape[:2], num_kv_blocks, dtype=torch.int64, device=q.device)
    last = q[:, :, q.shape[2] - min(block_size, q.shape[2]) :]
    sums = _block_scores(
        last,
        k,
        rows_per_block=_BUDGET_ROWS,
        row_span=_BUDGET_ROWS,
        row_step=1,
        block_size=block_size,
        seq_len_q=last.shape[2],
        reduce_max=False,
        causal=causal,
    ).sum(dim=2)
    count, _ = threshold_select(sums, gamma)
    return count.long()


# ---------------------------------------------------------------------------------- selection
def proxy_select(
    scores, head_blocks, *, causal=True, seq_len_q=None, seq_len_kv=None, block_size=128, min_budget_tokens=2048
) -> BlockSparseLayout:
    """The blocks ProxyAttn attends to: a `BlockSparseLayout` with one head per query head.

    scores: A_g [B, g, Mq, Nk] from `proxy_estimate` (float32 or float64).
    head_blocks: k_h, integer [B, Hq] from `proxy_budget` (Hq a multiple of g; query head h belongs to
        proxy group h // (Hq / g)).
    Per (batch, head, query block m) the layout holds the first K_{h,m} = min(N_m, max(ceil(k_h N_m /
    N_last), ceil(min_budget_tokens / B))) blocks of the group's ranking of row m: in causal mode the
    sink and diagonal blocks first (always kept), then the causally visible blocks by descending score,
    ties to the lower index. Heads of a group therefore get nested selections, and K_{h,m} grows with
    k_h. N_m counts the visible blocks of row m (Nk without `causal`), N_last those of the last row.
    seq_len_q, seq_len_kv: the lengths the scores were computed for (None: Mq * B and Nk * B).
    """
    block_size = _check_int(block_size, "block_size", 1)
    min_budget_tokens = _check_int(min_budget_tokens, "min_budget_tokens", 0)
    seq_len_q, seq_len_kv = block_score_lengths(scores, seq_len_q, seq_len_kv, block_size, causal)
    mask = _selected_blocks(
        scores, _check_head_blocks(head_blocks, scores), causal, seq_len_q, seq_len_kv, block_size, min_budget_tokens
    )
    return BlockSparseLayout.from_dense_mask(
        mask, q_block_size=block_size, kv_block_size=block_size, seq_len_q=seq_len_q, seq_len_kv=seq_len_kv
    )


def _selected_blocks(scores, budget, causal, seq_len_q, seq_len_kv, block_size, min_budget_tokens):
    """`proxy_select`'s kept blocks on checked arguments: bool [B, Hq, Mq, Nk]."""
    allowed, forced = selectable_blocks(seq_len_q, seq_len_kv, block_size, causal, scores.device)
    visible = allowed.sum(dim=-1)  # N_m
    keep = (budget[..., None] * visible + visible[-1] - 1) // visible[-1]  # ceil(k_h N_m / N_last), exact
    keep = torch.minimum(keep.clamp_min(-(-min_budget_tokens // block_size)), visible)  # [B, Hq, Mq]
    # One reduction (one sync): a NaN has no rank, so it would take an arbitrary place among the kept.
    if bool((allowed & scores.isnan()).any()):
        raise ValueError("scores must not be NaN where a block is selectable")
    # Forced blocks rank above any score, hidden ones below; a stable sort breaks ties low.
    ranked = torch.where(forced, float("inf"), torch.where(allowed, scores.double(), float("-inf")))
    order = ranked.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    batch, groups, num_q_blocks, num_kv_blocks = scores.shape
    heads_per_group = budget.shape[1] // groups
    kept = rank[:, :, None] < keep.view(batch, groups, heads_per_group, num_q_blocks, 1)
    return ((kept & allowed) | forced).reshape(batch, groups * heads_per_group, num_q_blocks, num_kv_blocks)


def _check_head_blocks(head_blocks, scores) -> torch.Tensor:
    if (
        not isinstance(head_blocks, torch.Tensor)
        or head_blocks.dtype.is_floating_point
        or head_blocks.dtype == torch.bool
    ):
        raise TypeError(
            f"head_blocks must be an integer tensor [B, Hq], got {getattr(head_blocks, 'dtype', head_blocks)!r}"
        )
    if head_blocks.dim() != 2 or head_blocks.shape[0] != scores.shape[0] or head_blocks.shape[1] % scores.shape[1]:
        raise ValueError(
            f"head_blocks must be [B={scores.shape[0]}, Hq] with Hq a multiple of the {scores.shape[1]} proxy groups, "
            f"got shape {tuple(head_blocks.shape)}"
        )
    if head_blocks.device != scores.device:
        raise ValueError(f"head_blocks is on {head_blocks.device}, scores on {scores.device}")
    if bool(((head_blocks < 1) | (head_blocks > scores.shape[3])).any()):
        raise ValueError(f"head_blocks values must lie in [1, {scores.shape[3]}] (the number of key blocks)")
    return head_blocks.long()


# ---------------------------------------------------------------------------------- attention
def _selection(q, k, *, gamma, num_proxy_groups, stride, block_size, min_budget_tokens, causal):
    """Estimate, budgets and selection of one batch: the kept blocks, bool [B, Hq, Mq, Nk]. The budgets are
    valid by construction, so `proxy_select`'s argument checks (and their device syncs) are skipped."""
    q, k = q.detach(), k.detach()
    scores = proxy_estimate(
        q, k, num_proxy_groups=num_proxy_groups, stride=stride, block_size=block_size, causal=causal
    )
    head_blocks = proxy_budget(q, k, gamma=gamma, block_size=block_size, causal=causal)
    return _selected_blocks(scores, head_blocks, causal, q.shape[2], k.shape[2], block_size, min_budget_tokens)


def proxy_attn(
    q,
    k,
    v,
    *,
    gamma=0.95,
    num_proxy_groups=1,
    stride=4,
    block_size=128,
    min_budget_tokens=2048,
    causal=True,
    softmax_scale=None,
    attn_sink=None,
    return_layout=False,
):
    """ProxyAttn prefill: proxy estimate, per-head budgets, selection, then the block-sparse engine.

    q (B, Hq, Sq, D), k and v (B, Hkv, Skv, D); returns the output (B, Hq, Sq, D) in q's dtype and,
    with `return_layout`, the `BlockSparseLayout` used. Differentiable in q, k and v through the
    engine (the selection is not). gamma in (0, 1] (1: dense causal attention); num_proxy_groups
    divides Hkv (1 for MHA-like GQA ratios, Hkv for high ones); stride in [1, block_size];
    `softmax_scale` only affects the attention (the estimate uses 1 / sqrt(D)). The Triton engine
    takes block sizes that are multiples of 16 (others run the PyTorch path). `attn_sink` as in
    `block_sparse_attn` (it does not take part in the estimate or the budget).
    """
    _check_qkv(q, k, v, packed=False)
    check_attn_sink(attn_sink, q.shape[1], q.device)
    _check_flags(return_layout=return_layout)
    options = dict(gamma=gamma, num_proxy_groups=num_proxy_groups, stride=stride, block_size=block_size)
    check_options(**options, min_budget_tokens=min_budget_tokens)
    mask = _selection(q, k, **options, min_budget_tokens=min_budget_tokens, causal=causal)
    layout = BlockSparseLayout.from_dense_mask(
        mask, q_block_size=block_size, kv_block_size=block_size, seq_len_q=q.shape[2], seq_len_kv=k.shape[2]
    )
    out = block_sparse_attn(q, k, v, layout, causal=causal, softmax_scale=softmax_scale, attn_sink=attn_sink)
    return (out, layout) if return_layout else out


def proxy_attn_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    *,
    gamma=0.95,
    num_proxy_groups=1,
    stride=4,
    block_size=128,
    min_budget_tokens=2048,
    causal=True,
    softmax_scale=None,
    attn_sink=None,
    return_layout=False,
):
    """ProxyAttn on packed sequences: q (total_q, Hq, D), k and v (total_k, Hkv, D), int32 cumulative lengths.

    Every sequence is estimated, budgeted and selected on its own (blocks restart at its start), then
    one varlen engine call attends all of them; the layout's batch axis is the sequence index.
    `attn_sink` as in `proxy_attn`.
    """
    _check_qkv(q, k, v, packed=True)
    check_attn_sink(attn_sink, q.shape[1], q.device)
    _check_flags(return_layout=return_layout)
    options = dict(gamma=gamma, num_proxy_groups=num_proxy_groups, stride=stride, block_size=block_size)
    check_options(**options, min_budget_tokens=min_budget_tokens)
    num_seqs = _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, q.device)
    if _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, q.device) != num_seqs:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    num_q_blocks, num_kv_blocks = -(-max_seqlen_q // block_size), -(-max_seqlen_k // block_size)
    mask = torch.zeros(num_seqs, q.shape[1], num_q_blocks, num_kv_blocks, dtype=torch.bool, device=q.device)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()  # one device sync each
    for index, (q0, q1, k0, k1) in enumerate(zip(starts_q, starts_q[1:], starts_k, starts_k[1:])):
        if q1 == q0:
            continue
        q_seq, k_seq = (t[a:b].transpose(0, 1)[None] for t, a, b in ((q, q0, q1), (k, k0, k1)))
        kept = _selection(q_seq, k_seq, **options, min_budget_tokens=min_budget_tokens, causal=causal)[0]
        mask[index, :, : kept.shape[1], : kept.shape[2]] = kept
    layout = BlockSparseLayout.from_dense_mask(
        mask, q_block_size=block_size, kv_block_size=block_size, seq_len_q=max_seqlen_q, seq_len_kv=max_seqlen_k
    )
    out = block_sparse_attn_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout,
        causal=causal, softmax_scale=softmax_scale, attn_sink=attn_sink,
    )  # fmt: skip
    return (out, layout) if return_layout else out
