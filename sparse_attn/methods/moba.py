"""MoBA (Mixture of Block Attention, Lu et al. 2025): block routing and the optional key short convolution.

Routing. For query head h at absolute position t (bottom-right aligned: row r of Sq query rows
against Skv keys sits at t = r + Skv - Sq), with block means kbar[i] of its KV head's keys
(h // (Hq / Hkv), fp32; fp64 for fp64 input) and scores s[i] = q_t . kbar[i] (no scale; fp32 in the
native ops, fp64 in the PyTorch fallback):

* causal: the current block t // block_size is always selected, plus the top topk - 1 scores
  among the blocks entirely in the past ((i + 1) * block_size <= t); a row with fewer such blocks
  takes all of them. The current block's mean, which covers future keys, is never used;
* non-causal: the top topk scores over all blocks (a ragged last block is averaged over its real
  length).

Ties go to the lower block index; NaN and -inf scores are never selected. Routing yields indices
only: no gradient flows through it. Packed sequences (`moba_route_varlen`) route each sequence as
one batch entry, all in one native call.

Attention (`moba_attn`; packed sequences through `moba_attn_varlen`, MoonshotAI's signature, and
`moba_attn_varlen_qk` with separate query and key sequences): each query attends, with the
token-level causal mask, to the keys of the blocks it selected. The Triton path is FlashMoBA's
gather-and-densify (`sparse_attn/kernels/moba_attn.py`): the rows that chose a block are gathered
into dense tiles, so its work follows the routed pairs, not the union of neighbouring rows' routes.
Where Triton does not run, `sparse_attn.routed_torch` does the same gather-and-densify in PyTorch ops.

MoBA is trained with: patching a checkpoint trained dense degrades it (repetitive text, upstream
issues #35 and #12) until it is further trained with MoBA, as the MoBA report does.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import reference, routed_torch
from .._native import HAS_NATIVE, _has_kernel
from ..selection import (
    _FLOAT_TYPES,
    _ascending_padded,
    _check_bool,
    _check_flags,
    _check_int,
    _check_tensor,
    block_mean_pool,
    topk_rows,
)
from ..sinks import attention_result, check_attn_sink, with_attn_sink

__all__ = [
    "KeyShortConv",
    "MoBABlockMeans",
    "moba_attention_reference",
    "moba_attn",
    "moba_attn_varlen",
    "moba_attn_varlen_qk",
    "moba_decode",
    "moba_route",
    "moba_route_reference",
    "moba_route_varlen",
    "moba_route_varlen_reference",
]


# ---------------------------------------------------------------------------------- routing
def check_options(*, block_size, topk) -> None:
    """MoBA's scalar options, checked before any tensor is seen (the HF patcher checks at patch time)."""
    _check_int(block_size, "block_size", 1)
    _check_int(topk, "topk", 1)


# The CUDA router keeps each row's top-k list in shared memory (kMaxMobaRankedBlocks in
# csrc/cuda/moba_route_kernels.h); the CPU router and the reference have no such limit.
CUDA_MAX_RANKED_BLOCKS = 64


def _check_cuda_route_limit(device, num_blocks, topk, causal) -> None:
    """A CUDA routing that would rank more than CUDA_MAX_RANKED_BLOCKS blocks per row raises here,
    before the op (the op checks too). `num_blocks`: an int, or a callable giving it, called only
    when topk alone could exceed the limit (for packed sequences it reads the offsets back)."""
    ranked_at_most = topk - 1 if causal else topk
    if device.type != "cuda" or ranked_at_most <= CUDA_MAX_RANKED_BLOCKS:
        return
    num_blocks = num_blocks() if callable(num_blocks) else num_blocks
    # A causal row ranks only past blocks: all but its own (moba_ranked_blocks in the CUDA header).
    needed = min(ranked_at_most, max(num_blocks - 1, 0) if causal else num_blocks)
    if needed > CUDA_MAX_RANKED_BLOCKS:
        raise ValueError(
            f"topk={topk}: the CUDA MoBA router ranks at most {CUDA_MAX_RANKED_BLOCKS} blocks per row "
            f"(topk up to {CUDA_MAX_RANKED_BLOCKS + int(causal)} with {'causal' if causal else 'non-causal'} "
            f"routing), and these {num_blocks} KV blocks would need {needed}"
        )


