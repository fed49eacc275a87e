"""torch.library registration of the engine's Triton kernels (forward, backward, autograd).

`triton_op` makes the kernels visible to torch.compile and registers the function itself as the
fake implementation, so everything here stays shape-only outside the kernel launches.
"""

from __future__ import annotations

import os

import torch
import triton
from torch.library import triton_op

from .kernels.block_sparse_attn import (
    LOG2E,
    _backward_delta_kernel,
    _block_sparse_dkdv_kernel,
    _block_sparse_rows_kernel,
)
from .kernels.launch import batch_head_grid, descriptor_args, launcher, warp_specialize_args, wide_index
from .selection import layout_transpose
from .tiles import launch_config


def _poisoned(*tensors):
    """Under SPARSE_ATTN_POISON_OUTPUTS=1, fill fresh outputs with NaN so tests catch unwritten elements."""
    if os.environ.get("SPARSE_ATTN_POISON_OUTPUTS") == "1":
        for t in tensors:
            t.fill_(float("nan"))
    return tensors


def _forward_outputs(q):
    """Fresh (out like q, fp32 lse [B, H, S]) of a forward."""
    return _poisoned(torch.empty_like(q), torch.empty(q.shape[:3], dtype=torch.float32, device=q.device))


def _backward_inputs(grad_out, grad_lse, out, q, k, v):
    """(dO with a unit last stride, delta in fp32 [B, H, S] like lse, q, k, v as the kernels read
    them, and fresh dq, dk, dv with their strides).

    delta = rowsum(dO * O) - dLSE: the score gradient is P * (dP - rowsum(dO * O)) from the output,
    plus P * dLSE from the LSE (dLSE/dscore = P), so a gradient of the returned LSE costs nothing."""
    grad_out = _unit_last_stride(grad_out)  # an expanded gradient (e.g. from .sum()) has stride 0
    delta = _row_delta(_unit_last_stride(out), grad_out, grad_lse)
    (q, dq), (k, dk), (v, dv) = (_with_gradient(t) for t in (q, k, v))
    return grad_out, delta, q, k, v, *_poisoned(dq, dk, dv)


def _row_delta(out, grad_out, grad_lse):
    """fp32 rowsum(out * grad_out) - grad_lse, shaped like out without its last dim: one kernel,
    where the PyTorch expression would hold fp32 copies of out and grad_out (and their product)."""
    delta = torch.empty(out.shape[:-1], dtype=torch.float32, device=out.device)
    rows = (1,) * (4 - out.dim()) + tuple(out.shape[:-1])  # [n0, n1, n2] rows, leading 1s for packed
    if delta.numel() == 0:
        return delta

    def row_strides(t):
        return ((0,) * (4 - out.dim()) + tuple(t.stride()))[:3]

    lse_strides = row_strides(grad_lse.unsqueeze(-1)) if grad_lse is not None else (0, 0, 0)
    block_rows = 32
    launcher(_backward_delta_kernel)[batch_head_grid(triton.cdiv(rows[2], block_rows), rows[1], rows[0])](
        out, grad_out, grad_lse, delta, rows[1], rows[2], *row_strides(out), *row_strides(grad_out), *lse_strides,
        HAS_DLSE=grad_lse is not None, HEAD_DIM=out.shape[-1], WIDE_INDEX=wide_index(out, grad_out, grad_lse),
        HEAD_DIM_PAD=triton.next_power_of_2(max(out.shape[-1], 16)), BLOCK_R=block_rows,
    )  # fmt: skip
    return delta


