"""S2O (arXiv 2602.22575): index-guided permuted loading with early stopping, spec shared/specs/s2o.md.

No code was published; every concrete choice below is the package's (spec section 4). Causal prefill
of q (B, Hq, Sq, D) over k, v (B, Hkv, Skv, D), Sq <= Skv (bottom-right aligned: a chunk of prefill):

1. Segments of `segment_len` queries tile the chunk; segment g's history is every key before its
   first absolute position s_g = (Skv - Sq) + g * segment_len.
2. Plan (`s2o_plan`): per (batch, KV head, segment) the key order pi_g sorts the history by its score
   against the segment's mean query (over its tokens and its GQA group), descending and stable; the
   guide u_g is the mean of the first `block_n` keys of pi_g, and per query head the query order
   sigma_{g,h} sorts the segment's rows by q . u_g. With `keep_frac` < 1, pi_g holds only the top
   ceil(keep_frac * s_g) keys (a partial top-k instead of the full sort; ties at the cut go to any of
   the tied keys) and -1 after them: an approximation, since the rest of the history is never read.
3. Attention: tiles of `block_m` consecutive sigma entries attend to their segment's keys causally
   (pass 1), then to pi_g block by block (pass 2) until a block's mass gain delta / l falls below
   `tau` for the tile's largest row (`stop_rule="max"`) or its mean row (`"mean"`); that block is kept.

Each row's output is dense softmax attention over its processed set: the segment's keys up to its
position plus the first n_blocks * block_n keys of pi_g (`s2o_processed_mask`, `s2o_reference`).
tau = 0 never stops, which is dense causal attention whatever the plan (with keep_frac = 1). Gradients
treat the processed set as fixed: none flows through pi, sigma or the stop decision. Decode
(single-token steps) is meant to stay dense; this function is the prefill.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from .. import reference
from ..engine import _check_qkv, _default_scale, choose_backend
from ..gathered import chunk_runner, records_gradients, unattended
from ..selection import _check_flags, _check_int, _check_tensor
from ..sinks import check_attn_sink, with_attn_sink

__all__ = [
    "check_options",
    "S2OPlan",
    "S2OStats",
    "STOP_RULES",
    "s2o_attention",
    "s2o_plan",
    "s2o_processed_mask",
    "s2o_reference",
]

STOP_RULES = ("max", "mean")
BLOCK_SIZES = (16, 32, 64, 128)
_MAX_KERNEL_HEAD_DIM = 256
# Elements of scores sorted at once by the planner, and of logits held at once by the PyTorch path.
_SORT_CHUNK_ELEMENTS = 1 << 26
_TORCH_CHUNK_ELEMENTS = 1 << 25


@dataclasses.dataclass(frozen=True)
class S2OPlan:
    """The loading orders of one call (spec 4.1).

    key_order int32 [B, Hkv, sum of the histories]: pi_g of every segment g with a history, packed in
    segment order (`keys(g)` is pi_g, a permutation of [0, s_g)). query_order int32 [B, Hq, Sq]:
    entries [g * S, g * S + len_g) are segment g's query positions (in the chunk) in loading order.
    """

    key_order: torch.Tensor
    query_order: torch.Tensor
    segment_len: int
    seq_len_kv: int
    keep_frac: float = 1.0

    @property
    def seq_len_q(self) -> int:
        return self.query_order.shape[-1]

    @property
    def seq_offset(self) -> int:
        """Absolute position of the chunk's first query (Skv - Sq)."""
        return self.seq_len_kv - self.seq_len_q

    @property
    def num_segments(self) -> int:
        return -(-self.seq_len_q // self.segment_len)

    def rows(self, g: int) -> range:
        """Segment g's query positions in the chunk."""
        return range(g * self.segment_len, min(self.seq_len_q, (g + 1) * self.segment_len))

    def history_len(self, g: int) -> int:
        """s_g: the keys before segment g."""
        return self.seq_offset + g * self.segment_len

    def kept_len(self, g: int) -> int:
        """The entries of pi_g that name keys (the rest are -1): all s_g, or ceil(keep_frac * s_g)."""
        history = self.history_len(g)
        return history if self.keep_frac >= 1.0 else min(history, max(1, math.ceil(self.keep_frac * history)))

    def history_offset(self, g: int) -> int:
        """Where pi_g starts in the packed key order (the kernels compute the same)."""
        return g * self.seq_offset + self.segment_len * (g * (g - 1) // 2)

    def keys(self, g: int) -> torch.Tensor:
        """pi_g int32 [B, Hkv, s_g] (-1 past `kept_len(g)`)."""
        start = self.history_offset(g)
        return self.key_order[..., start : start + self.history_len(g)]

    def queries(self, g: int) -> torch.Tensor:
        """sigma_g int32 [B, Hq, len_g]: positions in the chunk."""
        rows = self.rows(g)
        return self.query_order[..., rows.start : rows.stop]


class S2OStats(NamedTuple):
    """What `return_stats=True` adds: the plan, the processed pi blocks per tile int32 [B, Hq, segments,
    segment_len // block_m] (0 past the last segment's rows), and the density: processed (query, key)
    pairs over causal pairs, a float64 scalar tensor."""

    plan: S2OPlan
    n_blocks: torch.Tensor
    density: torch.Tensor


# ---------------------------------------------------------------------------------- validation
def _check_block(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value not in BLOCK_SIZES:
        raise ValueError(f"{name} must be one of {BLOCK_SIZES} (the kernels' tile sizes), got {value!r}")
    return value


def check_options(*, segment_len=1024, tau=1e-2, block_m=64, block_n=64, stop_rule="max", keep_frac=1.0) -> None:
    """S2O's scalar options (spec section 4, package decisions)."""
    _check_tiles(segment_len, block_m=block_m, block_n=block_n)
    _check_keep_frac(keep_frac)
    if not isinstance(tau, (int, float)) or isinstance(tau, bool):
        raise TypeError(f"tau must be a float, got {type(tau).__name__}")
    if math.isnan(tau) or tau < 0:
        raise ValueError(f"tau must be a float >= 0, got {tau!r}")
    if stop_rule not in STOP_RULES:
        raise ValueError(f"stop_rule must be one of {STOP_RULES}, got {stop_rule!r}")


def _check_keep_frac(keep_frac) -> float:
    if not isinstance(keep_frac, (int, float)) or isinstance(keep_frac, bool):
        raise TypeError(f"keep_frac must be a float, got {type(keep_frac).__name__}")
    if not 0.0 < keep_frac <= 1.0:  # NaN fails too
        raise ValueError(f"keep_frac must be a float in (0, 1], got {keep_frac!r}")
    return float(keep_frac)


def _check_tiles(segment_len, **blocks) -> None:
    """segment_len a positive int and a multiple of each tile size in `blocks` (name: size)."""
    segment_len = _check_int(segment_len, "segment_len", 1)
    for name, size in blocks.items():
        if _check_block(size, name) and segment_len % size:
            raise ValueError(f"segment_len={segment_len} must be a multiple of {name}={size}")


def _check_shapes(q, k, v=None) -> None:
    """q (B, Hq, Sq, D), k and v (B, Hkv, Skv, D) (v: k's own check when absent), Sq <= Skv."""
    _check_qkv(q, k, k if v is None else v, packed=False)
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"S2O is causal prefill: q's {q.shape[2]} positions exceed k's {k.shape[2]}")


def _check_plan_geometry(plan, q, k, segment_len: int, keep_frac: float) -> None:
    """A caller's plan fits this call: its segment length, key count, and its orders' dtype, device and
    shapes (the kernels read key_order by the call's segments). No device sync."""
    if not isinstance(plan, S2OPlan):
        raise TypeError(f"plan must be an S2OPlan (from s2o_plan), got {type(plan).__name__}")
    batch, num_q_heads, seq_q, _ = q.shape
    if (plan.segment_len, plan.seq_len_kv, plan.keep_frac) != (segment_len, k.shape[2], keep_frac):
        raise ValueError(
            f"plan was made for segment_len={plan.segment_len}, Skv={plan.seq_len_kv}, keep_frac={plan.keep_frac}; "
            f"this call has {segment_len}, {k.shape[2]}, {keep_frac}"
        )
    total = plan.history_offset(plan.num_segments) if seq_q else 0
    expected = {"query_order": (batch, num_q_heads, seq_q), "key_order": (batch, k.shape[1], total)}
    for name, shape in expected.items():
        t = getattr(plan, name)
        if t.dtype != torch.int32 or t.device != q.device or tuple(t.shape) != shape:
            raise ValueError(f"plan.{name} must be int32 {shape} on {q.device}, got {t.dtype} {tuple(t.shape)}")


def _check_plan_orders(plan, q) -> None:
    """Every sigma_g of a plan a permutation, every pi_g one too or (keep_frac < 1) kept_len(g) distinct keys
    of the history, then -1 (one sort per segment)."""
    for g in range(plan.num_segments):
        rows, kept, history = plan.rows(g), plan.kept_len(g), plan.history_len(g)
        sigma = plan.queries(g).sort(dim=-1).values
        want = torch.arange(rows.start, rows.stop, device=q.device, dtype=torch.int32)
        if not torch.equal(sigma, want.expand_as(sigma)):
            raise ValueError(f"plan.query_order of segment {g} is not a permutation of [{rows.start}, {rows.stop})")
        pi = plan.keys(g)
        named = pi[..., :kept].sort(dim=-1).values
        in_history = bool(((named >= 0) & (named < history)).all())
        distinct = in_history and bool((named[..., 1:] > named[..., :-1]).all())
        if not distinct or not bool((pi[..., kept:] == -1).all()):
            raise ValueError(
                f"plan.key_order of segment {g} must hold {kept} distinct keys of [0, {history}), then -1"
                + (" (a permutation)" if kept == history else "")
            )


# ---------------------------------------------------------------------------------- plan (spec 4.1)
def _segment_query_means(q, num_kv_heads: int, segment_len: int) -> torch.Tensor:
    """fp32 [B, Hkv, segments, D]: each segment's mean query over its rows and its GQA group."""
    batch, num_q_heads, seq_q, dim = q.shape
    segments = -(-seq_q // segment_len)
    sums = torch.zeros(batch, num_kv_heads, segments, dim, device=q.device)
    for g in range(segments):
        rows = q[:, :, g * segment_len : (g + 1) * segment_len]
        sums[:, :, g] = rows.float().sum(2).unflatten(1, (num_kv_heads, -1)).sum(2) / (
            rows.shape[2] * rows.shape[1] // num_kv_heads
        )
    return sums


def _sort_chunks(histories: list, rows_per_segment: int):
    """Consecutive runs of (segment, history length) whose padded scores fit one sort."""
    chunk = []
    for item in histories:
        if chunk and (len(chunk) + 1) * item[1] * rows_per_segment > _SORT_CHUNK_ELEMENTS:
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


def _key_orders(means, k, histories: list, plan: S2OPlan) -> list:
    """pi_g int32 [B, Hkv, s_g] for each (g, s_g) of `histories`, several segments per sort: scores past a
    segment's history are -inf, which a stable descending sort places last. With keep_frac < 1, a
    partial top-k keeps each segment's first kept_len(g) entries and -1 follows them."""
    orders = []
    for chunk in _sort_chunks(histories, k.shape[0] * k.shape[1]):
        segments = torch.tensor([g for g, _ in chunk], device=k.device)
        lengths = torch.tensor([n for _, n in chunk], device=k.device)
        longest = chunk[-1][1]
        scores = torch.einsum("bhgd,bhnd->bhgn", means[:, :, segments], k[:, :, :longest].float())
        scores = scores.masked_fill(torch.arange(longest, device=k.device) >= lengths[:, None], float("-inf"))
        kept = [plan.kept_len(g) for g, _ in chunk]
        if plan.keep_frac >= 1.0:
            order = torch.sort(scores, dim=-1, descending=True, stable=True).indices.int()
        else:
            order = _top_ordered(scores, max(kept))
        orders += [torch.nn.functional.pad(order[:, :, i, :m], (0, n - m), value=-1) for i, ((_, n), m) in
                   enumerate(zip(chunk, kept))]  # fmt: skip
    return orders


def _top_ordered(scores, count: int) -> torch.Tensor:
    """int32: the columns of the `count` largest scores per row, by descending score (ties to the lower
    column), as the full stable sort's first `count` would be (a tie at the cut goes to any tied column)."""
    columns = torch.topk(scores, count, dim=-1, sorted=False).indices.sort(dim=-1).values
    ranked = torch.sort(scores.gather(-1, columns), dim=-1, descending=True, stable=True).indices
    return columns.gather(-1, ranked).int()


def _query_order(q, k, plan: S2OPlan, block_n: int) -> torch.Tensor:
    """sigma int32 [B, Hq, Sq]: per segment and query head, the rows sorted by q . u_g, u_g the mean of the
    first block_n keys of pi_g (the package applies the guide per query head; a segment without a
    history keeps its physical order)."""
    group = q.shape[1] // k.shape[1]
    order = torch.arange(q.shape[2], device=q.device, dtype=torch.int32).expand(q.shape[:3]).clone()
    for g in range(plan.num_segments):
        if plan.history_len(g) == 0:
            continue
        first = plan.keys(g)[:, :, : min(block_n, plan.kept_len(g))].long()
        guide = k.gather(2, first[..., None].expand(-1, -1, -1, k.shape[-1])).float().mean(2)
        rows = plan.rows(g)
        scores = torch.einsum(
            "bhsd,bhd->bhs", q[:, :, rows.start : rows.stop].float(), guide.repeat_interleave(group, 1)
        )
        order[:, :, rows.start : rows.stop] = (
            torch.sort(scores, dim=-1, descending=True, stable=True).indices.int() + rows.start
        )
    return order


@torch.no_grad()
def s2o_plan(q, k, *, segment_len: int = 1024, block_n: int = 64, keep_frac: float = 1.0) -> S2OPlan:
    """The key and query loading orders of S2O (spec 4.1) for q (B, Hq, Sq, D) and k (B, Hkv, Skv, D);
    `keep_frac` < 1 keeps only the top ceil(keep_frac * s_g) keys of each history (approximate)."""
    _check_shapes(q, k)
    _check_tiles(segment_len, block_n=block_n)  # the plan has no query tiles
    keep_frac = _check_keep_frac(keep_frac)
    empty_order = torch.zeros(q.shape[:3], dtype=torch.int32, device=q.device)
    empty_keys = k.new_zeros(k.shape[0], k.shape[1], 0, dtype=torch.int32)
    plan = S2OPlan(empty_keys, empty_order, segment_len, k.shape[2], keep_frac)
    histories = [(g, plan.history_len(g)) for g in range(plan.num_segments) if plan.history_len(g) > 0]
    orders = _key_orders(_segment_query_means(q, k.shape[1], segment_len), k, histories, plan)
    plan = dataclasses.replace(plan, key_order=torch.cat([plan.key_order, *orders], dim=-1))
    return dataclasses.replace(plan, query_order=_query_order(q, k, plan, block_n))


# ---------------------------------------------------------------------------------- processed set (spec 4.3)
def _ranks(order, size: int) -> torch.Tensor:
    """int64 [..., size]: where each index in [0, size) stands in `order` (a permutation, or distinct
    indices then -1: pi with keep_frac < 1); an index the order does not hold ranks past any budget."""
    never = torch.iinfo(torch.int64).max
    ranks = torch.arange(order.shape[-1], device=order.device).expand(order.shape)
    spare = torch.where(order >= 0, order.long(), size)  # the -1 entries land in a column dropped after
    out = torch.full((*order.shape[:-1], size + 1), never, dtype=torch.long, device=order.device)
    return out.scatter_(-1, spare, ranks)[..., :size]


def _entry_blocks(plan: S2OPlan, n_blocks, block_m: int) -> torch.Tensor:
    """int64 [B, Hq, Sq]: the processed pi blocks of each sigma entry's tile (entry e sits in tile e // block_m)."""
    per_entry = n_blocks.flatten(2).repeat_interleave(block_m, dim=-1)
    return per_entry[..., : plan.seq_len_q].long()


def _check_n_blocks(plan: S2OPlan, n_blocks, block_m: int) -> None:
    tiles = plan.segment_len // block_m
    shape = (*plan.query_order.shape[:2], plan.num_segments, tiles)
    if not isinstance(n_blocks, torch.Tensor) or tuple(n_blocks.shape) != shape:
        raise ValueError(f"n_blocks must be [B, Hq, segments, segment_len // block_m] = {shape}")


def s2o_processed_mask(plan: S2OPlan, n_blocks, *, block_m: int = 64, block_n: int = 64, rows=None) -> torch.Tensor:
    """bool [B, Hq, R, Skv]: the keys each query row attended to, given the plan and the processed pi
    blocks per tile (`S2OStats.n_blocks`): its segment's keys up to its position, and the first
    n_blocks * block_n keys of pi_g. `rows` (int, positions in the chunk) picks rows; default all."""
    if not isinstance(plan, S2OPlan):
        raise TypeError(f"plan must be an S2OPlan (from s2o_plan), got {type(plan).__name__}")
    _check_n_blocks(plan, n_blocks, block_m)
    order = plan.query_order.long()
    device = order.device
    rows = torch.arange(plan.seq_len_q, device=device) if rows is None else _checked_rows(rows, plan.seq_len_q, device)
    entry = _ranks(order, plan.seq_len_q)  # where each row sits in the query order
    budget = _entry_blocks(plan, n_blocks, block_m).gather(2, entry[..., rows]) * block_n  # [B, Hq, R]
    segment = rows // plan.segment_len
    keys = torch.arange(plan.seq_len_kv, device=device)
    own = (keys <= (rows + plan.seq_offset)[:, None]) & (
        keys >= (segment * plan.segment_len + plan.seq_offset)[:, None]
    )
    mask = own.expand(*budget.shape, -1).clone()
    group = order.shape[1] // plan.key_order.shape[1]
    for g in segment.unique().tolist():
        history, picked = plan.history_len(g), segment == g
        if history == 0:
            continue
        rank = _ranks(plan.keys(g).repeat_interleave(group, dim=1), history)
        mask[:, :, picked, :history] = rank[:, :, None, :] < budget[:, :, picked, None]
    return mask


def _checked_rows(rows, seq_q: int, device) -> torch.Tensor:
    _check_tensor(rows, "rows", dim=1, dtypes=(torch.int32, torch.int64))
    if rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < seq_q):
        raise ValueError(f"rows must be query positions in [0, {seq_q})")
    return rows.to(device).long()


def s2o_reference(q, k, v, plan: S2OPlan, n_blocks, *, block_m=64, block_n=64, softmax_scale=None,
                  compute_dtype=torch.float64):  # fmt: skip
    """(out, lse) of dense attention over the processed set of `s2o_processed_mask`, in `compute_dtype`."""
    _check_qkv(q, k, v, packed=False)
    _check_plan_geometry(plan, q, k, getattr(plan, "segment_len", None), getattr(plan, "keep_frac", None))
    allowed = s2o_processed_mask(plan, n_blocks, block_m=block_m, block_n=block_n)
    return reference.masked_attention(q, k, v, allowed, softmax_scale=softmax_scale, compute_dtype=compute_dtype)


def _density(plan: S2OPlan, n_blocks, block_m: int, block_n: int) -> torch.Tensor:
    """Processed (query, key) pairs over causal pairs, from the counts alone (no mask)."""
    offset, segment_len, seq_q = plan.seq_offset, plan.segment_len, plan.seq_len_q
    entries = torch.arange(seq_q, device=n_blocks.device)
    kept = torch.tensor([plan.kept_len(g) for g in range(plan.num_segments)], device=n_blocks.device)
    named = kept[entries // segment_len]  # the history keys pi names: all of them unless keep_frac < 1
    from_history = torch.minimum(_entry_blocks(plan, n_blocks, block_m) * block_n, named).sum(dtype=torch.float64)
    heads = plan.query_order.shape[0] * plan.query_order.shape[1]
    local = heads * (entries % segment_len + 1).sum(dtype=torch.float64)
    causal = heads * (entries + offset + 1).sum(dtype=torch.float64)
    return (from_history + local) / causal.clamp(min=1)


# ---------------------------------------------------------------------------------- PyTorch path
def _stop_blocks(local, local_allowed, past, block_m, block_n, tau, stop_rule) -> torch.Tensor:
    """int64 [..., tiles]: pi blocks each tile processes. local [..., rows, Sg] and past [..., rows, s_g]
    are the logits of a segment's rows in loading order against its own keys and its history (pi
    order). The gain ratio of block i is its mass over the local mass plus blocks 0..i, taken in log
    space: against one reference max, a block far above the earlier ones would make both 0 (0/0)."""
    local = local.double().masked_fill(~local_allowed, float("-inf"))
    past = past.double()
    num_blocks = -(-past.shape[-1] // block_n)
    past = torch.nn.functional.pad(past, (0, num_blocks * block_n - past.shape[-1]), value=float("-inf"))
    log_gain = past.unflatten(-1, (num_blocks, block_n)).logsumexp(-1)  # [..., rows, blocks]
    log_mass = torch.cat([local.logsumexp(-1, keepdim=True), log_gain], -1).logcumsumexp(-1)[..., 1:]
    ratio = torch.exp(log_gain - log_mass)
    rows = ratio.shape[-2]
    tiles = -(-rows // block_m)
    real = torch.arange(tiles * block_m, device=ratio.device) < rows
    ratio = torch.nn.functional.pad(ratio, (0, 0, 0, tiles * block_m - rows)).unflatten(-2, (tiles, block_m))
    if stop_rule == "max":
        stat = ratio.masked_fill(~real.view(tiles, block_m, 1), float("-inf")).amax(-2)
    else:
        stat = ratio.sum(-2) / real.view(tiles, block_m).sum(-1)[:, None]
    below = stat < tau  # [..., tiles, blocks]
    return torch.where(below.any(-1), below.int().argmax(-1) + 1, num_blocks)


def _head_chunks(num_kv_heads: int, per_head: int):
    step = max(1, _TORCH_CHUNK_ELEMENTS // max(per_head, 1))
    return [slice(lo, min(lo + step, num_kv_heads)) for lo in range(0, num_kv_heads, step)]


def _heads_of(kv_heads: slice, group: int) -> slice:
    """The query heads of a slice of KV heads."""
    return slice(kv_heads.start * group, kv_heads.stop * group)


def _segment_attention(q, k, v, plan: S2OPlan, g: int, kv_heads: slice, options, scale, compute):
    """(segment g's output rows and their LSE in physical order, the pi blocks of its tiles) for a slice
    of KV heads, computed in `compute` and differentiable in q, k and v (the stop decision is not)."""
    block_m, block_n, tau, stop_rule = options
    rows, named = plan.rows(g), plan.kept_len(g)  # pi_g's entries that name keys (all of s_g for keep_frac 1)
    group = q.shape[1] // k.shape[1]
    q_heads = _heads_of(kv_heads, group)
    order = plan.queries(g)[:, q_heads].long() - rows.start  # [B, h, len]: local rows in loading order
    segment_q = q[:, q_heads, rows.start : rows.stop]
    queries = segment_q.gather(2, order[..., None].expand(-1, -1, -1, q.shape[-1])).to(compute)
    start = plan.seq_offset + rows.start
    pi = plan.keys(g)[:, kv_heads, :named].long()[..., None]

    def own_and_past(t):
        t = t[:, kv_heads]
        past = t.gather(2, pi.expand(-1, -1, -1, t.shape[-1]))
        return (x.repeat_interleave(group, 1).to(compute) for x in (t[:, :, start : start + len(rows)], past))

    own_k, past_k = own_and_past(k)
    own_v, past_v = own_and_past(v)
    local = queries @ own_k.transpose(-1, -2) * scale
    local_allowed = torch.arange(len(rows), device=q.device) <= order[..., None]
    past = queries @ past_k.transpose(-1, -2) * scale
    with torch.no_grad():
        if named:
            n = _stop_blocks(local, local_allowed, past, block_m, block_n, tau, stop_rule)
        else:
            n = torch.zeros(*order.shape[:2], -(-len(rows) // block_m), dtype=torch.long, device=q.device)
    budget = n.repeat_interleave(block_m, dim=-1)[..., : len(rows), None] * block_n
    allowed = torch.cat([local_allowed, torch.arange(named, device=q.device) < budget], dim=-1)
    probs, lse = reference.masked_softmax(torch.cat([local, past], dim=-1), allowed)
    out = probs @ torch.cat([own_v, past_v], dim=2)
    return torch.empty_like(out).scatter(2, order[..., None].expand_as(out), out), lse.scatter(2, order, lse), n


def _torch_s2o(q, k, v, plan: S2OPlan, options, scale, compute):
    """The PyTorch path: (out in q's dtype, lse (fp64 for fp64, else fp32), n_blocks int32 [B, Hq, segments,
    tiles]), a segment and a slice of KV heads at a time."""
    batch, num_q_heads, _, dim = q.shape
    group, tiles = num_q_heads // k.shape[1], plan.segment_len // options[0]
    # Under autograd each segment keeps its logits and probabilities against its whole history (S^2 / 2
    # over all segments): beyond gathered.SAVED_ELEMENTS they are recomputed in backward instead.
    kept = sum(len(plan.rows(g)) * (len(plan.rows(g)) + plan.history_len(g)) for g in range(plan.num_segments))
    run = chunk_runner(records_gradients(q, k, v), 2 * batch * num_q_heads * kept)
    outs, lses, counts = [], [], []
    for g in range(plan.num_segments):
        span = len(plan.rows(g)) * (len(plan.rows(g)) + plan.history_len(g)) * batch * group * dim
        parts = [
            run(_segment_attention, q, k, v, plan, g, heads, options, scale, compute)
            for heads in _head_chunks(k.shape[1], span)
        ]
        outs.append(torch.cat([o for o, _, _ in parts], dim=1))
        lses.append(torch.cat([lse for _, lse, _ in parts], dim=1))
        n = torch.cat([n for _, _, n in parts], dim=1)
        counts.append(torch.nn.functional.pad(n, (0, tiles - n.shape[-1])))
    if not outs:
        empty = torch.zeros(batch, num_q_heads, 0, tiles, dtype=torch.int32, device=q.device)
        return unattended(q, k, v), q.new_zeros(batch, num_q_heads, 0).float(), empty
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2), torch.stack(counts, dim=2).int()


# ---------------------------------------------------------------------------------- public API
def _resolve(backend: str, q) -> str:
    fits = q.shape[-1] <= _MAX_KERNEL_HEAD_DIM and q.shape[2] > 0
    return choose_backend(backend, q, fits, f"at least one query and head dim <= {_MAX_KERNEL_HEAD_DIM}")


def _per_segment(n_tiles, plan: S2OPlan, block_m: int) -> torch.Tensor:
    """The kernel's [B, Hq, tiles of the chunk] counts as [B, Hq, segments, tiles per segment]."""
    tiles = plan.segment_len // block_m
    padded = torch.nn.functional.pad(n_tiles, (0, plan.num_segments * tiles - n_tiles.shape[-1]))
    return padded.unflatten(-1, (plan.num_segments, tiles))


def s2o_attention(q, k, v, *, segment_len=1024, tau=1e-2, block_m=64, block_n=64, stop_rule="max",
                  keep_frac=1.0, softmax_scale=None, attn_sink=None, return_stats=False, plan=None,
                  check_plan=True, backend="auto"):  # fmt: skip
    """Causal S2O prefill attention of q (B, Hq, Sq, D) over k, v (B, Hkv, Skv, D), Sq <= Skv (spec 4).

    `tau` >= 0 is the stop threshold on a pi block's mass gain (0: dense causal attention); `stop_rule`
    'max' tests the tile's largest row, 'mean' its mean row. `keep_frac` in (0, 1]: below 1 each segment
    walks only the top ceil(keep_frac * s_g) keys of its history (a partial top-k; approximate even at
    tau = 0). `plan` (an `S2OPlan`) replaces the computed loading orders; its geometry (keep_frac
    included) is always checked against the call, and its orders to be well formed (one sort per
    segment; `check_plan=False` skips the sorts for plans `s2o_plan` made: a malformed order gives wrong
    outputs, never an out-of-bounds access).
    Differentiable in q, k and v. Returns the output in q's dtype, and with `return_stats` also an
    `S2OStats` (plan, n_blocks, density). `attn_sink` as in `block_sparse_attn` (the stop rule does
    not see it: a block's gain is measured against the attended mass only). Backends: 'triton' (CUDA,
    or the interpreter for 16/32-bit floats other than bfloat16), 'torch' (per segment, in float32 or
    float64 for float64 input), 'reference' (the same in float64); 'auto' picks.
    """
    _check_shapes(q, k, v)
    check_options(
        segment_len=segment_len, tau=tau, block_m=block_m, block_n=block_n, stop_rule=stop_rule, keep_frac=keep_frac
    )
    keep_frac = float(keep_frac)
    check_attn_sink(attn_sink, q.shape[1], q.device)
    _check_flags(return_stats=return_stats, check_plan=check_plan)
    tau = float(tau)
    scale = _default_scale(softmax_scale, q.shape[-1])
    resolved = _resolve(backend, q)
    if plan is None:
        plan = s2o_plan(q, k, segment_len=segment_len, block_n=block_n, keep_frac=keep_frac)
    else:
        _check_plan_geometry(plan, q, k, segment_len, keep_frac)
        if check_plan:
            _check_plan_orders(plan, q)
    # Every gain ratio is below 1 (a row's own key is in l), but a block far above the local logits
    # rounds it to exactly 1 (in fp32, and in fp64 past ~37 nats): tau >= 1, which must stop every tile
    # after one block, is tested as 2 so that no rounding keeps a tile going.
    stop_tau = tau if tau < 1.0 else 2.0
    if resolved == "triton":
        from ..kernels.s2o_attn import s2o_attn_fwd

        out, lse, n_tiles = s2o_attn_fwd(
            q, k, v, plan.key_order, plan.query_order, segment_len, block_m, block_n, stop_tau, stop_rule == "mean",
            scale,
        )  # fmt: skip
        n_blocks = _per_segment(n_tiles, plan, block_m)
    else:
        compute = torch.float64 if resolved == "reference" else reference.working_dtype(q.dtype)
        out, lse, n_blocks = _torch_s2o(q, k, v, plan, (block_m, block_n, stop_tau, stop_rule), scale, compute)
    out = with_attn_sink(out, lse, attn_sink)
    if not return_stats:
        return out
    return out, S2OStats(plan, n_blocks, _density(plan, n_blocks, block_m, block_n))
