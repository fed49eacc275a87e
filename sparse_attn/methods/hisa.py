"""DeepSeek Sparse Attention's lightning indexer and HISA (arXiv 2603.28458), spec shared/specs/hisa_dsa.md.

The indexer scores key s for query t as I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s]) (index heads j,
one key per position) and keeps the top-k keys; HISA replaces the flat scan by two stages:

1. Pool: each sequence's keys in blocks of B (anchored at the sequence start), k~_b their fp32 mean.
2. Stage 1: J[t, b] = sum_j w[t, j] * ReLU(q[t, j] . k~_b) over the eligible blocks (those at or before
   the block holding t); keep m of them with the first and the last eligible block forced (`"slots"`:
   they take two of the m; `"union"`: the top m of the others plus both).
3. Stage 2: score the tokens <= t of the kept blocks with the DSA formula and keep the top k.

Conventions are DeepGEMM's and the official pipeline's: q (M, H, D), k (N, D), weights (M, H), and per
query row the key range [ks, ke) it may see (ke = t + 1 for causal prefill); results are absolute
positions in k, int32 [M, k], -1 padding last (valid entries in unspecified order). `dsa_select` and
`hisa_select` take batched q (B, Sq, H, D), k (B, Skv, D), weights (B, Sq, H) and return the [B, Sq, 1, k]
token selections the token-sparse attention takes (bottom-right causal). FP8 (float8_e4m3fn) q and k
are widened to float16, which holds every e4m3 value exactly; `k_scale` multiplies each key's logits
(inside the ReLU, as the spec writes it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..engine import KERNEL_DTYPES, triton_runs
from ..layout import tensor_versions
from ..selection import _check_bool, _check_int, _check_tensor

__all__ = [
    "HISABlockMeans",
    "HISASegments",
    "check_options",
    "dsa_indexer",
    "dsa_indexer_logits",
    "dsa_indexer_logits_reference",
    "dsa_select",
    "hisa_indexer",
    "hisa_indexer_reference",
    "hisa_segments",
    "hisa_select",
    "topk_indices",
]

FORCED_MODES = ("slots", "union")
_FLOAT_INPUTS = (*KERNEL_DTYPES, torch.float64, torch.float8_e4m3fn)
# Scores held at a time by the functions that return indices (query rows x candidate keys).
_SCORE_CHUNK_ELEMENTS = 1 << 26
# Query rows x heads x keys of the PyTorch path's logits at a time.
_TORCH_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------- validation
def check_options(*, block_size=128, block_topk=64, topk=2048, forced="slots") -> None:
    """HISA's scalar options (spec section 2, package decisions); topk=None when a model sets it later."""
    block_size = _check_int(block_size, "block_size", 1)
    block_topk = _check_int(block_topk, "block_topk", 1)
    if forced not in FORCED_MODES:
        raise ValueError(f"forced must be one of {FORCED_MODES}, got {forced!r}")
    if forced == "slots" and block_topk < 2:
        raise ValueError(f"block_topk={block_topk} must be >= 2 in 'slots' mode (the first and last blocks take two)")
    if topk is not None and block_topk * block_size < _check_int(topk, "topk", 1):
        raise ValueError(
            f"block_topk * block_size = {block_topk * block_size} candidate tokens cannot hold topk={topk}"
        )


