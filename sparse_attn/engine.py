"""The block-sparse attention engine: attention over the KV blocks a `BlockSparseLayout` selects.

`block_sparse_attn` and `block_sparse_attn_varlen` run the Triton kernels on CUDA tensors (and on
CPU tensors under `TRITON_INTERPRET=1`), registered as `torch.ops.sparse_attn.block_sparse_attn_fwd`
/ `_bwd` through `torch.library.triton_op`, so torch.compile sees them. Elsewhere they run the
gathered-block PyTorch path (`sparse_attn.gathered`: float32 or float64 compute, work and memory
that follow the selected blocks), which accepts any float dtype and block size; `backend='reference'`
runs the dense-mask oracle.

Conventions: GQA is native (Hq % Hkv == 0, no K/V copies); causality is bottom-right aligned when
Sq < Skv; a query row with no selected key gets output 0 and LSE -inf (fp32, natural log).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch

from . import gathered, reference
from .layout import BlockSparseLayout
from .selection import _check_bool, _check_flags
from .sinks import attention_result, check_attn_sink

__all__ = ["block_sparse_attn", "block_sparse_attn_varlen", "triton_available"]

# 'auto' runs Triton where it can and the PyTorch path (sparse_attn.gathered) elsewhere; 'reference' is
# the dense-mask oracle.
BACKENDS = ("auto", "triton", "torch", "reference")
_MAX_HEAD_DIM = 256


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available(device: torch.device) -> bool:
    """Triton runs CUDA tensors, and CPU tensors only under its interpreter."""
    if not _triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a method's Triton kernel takes a tensor of `dtype` on `device`: Triton runs there and the
    dtype is 16/32-bit, except bfloat16 under the interpreter (its bf16 tl.dot is wrong)."""
    if not triton_available(device) or dtype not in KERNEL_DTYPES:
        return False
    return not (device.type == "cpu" and dtype == torch.bfloat16)


