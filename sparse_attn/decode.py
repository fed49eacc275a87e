"""Block-sparse decode: a few queries (Sq <= 16) against a long KV cache, over the blocks a layout selects.

`block_sparse_decode` runs the native op `torch.ops.sparse_attn.block_sparse_decode`: a split-KV CUDA
kernel on fp16/bf16 CUDA tensors (memory-bound: each selected K/V block is read once per group of
query heads that shares it) and a C++ twin on the CPU (fp16, bf16, fp32, fp64) that splits and
combines the same way. Semantics equal `block_sparse_attention_reference` with bottom-right causal
alignment: query i sits at key position i + Skv - Sq. Inference only: there is no backward.
"""

from __future__ import annotations

import torch

from ._native import HAS_NATIVE, _has_kernel
from .engine import _check_qkv, _default_scale
from .layout import BlockSparseLayout
from .selection import _check_bool, _check_flags
from .sinks import attention_result, check_attn_sink

__all__ = ["block_sparse_decode", "decode_available", "decode_kernel_accepts", "MAX_DECODE_QUERIES"]

OP_NAME = "block_sparse_decode"
MAX_DECODE_QUERIES = 16
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CUDA_HEAD_DIMS = (64, 96, 128, 256)


def decode_available(device: str | torch.device = "cpu") -> bool:
    """Whether the native decode op runs on tensors of this device type ('cpu' or 'cuda')."""
    return _has_kernel(OP_NAME, "CUDA" if torch.device(device).type == "cuda" else "CPU")


def decode_kernel_accepts(q, k, v) -> bool:
    """Whether `block_sparse_decode` takes these tensors (native kernel, dtype, head dim, Sq, no gradient);
    callers with another path (MoBA's routed decode) fall back to it otherwise."""
    if q.shape[2] > MAX_DECODE_QUERIES or not decode_available(q.device):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return False
    if any(t.shape[-1] > 1 and t.stride(-1) != 1 for t in (q, k, v)):
        return False
    if q.device.type == "cuda":
        return q.dtype in _CUDA_DTYPES and q.shape[-1] in _CUDA_HEAD_DIMS
    return q.dtype in _CPU_DTYPES


def block_sparse_decode(
    q,
    k,
    v,
    layout: BlockSparseLayout,
    *,
    causal=True,
    softmax_scale=None,
    attn_sink=None,
    num_splits=0,
    return_lse=False,
):
    """Attention of q (B, Hq, Sq, D), Sq <= 16, over the KV blocks of k, v (B, Hkv, Skv, D) that `layout` selects.

    The layout must have a single query block (Sq <= layout.q_block_size); all query rows use its
    block list. `num_splits` cuts each row's block list into that many shares computed in parallel
    and merged by log-sum-exp; 0 lets the op choose from the shapes. Returns the output (B, Hq, Sq, D)
    in q's dtype, and with `return_lse` also the fp32 natural-log LSE (B, Hq, Sq); rows without a
    visible key give 0 and -inf. `attn_sink` as in `block_sparse_attn` (the LSE stays the sink-free
    one). Inference only: use `block_sparse_attn` for gradients.
    """
    _check_qkv(q, k, v, packed=False)
    _check_flags(return_lse=return_lse)
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    layout.check_compatible(q, k)
    check_attn_sink(attn_sink, q.shape[1], q.device)
    seq_len_q, head_dim = q.shape[2], q.shape[3]
    if seq_len_q > MAX_DECODE_QUERIES:
        raise ValueError(
            f"block_sparse_decode takes at most {MAX_DECODE_QUERIES} queries, got Sq={seq_len_q}; "
            "use block_sparse_attn for longer query blocks"
        )
    if seq_len_q > layout.q_block_size:
        raise ValueError(
            f"block_sparse_decode needs a single query block, but Sq={seq_len_q} exceeds the layout's "
            f"q_block_size={layout.q_block_size}"
        )
    _check_bool(causal, "causal")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(f"num_splits must be an int, got {type(num_splits).__name__}")
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0 chooses automatically), got {num_splits}")
    scale = _default_scale(softmax_scale, head_dim)
    if any(t.requires_grad for t in (q, k, v)) and torch.is_grad_enabled():
        raise ValueError(
            "block_sparse_decode is inference-only (no backward); use block_sparse_attn for inputs that require grad"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in the last dim (stride 1), got stride {t.stride(-1)}")

    if q.device.type == "cuda":
        if q.dtype not in _CUDA_DTYPES:
            raise TypeError(f"the CUDA decode kernel takes float16 or bfloat16 q, k, v, got {q.dtype}")
        if head_dim not in _CUDA_HEAD_DIMS:
            raise ValueError(f"the CUDA decode kernel supports head dims {_CUDA_HEAD_DIMS}, got {head_dim}")
    elif q.dtype not in _CPU_DTYPES:
        raise TypeError(f"q dtype {q.dtype} is not supported (float16, bfloat16, float32, float64)")
    if not decode_available(q.device):
        reason = "the native extension is not loaded" if not HAS_NATIVE else "it was built without this backend"
        raise NotImplementedError(f"block_sparse_decode has no native kernel for {q.device.type} tensors: {reason}")

    out, lse = torch.ops.sparse_attn.block_sparse_decode(
        q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.kv_block_size, causal, scale, num_splits
    )
    return attention_result(out, lse, attn_sink, return_lse)


def _register_fake() -> None:
    """Shape-only implementation so FakeTensor and torch.compile trace through the op."""

    @torch.library.register_fake(f"sparse_attn::{OP_NAME}")
    def _(q, k, v, kv_num_blocks, kv_indices, kv_block_size, causal, softmax_scale, num_splits):
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype)


def _no_backward(ctx, grad_out, grad_lse):
    raise NotImplementedError(
        f"sparse_attn::{OP_NAME} is inference only (no backward); block_sparse_attn is differentiable"
    )


if HAS_NATIVE and hasattr(torch.ops.sparse_attn, OP_NAME):
    _register_fake()
    # An op without an autograd kernel would hand back inputs with no gradient and only a warning.
    torch.library.register_autograd(f"sparse_attn::{OP_NAME}", _no_backward)