def _unit_last_stride(t):
    """The kernels address the head dim contiguously; any other stride is fine."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _with_gradient(t):
    """(t, an empty gradient buffer addressed by t's strides): the backward kernels write each
    gradient with its input's strides. `empty_like` keeps the strides of a dense tensor (a packed
    view included), not those of an expanded or sliced one: such an input is copied first."""
    t = _unit_last_stride(t)
    grad = torch.empty_like(t)
    if any(a != b for a, b, size in zip(grad.stride(), t.stride(), t.shape) if size > 1):
        t = t.contiguous()
        grad = torch.empty_like(t)
    return t, grad


def _index_tensors(*tensors):
    """Block lists and sequence offsets as the kernels read them: the last axis (or the only one) contiguous."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _strides4(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _layout_strides(counts, indices, batch, varlen):
    """Strides of [B, H, M] lists and [B, H, M, W] indices; 0 on a broadcast batch or head axis."""
    cb, ch, cm = counts.stride()
    ib, ih, im, _ = indices.stride()
    if counts.shape[0] == 1 and (batch > 1 or varlen):
        cb = ib = 0
    if counts.shape[1] == 1:
        ch = ih = 0
    return cb, ch, cm, ib, ih, im


def _geometry(q, k, cu_seqlens_q):
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    return varlen, batch


def _batch_strides(t, varlen):
    """Packed varlen tensors carry sequence offsets instead of a batch stride."""
    s = _strides4(t)
    return (0, s[1], s[2]) if varlen else s


def _tensor_strides(varlen, *tensors):
    return tuple(stride for t in tensors for stride in _batch_strides(t, varlen))


