"""The DSA lightning indexer's training loss (spec shared/specs/hisa_dsa.md section 1, "Training").

DeepSeek-V3.2 trains its indexer to match the main attention: per query row t, KL(p_t || softmax(I[t, :]))
where p_t is the main attention's probabilities summed over heads and L1-normalised (their mean), the
target detached. During the dense warm-up the sum runs over every visible key; in the sparse stage both
distributions are restricted to the selected set S_t. Only the indexer learns from it: the main
attention's q and k are read without gradient, and the indexer's input is the caller's to detach.
"""

from __future__ import annotations

import torch

from .. import reference
from ..engine import KERNEL_DTYPES, _check_qkv, _default_scale
from ..selection import _check_bool, _check_tensor

__all__ = ["indexer_kl_loss"]

REDUCTIONS = ("mean", "sum", "none")
# Main-attention logits (query rows x heads x keys) held at a time.
_CHUNK_ELEMENTS = 1 << 24


def _check_inputs(index_scores, q, k, indices, reduction):
    _check_qkv(q, k, k, packed=False)
    batch, _, seq_q, _ = q.shape
    if indices is not None:
        _check_tensor(indices, "indices", dim=3, dtypes=(torch.int32, torch.int64))
        if tuple(indices.shape[:2]) != (batch, seq_q) or indices.device != q.device:
            raise ValueError(f"indices must be (B={batch}, Sq={seq_q}, K) on {q.device}, got {tuple(indices.shape)}")
    width = k.shape[2] if indices is None else indices.shape[2]
    _check_tensor(index_scores, "index_scores", dim=3, dtypes=(*KERNEL_DTYPES, torch.float64))
    if tuple(index_scores.shape) != (batch, seq_q, width) or index_scores.device != q.device:
        raise ValueError(
            f"index_scores must be (B, Sq, {'Skv' if indices is None else 'K'}) = {(batch, seq_q, width)} on "
            f"{q.device}, got {tuple(index_scores.shape)} on {index_scores.device}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _main_logits(q, k, rows, indices, scale, dtype):
    """Main-attention logits (B, Hq, rows, N) of query rows `rows` against every key (N = Skv) or against
    each row's listed keys (N = K, positions clamped into range)."""
    batch, num_q_heads, _, dim = q.shape
    num_kv_heads = k.shape[1]
    queries = q[:, :, rows].to(dtype).unflatten(1, (num_kv_heads, num_q_heads // num_kv_heads))
    if indices is None:
        logits = torch.einsum("bhgcd,bhnd->bhgcn", queries, k.to(dtype))
    else:
        positions = indices[:, rows].long().clamp(0, k.shape[2] - 1)  # (B, c, K)
        keys = k[torch.arange(batch, device=q.device)[:, None, None], :, positions]  # (B, c, K, Hkv, D)
        logits = torch.einsum("bhgcd,bcnhd->bhgcn", queries, keys.to(dtype))
    return logits.flatten(1, 2) * scale


@torch.no_grad()
def _targets(q, k, rows, indices, allowed, scale, dtype):
    """p_t (B, rows, N): the main attention's probabilities over the allowed keys, averaged over heads."""
    probs, _ = reference.masked_softmax(_main_logits(q, k, rows, indices, scale, dtype), allowed[:, None])
    return probs.mean(dim=1)


def indexer_kl_loss(index_scores, q, k, *, indices=None, softmax_scale=None, causal=True, reduction="mean"):
    """KL(p_t || softmax(index_scores[t])) per query row, differentiable in `index_scores` only.

    q (B, Hq, Sq, D) and k (B, Hkv, Skv, D): the main attention's queries and keys (GQA allowed), read
    without gradient; `softmax_scale` its scale (default D^-1/2).
    Dense warm-up (`indices=None`): index_scores (B, Sq, Skv) over every key; the keys a row sees are
    the bottom-right causal ones (every key with causal=False).
    Sparse stage: indices int (B, Sq, K) of the selected keys (-1 or >= Skv: not selected; the list is
    the set, no mask is added) and index_scores (B, Sq, K) the indexer's scores at those entries.
    Both distributions run over the same keys. Rows with none contribute 0 and do not count in the mean.
    reduction: 'mean' over rows with keys (a 0-d tensor), 'sum', or 'none' (B, Sq), in fp32 (fp64 for fp64).
    """
    _check_inputs(index_scores, q, k, indices, reduction)
    _check_bool(causal, "causal")
    scale = _default_scale(softmax_scale, q.shape[-1])
    dtype = reference.working_dtype(q.dtype)
    seq_q, seq_kv = q.shape[2], k.shape[2]
    if indices is None:
        every_key = torch.ones(seq_q, seq_kv, dtype=torch.bool, device=q.device)
        allowed = reference.causal_token_mask(seq_q, seq_kv, q.device) if causal else every_key
        allowed = allowed.expand(q.shape[0], seq_q, seq_kv)
    else:
        allowed = (indices >= 0) & (indices < seq_kv)
    # A row's elements: its logits over every head, and in the sparse stage its gathered keys (K x Hkv x D).
    keys_per_row = allowed.shape[-1] * (q.shape[1] + (0 if indices is None else k.shape[1] * k.shape[-1]))
    step = max(1, _CHUNK_ELEMENTS // max(q.shape[0] * keys_per_row, 1))
    losses = []
    for start in range(0, seq_q, step):
        rows = slice(start, min(seq_q, start + step))
        target = _targets(q.detach(), k.detach(), rows, indices, allowed[:, rows], scale, dtype)
        scores = index_scores[:, rows].to(dtype)
        _, lse = reference.masked_softmax(scores, allowed[:, rows])
        log_model = scores - lse[..., None]
        terms = torch.xlogy(target, target) - target * log_model.masked_fill(~allowed[:, rows], 0.0)
        losses.append(terms.sum(dim=-1))
    # No query rows: an empty sum of the scores keeps the (empty) loss in the graph.
    per_row = torch.cat(losses, dim=1) if losses else index_scores.to(dtype).sum(dim=-1)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / allowed.any(dim=-1).sum().clamp(min=1)