def _check_route_args(q, k, block_size, topk, causal, packed=False) -> None:
    """Batched q (B, Hq, Sq, D), k (B, Hkv, Skv, D), or packed (total, H, D) when `packed`."""
    _check_tensor(q, "q", dim=3 if packed else 4, dtypes=_FLOAT_TYPES)
    _check_tensor(k, "k", dim=3 if packed else 4, dtypes=_FLOAT_TYPES)
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has {q.dtype}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"q batch {q.shape[0]} differs from k batch {k.shape[0]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q head dim {q.shape[-1]} differs from k head dim {k.shape[-1]}")
    q_heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"the number of q heads ({q_heads}) must be a multiple of the number of k heads ({kv_heads})")
    if not packed and q.shape[2] > k.shape[2]:
        raise ValueError(f"q has more rows ({q.shape[2]}) than k ({k.shape[2]}); routing needs Sq <= Skv")
    check_options(block_size=block_size, topk=topk)
    _check_bool(causal, "causal")


def moba_route(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, causal: bool = True) -> torch.Tensor:
    """MoBA block routing: int32 [B, Hq, Sq, topk], each row's selected KV blocks ascending, then -1.

    q: (B, Hq, Sq, D); k: (B, Hkv, Skv, D) with Hq % Hkv == 0 and Sq <= Skv; float16, bfloat16,
    float32 or float64. block_size: any positive int; topk >= 1 counts the current block when causal.
    Rules in the module docstring. Runs the fused native op (C++ or CUDA; the CUDA kernel ranks
    at most 64 blocks per row) when built, else :func:`moba_route_reference`.
    """
    _check_route_args(q, k, block_size, topk, causal)
    _check_cuda_route_limit(q.device, -(-k.shape[2] // block_size), topk, causal)
    if _has_kernel("moba_route", "CUDA" if q.device.type == "cuda" else "CPU"):
        return torch.ops.sparse_attn.moba_route(q, k, block_size, topk, causal)
    return moba_route_reference(q, k, block_size=block_size, topk=topk, causal=causal)


def moba_route_reference(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, causal: bool = True
) -> torch.Tensor:
    """The oracle of :func:`moba_route`, literally from the definition; materialises all [B, Hq, Sq, blocks] scores."""
    means = reference.block_mean_pool_reference(k, block_size)  # fp32 (fp64) [B, Hkv, N, D]
    return _route_from_means(q, means, k.shape[2], block_size, topk, causal, reference.topk_rows_reference)


def moba_route_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, *, block_size, topk, causal=True):
    """MoBA routing of packed sequences: int32 [num_seqs, Hq, max_seqlen_q, topk].

    q (total_q, Hq, D), k (total_k, Hkv, D); `cu_seqlens_q` / `cu_seqlens_k` (int32 [num_seqs + 1],
    on q's device) delimit each sequence's queries and keys (Lq <= Lk). Sequence s is routed as
    :func:`moba_route` routes one batch entry: queries bottom-right aligned to its keys, blocks
    restarting at its first key, indices relative to it. Rows past a sequence's Lq are -1. One
    fused native op (C++ or CUDA) for all sequences when built, else
    :func:`moba_route_varlen_reference`.
    """
    _check_route_args(q, k, block_size, topk, causal, packed=True)
    _check_int(max_seqlen_q, "max_seqlen_q", 0)
    _check_packed_sequences(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, k.shape[0])
    return _route_packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_size, topk, causal)


_QK_NAMES = ("cu_seqlens_q", "cu_seqlens_k")