def choose_backend(backend: str, q, fits: bool, requirement: str) -> str:
    """The backend a method runs for `backend` (one of BACKENDS): 'auto' takes its Triton kernel where it
    runs and the kernel takes the shapes (`fits`), else the PyTorch path; an explicit 'triton' that cannot
    run raises, naming what it needs (`requirement`: the method's shape limits, as text)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if fits and triton_runs(q.device, q.dtype) else "torch"
    if backend == "triton" and not (fits and triton_runs(q.device, q.dtype)):
        raise ValueError(
            "backend='triton' needs triton with a CUDA tensor (or TRITON_INTERPRET=1), a float16/bfloat16/"
            f"float32 q (not bfloat16 under the interpreter, whose bf16 dot is wrong) and {requirement}"
        )
    return backend


# ---------------------------------------------------------------------------------- validation
def _check_qkv(q, k, v, packed: bool):
    rank, shape_text = (3, "(total, H, D)") if packed else (4, "(B, H, S, D)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {shape_text}, got shape {tuple(t.shape)}")
        if not t.is_floating_point() or t.element_size() == 1:
            raise TypeError(f"{name} must be a 16-, 32- or 64-bit floating-point tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
    head_axis = 1
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head dim {q.shape[-1]} differs from k head dim {k.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError("the head dim (the last axis of q, k, v) must be positive, got 0")
    if not packed and q.shape[0] != k.shape[0]:
        raise ValueError(f"q batch {q.shape[0]} differs from k batch {k.shape[0]}")
    hq, hkv = q.shape[head_axis], k.shape[head_axis]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number of KV heads ({hkv})")


def _check_block_kernel_inputs(q, block_sizes: dict) -> None:
    """What the block kernels (the engine's and MoBA's) take: 16/32-bit q, head dim <= 256, and block
    sizes ({name: size}) that are multiples of 16."""
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q dtype {q.dtype} is not supported by the Triton kernels (float16, bfloat16, float32)")
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} exceeds the kernels' maximum of {_MAX_HEAD_DIM}")
    for name, size in block_sizes.items():
        if size >= 2**31:  # a constexpr the kernels compute with in int32
            raise ValueError(f"{name}={size} exceeds the Triton kernels' int32 block sizes (backend='torch' takes it)")
        if size % 16:
            raise ValueError(
                f"{name}={size} must be a multiple of 16 for the Triton kernels (backend='reference' takes any size)"
            )


def _resolve_backend(backend: str, q, block_sizes: dict) -> str:
    """`choose_backend` for the block kernels: 'auto' takes the PyTorch path for inputs they cannot take
    (a float64 q, a head dim over 256, a block size of 8, bfloat16 under the interpreter); an explicit
    'triton' raises, naming the input."""
    try:
        _check_block_kernel_inputs(q, block_sizes)
        fits = True
    except (TypeError, ValueError):
        if backend == "triton":
            raise
        fits = False
    return choose_backend(backend, q, fits, "inputs the block kernels take")


def _layout_block_sizes(layout: BlockSparseLayout) -> dict:
    return {"layout q_block_size": layout.q_block_size, "layout kv_block_size": layout.kv_block_size}


def _default_scale(scale, head_dim, name="softmax_scale") -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name} must be a positive finite float, got {scale!r}")
    return float(scale)


# ---------------------------------------------------------------------------------- public API
def block_sparse_attn(
    q,
    k,
    v,
    layout: BlockSparseLayout,
    *,
    causal=True,
    softmax_scale=None,
    attn_sink=None,
    return_lse=False,
    backend="auto",
):
    """Attention of q (B, Hq, Sq, D) over the KV blocks of k, v (B, Hkv, Skv, D) that `layout` selects.

    Differentiable in q, k and v (and `attn_sink`, one logit per query head that joins every row's
    softmax with no value, as GPT-OSS's sinks; see `sparse_attn.sinks`). Returns the output
    (B, Hq, Sq, D) in q's dtype, and with `return_lse` also the fp32 log-sum-exp (B, Hq, Sq) of the
    attended logits (without the sink). `backend` is 'auto' (Triton where it runs and takes the
    inputs, else 'torch'), 'triton', 'torch' (gathered blocks in PyTorch ops) or 'reference' (dense masks).
    """
    _check_qkv(q, k, v, packed=False)
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    layout.check_compatible(q, k)
    _check_bool(causal, "causal")
    check_attn_sink(attn_sink, q.shape[1], q.device)
    _check_flags(return_lse=return_lse)
    scale = _default_scale(softmax_scale, q.shape[-1])
    resolved = _resolve_backend(backend, q, _layout_block_sizes(layout))
    if resolved == "triton":
        out, lse = _triton_attention(q, k, v, layout, causal, scale, None, None)
    else:
        out, lse = _pytorch_path(resolved, return_lse or attn_sink is not None)(q, k, v, layout, causal, scale)
    return attention_result(out, lse, attn_sink, return_lse)


def block_sparse_attn_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    layout: BlockSparseLayout,
    *,
    causal=True,
    softmax_scale=None,
    attn_sink=None,
    return_lse=False,
    backend="auto",
):
    """Packed sequences: q (total_q, Hq, D), k and v (total_k, Hkv, D), int32 cumulative lengths.

    Block grids restart at every sequence start: the layout's batch axis is the sequence index and
    its query blocks cover `max_seqlen_q`. The LSE, if returned, is fp32 (Hq, total_q). `attn_sink`
    as in `block_sparse_attn`.
    """
    _check_qkv(q, k, v, packed=True)
    _check_bool(causal, "causal")
    check_attn_sink(attn_sink, q.shape[1], q.device)
    _check_flags(return_lse=return_lse)
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    num_seqs = _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, q.device)
    if _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, q.device) != num_seqs:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    if layout.batch_size not in (num_seqs, 1):
        raise ValueError(f"layout batch {layout.batch_size} must be the number of sequences ({num_seqs}) or 1")
    if (layout.seq_len_q, layout.seq_len_kv) != (max_seqlen_q, max_seqlen_k):
        raise ValueError(
            f"layout is for seq_len_q={layout.seq_len_q}, seq_len_kv={layout.seq_len_kv}; varlen layouts "
            f"must use max_seqlen_q={max_seqlen_q} and max_seqlen_k={max_seqlen_k}"
        )
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}")
    layout.head_map(q.shape[1], k.shape[1])
    scale = _default_scale(softmax_scale, q.shape[-1])
    resolved = _resolve_backend(backend, q, _layout_block_sizes(layout))
    if resolved == "triton":
        out, lse = _packed_call(_triton_attention, q, k, v, cu_seqlens_q, cu_seqlens_k, layout, causal, scale)
    else:
        attention = _pytorch_path(resolved, return_lse or attn_sink is not None)
        out, lse = _per_sequence(attention, q, k, v, cu_seqlens_q, cu_seqlens_k, layout, causal, scale)
    return attention_result(out, lse, attn_sink, return_lse, packed=True)


def _check_cu_seqlens(cu, name, total, max_seqlen, device) -> int:
    max_name = name.replace("cu_seqlens", "max_seqlen")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{max_name} must be an int, got {type(max_seqlen).__name__}")
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor [num_seqs + 1]")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (or int64), got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lengths < 0).any()):
        raise ValueError(f"{name} must start at 0, be non-decreasing and end at the packed length {total}")
    if int(lengths.max()) > max_seqlen:
        raise ValueError(f"{name} holds a sequence longer than {max_name}={max_seqlen}")
    return cu.numel() - 1


# ---------------------------------------------------------------------------------- PyTorch paths
def _reference_attention(q, k, v, layout, causal, scale):
    oracle = reference.block_sparse_attention_reference
    return reference.at_working_precision(oracle, q, k, v, layout, causal=causal, softmax_scale=scale)


def _pytorch_path(backend: str, return_lse: bool):
    """`attention(q, k, v, layout, causal, scale)` of the 'torch' or 'reference' backend."""
    if backend == "reference":
        return _reference_attention
    return functools.partial(gathered.layout_attention, lse_grad=return_lse)


def _per_sequence(attention, q, k, v, cu_q, cu_k, layout, causal, scale):
    """A batched PyTorch path `attention(q, k, v, layout, causal, scale)` on each packed sequence."""
    block_mask = layout.to_dense_mask()
    outs, lses = [], []
    for i in range(cu_q.numel() - 1):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        len_q, len_k = qs.stop - qs.start, ks.stop - ks.start
        if len_q == 0 or len_k == 0:  # nothing to attend: empty rows, or no rows at all
            outs.append(gathered.unattended(q[qs], k[ks], v[ks]))
            lses.append(torch.full((q.shape[1], len_q), float("-inf"), device=q.device))
            continue
        # Blocks restart at the sequence start; blocks past its own length are ignored.
        row = min(i, layout.batch_size - 1)
        mask = block_mask[row : row + 1, :, : -(-len_q // layout.q_block_size), : -(-len_k // layout.kv_block_size)]
        part = BlockSparseLayout.from_dense_mask(
            mask.contiguous(),
            q_block_size=layout.q_block_size,
            kv_block_size=layout.kv_block_size,
            seq_len_q=len_q,
            seq_len_kv=len_k,
        )
        seq_q, seq_k, seq_v = (t[s].transpose(0, 1)[None] for t, s in ((q, qs), (k, ks), (v, ks)))
        o, lse = attention(seq_q, seq_k, seq_v, part, causal, scale)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


# ---------------------------------------------------------------------------------- Triton path
def _packed_call(attention, q, k, v, cu_q, cu_k, *args):
    """`attention(q4, k4, v4, *args, cu_q, cu_k)` on packed (total, H, D) tensors viewed as one batch
    (1, H, total, D) with per-sequence offsets: (out (total_q, Hq, D), lse (Hq, total_q))."""
    q4, k4, v4 = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))
    out4, lse = attention(q4, k4, v4, *args, cu_q.to(torch.int32), cu_k.to(torch.int32))
    return out4.transpose(1, 2).squeeze(0), lse.squeeze(0)


def _triton_attention(q, k, v, layout, causal, scale, cu_q=None, cu_k=None):
    """The Triton op over `layout`: (out, fp32 lse)."""
    from . import _engine_ops

    group = q.shape[1] // k.shape[1]
    layout_head_div = group if (layout.num_heads == k.shape[1] and layout.num_heads != q.shape[1]) else 1
    return _engine_ops.block_sparse_attn_fwd(
        q,
        k,
        v,
        layout.kv_num_blocks,
        layout.kv_indices,
        cu_q,
        cu_k,
        layout.q_block_size,
        layout.kv_block_size,
        layout.seq_len_q,
        layout.seq_len_kv,
        layout_head_div,
        causal,
        scale,
    )