def _check_indexer_inputs(q, k, weights, ks, ke, k_scale):
    """The DeepGEMM-convention inputs, with FP8 q/k widened to float16 and ks/ke as int32."""
    _check_tensor(q, "q", dim=3, dtypes=_FLOAT_INPUTS)
    _check_tensor(k, "k", dim=2, dtypes=_FLOAT_INPUTS)
    _check_tensor(weights, "weights", dim=2, dtypes=_FLOAT_INPUTS[:-1])
    rows, heads, dim = q.shape
    if k.shape[1] != dim:
        raise ValueError(f"k must be (N, D={dim}) like q's head dim, got shape {tuple(k.shape)}")
    if weights.shape != (rows, heads):
        raise ValueError(f"weights must be (M={rows}, H={heads}), got shape {tuple(weights.shape)}")
    bounds = []
    for name, t in (("ks", ks), ("ke", ke)):
        _check_tensor(t, name, dim=1, dtypes=(torch.int32, torch.int64))
        if t.shape[0] != rows:
            raise ValueError(f"{name} must have one entry per query row ({rows}), got shape {tuple(t.shape)}")
        # Bounds past int32 act as the clamped ones (N < 2^31): ke >= N ends at N, ks <= 0 starts at 0.
        t = t.clamp(-(2**31), 2**31 - 1) if t.dtype == torch.int64 else t
        bounds.append(t.to(torch.int32).contiguous())
    _check_k_scale(k_scale, k.shape[:1])
    for name, t in (("k", k), ("weights", weights), ("ks", ks), ("ke", ke), ("k_scale", k_scale)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    q, k = (t.to(torch.float16) if t.dtype == torch.float8_e4m3fn else t for t in (q, k))
    if q.dtype != k.dtype and torch.float32 not in (q.dtype, k.dtype):
        raise TypeError(f"q and k must share a 16-bit dtype (or one be float32), got {q.dtype} and {k.dtype}")
    return q, k, weights, *bounds, k_scale


def _check_k_scale(k_scale, key_shape) -> None:
    """An optional per-key scale: one float per key, shaped as the keys without their last dim."""
    if k_scale is not None:
        _check_tensor(k_scale, "k_scale", dtypes=_FLOAT_INPUTS[:-1])
        if tuple(k_scale.shape) != tuple(key_shape):
            raise ValueError(
                f"k_scale must have one entry per key {tuple(key_shape)}, got shape {tuple(k_scale.shape)}"
            )


def _check_batched(q, k, weights, causal: bool):
    """Batched q (B, Sq, H, D), k (B, Skv, D), weights (B, Sq, H); Sq <= Skv when causal (bottom-right)."""
    _check_tensor(q, "q", dim=4, dtypes=_FLOAT_INPUTS)
    _check_tensor(k, "k", dim=3, dtypes=_FLOAT_INPUTS)
    _check_tensor(weights, "weights", dim=3, dtypes=_FLOAT_INPUTS[:-1])
    batch, seq_q, heads, dim = q.shape
    if k.shape[0] != batch or k.shape[2] != dim:
        raise ValueError(f"k must be (B={batch}, Skv, D={dim}), got shape {tuple(k.shape)}")
    if weights.shape != (batch, seq_q, heads):
        raise ValueError(f"weights must be (B, Sq, H) = {(batch, seq_q, heads)}, got shape {tuple(weights.shape)}")
    if causal and seq_q > k.shape[1]:
        raise ValueError(f"causal selection needs Sq <= Skv (bottom-right aligned), got {seq_q} > {k.shape[1]}")


# ---------------------------------------------------------------------------------- scores
def _kernel_runs(q, k, heads: int, tile: int) -> bool:
    """Triton takes q and k on their device, and the kernel takes the shapes."""
    if not (triton_runs(q.device, q.dtype) and triton_runs(k.device, k.dtype)):
        return False
    from ..kernels.indexer_scores import kernel_supports

    return kernel_supports(heads, q.shape[-1], tile)


def _row_chunks(rows: int, per_row: int, budget: int):
    step = max(1, budget // max(per_row, 1))
    return ((start, min(rows, start + step)) for start in range(0, rows, step))


def _head_sum(q, keys, weights, dtype, scale=None):
    """sum_j w[t, j] ReLU(q[t, j] . keys[t?, s] scale[t?, s]) in `dtype`: keys (N, D) shared or (M, C, D)
    per row, scale (N) or (M, C) likewise (inside the ReLU, as the spec writes it: any sign)."""
    pattern = "mhd,nd->mhn" if keys.dim() == 2 else "mhd,mcd->mhc"
    logits = torch.einsum(pattern, q.to(dtype), keys.to(dtype))
    if scale is not None:
        logits *= scale.to(dtype)[..., None, :]
    return (logits.relu_() * weights.to(dtype)[:, :, None]).sum(dim=1)


def _mask_outside(scores, keys, ks, ke, valid=None):
    inside = (keys >= ks[:, None]) & (keys < ke[:, None])
    if valid is not None:
        inside &= valid
    return scores.masked_fill(~inside, float("-inf"))


def _torch_scores(q, k, weights, ks, ke, k_scale, positions, dtype, valid=None):
    """The PyTorch path in `dtype`, a chunk of rows at a time: scores of each row against k[positions]
    (positions [N] shared by all rows: every key, in order; or [M, C] per row), -inf outside [ks, ke)
    and where `valid` [M, C] is False."""
    shared = positions.dim() == 1
    out = torch.empty(q.shape[0], positions.shape[-1], dtype=dtype, device=q.device)
    # A row holds its logits over every head, and without shared positions its own gathered keys too.
    per_row = positions.shape[-1] * (q.shape[1] + (0 if shared else k.shape[1]))
    for lo, hi in _row_chunks(q.shape[0], per_row, _TORCH_CHUNK_ELEMENTS):
        rows = positions[None, :] if shared else positions[lo:hi]
        safe = rows.clamp(0, k.shape[0] - 1)
        scale = None if k_scale is None else k_scale[safe]
        scores = _head_sum(q[lo:hi], k if shared else k[safe], weights[lo:hi], dtype, scale)
        out[lo:hi] = _mask_outside(scores, rows, ks[lo:hi], ke[lo:hi], None if valid is None else valid[lo:hi])
    return out


def dsa_indexer_logits_reference(q, k, weights, ks, ke, k_scale=None, *, compute_dtype=torch.float64):
    """I[t, s] in `compute_dtype` [M, N], -inf outside [ks[t], ke[t]): the spec's formula over all keys,
    in row chunks (in float32 it is also the CPU path of `dsa_indexer_logits`)."""
    q, k, weights, ks, ke, k_scale = _check_indexer_inputs(q, k, weights, ks, ke, k_scale)
    return _torch_scores(q, k, weights, ks, ke, k_scale, torch.arange(k.shape[0], device=q.device), compute_dtype)


def _dense_scores(q, k, weights, ks, ke, k_scale):
    """DSA scores of q against every key: the fused kernel, or the float32 PyTorch path."""
    if _kernel_runs(q, k, q.shape[1], 16):
        from ..kernels.indexer_scores import indexer_scores_op

        return indexer_scores_op(q, k, weights, ks, ke, k_scale)
    return _torch_scores(q, k, weights, ks, ke, k_scale, torch.arange(k.shape[0], device=q.device), torch.float32)


def _gathered_scores(q, k, weights, ks, ke, k_scale, tile_starts, tile: int):
    """[M, T * tile] scores of row t against keys tile_starts[t, j] + [0, tile) (-1: no tile); -inf outside [ks, ke)."""
    if _kernel_runs(q, k, q.shape[1], tile):
        from ..kernels.indexer_scores import indexer_gathered_scores_op

        return indexer_gathered_scores_op(q, k, weights, ks, ke, k_scale, tile_starts.contiguous(), tile)
    keys = (tile_starts[:, :, None] + torch.arange(tile, device=q.device)).flatten(1)
    valid = (tile_starts >= 0).repeat_interleave(tile, dim=1) & (keys < k.shape[0])
    return _torch_scores(q, k, weights, ks, ke, k_scale, keys, torch.float32, valid)


def dsa_indexer_logits(q, k, weights, ks, ke, k_scale=None):
    """DeepGEMM's `fp8_mqa_logits` (clean_logits=True): fp32 [M, N] scores, -inf outside [ks, ke).

    q (M, H, D), k (N, D) in float16/bfloat16/float32 or float8_e4m3fn; weights (M, H); ks, ke int [M];
    k_scale (N,) optional, multiplying each key's logits (inside the ReLU). Fused Triton kernel on CUDA
    (and on the CPU under the interpreter for 16/32-bit), the float32 PyTorch reference elsewhere.
    """
    return _dense_scores(*_check_indexer_inputs(q, k, weights, ks, ke, k_scale))


def topk_indices(logits, k: int) -> torch.Tensor:
    """int32 [M, k]: the columns of the k largest finite scores per row, -1 padding last (fewer than k
    finite scores, or fewer than k columns). Scores must not be NaN."""
    _check_tensor(logits, "logits", dim=2, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    k = _check_int(k, "k", 1)
    taken = min(k, logits.shape[1])
    values, columns = torch.topk(logits, taken, dim=1, sorted=True)  # -inf sorts last
    out = torch.full((logits.shape[0], k), -1, dtype=torch.int32, device=logits.device)
    out[:, :taken] = torch.where(values == float("-inf"), -1, columns).to(torch.int32)
    return out


def _select_rows(q, topk: int, scores_per_row: int, select):
    """int32 [M, topk]: select(rows) for slices of query rows holding a bounded number of scores."""
    out = torch.empty(q.shape[0], topk, dtype=torch.int32, device=q.device)
    for lo, hi in _row_chunks(q.shape[0], scores_per_row, _SCORE_CHUNK_ELEMENTS):
        out[lo:hi] = select(slice(lo, hi))
    return out


# ---------------------------------------------------------------------------------- HISA
class HISASegments(NamedTuple):
    """Where `hisa_indexer` pools key blocks, drawn from the query rows' [ks, ke) bounds by `hisa_segments`:
    one sequence per distinct ks of the rows that see a key, running to the furthest ke of its rows, cut
    into blocks from its start. Keys of no sequence (a padded batch's next-row padding) are pooled by none."""

    starts: torch.Tensor  # int64 [S], ascending
    ends: torch.Tensor  # int64 [S]
    first_block: torch.Tensor  # int64 [S]: the index of each sequence's first block among all blocks
    row_first: torch.Tensor  # int32 [M]: each row's sequence's first block (0 for rows that see no key)
    block_starts: torch.Tensor  # int32 [P]: each block's first key position
    num_keys: int
    block_size: int
    bounds: tuple = ()  # the ks and ke drawn from (tensors, versions, values): hisa_indexer checks its own
    max_blocks: int = 0  # the most blocks of one sequence: the width of stage 1's per-row window


def hisa_segments(ks, ke, num_keys: int, *, block_size: int = 128) -> HISASegments:
    """The block grid `hisa_indexer` draws from the bounds ks, ke (int [M]) over num_keys keys.

    HISA pools blocks anchored at each sequence's start, so the rows of a sequence share their ks and no
    row reaches past the next sequence's start (packed causal sequences, left padding); rows whose ranges
    overlap that way (sliding windows) get a ValueError. A row with ke <= ks (after clamping ke to
    num_keys) sees no key and starts no sequence. Drawing the grid reads the bounds on the host (a few GPU
    syncs), so callers that run many indexers over the same bounds (a model's layers in one decode step)
    compute it once and pass it as `hisa_indexer(..., segments=...)`, as FlashMLA's `get_mla_metadata` is.
    """
    for name, t in (("ks", ks), ("ke", ke)):
        _check_tensor(t, name, dim=1, dtypes=(torch.int32, torch.int64))
    if ke.shape != ks.shape or ke.device != ks.device:
        raise ValueError(f"ke must match ks ({tuple(ks.shape)} on {ks.device}), got {tuple(ke.shape)} on {ke.device}")
    num_keys, block_size = _check_int(num_keys, "num_keys", 0), _check_int(block_size, "block_size", 1)
    bounds = (ks, ke, tensor_versions(ks, ke), ks.clone(), ke.clone())  # the values too: a refill reuses ks and ke
    ks, ke = ks.long(), ke.long().clamp(max=num_keys)
    if bool((ks < 0).any()):
        raise ValueError("ks must be >= 0 (key positions)")
    sees = ke > ks
    starts = torch.unique(ks[sees])
    sequence_of_row = (torch.searchsorted(starts, ks, right=True) - 1).clamp(min=0)
    next_start = torch.cat([starts[1:], starts.new_tensor([num_keys])])
    if bool((sees & (ke > next_start[sequence_of_row])).any()):
        raise ValueError(
            "a row's [ks, ke) reaches past the next sequence's start: HISA's blocks are anchored at sequence "
            "starts, so every row of a sequence must share its ks (packed causal sequences); overlapping "
            "ranges such as sliding windows are not supported (use dsa_indexer)"
        )
    ends = starts.scatter_reduce(0, sequence_of_row[sees], ke[sees], "amax")  # include_self: ks < ke anyway
    blocks_per_seq = (ends - starts + block_size - 1) // block_size
    first_block = torch.cumsum(blocks_per_seq, 0) - blocks_per_seq
    longest = torch.nn.functional.pad(blocks_per_seq, (0, 1)).amax()  # 0 without sequences
    num_blocks, max_blocks = (int(n) for n in torch.stack([blocks_per_seq.sum(), longest]).tolist())
    seq_of_block = torch.repeat_interleave(blocks_per_seq, output_size=num_blocks)
    offsets = torch.arange(num_blocks, device=ks.device) - first_block[seq_of_block]
    block_starts = starts[seq_of_block] + offsets * block_size
    row_first = torch.where(sees, torch.nn.functional.pad(first_block, (0, 1))[sequence_of_row], 0)
    row_first, block_starts = row_first.to(torch.int32), block_starts.to(torch.int32)
    return HISASegments(starts, ends, first_block, row_first, block_starts, num_keys, block_size, bounds, max_blocks)


def _check_segments(segments, ks, ke, num_keys: int, block_size: int, device) -> None:
    """`segments` must be hisa_segments of these bounds: the very tensors (free), else equal ones (a sync)."""
    if not isinstance(segments, HISASegments) or len(segments.bounds) != 5:
        raise TypeError(f"segments must be a HISASegments (from hisa_segments), got {type(segments).__name__}")
    rows = ks.shape[0]
    drawn = (segments.row_first.shape[0], segments.num_keys, segments.block_size, segments.row_first.device)
    if drawn != (rows, num_keys, block_size, torch.device(device)):
        raise ValueError(
            f"segments were drawn for {drawn[0]} rows, {drawn[1]} keys, block_size={drawn[2]} on {drawn[3]}; "
            f"this call has {rows} rows, {num_keys} keys, block_size={block_size} on {device}"
        )
    drawn_ks, drawn_ke, drawn_versions, ks_values, ke_values = segments.bounds
    if drawn_ks is ks and drawn_ke is ke and drawn_versions == tensor_versions(ks, ke):
        # The very tensors, unchanged since: a refill in place bumps their versions (inference tensors
        # keep none, so there only identity is checked: a no-sync decode step).
        return
    same = torch.equal(ks_values.long(), ks.long()) and torch.equal(
        ke_values.long().clamp(max=num_keys), ke.long().clamp(max=num_keys)
    )
    if not same:
        raise ValueError("segments were drawn from other bounds than this call's ks and ke: use hisa_segments(ks, ke)")


def _pool_segments(k, segments: HISASegments, k_scale):
    """fp32 means of each sequence's key blocks. Returns (pooled [P, D], block start positions [P], first
    pooled block of every row [M]). A ragged tail block averages its real keys."""
    starts, ends, first_block, block_size = segments.starts, segments.ends, segments.first_block, segments.block_size
    row_first, block_starts = segments.row_first, segments.block_starts
    positions = torch.arange(int(starts[0]), k.shape[0], device=k.device)
    seq = torch.searchsorted(starts, positions, right=True) - 1
    inside = positions < ends[seq]
    positions, seq = positions[inside], seq[inside]
    block = first_block[seq] + (positions - starts[seq]) // block_size
    sums = torch.zeros(block_starts.shape[0], k.shape[1], dtype=torch.float32, device=k.device)
    counts = torch.zeros(block_starts.shape[0], dtype=torch.float32, device=k.device)
    _add_to_blocks(sums, counts, block, _scaled_keys(k, positions, k_scale))
    return sums / counts[:, None], block_starts, row_first


def _scaled_keys(k, positions, k_scale):
    """fp32 keys at `positions` ([..., N, D] -> [..., len(positions), D]), times their scale when there is one."""
    keys = k.index_select(-2, positions).float()
    return keys if k_scale is None else keys * k_scale.index_select(-1, positions).float()[..., None]


def _add_to_blocks(sums, counts, block, keys) -> None:
    """Adds each key row to its block's fp32 sum ([..., P, D]) and count ([P]), in row order (batch pooling
    and the decode state add alike, so their means agree bit for bit on the CPU)."""
    sums.index_add_(-2, block, keys)
    counts.index_add_(0, block, torch.ones_like(block, dtype=torch.float32))


def _cached_pool(block_means, k, segments: HISASegments):
    """(pooled, block starts, first block per row) with the pooling done by HISABlockMeans: its means of
    every sequence, concatenated in order."""
    _check_tensor(block_means, "block_means", dim=2, dtypes=(torch.float32,))
    block_starts = segments.block_starts
    if tuple(block_means.shape) != (block_starts.shape[0], k.shape[1]) or block_means.device != k.device:
        raise ValueError(
            f"block_means must be fp32 ({block_starts.shape[0]}, {k.shape[1]}) on {k.device}: the block means of "
            f"the sequences from each distinct ks to its rows' furthest ke (HISABlockMeans.update of each, "
            f"concatenated), got {tuple(block_means.shape)} on {block_means.device}"
        )
    return block_means, block_starts, segments.row_first


class HISABlockMeans:
    """The decode state beside an indexer key cache (spec section 2): fp32 sums and counts of its blocks,
    so that each step adds only the new keys instead of re-pooling the prefix.

    `update(k, k_scale=None)` takes the whole cache k (N, D) of one sequence (positions 0 .. N-1), or
    (B, N, D) of B sequences of equal length, adds the rows since the previous call to their blocks, and
    returns the means [ceil(N / block_size), D] (or [B, ceil(N / block_size), D]) for
    `hisa_indexer(..., block_means=...)` (batched: flattened to [B * blocks, D], the sequences at ks = b * N).
    A partial last block averages its real rows. Rows are added in position order, as batch pooling adds
    them, so on the CPU the means equal batch pooling bit for bit. A cache that shrank or changed batch,
    width, device or dtype, or a change between scaled and unscaled keys, starts over; a rewritten one
    needs `reset()`.
    """

    def __init__(self, block_size: int = 128):
        self.block_size = _check_int(block_size, "block_size", 1)
        self.reset()

    def reset(self) -> None:
        self.sums, self.counts, self.length, self._keys_kind = None, None, 0, None

    def update(self, k, k_scale=None) -> torch.Tensor:
        _check_tensor(k, "k", dtypes=_FLOAT_INPUTS)
        if k.dim() not in (2, 3):
            raise ValueError(f"k must be 2-D (N, D) or 3-D (B, N, D), got shape {tuple(k.shape)}")
        batched = k.dim() == 3
        keys = k if batched else k[None]
        _check_k_scale(k_scale, k.shape[:-1])
        sums, (batch, num_keys, dim) = self.sums, keys.shape
        kind = (k.device, k.dtype, k_scale is None)  # sums pooled from other keys than these would mix in
        if sums is None or num_keys < self.length or sums.shape[::2] != (batch, dim) or self._keys_kind != kind:
            self.sums = torch.zeros(batch, 0, dim, dtype=torch.float32, device=k.device)
            self.counts = torch.zeros(0, dtype=torch.float32, device=k.device)
            self.length, self._keys_kind = 0, kind
        grow = -(-num_keys // self.block_size) - self.sums.shape[1]
        self.sums = torch.nn.functional.pad(self.sums, (0, 0, 0, grow))
        self.counts = torch.nn.functional.pad(self.counts, (0, grow))
        positions = torch.arange(self.length, num_keys, device=k.device)
        scale = k_scale if k_scale is None or batched else k_scale[None]
        _add_to_blocks(self.sums, self.counts, positions // self.block_size, _scaled_keys(keys, positions, scale))
        self.length = num_keys
        means = self.sums / self.counts[:, None]
        return means if batched else means[0]


def _forced_ranking(block_scores, first, last, has_blocks, value):
    """block_scores with the first and last eligible block of every non-empty row set to `value`."""
    ranked = block_scores.clone()
    for column in (first, last):
        # Masked scatters rather than indexing the non-empty rows: their count would sync the GPU.
        column = column.long().clamp(0, ranked.shape[1] - 1)[:, None]
        kept = torch.gather(ranked, 1, column)
        ranked.scatter_(1, column, torch.where(has_blocks[:, None], torch.full_like(kept, value), kept))
    return ranked


def _top_blocks(scores, count: int):
    """Columns of the `count` largest finite scores per row, ties to the lower index; -1 for the rest."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :count]
    return torch.where(torch.gather(scores, 1, order) == float("-inf"), -1, order)


def _choose_blocks(block_scores, first, end, block_topk: int, forced: str):
    """Stage-1 candidates: pooled-block columns [M, m] (slots) or [M, m + 2] (union), -1 padded."""
    has_blocks = end > first
    last = end - 1
    count = min(block_topk, block_scores.shape[1])
    if forced == "slots":
        return _top_blocks(_forced_ranking(block_scores, first, last, has_blocks, float("inf")), count)
    others = _top_blocks(_forced_ranking(block_scores, first, last, has_blocks, float("-inf")), count)
    first_col = torch.where(has_blocks, first, -1)[:, None]
    last_col = torch.where(has_blocks & (last > first), last, -1)[:, None]
    return torch.cat([first_col.to(others.dtype), others, last_col.to(others.dtype)], dim=1)


def hisa_indexer(
    q,
    k,
    weights,
    ks,
    ke,
    *,
    block_size=128,
    block_topk=64,
    topk=2048,
    forced="slots",
    k_scale=None,
    relative=False,
    block_means=None,
    segments=None,
):
    """HISA's two-stage indexer: int32 [M, topk] key positions per query row (-1 padding last).

    Inputs as `dsa_indexer_logits`; each distinct ks (of a row that sees a key) starts a sequence whose
    keys (up to the furthest ke of its rows) are pooled in blocks of `block_size` (`hisa_segments`: rows
    of a sequence share its ks; a range reaching into the next sequence is a ValueError). Row t's eligible
    blocks are those of its sequence starting before ke[t]. `relative=True` returns offsets from ks (the
    vLLM/TileLang convention) instead of absolute positions (FlashMLA's).
    Identical to `topk_indices(dsa_indexer_logits(...), topk)` (up to ties) while every eligible block is a
    candidate: at most `block_topk` of them ('slots') or `block_topk + 2` ('union').
    `block_means` (from `HISABlockMeans.update(k)`, decode) replaces the pooling: the means of every
    sequence, concatenated in order. `segments`, `hisa_segments(ks, ke, len(k), block_size=block_size)`
    of these very bounds, saves drawing the grid again (its host syncs) in each call that shares them; it is
    checked against them (free for the same, unedited tensors; else one sync). Under inference_mode, bounds
    refilled in place need fresh segments: inference tensors keep no version counter to show the edit.
    """
    check_options(block_size=block_size, block_topk=block_topk, topk=topk, forced=forced)
    _check_bool(relative, "relative")
    bounds = (ks, ke)
    q, k, weights, ks, ke, k_scale = _check_indexer_inputs(q, k, weights, ks, ke, k_scale)
    if segments is None:
        segments = hisa_segments(ks, ke, k.shape[0], block_size=block_size)
    else:
        _check_segments(segments, *bounds, k.shape[0], block_size, q.device)
    if q.shape[0] == 0 or segments.block_starts.shape[0] == 0:  # no row sees a key
        return torch.full((q.shape[0], topk), -1, dtype=torch.int32, device=q.device)
    ke = ke.clamp(max=k.shape[0])  # keys past the end do not exist (as in the flat indexer's logits)
    if block_means is None:
        pooled, block_starts, first = _pool_segments(k, segments, k_scale)
    else:
        pooled, block_starts, first = _cached_pool(block_means, k, segments)
    num_eligible = torch.where(ke > ks, (ke - 1 - ks) // block_size + 1, 0)
    width = block_topk + (2 if forced == "union" else 0)

    # Stage 1 scores a row against its own sequence's blocks only: a window of the longest sequence's
    # blocks from the row's first, where that is narrower than every pooled block (several sequences).
    narrower = 0 < _round_up(segments.max_blocks, _WINDOW_TILE) < pooled.shape[0]  # 0: segments drawn elsewhere
    window = segments.max_blocks if narrower else None

    def select(rows):
        end = first[rows] + num_eligible[rows]
        block_scores, base = _stage_one_scores(q[rows], pooled, weights[rows], first[rows], end, window)
        chosen = _choose_blocks(block_scores, first[rows] - base, end - base, block_topk, forced)
        chosen = torch.where(chosen >= 0, chosen + base[:, None], -1)
        starts = torch.where(chosen >= 0, block_starts[chosen.clamp(min=0)], -1)
        scores = _gathered_scores(q[rows], k, weights[rows], ks[rows], ke[rows], k_scale, starts, block_size)
        slots = topk_indices(scores, topk)
        tile = torch.gather(starts, 1, (slots // block_size).clamp(min=0).long())
        return torch.where(slots >= 0, tile + slots % block_size, -1)

    stage_one = pooled.shape[0] if window is None else _round_up(window, _WINDOW_TILE)
    out = _select_rows(q, topk, width * block_size + stage_one, select)
    return torch.where(out >= 0, out - ks[:, None], -1) if relative else out


_WINDOW_TILE = 64  # pooled blocks per gathered tile of stage 1's window


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _stage_one_scores(q, pooled, weights, first, end, window):
    """(scores of each row's eligible pooled blocks [first, end), the pooled index of column 0 per row):
    over every pooled block (window None), or over a window of `window` blocks from the row's first."""
    if window is None:
        return _dense_scores(q, pooled, weights, first, end, None), torch.zeros_like(first)
    tiles = torch.arange(0, window, _WINDOW_TILE, device=q.device, dtype=first.dtype)
    tile_starts = first[:, None] + tiles
    tile_starts = torch.where(tile_starts < end[:, None], tile_starts, -1)
    return _gathered_scores(q, pooled, weights, first, end, None, tile_starts, _WINDOW_TILE), first


def dsa_indexer(q, k, weights, ks, ke, *, topk=2048, k_scale=None):
    """The flat DSA selection, `topk_indices(dsa_indexer_logits(...), topk)`, a chunk of rows at a time."""
    topk = _check_int(topk, "topk", 1)
    q, k, weights, ks, ke, k_scale = _check_indexer_inputs(q, k, weights, ks, ke, k_scale)

    def select(rows):
        return topk_indices(_dense_scores(q[rows], k, weights[rows], ks[rows], ke[rows], k_scale), topk)

    return _select_rows(q, topk, k.shape[0], select)


# ---------------------------------------------------------------------------------- batched
def _flatten_batched(q, k, weights, causal: bool):
    """(q (B*Sq, H, D), k (B*Skv, D), weights, ks, ke, batch key offsets [B*Sq]) of batched inputs."""
    _check_bool(causal, "causal")
    _check_batched(q, k, weights, causal)
    batch, seq_q, heads, dim = q.shape
    seq_kv = k.shape[1]
    offsets = (torch.arange(batch, device=q.device) * seq_kv).repeat_interleave(seq_q)
    query_pos = torch.arange(seq_q, device=q.device).repeat(batch) + (seq_kv - seq_q)
    ke = offsets + (query_pos + 1 if causal else seq_kv)
    return q.reshape(-1, heads, dim), k.reshape(-1, dim), weights.reshape(-1, heads), offsets, ke


def _batched_indices(flat_indices, offsets, batch: int, seq_q: int):
    local = torch.where(flat_indices >= 0, flat_indices - offsets[:, None].to(flat_indices.dtype), -1)
    return local.to(torch.int32).view(batch, seq_q, 1, flat_indices.shape[-1])


def dsa_select(q, k, weights, *, topk=2048, causal=True):
    """Token selections int32 [B, Sq, 1, topk] of the flat DSA indexer: q (B, Sq, H, D), k (B, Skv, D),
    weights (B, Sq, H); query r sees keys <= r + Skv - Sq when causal."""
    _, _, _, offsets, ke = _flatten_batched(q, k, weights, causal)
    topk = _check_int(topk, "topk", 1)
    # Each entry against its own keys: a flat scan of the packed B * Skv keys would score them all.
    ke = (ke - offsets).view(q.shape[:2])
    out = torch.empty(*q.shape[:2], 1, topk, dtype=torch.int32, device=q.device)
    for b in range(q.shape[0]):
        out[b, :, 0] = dsa_indexer(q[b], k[b], weights[b], torch.zeros_like(ke[b]), ke[b], topk=topk)
    return out


def hisa_select(q, k, weights, *, topk=2048, block_size=128, block_topk=64, forced="slots", causal=True):
    """Token selections int32 [B, Sq, 1, topk] of HISA, batched like `dsa_select`."""
    flat_q, flat_k, flat_w, offsets, ke = _flatten_batched(q, k, weights, causal)
    out = hisa_indexer(
        flat_q, flat_k, flat_w, offsets, ke, block_size=block_size, block_topk=block_topk, topk=topk, forced=forced
    )
    return _batched_indices(out, offsets, q.shape[0], q.shape[1])


# ---------------------------------------------------------------------------------- oracle
def _stable_top(scores, count: int):
    """Columns of the `count` largest finite scores (ties to the lower index), as a Python list."""
    order = torch.sort(scores, descending=True, stable=True).indices[:count]
    return [int(c) for c in order if scores[c] != float("-inf")]


def hisa_indexer_reference(
    q, k, weights, ks, ke, *, block_size=128, block_topk=64, topk=2048, forced="slots", k_scale=None
):
    """Float64 oracle of spec section 2, one row at a time: returns (selected absolute positions, candidate
    block starts) as lists of lists. Slow; for tests on small shapes."""
    check_options(block_size=block_size, block_topk=block_topk, topk=topk, forced=forced)
    q, k, weights, ks, ke, k_scale = _check_indexer_inputs(q, k, weights, ks, ke, k_scale)
    keys = k.double() * (k_scale.double()[:, None] if k_scale is not None else 1.0)
    starts = sorted({int(s) for s in ks})
    selected, candidates = [], []
    for t in range(q.shape[0]):
        start, end = int(ks[t]), int(ke[t])
        seq_end = next((s for s in starts if s > start), k.shape[0])
        qt, wt = q[t].double(), weights[t].double()
        blocks = list(range(start, seq_end, block_size)) if end > start else []
        eligible = [b for b in blocks if b < end]
        means = torch.stack([keys[b : min(b + block_size, seq_end)].mean(0) for b in eligible]) if eligible else None
        chosen = []
        if eligible:
            block_scores = ((qt @ means.T).relu() * wt[:, None]).sum(0)
            forced_ids = {0, len(eligible) - 1}
            if forced == "slots":
                block_scores[list(forced_ids)] = float("inf")
                chosen = _stable_top(block_scores, block_topk)
            else:
                block_scores[list(forced_ids)] = float("-inf")
                chosen = sorted(forced_ids) + _stable_top(block_scores, block_topk)
        omega = [s for i in chosen for s in range(eligible[i], min(eligible[i] + block_size, end))]
        token_scores = ((qt @ keys[omega].T).relu() * wt[:, None]).sum(0) if omega else torch.zeros(0)
        selected.append([omega[i] for i in _stable_top(token_scores, topk)])
        candidates.append([eligible[i] for i in chosen])
    return selected, candidates