def _launch(kernel, name, q, k, v, o, lse, outputs, lists, cu_q, cu_k, heads, sizes, causal, softmax_scale, **flags):
    """One engine kernel: Q, K, V, O (dO in the backward), LSE, then `outputs` (DELTA and the
    gradients), the block lists it walks, the strides, and the shared scalars; `heads` are the grid's
    query heads (rows kernel) or KV heads (dK/dV kernel)."""
    q_block_size, kv_block_size, seq_len_q, seq_len_kv, layout_head_div = sizes
    varlen, batch = _geometry(q, k, cu_q)
    config = launch_config(f"engine_{name}", q, q_block_size, kv_block_size)
    if "USE_TMA" in config:
        # The row kernels walk K/V tiles, the dK/dV kernel Q and dO tiles (`o` is dO in the backward).
        tiled = dict(Q=q, DO=o) if name == "dkdv" else dict(K=k, V=v)
        flags = {**flags, **descriptor_args(config, "BLOCK_M" if name == "dkdv" else "BLOCK_N", **tiled)}
    if "WARP_SPECIALIZE" in config:
        # Every tile a ws kernel reads comes through a device-side descriptor (`o` is dO in the backward).
        read = dict(Q=q, K=k, V=v) if name == "fwd" else dict(Q=q, K=k, V=v, DO=o)
        grouped = ("Q", "DO") if name == "dkdv" else ()  # the dK/dV loop walks a GQA group's query heads
        stats = (lse, outputs[0]) if name == "dq" else ()  # dQ reads LSE and delta through descriptors,
        if name == "dq" and varlen:  # whose boxes start 16-byte aligned: packed sequences start anywhere
            config["WARP_SPECIALIZE"] = False
        flags = {**flags, **warp_specialize_args(config, grouped, stats, **read)}
    if name == "dkdv":
        flags = {**flags, "GROUP_PAD": triton.next_power_of_2(q.shape[1] // k.shape[1])}
    tiles = triton.cdiv(seq_len_kv, config["BLOCK_N"]) if name == "dkdv" else triton.cdiv(seq_len_q, config["BLOCK_M"])
    launcher(kernel)[batch_head_grid(tiles, heads, batch)](
        q, k, v, o, lse, *outputs, *lists, cu_q, cu_k,
        *_tensor_strides(varlen, q, k, v, o, lse.unsqueeze(-1)),
        *_layout_strides(*lists, batch, varlen),
        q.shape[1] // k.shape[1], seq_len_q, seq_len_kv, softmax_scale * LOG2E, softmax_scale,
        LAYOUT_HEAD_DIV=layout_head_div, Q_BLOCK=q_block_size, KV_BLOCK=kv_block_size, CAUSAL=causal,
        VARLEN=varlen, WIDE_INDEX=wide_index(q, k, v, o, lse, *outputs, *lists), **flags, **config,
    )  # fmt: skip


@triton_op("sparse_attn::block_sparse_attn_fwd", mutates_args={})
def block_sparse_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    q_block_size: int,
    kv_block_size: int,
    seq_len_q: int,
    seq_len_kv: int,
    layout_head_div: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    kv_num_blocks, kv_indices, cu_seqlens_q, cu_seqlens_k = _index_tensors(
        kv_num_blocks, kv_indices, cu_seqlens_q, cu_seqlens_k
    )
    out, lse = _forward_outputs(q)
    sizes = (q_block_size, kv_block_size, seq_len_q, seq_len_kv, layout_head_div)
    _launch(
        _block_sparse_rows_kernel, "fwd", q, k, v, out, lse, (None, None), (kv_num_blocks, kv_indices),
        cu_seqlens_q, cu_seqlens_k, q.shape[1], sizes, causal, softmax_scale, BACKWARD=False,
    )  # fmt: skip
    return out, lse


@triton_op("sparse_attn::block_sparse_attn_bwd", mutates_args={})
def block_sparse_attn_bwd(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    q_num_blocks: torch.Tensor,
    q_indices: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    q_block_size: int,
    kv_block_size: int,
    seq_len_q: int,
    seq_len_kv: int,
    layout_head_div: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_out, delta, q, k, v, dq, dk, dv = _backward_inputs(grad_out, grad_lse, out, q, k, v)
    kv_num_blocks, kv_indices, q_num_blocks, q_indices, cu_seqlens_q, cu_seqlens_k = _index_tensors(
        kv_num_blocks, kv_indices, q_num_blocks, q_indices, cu_seqlens_q, cu_seqlens_k
    )
    sizes = (q_block_size, kv_block_size, seq_len_q, seq_len_kv, layout_head_div)
    shared = (q, k, v, grad_out, lse)
    _launch(
        _block_sparse_rows_kernel, "dq", *shared, (delta, dq), (kv_num_blocks, kv_indices),
        cu_seqlens_q, cu_seqlens_k, q.shape[1], sizes, causal, softmax_scale, BACKWARD=True,
    )  # fmt: skip
    # The dK/dV kernel walks KV blocks, so it reads the query-side (transposed) lists.
    _launch(
        _block_sparse_dkdv_kernel, "dkdv", *shared, (delta, dk, dv), (q_num_blocks, q_indices),
        cu_seqlens_q, cu_seqlens_k, k.shape[1], sizes, causal, softmax_scale,
    )  # fmt: skip
    return dq, dk, dv


_FWD_ARGS = (
    "q",
    "k",
    "v",
    "kv_num_blocks",
    "kv_indices",
    "cu_seqlens_q",
    "cu_seqlens_k",
    "q_block_size",
    "kv_block_size",
    "seq_len_q",
    "seq_len_kv",
    "layout_head_div",
    "causal",
    "softmax_scale",
)


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FWD_ARGS, inputs))
    ctx.save_for_backward(
        args["q"],
        args["k"],
        args["v"],
        output[0],
        output[1],
        args["kv_num_blocks"],
        args["kv_indices"],
        args["cu_seqlens_q"],
        args["cu_seqlens_k"],
    )
    ctx.sizes = tuple(args[name] for name in _FWD_ARGS[_FWD_ARGS.index("q_block_size") :])


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_num_blocks, kv_indices, cu_q, cu_k = ctx.saved_tensors
    q_block_size, kv_block_size, seq_len_q, seq_len_kv = ctx.sizes[:4]
    q_num_blocks, q_indices = layout_transpose(kv_num_blocks, kv_indices, -(-seq_len_kv // kv_block_size))
    dq, dk, dv = block_sparse_attn_bwd(
        grad_out,
        grad_lse,
        q,
        k,
        v,
        out,
        lse,
        kv_num_blocks,
        kv_indices,
        q_num_blocks,
        q_indices,
        cu_q,
        cu_k,
        *ctx.sizes,
    )
    return (dq, dk, dv) + (None,) * (len(_FWD_ARGS) - 3)


block_sparse_attn_fwd.register_autograd(_backward, setup_context=_setup_context)