def _check_packed_sequences(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, names=_QK_NAMES) -> None:
    """The offsets of packed q (total_q, ..) and k (total_k, ..): valid, as many of each, Lq <= Lk.
    `names`: the caller's names of the two offsets (their max_seqlen's follow), for the errors."""
    from .. import engine

    name_q, name_k = names
    num_seqs = engine._check_cu_seqlens(cu_seqlens_q, name_q, q.shape[0], max_seqlen_q, q.device)
    if engine._check_cu_seqlens(cu_seqlens_k, name_k, k.shape[0], max_seqlen_k, q.device) != num_seqs:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    longer = (cu_seqlens_q.diff() > cu_seqlens_k.diff()).nonzero()
    if longer.numel():
        raise ValueError(f"sequence {int(longer[0])} has more queries than keys; MoBA routing needs Lq <= Lk")


def _route_packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_size, topk, causal):
    """:func:`moba_route_varlen` on arguments already checked."""
    _check_cuda_route_limit(q.device, lambda: -(-int(cu_seqlens_k.diff().max()) // block_size), topk, causal)
    cu_q, cu_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
    if _has_kernel("moba_route_varlen", "CUDA" if q.device.type == "cuda" else "CPU"):
        return torch.ops.sparse_attn.moba_route_varlen(q, k, cu_q, cu_k, max_seqlen_q, block_size, topk, causal)
    return moba_route_varlen_reference(q, k, cu_q, cu_k, max_seqlen_q, block_size=block_size, topk=topk, causal=causal)


def moba_route_varlen_reference(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, *, block_size, topk, causal=True):
    """The oracle of :func:`moba_route_varlen`: :func:`moba_route_reference` on each sequence."""
    num_seqs = cu_seqlens_q.numel() - 1
    routes = torch.full((num_seqs, q.shape[1], max_seqlen_q, topk), -1, dtype=torch.int32, device=q.device)
    for i, (q_span, k_span) in enumerate(zip(_pairs(cu_seqlens_q), _pairs(cu_seqlens_k))):
        seq_q, seq_k = _sequence(q, q_span), _sequence(k, k_span)
        routes[i, :, : q_span[1] - q_span[0]] = moba_route_reference(
            seq_q, seq_k, block_size=block_size, topk=topk, causal=causal
        )[0]
    return routes


@reference.eager_under_compile  # its block arithmetic on `arange` is what Inductor's CPU code gets wrong
def _route_from_means(q, means, kv_len, block_size, topk, causal, rank_rows):
    """Routing of q (B, Hq, Sq, D) from block means [B, Hkv, N, D]; `rank_rows(scores [R, N], k)` is a top-k
    with the package's tie rule. Causal routing needs only the complete blocks' means (N >= (kv_len - 1) // C)."""
    batch, q_heads, q_len, dim = q.shape
    kv_heads, num_blocks = means.shape[1], means.shape[2]
    if batch * q_heads * q_len == 0:
        return torch.full((batch, q_heads, q_len, topk), -1, dtype=torch.int32, device=q.device)
    # GQA without copies: the query heads of one KV head share its block means. In float64: a matmul
    # sums in an order that depends on its row count, and in fp32 that can flip a near-tie between a
    # prefill (Sq rows) and a decode step (one row) routed here without the native op.
    grouped = q.reshape(batch, kv_heads, q_heads // kv_heads * q_len, dim).double()
    scores = (grouped @ means.double().transpose(-1, -2)).view(batch, q_heads, q_len, num_blocks)
    rows = batch * q_heads * q_len  # not -1: a cache shorter than one block has no complete block (N = 0)
    if not causal:
        return _ascending_padded(rank_rows(scores.reshape(rows, num_blocks), topk)).view(batch, q_heads, q_len, topk)

    position = torch.arange(q_len, device=q.device) + (kv_len - q_len)
    current = position // block_size
    block = torch.arange(num_blocks, device=q.device)
    in_past = (block[None, :] + 1) * block_size <= position[:, None]  # [Sq, N]
    scores = scores.masked_fill(~in_past, float("-inf"))  # top-k never selects -inf
    ranked = rank_rows(scores.reshape(rows, num_blocks), topk - 1)
    current_column = current.to(torch.int32).expand(batch, q_heads, q_len).reshape(-1, 1)
    selected = torch.cat([ranked, current_column], dim=1)
    return _ascending_padded(selected).view(batch, q_heads, q_len, topk)


def _route_with_means(q, means, kv_len, block_size, topk):
    """Causal routing of q (B, Hq, Sq, D) from block means, exactly as `moba_route` routes the same rows:
    the native op scores the means with the fused router's own arithmetic (a matmul would follow the
    matmul precision setting and sum in another order, so near-ties could go the other way)."""
    _check_cuda_route_limit(q.device, -(-kv_len // block_size), topk, True)
    if _has_kernel("moba_route_means", "CUDA" if q.device.type == "cuda" else "CPU"):
        return torch.ops.sparse_attn.moba_route_means(q, means, kv_len, block_size, topk, True)
    return _route_from_means(q, means, kv_len, block_size, topk, True, topk_rows)


def _routable(topk: int, seq_len_kv: int, block_size: int) -> int:
    """topk (checked) capped at the number of KV blocks: no row selects more, so the internal routes need no
    wider -1 padding (a topk far above the blocks, set to make short inputs dense, would size them)."""
    check_options(block_size=block_size, topk=topk)
    return max(1, min(topk, -(-seq_len_kv // block_size)))


def moba_attn(
    q, k, v, *, block_size, topk, causal=True, softmax_scale=None, attn_sink=None, return_lse=False, backend="auto"
):
    """MoBA attention: q (B, Hq, S, D), k and v (B, Hkv, S, D) (Sq <= Skv: bottom-right aligned).

    Routes with :func:`moba_route` (no gradient through routing), then attends to the routed
    blocks; differentiable in q, k and v. When topk * block_size covers every block, the result is
    dense causal attention. `attn_sink`, `return_lse` and `backend` ('auto', 'triton', 'torch' or
    'reference') as in `block_sparse_attn`; the sink does not take part in routing.
    """
    from .. import engine

    engine._check_qkv(q, k, v, packed=False)
    check_attn_sink(attn_sink, q.shape[1], q.device)
    _check_flags(return_lse=return_lse)
    routes = moba_route(
        q.detach(), k.detach(), block_size=block_size, topk=_routable(topk, k.shape[2], block_size), causal=causal
    )
    scale = engine._default_scale(softmax_scale, q.shape[-1])
    out, lse = _attend_routes(q, k, v, routes, block_size, causal, scale, backend)
    return attention_result(out, lse, attn_sink, return_lse)


def _attend_routes(q, k, v, routes, block_size, causal, scale, backend="auto"):
    """Each query over the blocks of its own routes [B, Hq, Sq, K]: (out in q's dtype, fp32 LSE)."""
    from .. import engine

    resolved = engine._resolve_backend(backend, q, {"block_size": block_size})
    if resolved != "triton":
        return _pytorch_path(resolved)(q, k, v, routes, block_size, causal, scale)
    from .._moba_ops import routed_attention

    return routed_attention(q, k, v, routes, block_size, causal, scale, k.shape[2])


def moba_attn_varlen(
    q,
    k,
    v,
    cu_seqlens,
    max_seqlen,
    moba_chunk_size,
    moba_topk,
    *,
    causal=True,
    softmax_scale=None,
    attn_sink=None,
    return_lse=False,
    backend="auto",
):
    """MoonshotAI's `moba_attn_varlen` signature: packed q (total, Hq, D), k and v (total, Hkv, D).

    `cu_seqlens` (int32 [num_seqs + 1]) and `max_seqlen` describe the sequences, shared by queries
    and keys; blocks of `moba_chunk_size` keys restart at every sequence start, and every query
    keeps `moba_topk` blocks (its own included). GQA is native. Returns the output (total, Hq, D)
    and, with `return_lse`, the fp32 LSE (Hq, total). Differentiable in q, k and v (and
    `attn_sink`, as in `block_sparse_attn`).
    """
    _check_int(max_seqlen, "max_seqlen", 0)
    packed = (cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, ("cu_seqlens", "cu_seqlens"))
    options = (moba_chunk_size, moba_topk, causal, softmax_scale, attn_sink, return_lse, backend)
    return _moba_varlen(q, k, v, *packed, *options)


def moba_attn_varlen_qk(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    moba_chunk_size,
    moba_topk,
    *,
    causal=True,
    softmax_scale=None,
    attn_sink=None,
    return_lse=False,
    backend="auto",
):
    """`moba_attn_varlen` with separate query and key sequences (FlashMoBA's `flash_moba_varlen_func`
    order): chunked prefill and decode, each sequence's queries bottom-right aligned to its keys."""
    packed = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, _QK_NAMES)
    options = (moba_chunk_size, moba_topk, causal, softmax_scale, attn_sink, return_lse, backend)
    return _moba_varlen(q, k, v, *packed, *options)


def _moba_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, names, moba_chunk_size, moba_topk, causal,
    softmax_scale, attn_sink, return_lse, backend,
):  # fmt: skip
    from .. import engine

    engine._check_qkv(q, k, v, packed=True)
    _check_int(moba_chunk_size, "moba_chunk_size", 1)
    _check_int(moba_topk, "moba_topk", 1)
    _check_route_args(q, k, moba_chunk_size, moba_topk, causal, packed=True)
    _check_packed_sequences(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, names)
    check_attn_sink(attn_sink, q.shape[1], q.device)
    _check_flags(return_lse=return_lse)
    scale = engine._default_scale(softmax_scale, q.shape[-1])
    topk = _routable(moba_topk, max_seqlen_k, moba_chunk_size)
    routes = _route_packed(
        q.detach(), k.detach(), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, moba_chunk_size, topk, causal
    )
    resolved = engine._resolve_backend(backend, q, {"moba_chunk_size": moba_chunk_size})
    if resolved != "triton":
        parts = [
            _pytorch_path(resolved)(
                _sequence(q, q_span),
                _sequence(k, k_span),
                _sequence(v, k_span),
                routes[i : i + 1, :, : q_span[1] - q_span[0]],
                moba_chunk_size,
                causal,
                scale,
            )  # fmt: skip
            for i, (q_span, k_span) in enumerate(zip(_pairs(cu_seqlens_q), _pairs(cu_seqlens_k)))
        ]
        out = torch.cat([o[0].transpose(0, 1) for o, _ in parts])
        lse = torch.cat([lse[0] for _, lse in parts], dim=1)
    else:
        from .._moba_ops import routed_attention

        out, lse = engine._packed_call(
            routed_attention, q, k, v, cu_seqlens_q, cu_seqlens_k, routes, moba_chunk_size, causal, scale, max_seqlen_k
        )
    return attention_result(out, lse, attn_sink, return_lse, packed=True)


def _pairs(cu_seqlens) -> list:
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _sequence(packed: torch.Tensor, span) -> torch.Tensor:
    """Rows span[0]:span[1] of a packed (total, H, D) tensor as one batch entry (1, H, L, D)."""
    return packed[span[0] : span[1]].transpose(0, 1)[None]


def _reference_in_dtype(q, k, v, routes, block_size, causal, scale):
    return reference.at_working_precision(
        moba_attention_reference, q, k, v, routes, block_size=block_size, causal=causal, softmax_scale=scale
    )


def _pytorch_path(backend: str):
    """`attention(q, k, v, routes, block_size, causal, scale)` of the 'torch' or 'reference' backend."""
    return _reference_in_dtype if backend == "reference" else routed_torch.routed_attention


@reference.eager_under_compile
def moba_attention_reference(
    q, k, v, routes, *, block_size, causal=True, softmax_scale=None, compute_dtype=torch.float64
):
    """Dense-mask oracle: each query attends to the keys of its routed blocks (int [B, Hq, Sq, K], -1 padded)."""
    num_blocks = -(-k.shape[2] // block_size)
    slots = torch.where(routes < 0, num_blocks, routes).long()
    chosen = torch.zeros(*routes.shape[:3], num_blocks + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, slots, True)
    allowed = chosen[..., torch.arange(k.shape[2], device=q.device) // block_size]  # each key's block
    if causal:
        allowed = allowed & reference.causal_token_mask(q.shape[2], k.shape[2], q.device)
    return reference.masked_attention(q, k, v, allowed, softmax_scale=softmax_scale, compute_dtype=compute_dtype)


# ---------------------------------------------------------------------------------- routed decode
class MoBABlockMeans:
    """The fp32 means of the complete key blocks of a growing KV cache, each block pooled once.

    `update(k)` takes the whole cache k (B, Hkv, Skv, D), pools only the blocks completed since the
    previous call (with :func:`block_mean_pool`, as routing does) and returns the means
    [B, Hkv, Skv // block_size, D]. The partial last block is never needed: in causal routing it is
    only ever the current block. A cache that shrank or changed shape, device or dtype starts over; a cache whose
    rows were reordered (beam search) or rewritten needs `reset()`.
    """

    def __init__(self, block_size: int):
        self.block_size = _check_int(block_size, "block_size", 1)
        self.means = None
        self._key_dtype = None  # the means are fp32 for every 16/32-bit cache: the keys' own dtype tells them apart

    def reset(self) -> None:
        self.means = None

    def update(self, k: torch.Tensor) -> torch.Tensor:
        _check_tensor(k, "k", dim=4, dtypes=_FLOAT_TYPES)
        size = self.block_size
        complete = k.shape[2] // size
        means = self.means
        stale = means is None or (means.device, self._key_dtype) != (k.device, k.dtype) or means.shape[2] > complete
        if stale or (means.shape[0], means.shape[1], means.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
            means = block_mean_pool(k[:, :, : complete * size], size)
        elif means.shape[2] < complete:
            fresh = block_mean_pool(k[:, :, means.shape[2] * size : complete * size], size)
            means = torch.cat([means, fresh], dim=2)
        self.means, self._key_dtype = means, k.dtype
        return means


def routed_decode_layout(routes: torch.Tensor, block_size: int, seq_len_kv: int):
    """The BlockSparseLayout of one decode query's routes int32 [B, Hq, 1, topk] (-1 padded), per query head."""
    from ..layout import BlockSparseLayout

    return BlockSparseLayout.from_kv_blocks(
        (routes >= 0).sum(dim=-1, dtype=torch.int32),
        routes,
        q_block_size=1,
        kv_block_size=block_size,
        seq_len_q=1,
        seq_len_kv=seq_len_kv,
        validate=False,  # routes are ascending, in range, -1 last: the checks would only sync the GPU
    )


def moba_decode(q, k, v, *, block_size, topk, block_means=None, softmax_scale=None, attn_sink=None):
    """Routed MoBA decode: q (B, Hq, Sq <= 16, D), the newest queries, against the cache k, v (B, Hkv, Skv, D).

    Causal, bottom-right aligned: each query routes exactly as row t of a full prefill would (the
    current block plus the top topk - 1 complete past blocks by q . block mean), then attends to
    those blocks. `block_means`, a :class:`MoBABlockMeans` that follows this cache, saves pooling
    the whole cache every step. One query per sequence runs the split-KV decode kernel; more, or
    inputs it cannot take (gradients, dtypes), run the engine. `attn_sink` as in `moba_attn`.
    Returns (B, Hq, Sq, D).
    """
    from .. import engine
    from ..decode import MAX_DECODE_QUERIES, block_sparse_decode, decode_kernel_accepts

    engine._check_qkv(q, k, v, packed=False)
    _check_route_args(q, k, block_size, topk, True)
    check_attn_sink(attn_sink, q.shape[1], q.device)
    if q.shape[2] > MAX_DECODE_QUERIES:
        raise ValueError(f"moba_decode takes at most {MAX_DECODE_QUERIES} queries, got Sq={q.shape[2]}; use moba_attn")
    if block_means is None:
        block_means = MoBABlockMeans(block_size)  # a one-step cache: pools every complete block now
    elif not isinstance(block_means, MoBABlockMeans) or block_means.block_size != block_size:
        raise ValueError(f"block_means must be a MoBABlockMeans with block_size={block_size}")
    means = block_means.update(k.detach())
    routes = _route_with_means(q.detach(), means, k.shape[2], block_size, _routable(topk, k.shape[2], block_size))
    scale = engine._default_scale(softmax_scale, q.shape[-1])
    if q.shape[2] == 1 and decode_kernel_accepts(q, k, v):
        layout = routed_decode_layout(routes, block_size, k.shape[2])
        return block_sparse_decode(q, k, v, layout, softmax_scale=scale, attn_sink=attn_sink)
    return with_attn_sink(*_attend_routes(q, k, v, routes, block_size, True, scale), attn_sink)


def _register_fake() -> None:
    @torch.library.register_fake("sparse_attn::moba_route")
    def _(q, k, block_size, topk, causal):
        return q.new_empty((*q.shape[:3], topk), dtype=torch.int32)

    @torch.library.register_fake("sparse_attn::moba_route_means")
    def _(q, block_means, kv_len, block_size, topk, causal):
        return q.new_empty((*q.shape[:3], topk), dtype=torch.int32)

    @torch.library.register_fake("sparse_attn::moba_route_varlen")
    def _(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_size, topk, causal):
        return q.new_empty((cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q, topk), dtype=torch.int32)


if HAS_NATIVE and (_has_kernel("moba_route", "CPU") or _has_kernel("moba_route", "CUDA")):
    _register_fake()


# ---------------------------------------------------------------------------------- key convolution
class KeyShortConv(nn.Module):
    """Causal depthwise convolution of keys over tokens: MoBA's optional key convolution ("kconv3"/"kconv5").

    y_t[c] = sum_{j < width} weight[c, j] * x_{t - width + 1 + j}[c], zero left padding: a key mixes
    with the width - 1 keys before it, never a later one. Apply it to the key projection before
    RoPE, so routing and attention both see the convolved keys.

    Channels: `channels == H * D` gives each (head, dim) of the keys its own filter (the channels of
    a [.., Hkv * D] key projection); `channels == D` shares one filter per dim across heads.
    Options (their published form is unknown; they cover fla's ShortConvolution): `bias`,
    `activation` None or "silu", and `residual` (y = x + f(x)).

    Initialisation makes insertion a no-op whenever possible: the last tap is 1 (identity) without
    `residual`; with `residual` every tap is 0, so y = x + act(0) = x.

    Input: keys (B, H, S, D), optionally with `state`, the last width - 1 keys before them
    (B, H, width - 1, D) for decoding (see :meth:`next_state`); or packed keys (total, H, D) with
    `cu_seqlens`, where the convolution restarts at every sequence start.
    """

    def __init__(
        self,
        channels: int,
        width: int = 3,
        *,
        bias: bool = False,
        activation: str | None = None,
        residual: bool = False,
    ):
        super().__init__()
        _check_int(channels, "channels", 1)
        if _check_int(width, "width", 1) not in (3, 5):
            raise ValueError(f"width must be 3 or 5, got {width!r}")
        if activation not in (None, "silu"):
            raise ValueError(f"activation must be None or 'silu', got {activation!r}")
        _check_bool(bias, "bias")
        self.channels, self.width, self.activation = channels, int(width), activation
        self.residual = _check_bool(residual, "residual")
        self.weight = nn.Parameter(torch.zeros(channels, width))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            if not self.residual:
                self.weight[:, -1] = 1.0
            if self.bias is not None:
                self.bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, width={self.width}, bias={self.bias is not None}, "
            f"activation={self.activation}, residual={self.residual}"
        )

    def forward(self, k: torch.Tensor, state: torch.Tensor | None = None, *, cu_seqlens=None) -> torch.Tensor:
        if cu_seqlens is not None:
            if state is not None:
                raise ValueError("state and cu_seqlens cannot be combined")
            return self._forward_packed(k, cu_seqlens)
        _check_tensor(k, "k", dim=4, dtypes=_FLOAT_TYPES)
        history = self._history(k, state)
        seq_len = k.shape[2]
        taps = self._taps(k, head_axis=1)
        mixed = sum(taps[j] * history[:, :, j : j + seq_len] for j in range(self.width))
        return self._finish(k, mixed, taps_shape=taps[0].shape)

    def next_state(self, k: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """The last width - 1 keys (B, H, width - 1, D) after `k`, zero-padded: the `state` of the next call."""
        _check_tensor(k, "k", dim=4, dtypes=_FLOAT_TYPES)
        return self._history(k, state)[:, :, -(self.width - 1) :]

    def _history(self, k: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """The keys preceded by the width - 1 earlier ones (zeros at a sequence start)."""
        b, h, _, d = k.shape
        if state is None:
            state = k.new_zeros(b, h, self.width - 1, d)
        else:
            _check_tensor(state, "state", dim=4, dtypes=_FLOAT_TYPES)
            if state.shape != (b, h, self.width - 1, d) or state.device != k.device:
                raise ValueError(
                    f"state must have shape {(b, h, self.width - 1, d)} on {k.device}, got {tuple(state.shape)} "
                    f"on {state.device}"
                )
        return torch.cat([state.to(k.dtype), k], dim=2)

    def _forward_packed(self, k: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        _check_tensor(k, "k", dim=3, dtypes=_FLOAT_TYPES)
        _check_tensor(cu_seqlens, "cu_seqlens", dim=1, dtypes=(torch.int32, torch.int64))
        total = k.shape[0]
        if cu_seqlens.numel() < 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
            raise ValueError(f"cu_seqlens must start at 0 and end at the number of tokens ({total})")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
        token = torch.arange(total, device=k.device)
        starts = cu_seqlens.to(device=k.device, dtype=torch.int64)
        # Position of each token within its sequence: a tap reaching before it reads zero.
        sequence = torch.searchsorted(starts[1:], token, right=True)
        position = token - starts[sequence]
        taps = self._taps(k, head_axis=1)
        mixed = torch.zeros_like(k)
        for j in range(self.width):
            shift = self.width - 1 - j
            shifted = nn.functional.pad(k, (0, 0, 0, 0, shift, 0))[:total]
            mixed = mixed + taps[j] * shifted.masked_fill((position < shift)[:, None, None], 0)
        return self._finish(k, mixed, taps_shape=taps[0].shape)

    def _taps(self, k: torch.Tensor, head_axis: int) -> list[torch.Tensor]:
        """Per tap, the weights shaped to broadcast over k ([H, 1, D] or [1, 1, D] for (B, H, S, D) keys)."""
        heads, dim = k.shape[head_axis], k.shape[-1]
        if self.channels not in (heads * dim, dim):
            raise ValueError(f"k has {heads} heads of dim {dim}; channels={self.channels} must be H * D or D")
        shape = [1] * (k.dim() - head_axis)
        shape[0], shape[-1] = (heads if self.channels == heads * dim else 1), dim
        weight = self.weight.to(k.dtype)
        return [weight[:, j].reshape(shape) for j in range(self.width)]

    def _finish(self, k: torch.Tensor, mixed: torch.Tensor, taps_shape) -> torch.Tensor:
        if self.bias is not None:
            mixed = mixed + self.bias.to(k.dtype).reshape(taps_shape)
        if self.activation == "silu":
            mixed = nn.functional.silu(mixed)
        return k + mixed if self.residual else mixed
