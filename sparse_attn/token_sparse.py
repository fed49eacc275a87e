"""Token-sparse attention: each query row attends to the key positions its index list names.

`token_sparse_attn` is the general form (DSA and HISA selections, GQA or shared lists) and `sparse_mla`
FlashMLA's `flash_mla_sparse_fwd` convention on top of it (spec shared/specs/hisa_dsa.md section 3),
both differentiable. No mask is applied: causality lives in the indices. Indices < 0 or >= Skv are
ignored; duplicates of a valid index are not allowed (the kernels would count the key twice;
`check_indices=True` verifies, at the cost of a sort and a device sync). A row without a valid index
gets output 0 and LSE -inf (natural log, fp32), and zero gradients. `attn_sink` (one logit per query
head) scales a row's output by exp(lse) / (exp(lse) + exp(sink)).

Backends as the block-sparse engine's: the Triton kernels (`sparse_attn.kernels.token_sparse_attn`) on
CUDA, and on the CPU under the interpreter for 16/32-bit floats other than bfloat16; elsewhere the
PyTorch path (gathered rows, float32 compute, a chunk of query rows at a time); 'reference' is the
dense-mask oracle.
"""

from __future__ import annotations

import torch

from . import reference
from .engine import _check_qkv, _default_scale, choose_backend
from .gathered import chunk_runner, records_gradients, unattended
from .selection import _check_flags, _check_int, _check_tensor
from .sinks import attention_result, check_attn_sink

__all__ = ["sparse_mla", "token_sparse_attn"]

_MAX_KERNEL_HEAD_DIM = 1024
_MAX_KERNEL_VALUE_DIM = 512
# fp32 tiles take twice the shared memory: past 256 dims the backward (and at 1024 the forward) overflows
# an A100's 163 KB a block (sparse_mla's 576/512 in fp32 needs 208 KB).
_MAX_FP32_KERNEL_DIM = 256
# Gathered elements (query rows x heads x indices x head dim) of the PyTorch path at a time.
_TORCH_CHUNK_ELEMENTS = 1 << 25


def _check_inputs(q, k, v, indices, attn_sink):
    """q (B, Hq, Sq, D), k (B, Hkv, Skv, D), v (B, Hkv, Skv, Dv), indices int [B, Sq, G, K] with G in {Hkv, 1}."""
    _check_qkv(q, k, k, packed=False)
    _check_tensor(v, "v", dim=4)
    if v.dtype != q.dtype or v.device != q.device:
        raise TypeError(f"v must match q's dtype and device ({q.dtype}, {q.device}), got ({v.dtype}, {v.device})")
    if v.shape[:3] != k.shape[:3] or v.shape[-1] == 0:
        raise ValueError(f"v must be (B, Hkv, Skv, Dv) like k {tuple(k.shape[:3])}, got shape {tuple(v.shape)}")
    _check_tensor(indices, "indices", dim=4, dtypes=(torch.int32, torch.int64))
    if indices.device != q.device:
        raise ValueError(f"indices is on {indices.device} but q is on {q.device}")
    batch, _, seq_q, _ = q.shape
    if tuple(indices.shape[:2]) != (batch, seq_q):
        raise ValueError(f"indices must start with [B={batch}, Sq={seq_q}], got shape {tuple(indices.shape)}")
    if indices.shape[2] not in (k.shape[1], 1):
        raise ValueError(f"indices dim 2 must be the number of KV heads ({k.shape[1]}) or 1, got {indices.shape[2]}")
    check_attn_sink(attn_sink, q.shape[1], q.device)


def _as_kernel_indices(indices, seq_len_kv: int):
    """int32 indices; int64 values are clamped first so that none wraps into the valid range."""
    if indices.dtype == torch.int64:
        indices = indices.clamp(-1, seq_len_kv)
    return indices.to(torch.int32)


