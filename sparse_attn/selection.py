"""Selection primitives that every method's routing is built from.

Each function validates its arguments, then runs the native op (`torch.ops.sparse_attn.*`, C++ on
the CPU and CUDA on the GPU) when the extension provides one for the tensor's device, and the
PyTorch reference otherwise. Both compute the same function; the semantics are documented in
csrc/ops.cpp and implemented literally in sparse_attn/reference.py.
"""

from __future__ import annotations

import torch

from . import reference
from ._native import HAS_NATIVE, _has_kernel

__all__ = ["block_mean_pool", "topk_rows", "threshold_select", "layout_transpose"]

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _run(op_name: str, device: torch.device, *args):
    key = "CUDA" if device.type == "cuda" else "CPU"
    if _has_kernel(op_name, key):
        return getattr(torch.ops.sparse_attn, op_name)(*args)
    return getattr(reference, f"{op_name}_reference")(*args)


def _check_tensor(t, name: str, *, dim: int | None = None, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_flags(**flags) -> None:
    """Each keyword a bool (a public function's return_lse, return_stats, ...), named in the error."""
    for name, value in flags.items():
        _check_bool(value, name)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _ascending_padded(indices: torch.Tensor) -> torch.Tensor:
    """Sorts each row's indices ascending with the -1 padding moved to the end."""
    missing = torch.iinfo(torch.int32).max
    ascending = torch.where(indices < 0, missing, indices).sort(dim=-1).values
    return torch.where(ascending == missing, -1, ascending)


def _kept_in_order(indices: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Each row's entries where `keep`, in their order, then -1: a compaction without a sort."""
    slot = torch.where(keep, keep.cumsum(-1) - 1, indices.shape[-1])  # the dropped go to a spare column
    out = torch.full((*indices.shape[:-1], indices.shape[-1] + 1), -1, dtype=indices.dtype, device=indices.device)
    return out.scatter_(-1, slot, indices)[..., :-1]


def block_score_lengths(scores, seq_len_q, seq_len_kv, block_size: int, causal: bool) -> tuple[int, int]:
    """The sequence lengths of float block scores [B, H, Mq, Nk] (None: Mq * block_size, Nk * block_size),
    checked against their block grid; a selection method's scores must match the lengths it lays out."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        raise ValueError(f"scores must be a 4-D tensor [B, H, Mq, Nk], got {getattr(scores, 'shape', scores)!r}")
    if scores.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"scores must be float32 or float64, got {scores.dtype}")
    _check_bool(causal, "causal")
    num_q_blocks, num_kv_blocks = scores.shape[2:]
    seq_len_q = num_q_blocks * block_size if seq_len_q is None else _check_int(seq_len_q, "seq_len_q", 1)
    seq_len_kv = num_kv_blocks * block_size if seq_len_kv is None else _check_int(seq_len_kv, "seq_len_kv", 1)
    if (-(-seq_len_q // block_size), -(-seq_len_kv // block_size)) != (num_q_blocks, num_kv_blocks):
        raise ValueError(
            f"scores have {num_q_blocks} x {num_kv_blocks} blocks, but seq_len_q={seq_len_q}, "
            f"seq_len_kv={seq_len_kv} with block_size={block_size} need "
            f"{-(-seq_len_q // block_size)} x {-(-seq_len_kv // block_size)}"
        )
    if causal and seq_len_q > seq_len_kv:
        raise ValueError(f"causal selection needs seq_len_q <= seq_len_kv, got {seq_len_q} > {seq_len_kv}")
    return seq_len_q, seq_len_kv


def block_mean_pool(keys: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each block of `block_size` keys: (B, H, S, D) -> float32 (B, H, ceil(S/bs), D).

    The ragged last block is averaged over its real length. float64 keys give float64 means.
    """
    _check_tensor(keys, "keys", dim=4, dtypes=_FLOAT_TYPES)
    _check_int(block_size, "block_size", 1)
    # A block longer than the keys is all of them: the same means, and no int64 overflow in the op.
    return _run("block_mean_pool", keys.device, keys, min(block_size, max(keys.shape[2], 1)))


def topk_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [..., k]: per row of `scores` [..., N], the indices of the k largest scores.

    Order is by descending score with ties to the lower index, so results are deterministic.
    -inf and NaN scores are never selected; rows with fewer than k selectable entries pad with -1.
    """
    _check_tensor(scores, "scores", dtypes=(torch.float32, torch.float64))
    if scores.dim() < 1:
        raise ValueError("scores must have at least one dimension")
    _check_int(k, "k", 0)
    rows = scores.reshape(scores.shape[:-1].numel(), scores.shape[-1])  # -1 is ambiguous with N == 0
    return _run("topk_rows", scores.device, rows, k).view(*scores.shape[:-1], k)


def threshold_select(scores, threshold, *, forced=None, allowed=None):
    """XAttention's cumulative-mass selection per row of non-negative `scores` [..., N] (masses).

    Forced entries come first, then allowed entries by descending score (ties to the lower index).
    An unforced entry is kept iff the mass before it in that order is below
    `threshold * sum(allowed scores)`: the shortest prefix reaching the threshold, including the
    entry that crosses it. Forced entries are always kept; threshold >= 1 keeps every allowed entry.

    threshold: float or tensor broadcastable to the leading dims [...]; values in [0, 1].
    forced, allowed: bool [..., N] (defaults: nothing forced, everything allowed).
    Returns (count int32 [...], indices int32 [..., N] ascending, -1 padded).
    """
    _check_tensor(scores, "scores", dtypes=(torch.float32, torch.float64))
    if scores.dim() < 1:
        raise ValueError("scores must have at least one dimension")
    lead, n = scores.shape[:-1], scores.shape[-1]
    numeric = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
    if not numeric and not (isinstance(threshold, torch.Tensor) and threshold.is_floating_point()):
        raise TypeError(f"threshold must be a float or a float tensor, got {type(threshold).__name__}")
    tau = torch.as_tensor(threshold, dtype=torch.float64, device=scores.device)
    try:
        tau = torch.broadcast_to(tau, lead)
    except RuntimeError as exc:
        raise ValueError(f"threshold of shape {tuple(tau.shape)} does not broadcast to {tuple(lead)}") from exc
    if bool(((tau < 0) | (tau > 1) | torch.isnan(tau)).any()):
        raise ValueError("threshold values must lie in [0, 1]")
    if n == 0:  # rows without entries keep none (reshape(-1, 0) would be ambiguous)
        empty = torch.zeros(lead, dtype=torch.int32, device=scores.device)
        return empty, torch.empty(*lead, 0, dtype=torch.int32, device=scores.device)
    masks = []
    for mask, name, default in ((forced, "forced", False), (allowed, "allowed", True)):
        if mask is None:
            mask = torch.full(scores.shape, default, dtype=torch.bool, device=scores.device)
        _check_tensor(mask, name, dtypes=(torch.bool,))
        if mask.shape != scores.shape:
            raise ValueError(f"{name} must have the shape of scores {tuple(scores.shape)}, got {tuple(mask.shape)}")
        masks.append(mask.reshape(-1, n))
    # One reduction (one sync) for negative, NaN and infinite masses: no order or prefix sum is defined for them.
    if bool((masks[1] & ~(torch.isfinite(scores) & (scores >= 0)).reshape(-1, n)).any()):
        raise ValueError("scores must be finite, non-negative masses where allowed")
    count, indices = _run(
        "threshold_select", scores.device, scores.reshape(-1, n), tau.reshape(-1).contiguous(), *masks
    )
    return count.view(lead), indices.view(*lead, n)


def layout_transpose(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, num_kv_blocks: int):
    """KV-side lists -> query-side lists: (q_num_blocks [B, H, N], q_indices [B, H, N, Mq] ascending, -1 padded).

    Expects validated lists (see `BlockSparseLayout`); the backward pass walks these per KV block.
    """
    _check_tensor(kv_num_blocks, "kv_num_blocks", dim=3, dtypes=(torch.int32,))
    _check_tensor(kv_indices, "kv_indices", dim=4, dtypes=(torch.int32,))
    _check_int(num_kv_blocks, "num_kv_blocks", 0)
    return _run("layout_transpose", kv_num_blocks.device, kv_num_blocks, kv_indices, num_kv_blocks)


def _register_fakes() -> None:
    """Shape-only implementations so FakeTensor and torch.compile trace through the native ops."""

    @torch.library.register_fake("sparse_attn::block_mean_pool")
    def _(keys, block_size):
        acc = reference.working_dtype(keys.dtype)
        b, h, s, d = keys.shape
        return keys.new_empty((b, h, (s + block_size - 1) // block_size, d), dtype=acc)

    @torch.library.register_fake("sparse_attn::topk_rows")
    def _(scores, k):
        return scores.new_empty((scores.shape[0], k), dtype=torch.int32)

    @torch.library.register_fake("sparse_attn::threshold_select")
    def _(scores, threshold, forced, allowed):
        return scores.new_empty(scores.shape[:1], dtype=torch.int32), scores.new_empty(scores.shape, dtype=torch.int32)

    @torch.library.register_fake("sparse_attn::layout_transpose")
    def _(kv_num_blocks, kv_indices, num_kv_blocks):
        b, h, mq = kv_num_blocks.shape
        return kv_num_blocks.new_empty((b, h, num_kv_blocks)), kv_num_blocks.new_empty((b, h, num_kv_blocks, mq))


def _pool_setup_context(ctx, inputs, output) -> None:
    keys, block_size = inputs
    ctx.seq_len, ctx.block_size, ctx.dtype = keys.shape[2], block_size, keys.dtype


def _pool_backward(ctx, grad):
    """Each key of block j gets grad[j] over the block's real length (the ragged last one's too)."""
    num_blocks = grad.shape[2]
    starts = torch.arange(num_blocks, device=grad.device) * ctx.block_size
    lengths = (ctx.seq_len - starts).clamp(max=ctx.block_size).to(grad.dtype)
    per_block = grad / lengths[:, None]
    per_key = per_block.unsqueeze(3).expand(-1, -1, -1, ctx.block_size, -1).flatten(2, 3)
    return per_key[:, :, : ctx.seq_len].to(ctx.dtype), None


if HAS_NATIVE:
    _register_fakes()
    # The native op has no backward of its own; the reference fallback is differentiable, so this one is too.
    torch.library.register_autograd("sparse_attn::block_mean_pool", _pool_backward, setup_context=_pool_setup_context)
