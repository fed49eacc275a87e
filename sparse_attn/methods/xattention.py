"""XAttention (Xu et al., ICML 2025): antidiagonal block scores, threshold selection, block-sparse attention.

The algorithm and the package decisions are specified in shared/specs/xattention.md; in short:

1. `xattention_estimate` scores every B x B block (B = `block_size`) with the strided reshape of
   stride S: reshaped query row i is Q[iS+S-1], ..., Q[iS] concatenated, reshaped key column j is
   K[jS], ..., K[jS+S-1], so their product is the sum of the S logits on the antidiagonal of tile
   (i, j) of QK^T. A row softmax of those products / (sqrt(D) S) is summed over (B/S) x (B/S)
   tiles: a full query-block row of the scores A sums to B/S.
2. `xattention_select` keeps, per (batch, head, query block), the sink and diagonal blocks, then the
   highest-scoring blocks until the kept mass reaches tau times the row's mass
   (`sparse_attn.selection.threshold_select`).
3. `xattention_attn` runs the shared block-sparse engine on the selected blocks.

Conventions: q (B, Hq, Sq, D), k and v (B, Hkv, Skv, D) with native GQA (Hq % Hkv == 0) and
Sq <= Skv in causal mode, bottom-right aligned: query r sits at key position r + Skv - Sq, and
reshaped key column j is allowed for reshaped query row i iff jS <= iS + Skv - Sq. Query blocks are
anchored at query 0, key blocks at key 0. Lengths need not be multiples of S or B: missing positions
are zero-padded, reshaped key columns past the keys are masked, reshaped query rows past the queries
contribute zero (the last query-block row of A sums to its number of real reshaped rows).

Against upstream's code: its `find_blocks_chunked` lets the diagonal's `eye` overwrite the forced
sink in the first query chunk (where the chunk starts at key block 0), and its prefix then skips
two forced entries that are one, so there it keeps the block that crosses tau plus the next. This
package applies the spec's rule in every chunk, so at a given tau its selection is a subset of
upstream's (measured: 146 against 166 kept blocks at tau = 0.8, Lq = Lk = 96, B = 16, S = 8) and a
tau calibrated with upstream's code is conservative here. The kept mass is measured against the
row's whole mass and the kept set then intersected with causal validity (spec section 2, step 4).

`calibrate_xattention` implements the repository's per-head threshold calibration (spec section 4)
and `save_thresholds` / `load_thresholds` store its [layers, Hq] table as JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from ..engine import _check_qkv, block_sparse_attn
from ..layout import BlockSparseLayout, causal_block_mask, selectable_blocks
from ..reference import working_dtype
from ..selection import _check_flags, _check_int, _kept_in_order, block_score_lengths, threshold_select
from ..sinks import check_attn_sink
from .scoring import block_scores_kernel_runs, check_scored_qk

__all__ = [
    "calibrate_xattention",
    "default_chunk_size",
    "load_thresholds",
    "save_thresholds",
    "xattention_attn",
    "xattention_estimate",
    "xattention_estimate_reference",
    "xattention_select",
]

_THRESHOLD_FORMAT = "sparse_attn.xattention.thresholds"
_THRESHOLD_VERSION = 1


# ---------------------------------------------------------------------------------- validation
def _check_stride(stride, block_size) -> None:
    block_size = _check_int(block_size, "block_size", 1)
    stride = _check_int(stride, "stride", 1)
    if block_size % stride:
        raise ValueError(f"stride={stride} must divide block_size={block_size}")


def check_options(*, stride, block_size, chunk_size=None) -> None:
    """XAttention's scalar options, checked before any tensor is seen (the HF patcher checks at patch time)."""
    _check_stride(stride, block_size)
    if chunk_size is not None:
        _resolve_chunk_size(chunk_size, block_size, 0)


def _check_qk(q, k, causal: bool) -> None:
    check_scored_qk(q, k, causal, "XAttention")