def _check_unique(indices, seq_len_kv: int) -> None:
    valid = (indices >= 0) & (indices < seq_len_kv)
    ordered = torch.where(valid, indices.long(), -1 - torch.arange(indices.shape[-1], device=indices.device))
    ordered = ordered.sort(dim=-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("indices repeat a valid key position within a row (duplicates are not allowed)")


def _resolve(backend: str, q, k, v) -> str:
    fits = q.shape[-1] <= _MAX_KERNEL_HEAD_DIM and v.shape[-1] <= _MAX_KERNEL_VALUE_DIM
    limits = f"head dim <= {_MAX_KERNEL_HEAD_DIM} and value dim <= {_MAX_KERNEL_VALUE_DIM}"
    if q.dtype == torch.float32:
        fits = fits and max(q.shape[-1], v.shape[-1]) <= _MAX_FP32_KERNEL_DIM
        limits += f", and both <= {_MAX_FP32_KERNEL_DIM} in float32"
    return choose_backend(backend, q, fits, limits)


def _gathered_attention(q, k, v, indices, scale):
    """The PyTorch path: (out in q's dtype, lse in the working precision), differentiable, a chunk of query
    rows at a time; under autograd each chunk is recomputed in backward once what all of them would keep
    (their gathered keys and values, logits and probabilities) exceeds `gathered.SAVED_ELEMENTS`."""
    batch, num_q_heads, seq_q, _ = q.shape
    num_kv_heads, seq_kv = k.shape[1], k.shape[2]
    per_row = num_q_heads * indices.shape[-1] * (k.shape[-1] + v.shape[-1])
    step = max(1, _TORCH_CHUNK_ELEMENTS // max(per_row, 1))
    if seq_kv == 0:  # no key: one zero row to gather from keeps the shapes; every index stays invalid
        k, v = (torch.nn.functional.pad(t, (0, 0, 0, 1)) for t in (k, v))
    differentiable = records_gradients(q, k, v)
    # Widened before the gathers: their backward then sums every row's dK/dV in the working precision (a
    # gather of 16-bit rows summed its scatter in 16 bits).
    compute = reference.working_dtype(q.dtype)
    k, v = k.to(compute), v.to(compute)
    kept = batch * seq_q * indices.shape[-1] * (num_kv_heads * (k.shape[-1] + v.shape[-1]) + 2 * num_q_heads)
    run = chunk_runner(differentiable, kept)
    outs, lses = [], []
    for lo in range(0, seq_q, step):
        out, lse = run(_gathered_chunk, q[:, :, lo : lo + step], k, v, indices[:, lo : lo + step], seq_kv, scale)
        outs.append(out)
        lses.append(lse)
    if not outs:
        return unattended(q, k, v), q.new_zeros(batch, num_q_heads, 0).float()
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


def _gathered_chunk(queries, k, v, indices, seq_kv: int, scale):
    """(out [B, Hq, c, Dv], lse [B, Hq, c]) in the working precision for a chunk of query rows."""
    batch, num_q_heads = queries.shape[:2]
    num_kv_heads = k.shape[1]
    compute = k.dtype
    batch_ids = torch.arange(batch, device=queries.device)[:, None, None, None]
    head_ids = torch.arange(num_kv_heads, device=queries.device)[None, None, :, None]
    idx = indices.expand(-1, -1, num_kv_heads, -1).long()  # [B, c, Hkv, K]
    valid = (idx >= 0) & (idx < seq_kv)
    rows = idx.clamp(0, max(seq_kv - 1, 0))
    keys = k[batch_ids, head_ids, rows]  # [B, c, Hkv, K, D]
    values = v[batch_ids, head_ids, rows]
    queries = queries.to(compute).unflatten(1, (num_kv_heads, num_q_heads // num_kv_heads))
    queries = queries.permute(0, 3, 1, 2, 4)  # [B, c, Hkv, g, D]
    logits = torch.einsum("bchgd,bchkd->bchgk", queries, keys) * scale
    probs, lse = reference.masked_softmax(logits, valid[:, :, :, None, :])
    out = torch.einsum("bchgk,bchkd->bchgd", probs, values)
    return out.flatten(2, 3).permute(0, 2, 1, 3), lse.flatten(2, 3).permute(0, 2, 1)


def _reference_attention(q, k, v, indices, scale):
    oracle = reference.token_sparse_attention_reference
    return reference.at_working_precision(oracle, q, k, v, indices, causal=False, softmax_scale=scale)


def token_sparse_attn(
    q, k, v, indices, *, softmax_scale=None, attn_sink=None, return_lse=False, backend="auto", check_indices=False
):
    """Attention of q (B, Hq, Sq, D) over the rows of k (B, Hkv, Skv, D) and v (B, Hkv, Skv, Dv) that
    indices int [B, Sq, G, K] name per query row (G = Hkv: per KV head; G = 1: shared by all heads).

    Differentiable in q, k, v (and attn_sink). Returns the output (B, Hq, Sq, Dv) in q's dtype, and with
    `return_lse` also the fp32 natural-log LSE (B, Hq, Sq) of the attended logits (before the sink).
    """
    _check_inputs(q, k, v, indices, attn_sink)
    _check_flags(return_lse=return_lse, check_indices=check_indices)
    scale = _default_scale(softmax_scale, q.shape[-1])
    resolved = _resolve(backend, q, k, v)
    if check_indices:
        _check_unique(indices, k.shape[2])
    if resolved == "triton":
        from .kernels.token_sparse_attn import token_sparse_attn_fwd

        out, lse = token_sparse_attn_fwd(q, k, v, _as_kernel_indices(indices, k.shape[2]), scale)
    elif resolved == "torch":
        out, lse = _gathered_attention(q, k, v, indices, scale)
    else:
        out, lse = _reference_attention(q, k, v, indices, scale)
    return attention_result(out, lse, attn_sink, return_lse)


def sparse_mla(q, kv, indices, sm_scale, d_v=512, attn_sink=None, *, backend="auto", check_indices=False):
    """FlashMLA's sparse MLA prefill (`flash_mla_sparse_fwd`), differentiable: (out, lse).

    q (s_q, h_q, d_qk), kv (s_kv, h_kv, d_qk) with V the first `d_v` dims of kv, indices int (s_q, h_kv,
    topk); a leading batch axis on all three is accepted. `sm_scale` is the model's softmax scale (for
    DeepSeek's MLA, 192^-1/2 times the YaRN factor, not d_qk^-1/2). Returns out (..., s_q, h_q, d_v) in q's
    dtype and the fp32 natural-log lse (..., s_q, h_q); rows without a valid index give 0 and -inf.
    A valid index may appear once per row; `check_indices=True` checks that (a sort per row).
    """
    if sm_scale is None:  # token_sparse_attn would take d_qk^-1/2, which is wrong for MLA
        raise TypeError("sm_scale is required: MLA's softmax scale is the model's (192^-1/2 times YaRN's factor)")
    _default_scale(sm_scale, 1, "sm_scale")
    batched = isinstance(q, torch.Tensor) and q.dim() == 4
    for name, t in (("q", q), ("kv", kv), ("indices", indices)):
        _check_tensor(t, name, dim=4 if batched else 3)
    d_v = _check_int(d_v, "d_v", 1)
    if d_v > kv.shape[-1]:
        raise ValueError(f"d_v={d_v} exceeds the kv head dim {kv.shape[-1]}")
    if q.shape[-1] != kv.shape[-1]:
        raise ValueError(f"q and kv must share d_qk, got {q.shape[-1]} and {kv.shape[-1]}")
    if not batched:
        q, kv, indices = q[None], kv[None], indices[None]
    keys = kv.transpose(1, 2)
    out, lse = token_sparse_attn(
        q.transpose(1, 2),
        keys,
        keys[..., :d_v],
        indices,
        softmax_scale=sm_scale,
        attn_sink=attn_sink,
        return_lse=True,
        backend=backend,
        check_indices=check_indices,
    )
    out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    return (out, lse) if batched else (out[0], lse[0])
