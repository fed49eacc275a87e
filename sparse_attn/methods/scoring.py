"""Which block scores the fused kernel (`sparse_attn.kernels.block_scores`) computes, for the methods that
score blocks with it (XAttention, ProxyAttn); elsewhere they take their PyTorch paths."""

from __future__ import annotations

from ..engine import KERNEL_DTYPES, _check_qkv, triton_runs
from ..selection import _check_bool

__all__ = ["KERNEL_DTYPES", "block_scores_kernel_runs", "check_scored_qk"]
_KERNEL_MAX_HEAD_DIM = 256


def block_scores_kernel_runs(q, rows_per_block: int, cols_per_block: int) -> bool:
    """Whether the kernel takes q: Triton runs on its device (CUDA, or the interpreter for fp16/fp32 CPU
    tensors: its bf16 tl.dot is wrong), a 16/32-bit float, head dim <= 256, and blocks of rows and key
    columns that are powers of two (the in-kernel tile reductions reshape by them) and whose tile fits
    shared memory."""
    if not triton_runs(q.device, q.dtype) or q.shape[-1] > _KERNEL_MAX_HEAD_DIM:
        return False
    from ..kernels.block_scores import kernel_supports

    return kernel_supports(q, rows_per_block, cols_per_block)


def check_scored_qk(q, k, causal: bool, method: str) -> None:
    """q (B, Hq, Sq, D) and k (B, Hkv, Skv, D) as the engine takes them, none of B, Sq, Skv empty (there
    would be nothing to score), and Sq <= Skv in causal mode."""
    _check_qkv(q, k, k, packed=False)
    _check_bool(causal, "causal")
    if 0 in (q.shape[0], q.shape[2], k.shape[2]):
        raise ValueError(
            f"{method} scores blocks of at least one sequence with at least one query and one key, got q of shape "
            f"{tuple(q.shape)} and k of shape {tuple(k.shape)}"
        )
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(
            f"causal {method} needs seq_len_q <= seq_len_kv (bottom-right aligned), got {q.shape[2]} > {k.shape[2]}"
        )