def default_chunk_size(seq_len_kv: int, block_size: int = 128) -> int:
    """Upstream's query chunk: with P = next_pow2(Skv), max(2048, min(max(2048, P), 2^28 / P)).

    That is max(2048, P) up to 16K keys, 8192 at 32K, 4096 at 64K and 2048 from 128K; rounded up
    to a multiple of `block_size` so that chunks hold whole query blocks.
    """
    p = 1 << max(seq_len_kv - 1, 0).bit_length()
    chunk = max(2048, min(max(2048, p), (1 << 28) // p))
    return -(-chunk // block_size) * block_size


def _resolve_chunk_size(chunk_size, block_size: int, seq_len_kv: int) -> int:
    if chunk_size is None:
        return default_chunk_size(seq_len_kv, block_size)
    chunk_size = _check_int(chunk_size, "chunk_size", 1)
    if chunk_size % block_size:
        raise ValueError(f"chunk_size={chunk_size} must be a multiple of block_size={block_size}")
    return chunk_size


def _threshold_per_head(threshold, num_heads: int, layer_idx, device) -> torch.Tensor:
    """float64 [num_heads] from a float, a [Hq] tensor or a [layers, Hq] table (row `layer_idx`)."""
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        tau = torch.full((num_heads,), float(threshold), dtype=torch.float64, device=device)
    elif isinstance(threshold, torch.Tensor) and threshold.dtype != torch.bool and not threshold.is_complex():
        tau = threshold.detach().to(device=device, dtype=torch.float64)
        if tau.dim() == 2:
            if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < tau.shape[0]:
                raise ValueError(
                    f"a [layers, Hq] threshold table is read by layer: it needs layer_idx in [0, {tau.shape[0]}), "
                    f"got {layer_idx!r}"
                )
            tau = tau[layer_idx]
        if tau.dim() == 0:
            tau = tau.expand(num_heads)
        if tau.shape != (num_heads,):
            raise ValueError(
                f"threshold must be a float, a [Hq={num_heads}] tensor or a [layers, Hq={num_heads}] table, "
                f"got shape {tuple(threshold.shape)}"
            )
    else:
        raise ValueError(
            "threshold must be a float in [0, 1], a [Hq] tensor or a [layers, Hq] table, "
            f"got {type(threshold).__name__}"
        )
    if bool(((tau < 0) | (tau > 1) | torch.isnan(tau)).any()):
        raise ValueError(f"threshold values must lie in [0, 1], got {threshold!r}")
    return tau


# ---------------------------------------------------------------------------------- estimation
def xattention_estimate_reference(q, k, *, stride, block_size, causal=True):
    """Float64 oracle of spec section 1, built literally from the reshape (no chunking, K repeated for GQA).

    Returns float64 A [B, Hq, ceil(Sq/B), ceil(Skv/B)].
    """
    _check_stride(stride, block_size)
    _check_qk(q, k, causal)
    seq_q, seq_kv, dim = q.shape[2], k.shape[2], q.shape[3]
    rows, cols = -(-seq_q // stride), -(-seq_kv // stride)
    q64 = F.pad(q.double(), (0, 0, 0, rows * stride - seq_q))
    k64 = F.pad(k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1), (0, 0, 0, cols * stride - seq_kv))
    q_reshaped = torch.cat([q64[:, :, stride - 1 - t :: stride] for t in range(stride)], dim=-1)
    k_reshaped = torch.cat([k64[:, :, t::stride] for t in range(stride)], dim=-1)
    logits = q_reshaped @ k_reshaped.transpose(-1, -2) / (math.sqrt(dim) * stride)
    if causal:
        row_pos = torch.arange(rows, device=q.device)[:, None] * stride + (seq_kv - seq_q)
        logits = logits.masked_fill(torch.arange(cols, device=q.device)[None, :] * stride > row_pos, float("-inf"))
    return _tile_sums(logits.softmax(dim=-1), block_size // stride, -(-seq_q // block_size), -(-seq_kv // block_size))


def _tile_sums(probs, per_block: int, num_q_blocks: int, num_kv_blocks: int):
    """Sum [..., rows, cols] over per_block x per_block tiles; missing rows and columns count as zeros."""
    rows, cols = probs.shape[-2:]
    padded = F.pad(probs, (0, num_kv_blocks * per_block - cols, 0, num_q_blocks * per_block - rows))
    tiles = padded.view(*probs.shape[:-2], num_q_blocks, per_block, num_kv_blocks, per_block)
    return tiles.sum(dim=(-3, -1))


def _estimate_chunked(q, k, stride: int, block_size: int, causal: bool, chunk_size: int):
    """The estimator in PyTorch (float32, float64 for float64 inputs), one query chunk of logits at a time."""
    work = working_dtype(q.dtype)
    batch, num_q_heads, seq_q, dim = q.shape
    num_kv_heads, seq_kv = k.shape[1], k.shape[2]
    group, per_block = num_q_heads // num_kv_heads, block_size // stride
    num_q_blocks, num_kv_blocks = -(-seq_q // block_size), -(-seq_kv // block_size)
    rows, cols = -(-seq_q // stride), -(-seq_kv // stride)
    # GQA by a group axis: every query head of a group multiplies the same (unrepeated) keys.
    k_reshaped = F.pad(k.to(work), (0, 0, 0, cols * stride - seq_kv)).reshape(batch, num_kv_heads, 1, cols, -1)
    q_padded = F.pad(q.to(work), (0, 0, 0, num_q_blocks * block_size - seq_q))
    q_reshaped = q_padded.reshape(batch, num_kv_heads, group, -1, stride, dim).flip(-2).flatten(-2)
    scale = 1.0 / (math.sqrt(dim) * stride)
    col_pos = torch.arange(cols, device=q.device) * stride
    chunk_rows = chunk_size // stride
    parts = []
    for row0 in range(0, num_q_blocks * per_block, chunk_rows):
        row_ids = torch.arange(row0, min(row0 + chunk_rows, num_q_blocks * per_block), device=q.device)
        logits = q_reshaped[..., row_ids, :] @ k_reshaped.transpose(-1, -2) * scale
        if causal:
            logits = logits.masked_fill(col_pos[None, :] > (row_ids * stride + seq_kv - seq_q)[:, None], float("-inf"))
        probs = logits.softmax(dim=-1) * (row_ids < rows).to(work)[:, None]
        parts.append(_tile_sums(probs, per_block, len(row_ids) // per_block, num_kv_blocks))
    scores = torch.cat(parts, dim=-2).reshape(batch, num_q_heads, num_q_blocks, num_kv_blocks)
    return scores if work == torch.float64 else scores.float()


def xattention_estimate(q, k, *, stride, block_size, causal=True, chunk_size=None):
    """fp32 antidiagonal block scores A [B, Hq, ceil(Sq/B), ceil(Skv/B)] of q (B, Hq, Sq, D), k (B, Hkv, Skv, D).

    Runs the fused Triton kernel where Triton runs (CUDA, or fp16/fp32 CPU tensors under
    TRITON_INTERPRET=1) and block_size / stride is a power of two; the kernel keeps no logits, so
    `chunk_size` only bounds the memory of the PyTorch path, which holds chunk/S x Skv/S logits at
    a time. The result does not depend on `chunk_size` (a multiple of `block_size`; default
    `default_chunk_size(Skv)`).
    float64 inputs are scored in float64 by the PyTorch path, and A is then float64.
    """
    _check_stride(stride, block_size)
    _check_qk(q, k, causal)
    chunk_size = _resolve_chunk_size(chunk_size, block_size, k.shape[2])
    if block_scores_kernel_runs(q, block_size // stride, block_size // stride):
        from ..kernels.block_scores import xattention_estimate_op

        return xattention_estimate_op(q, k, stride, block_size, causal)
    return _estimate_chunked(q, k, stride, block_size, causal, chunk_size)


# ---------------------------------------------------------------------------------- selection
def xattention_select(
    scores, threshold, *, causal=True, seq_len_q=None, seq_len_kv=None, block_size=128, layer_idx=None
) -> BlockSparseLayout:
    """The blocks XAttention attends to: a `BlockSparseLayout` with one head per query head.

    scores: A [B, Hq, Mq, Nk] from `xattention_estimate` (float32 or float64, non-negative).
    threshold: tau, a float in [0, 1], a tensor [Hq], or a [layers, Hq] table read at row
        `layer_idx`. Per (batch, head, query block) the kept set is the shortest prefix of
        (forced blocks, then the rest by descending score, ties to the lower index) whose mass
        reaches tau times the row's mass, less its causally invisible blocks (spec 2: the row's
        whole mass and order, then causal validity). tau = 0 keeps only the forced blocks, tau = 1
        keeps every causally visible block; selections grow with tau.
    causal: force the sink (key block 0) and the diagonal (every key block holding a real query
        of the row, bottom-right aligned) and keep only causally visible blocks; non-causal
        selection forces nothing.
    seq_len_q, seq_len_kv: the sequence lengths the scores were computed for (they fix the
        alignment and the layout); None means Mq * block_size and Nk * block_size, right whenever
        the lengths are multiples of `block_size`.
    block_size: the block size of the scores (query and key blocks are equal).
    layer_idx: the row of a [layers, Hq] threshold table (ignored for other thresholds).

    Raises ValueError for a threshold out of [0, 1] or of the wrong shape, or inconsistent lengths.
    """
    block_size = _check_int(block_size, "block_size", 1)
    seq_len_q, seq_len_kv = block_score_lengths(scores, seq_len_q, seq_len_kv, block_size, causal)
    tau = _threshold_per_head(threshold, scores.shape[1], layer_idx, scores.device)
    allowed, forced = selectable_blocks(seq_len_q, seq_len_kv, block_size, causal, scores.device)
    # Spec 2: the mass and the order are the whole row's, then the kept set meets causal validity (for
    # the estimator's scores, which are 0 outside it, the same as selecting among the valid blocks).
    _, indices = threshold_select(scores, tau[:, None], forced=forced.expand(scores.shape))
    valid = (indices >= 0) & allowed.expand(scores.shape).gather(-1, indices.long().clamp(min=0))
    count, indices = valid.sum(-1, dtype=torch.int32), _kept_in_order(indices, valid)
    return BlockSparseLayout.from_kv_blocks(
        count,
        indices,
        q_block_size=block_size,
        kv_block_size=block_size,
        seq_len_q=seq_len_q,
        seq_len_kv=seq_len_kv,
        validate=False,  # threshold_select returns ascending in-range lists; skip the GPU syncs
    )


# ---------------------------------------------------------------------------------- attention
def xattention_attn(
    q,
    k,
    v,
    *,
    stride=8,
    threshold=0.9,
    block_size=128,
    causal=True,
    chunk_size=None,
    softmax_scale=None,
    attn_sink=None,
    return_layout=False,
    layer_idx=None,
):
    """XAttention prefill: estimate, select, then block-sparse attention through the shared engine.

    q (B, Hq, Sq, D), k and v (B, Hkv, Skv, D); returns the output (B, Hq, Sq, D) in q's dtype and,
    with `return_layout`, the `BlockSparseLayout` used. Differentiable in q, k and v through the
    engine (the selection itself is not). `threshold` is a float, a [Hq] tensor or a calibrated
    [layers, Hq] table read at row `layer_idx`; `softmax_scale` only affects the attention, the
    estimate always uses 1 / (sqrt(D) S). `attn_sink` as in `block_sparse_attn` (it does not take part in
    the estimate). The Triton engine takes block sizes that are multiples of 16 (others run the PyTorch path).
    """
    _check_qkv(q, k, v, packed=False)
    check_attn_sink(attn_sink, q.shape[1], q.device)
    _check_flags(return_layout=return_layout)
    _check_stride(stride, block_size)
    _threshold_per_head(threshold, q.shape[1], layer_idx, q.device)  # fail before the estimate's work
    scores = xattention_estimate(
        q.detach(), k.detach(), stride=stride, block_size=block_size, causal=causal, chunk_size=chunk_size
    )
    # A NaN in q or k (the kernel's row softmax drops it, the PyTorch path keeps it) counts as no mass, so
    # both paths select and the attention itself meets the NaN, as dense attention would.
    scores = scores.nan_to_num(nan=0.0)
    layout = xattention_select(
        scores,
        threshold,
        causal=causal,
        seq_len_q=q.shape[2],
        seq_len_kv=k.shape[2],
        block_size=block_size,
        layer_idx=layer_idx,
    )
    out = block_sparse_attn(q, k, v, layout, causal=causal, softmax_scale=softmax_scale, attn_sink=attn_sink)
    return (out, layout) if return_layout else out


# ---------------------------------------------------------------------------------- calibration
def _dense_block_mass(q, k, block_size: int, chunk_size: int):
    """fp32 [B, Hq, Mq, Nk]: the true causal attention mass (softmax(qk^T / sqrt(D))) of each block."""
    batch, num_q_heads, seq_q, dim = q.shape
    num_kv_heads, seq_kv = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    num_q_blocks, num_kv_blocks = -(-seq_q // block_size), -(-seq_kv // block_size)
    q_grouped = q.float().reshape(batch, num_kv_heads, group, seq_q, dim)
    keys_t = k.float()[:, :, None].transpose(-1, -2)
    key_pos = torch.arange(seq_kv, device=q.device)
    parts = []
    for start in range(0, seq_q, chunk_size):
        query_pos = torch.arange(start, min(start + chunk_size, seq_q), device=q.device) + (seq_kv - seq_q)
        logits = q_grouped[..., start : start + chunk_size, :] @ keys_t / math.sqrt(dim)
        probs = logits.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf")).softmax(dim=-1)
        parts.append(_tile_sums(probs, block_size, -(-len(query_pos) // block_size), num_kv_blocks))
    return torch.cat(parts, dim=-2).reshape(batch, num_q_heads, num_q_blocks, num_kv_blocks)


def _calibration_threshold(true_mass, estimate, coverage: float, allowed) -> torch.Tensor:
    """Per (batch, head), steps 2-3 of spec section 4: the estimated mass share of every block scoring
    at least its row's cutoff, the smallest estimate among the fewest true blocks covering `coverage`.

    true_mass, estimate: [B, H, Mq, N]; allowed: bool [Mq, N] (the causally visible blocks).
    """
    # The shortest descending prefix reaching the coverage is exactly threshold_select's kept set.
    count, indices = threshold_select(true_mass.float(), coverage, allowed=allowed.expand(true_mass.shape))
    num_kv_blocks = true_mass.shape[-1]
    slots = torch.where(indices < 0, num_kv_blocks, indices).long()  # -1 padding lands in a spare column
    covering = torch.zeros(*indices.shape[:-1], num_kv_blocks + 1, dtype=torch.bool, device=indices.device)
    covering = covering.scatter_(-1, slots, True)[..., :num_kv_blocks]
    estimate = estimate.double()
    cutoff = estimate.masked_fill(~covering, float("inf")).amin(dim=-1, keepdim=True)
    counted = (estimate * (estimate >= cutoff)).sum(dim=(-2, -1))
    return counted / estimate.sum(dim=(-2, -1)).clamp_min(torch.finfo(torch.float64).tiny)


def _sample_thresholds(q, k, *, stride, block_size, coverage, chunk_size):
    """tau of each (text, query head) of one (q, k) sample: float64 [B, Hq]."""
    _check_qk(q, k, causal=True)
    estimate = xattention_estimate(q, k, stride=stride, block_size=block_size, chunk_size=chunk_size)
    # About 2^28 fp32 logits at a time, whole query blocks.
    mass_chunk = max(1, (1 << 28) // (q.shape[0] * q.shape[1] * k.shape[2] * block_size)) * block_size
    true_mass = _dense_block_mass(q, k, block_size, mass_chunk)
    allowed = causal_block_mask(q.shape[2], k.shape[2], block_size, block_size, q.device)
    return _calibration_threshold(true_mass, estimate, coverage, allowed)


def _layer_samples(samples, num_layers) -> Iterable:
    """(layer index, iterable of (q, k) pairs) per layer, for nested lists or a callable."""
    if callable(samples):
        num_layers = _check_int(num_layers, "num_layers", 1)
        return ((layer, samples(layer)) for layer in range(num_layers))
    if not isinstance(samples, Sequence) or len(samples) == 0:
        raise ValueError("samples must be a non-empty list of per-layer lists of (q, k) pairs, or a callable")
    if num_layers is not None and num_layers != len(samples):
        raise ValueError(f"num_layers={num_layers} but samples holds {len(samples)} layers")
    return enumerate(samples)


def calibrate_xattention(
    samples: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]] | Callable | torch.nn.Module,
    *,
    stride=8,
    block_size=128,
    coverage=0.9,
    num_layers=None,
    chunk_size=None,
    inputs=None,
) -> torch.Tensor:
    """Per-(layer, query head) thresholds by the repository's procedure (spec section 4): float32 [layers, Hq].

    samples: `samples[layer]` is a list of (q, k) pairs of full causal prefills of calibration texts,
        q (B, Hq, L, D) and k (B, Hkv, L, D) after RoPE (every batch row is a text); or a callable
        `samples(layer_idx)` returning such a list, with `num_layers`, so samples can be produced
        lazily; or a Hugging Face causal LM, with `inputs` a list of unpadded token-id tensors (1, L)
        or (B, L): each runs through the model with dense attention while every layer's post-RoPE
        q and k are turned into thresholds on the fly (no q/k is kept).
    For each text and head: the true fp32 causal attention mass of every block; per query-block row
    the fewest true blocks (by descending mass) covering `coverage` of the row; the cutoff c_m, the
    smallest XAttention estimate among them; tau_text = sum of estimates >= c_m over all rows /
    sum of all estimates. tau_head is the maximum over texts.
    """
    _check_stride(stride, block_size)
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not 0 <= coverage <= 1:
        raise ValueError(f"coverage must be a float in [0, 1], got {coverage!r}")
    options = dict(stride=stride, block_size=block_size, coverage=coverage, chunk_size=chunk_size)
    if isinstance(samples, torch.nn.Module):
        return _calibrate_model(samples, inputs, options)
    if inputs is not None:
        raise ValueError("inputs are token ids for calibrating a model; q/k samples need none")
    best: dict = {}
    for layer, pairs in _layer_samples(samples, num_layers):
        for pair in pairs:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ValueError(f"layer {layer}: each sample must be a (q, k) pair")
            _keep_max(best, layer, _sample_thresholds(*(t.detach() for t in pair), **options))
        if layer not in best:
            raise ValueError(f"layer {layer} has no (q, k) samples")
    return _stack_layers(best)


def _keep_max(best: dict, layer: int, taus: torch.Tensor) -> None:
    """Fold one sample's [B, Hq] thresholds into the running per-head maximum of `layer`."""
    taus = taus.amax(dim=0).cpu()
    if layer in best and best[layer].shape != taus.shape:
        raise ValueError(f"layer {layer}: samples disagree on the number of query heads")
    best[layer] = taus if layer not in best else torch.maximum(best[layer], taus)


def _stack_layers(best: dict) -> torch.Tensor:
    """float32 [layers, Hq] from per-layer thresholds covering layers 0..L-1."""
    missing = sorted(set(range(max(best) + 1)) - set(best))
    if missing:
        raise ValueError(f"layers {missing} have no thresholds (no full prefill or sample reached them)")
    heads = {t.shape for t in best.values()}
    if len(heads) != 1:
        raise ValueError(f"layers disagree on the number of query heads: {sorted(h[0] for h in heads)}")
    return torch.stack([best[i] for i in range(len(best))]).float()


def _calibrate_model(model, inputs, options) -> torch.Tensor:
    """Thresholds of a transformers model: its layers' q/k observed during dense prefills of `inputs`."""
    from ..hf import observing

    if isinstance(inputs, torch.Tensor):
        inputs = [inputs]
    if not inputs or not all(isinstance(ids, torch.Tensor) and ids.dim() == 2 for ids in inputs):
        raise ValueError("calibrating a model needs inputs=[token ids (B, L), ...] (unpadded calibration texts)")
    best: dict = {}

    def observe(layer_idx, q, k):
        if isinstance(layer_idx, int):  # modules without a layer index are not decoder layers
            _keep_max(best, layer_idx, _sample_thresholds(q, k, **options))

    device = next(model.parameters()).device
    with torch.no_grad(), observing(model, observe):
        for ids in inputs:
            model(input_ids=ids.to(device))
    if not best:
        raise ValueError("no attention layer with a layer_idx ran a full prefill: nothing to calibrate")
    return _stack_layers(best)


def _check_table(table) -> torch.Tensor:
    try:
        table = torch.as_tensor(table, dtype=torch.float32).cpu()
    except (TypeError, ValueError, RuntimeError) as error:  # ragged rows, strings, ...
        raise ValueError(f"a threshold table must be a [layers, Hq] array of numbers: {error}") from None
    if table.dim() != 2 or table.numel() == 0:
        raise ValueError(f"a threshold table must be 2-D [layers, Hq], got shape {tuple(table.shape)}")
    if bool(((table < 0) | (table > 1) | torch.isnan(table)).any()):
        raise ValueError("threshold table values must lie in [0, 1]")
    return table


def save_thresholds(path, table, meta=None) -> None:
    """Write a [layers, Hq] threshold table and a JSON-serialisable `meta` dict (model, stride, ...) as JSON."""
    payload = {
        "format": _THRESHOLD_FORMAT,
        "version": _THRESHOLD_VERSION,
        "thresholds": _check_table(table).tolist(),
        "meta": dict(meta or {}),
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")


def load_thresholds(path):
    """Read a file written by `save_thresholds`: (float32 table [layers, Hq], meta dict)."""
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    if not isinstance(payload, dict) or payload.get("format") != _THRESHOLD_FORMAT:
        raise ValueError(f"{path} is not an XAttention threshold file (format {_THRESHOLD_FORMAT!r})")
    if payload.get("version") != _THRESHOLD_VERSION:
        raise ValueError(f"{path} has version {payload.get('version')!r}; this package reads {_THRESHOLD_VERSION}")
    if "thresholds" not in payload or not isinstance(payload.get("meta", {}), dict):
        raise ValueError(f"{path} must hold 'thresholds' (a [layers, Hq] table) and, optionally, a 'meta' object")
    try:
        table = _check_table(payload["thresholds"])
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return table, payload.get("meta", {})
