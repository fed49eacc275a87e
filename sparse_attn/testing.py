"""Seeded q/k/v generators with the structure of real long-context attention.

Random Gaussian q and k give near-uniform attention rows, which no sparse-attention method can
exploit and on which every method looks equally good (or bad). :func:`structured_qkv` plants the
patterns that real long-context attention heads show -- RoPE, attention sinks, a local window,
heavy-hitter ("vertical") keys and far-away retrieval spans ("needles") -- each switchable, so
benchmarks and quality checks of MoBA, XAttention, ... see inputs where sparsity pays off and
where a wrong selection measurably loses attention mass.

Only generation lives here (plus :func:`apply_rope`); measuring recall is left to the callers.
"""

from __future__ import annotations

import collections
import math
import os
import traceback
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .reference import working_dtype
from .selection import _check_int

__all__ = [
    "HostSyncs",
    "RetrievalSpan",
    "StructuredInputs",
    "apply_rope",
    "assert_flash_rule",
    "assert_patched_bf16_follows_flash_rule",
    "cache_argument",
    "assert_flash_rule_with_grads",
    "max_err",
    "planted_indexer_inputs",
    "random_block_layout",
    "structured_qkv",
]

# Fraction of queries (per query head) that align to each heavy-hitter key.
_HEAVY_HITTER_PROB = 0.5
# Target std of the logits q.k/sqrt(D) between unrelated positions: real heads have O(1) spread.
_BACKGROUND_LOGIT_STD = 1.0
# Std of the noise kept in the dims that carry the planted features, so no dim is exactly zero.
_FEATURE_DIM_NOISE = 0.1
# Offsets (nats) on top of log(seq_len / n_keys) for each planted logit boost. Tuned so that, at
# 1K-4K keys, queries in the second half of the sequence put roughly 30-40% of their mass on the
# sinks, 25-30% on the +-64 local window, 20% on their aligned heavy hitters, and a retrieval query
# 60-90% on its span (see tests/test_structured_inputs.py).
_SINK_OFFSET = 0.4
_LOCAL_OFFSET = 2.5
_HEAVY_OFFSET = -0.3
_RETRIEVAL_OFFSET = 3.0
# The smallest boost a structure gets, so it still shows when seq_len is barely above its size.
_MIN_BOOST = 1.0


@dataclass(frozen=True)
class RetrievalSpan:
    """One planted needle: queries ``q_start:q_end`` of every query head that reads kv head
    ``kv_head`` in batch ``batch`` share a random direction with keys ``k_start:k_end``.

    Ranges are half-open. ``q_start``/``q_end`` index the sequence axis of ``q`` (row ``i`` sits at
    key position ``i + seq_len - seq_len_q``); ``k_start``/``k_end`` index the sequence axis of k.
    """

    batch: int
    kv_head: int
    q_start: int
    q_end: int
    k_start: int
    k_end: int


@dataclass
class StructuredInputs:
    """Output of :func:`structured_qkv`: the tensors and where the structure was planted.

    ``heavy_hitters`` is int64 ``(B, Hkv, n_heavy)``, sorted key positions, on the tensors' device.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    sink_positions: list[int]
    heavy_hitters: torch.Tensor
    retrieval_spans: list[RetrievalSpan]


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding, Llama-style half rotation, returned as a new tensor.

    ``x`` is ``(B, H, S, D)`` with ``D`` even; dim ``i`` and dim ``i + D/2`` form a pair rotated by
    ``positions * base ** (-2i / D)``. ``positions`` is ``(S,)`` (shared by the batch) or ``(B, S)``.
    Computed in float32 (float64 for float64 inputs) and returned in ``x.dtype``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, S, D), got shape {tuple(x.shape)}")
    B, _, S, D = x.shape
    if D % 2:
        raise ValueError(f"x's last dim (head_dim) must be even, got {D}")
    if not isinstance(base, (int, float)) or isinstance(base, bool) or not base > 0:
        raise ValueError(f"base must be a positive number, got {base!r}")
    positions = torch.as_tensor(positions)
    if positions.dim() == 1 and positions.shape[0] == S:
        pos = positions
    elif positions.dim() == 2 and tuple(positions.shape) == (B, S):
        pos = positions[:, None, :]
    else:
        raise ValueError(f"positions must be (S,) or (B, S) = ({B}, {S}), got {tuple(positions.shape)}")
    work = working_dtype(x.dtype)
    cos, sin = _rope_tables(pos.to(x.device), D, base, work)
    return _rotate(x.to(work), cos, sin).to(x.dtype)


def _rope_tables(pos: torch.Tensor, dim: int, base: float, dtype: torch.dtype):
    # Angles in float64: at 128K positions float32 products would lose ~1e-2 rad.
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    angles = pos.to(torch.float64)[..., None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    # In place, for the generator's multi-GB tensors: one half-size temporary instead of six.
    x1, x2 = x.chunk(2, dim=-1)
    x1_old = x1.clone()
    x1.mul_(cos).addcmul_(x2, sin, value=-1)
    x2.mul_(cos).addcmul_(x1_old, sin)


def structured_qkv(
    batch: int = 1,
    num_q_heads: int = 4,
    num_kv_heads: int = 2,
    seq_len: int = 1024,
    head_dim: int = 64,
    *,
    seq_len_q: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    rope: bool = True,
    rope_base: float = 10000.0,
    num_sinks: int = 4,
    local_window: int = 64,
    num_heavy_hitters: int = 8,
    num_retrieval_spans: int = 2,
    retrieval_span_len: int = 32,
    strength: float = 1.0,
) -> StructuredInputs:
    """Seeded q ``(B, Hq, Sq, D)``, k and v ``(B, Hkv, S, D)`` with planted attention structure.

    Queries are the last ``Sq = seq_len_q`` positions (bottom-right aligned: q row ``i`` sits at key
    position ``i + S - Sq``), and query head ``h`` reads kv head ``h // (Hq // Hkv)``. Same arguments
    and seed give bit-identical tensors (drawn in float32 on the CPU with a local generator, then
    cast/moved to ``dtype``/``device``). Each structure below is switched off by its 0/False value.

    Each head's ``D`` dims are split into *content* dims and a few *feature* dims (the
    ``2 * ceil(n_directions / 2)`` lowest-frequency RoPE dims, at most ``D / 2``), so planted
    features and content noise do not leak into each other's logits. The planted structure,
    with every logit boost (in nats of ``q.k / sqrt(D)``) multiplied by ``strength``:

    * **content**: i.i.d. Gaussian noise per q/k vector in the content dims, sized so unrelated
      positions have logit std ~1; the feature dims get only small noise (std 0.1).
    * **local window** (``local_window > 0``): a smooth latent per kv head and position -- Gaussian
      knots every ``local_window`` positions (random phase), smoothstep-interpolated and variance-normalised -- is
      added to the content dims of k and of q (q heads use their kv head's latent at their own
      positions). q_t and k_j therefore correlate for ``|t - j| < 2 * local_window`` and not beyond,
      with boost ``log(S / local_window) + 2.5`` at ``t == j``, decaying with distance. RoPE makes
      the decay faster (its high-frequency pairs decorrelate within a few positions), which is
      also why the window's share shrinks slowly at very long contexts (~25% at 2K keys, ~8% at
      128K for late queries).
    * **RoPE** (``rope``): :func:`apply_rope` with ``rope_base`` on q and k at their absolute
      positions, applied to the content part (noise + latent). The features below are added after
      the rotation, i.e. they match at any distance, like NoPE / low-frequency dims in real models.
    * **attention sinks** (``num_sinks > 0``): keys ``0 .. num_sinks-1`` carry a per-(batch, kv
      head) sink direction that every query also carries; boost ``log(S / num_sinks) + 0.4``.
    * **heavy hitters** (``num_heavy_hitters > 0``): per (batch, kv head), that many distinct key
      positions drawn uniformly from ``[num_sinks, S)`` (returned in ``heavy_hitters``) each carry
      their own direction; every query (each query head independently) carries each heavy-hitter
      direction with probability 0.5, so the key is a "vertical" column of attention. Boost
      ``log(S / (0.5 * num_heavy_hitters)) - 0.3`` for an aligned query.
    * **retrieval spans** (``num_retrieval_spans > 0``): each span gets a (batch, kv head), spread
      over all pairs before any repeats, a query range of ``retrieval_span_len`` rows and a key span
      of ``retrieval_span_len`` keys lying wholly in the past of that range, at least
      ``max(2 * local_window, retrieval_span_len)`` before its first query and after the sinks.
      Spans sharing a (batch, kv head) have disjoint query and key ranges. Those queries, in all
      query heads of the group, and those keys share a fresh direction; boost
      ``log(S / retrieval_span_len) + 3``. Described in ``retrieval_spans``.
    * **v**: i.i.d. standard normal, no structure.

    Each planted direction is a unit vector in the feature dims, orthonormal to the others of its
    (batch, kv head) when they fit (``n_directions <= feature dims``), and scaled by
    ``sqrt(boost * sqrt(D))`` on both the query and the key side, so entries stay moderate
    (|q|, |k| entries below ~30 up to 128K keys at ``strength=1``) and float16 is safe.

    The boosts grow with ``log(seq_len)`` so that the sinks', heavy hitters' and spans' share of
    the late queries' mass does not fade as the context grows; earlier queries see fewer
    background keys and put even more of their mass on the planted structure.
    """
    batch = _check_int(batch, "batch", 1)
    num_q_heads = _check_int(num_q_heads, "num_q_heads", 1)
    num_kv_heads = _check_int(num_kv_heads, "num_kv_heads", 1)
    seq_len = _check_int(seq_len, "seq_len", 1)
    head_dim = _check_int(head_dim, "head_dim", 4)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates pairs of dims), got {head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if seq_len_q is None:
        seq_len_q = seq_len
    seq_len_q = _check_int(seq_len_q, "seq_len_q", 1)
    if seq_len_q > seq_len:
        raise ValueError(f"seq_len_q ({seq_len_q}) must be <= seq_len ({seq_len})")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device: {err}") from None
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    if not isinstance(rope, bool):
        raise TypeError(f"rope must be a bool, got {type(rope).__name__}")
    if not isinstance(rope_base, (int, float)) or isinstance(rope_base, bool):
        raise TypeError(f"rope_base must be a number, got {type(rope_base).__name__}")
    if not (math.isfinite(rope_base) and rope_base > 1):
        raise ValueError(f"rope_base must be a finite number > 1, got {rope_base}")
    num_sinks = _check_int(num_sinks, "num_sinks", 0)
    local_window = _check_int(local_window, "local_window", 0)
    num_heavy_hitters = _check_int(num_heavy_hitters, "num_heavy_hitters", 0)
    num_retrieval_spans = _check_int(num_retrieval_spans, "num_retrieval_spans", 0)
    retrieval_span_len = _check_int(retrieval_span_len, "retrieval_span_len", 1)
    if not isinstance(strength, (int, float)) or isinstance(strength, bool):
        raise TypeError(f"strength must be a number, got {type(strength).__name__}")
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"strength must be a finite number >= 0, got {strength}")
    if num_sinks > seq_len:
        raise ValueError(f"num_sinks ({num_sinks}) must be <= seq_len ({seq_len})")
    if num_heavy_hitters > seq_len - num_sinks:
        raise ValueError(
            f"num_heavy_hitters ({num_heavy_hitters}) must be <= seq_len - num_sinks ({seq_len - num_sinks})"
        )

    B, Hq, Hkv, S, Sq, D = batch, num_q_heads, num_kv_heads, seq_len, seq_len_q, head_dim
    group = Hq // Hkv
    offset = S - Sq
    gap = max(2 * local_window, retrieval_span_len)
    # An impossible span request should fail before any large allocation.
    _check_span_room(S, offset, num_sinks, gap, num_retrieval_spans, retrieval_span_len)

    def boost(n_keys: float, extra: float) -> float:
        return strength * max(math.log(S / n_keys) + extra, _MIN_BOOST)

    n_dirs = (num_sinks > 0) + num_heavy_hitters + num_retrieval_spans
    pairs = min(-(-n_dirs // 2), D // 4)
    m = 2 * pairs
    half = D // 2
    # The lowest-frequency pairs carry the features; content keeps the rest, whole pairs, so
    # RoPE never rotates content into feature dims.
    feat_idx = torch.cat((torch.arange(half - pairs, half), torch.arange(D - pairs, D)))
    d_content = D - m
    content_mask = torch.ones(D)
    content_mask[feat_idx] = 0.0

    # The latent alone gives the diagonal boost a_lat^2 * d_content / sqrt(D); the noise tops the
    # content up so unrelated positions keep the target logit spread.
    a_lat = 0.0
    if local_window:
        a_lat = math.sqrt(boost(local_window, _LOCAL_OFFSET) * math.sqrt(D) / d_content)
    total_var = _BACKGROUND_LOGIT_STD * math.sqrt(D / d_content)
    a_noise = math.sqrt(max(total_var - a_lat**2, 0.25 * total_var))
    noise_scale = content_mask * a_noise + (1 - content_mask) * _FEATURE_DIM_NOISE

    # Everything about the keys is drawn before anything that depends on seq_len_q, so k and v
    # do not change with seq_len_q (except for the retrieval spans' keys).
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, S, D, generator=g).mul_(noise_scale)
    v = torch.randn(B, Hkv, S, D, generator=g)
    if a_lat:
        knots = torch.randn(B, Hkv, S // local_window + 2, D, generator=g).mul_(content_mask * a_lat)
        shift = int(torch.randint(0, local_window, (1,), generator=g))
        # The last position reads knot (S - 1 + shift) // W + 1, one past the S // W + 2 drawn when the
        # phase carries over: draw it then (only such lengths change; the others keep their values).
        missing = (S - 1 + shift) // local_window + 2 - knots.shape[2]
        if missing > 0:
            extra = torch.randn(B, Hkv, missing, D, generator=g).mul_(content_mask * a_lat)
            knots = torch.cat([knots, extra], dim=2)
    heavy = torch.zeros(B, Hkv, 0, dtype=torch.int64)
    if num_heavy_hitters:
        # Top-k of uniform keys: a vectorised sample without replacement per (batch, kv head).
        heavy = torch.rand(B, Hkv, S - num_sinks, generator=g).topk(num_heavy_hitters, dim=-1).indices
        heavy = heavy.sort(dim=-1).values + num_sinks
    if n_dirs:
        basis = torch.randn(B, Hkv, m, n_dirs, generator=g)
        if n_dirs <= m:
            basis = torch.linalg.qr(basis).Q
        else:
            basis = basis / basis.norm(dim=-2, keepdim=True)
        dirs = basis.transpose(-1, -2).contiguous()  # (B, Hkv, n_dirs, m), unit rows
    spans = _place_spans(g, B, Hkv, S, offset, num_sinks, gap, num_retrieval_spans, retrieval_span_len)
    q = torch.randn(B, Hq, Sq, D, generator=g).mul_(noise_scale)
    if num_heavy_hitters:
        aligned = torch.rand(B, Hq, Sq, num_heavy_hitters, generator=g) < _HEAVY_HITTER_PROB

    if a_lat:
        pos = torch.arange(S) + shift
        idx = pos // local_window
        frac = (pos % local_window).float() / local_window
        smooth = frac * frac * (3 - 2 * frac)  # smoothstep: no kinks at the knots
        norm = torch.sqrt((1 - smooth) ** 2 + smooth**2)  # flat variance between knots
        w0, w1 = ((1 - smooth) / norm)[:, None], (smooth / norm)[:, None]
        for h in range(Hkv):  # per head, so temporaries stay one head in size
            latent = knots[:, h, idx] * w0 + knots[:, h, idx + 1] * w1
            k[:, h] += latent
            for hq in range(h * group, (h + 1) * group):
                q[:, hq] += latent[:, offset:]
        del knots, latent

    if rope:
        # One table for all heads; the queries' positions are the tail of the keys'.
        cos, sin = _rope_tables(torch.arange(S), D, float(rope_base), torch.float32)
        for h in range(Hkv):
            _rotate_(k[:, h], cos, sin)
        for h in range(Hq):
            _rotate_(q[:, h], cos[offset:], sin[offset:])

    if n_dirs:
        # Added after RoPE: the features match at any distance.
        sqrt_d = math.sqrt(D)
        coef_q = torch.zeros(B, Hq, Sq, n_dirs)
        col = 0
        if num_sinks:
            amp = math.sqrt(boost(num_sinks, _SINK_OFFSET) * sqrt_d)
            coef_q[..., col] = amp
            sink_feat = (amp * dirs[:, :, col, None, :]).expand(B, Hkv, num_sinks, m)
            k[:, :, :num_sinks].index_add_(-1, feat_idx, sink_feat)
            col += 1
        if num_heavy_hitters:
            amp = math.sqrt(boost(_HEAVY_HITTER_PROB * num_heavy_hitters, _HEAVY_OFFSET) * sqrt_d)
            coef_q[..., col : col + num_heavy_hitters] = aligned * amp
            bi = torch.arange(B)[:, None, None]
            hi = torch.arange(Hkv)[None, :, None]
            rows = k[bi, hi, heavy]  # a copy; the positions are distinct, so writing back is safe
            rows.index_add_(-1, feat_idx, amp * dirs[:, :, col : col + num_heavy_hitters])
            k[bi, hi, heavy] = rows
            col += num_heavy_hitters
        if num_retrieval_spans:
            amp = math.sqrt(boost(retrieval_span_len, _RETRIEVAL_OFFSET) * sqrt_d)
            for j, sp in enumerate(spans):
                c = col + j
                heads = slice(sp.kv_head * group, (sp.kv_head + 1) * group)
                coef_q[sp.batch, heads, sp.q_start : sp.q_end, c] = amp
                span_feat = (amp * dirs[sp.batch, sp.kv_head, c]).expand(retrieval_span_len, m)
                k[sp.batch, sp.kv_head, sp.k_start : sp.k_end].index_add_(-1, feat_idx, span_feat)
        dirs_q = dirs.repeat_interleave(group, dim=1)
        for h in range(Hq):
            q[:, h].index_add_(-1, feat_idx, coef_q[:, h] @ dirs_q[:, h])

    # Move first, then cast: on a GPU the cast is far cheaper, and rounding is the same anywhere.
    return StructuredInputs(
        q=q.to(device).to(dtype),
        k=k.to(device).to(dtype),
        v=v.to(device).to(dtype),
        sink_positions=list(range(num_sinks)),
        heavy_hitters=heavy.to(device),
        retrieval_spans=spans,
    )


def _check_span_room(S: int, offset: int, num_sinks: int, gap: int, count: int, length: int) -> None:
    if count and _query_range(S, offset, num_sinks, gap, length)[0] > S - length:
        raise ValueError(
            f"seq_len ({S}) too short to plant retrieval spans of retrieval_span_len={length} "
            f"(each needs its keys after {num_sinks} sinks and >= {gap} positions before its queries"
            + (f", which must lie in the last seq_len_q={S - offset} positions" if offset else "")
            + "); lower num_retrieval_spans, retrieval_span_len or local_window"
        )


def _query_range(S: int, offset: int, num_sinks: int, gap: int, length: int) -> tuple[int, int]:
    # Inclusive range of a span's first query position, in key coordinates.
    return max(offset, num_sinks + length + gap), S - length


def _place_spans(
    g: torch.Generator,
    B: int,
    Hkv: int,
    S: int,
    offset: int,
    num_sinks: int,
    gap: int,
    count: int,
    length: int,
) -> list[RetrievalSpan]:
    """Random, mutually disjoint (per batch and kv head) needle placements; see structured_qkv."""
    if count == 0:
        return []
    # In key coordinates: keys [k0, k0+len) with k0 >= num_sinks, queries [p, p+len) with
    # p >= offset and p >= k0 + len + gap.
    p_lo, p_hi = _query_range(S, offset, num_sinks, gap, length)

    def randint(lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    order = torch.randperm(B * Hkv, generator=g).tolist()
    spans: list[RetrievalSpan] = []
    for j in range(count):
        b, h = divmod(order[j % len(order)], Hkv)
        taken = [s for s in spans if s.batch == b and s.kv_head == h]
        for _ in range(100):
            p = randint(p_lo, p_hi)
            k0 = randint(num_sinks, p - length - gap)
            span = RetrievalSpan(b, h, p - offset, p - offset + length, k0, k0 + length)
            if all(span.q_end <= t.q_start or t.q_end <= span.q_start for t in taken) and all(
                span.k_end <= t.k_start or t.k_end <= span.k_start for t in taken
            ):
                break
        else:
            raise ValueError(
                f"cannot fit {count} disjoint retrieval spans of retrieval_span_len={length} into "
                f"seq_len={S} with {B * Hkv} (batch, kv head) pairs; lower num_retrieval_spans"
            )
        spans.append(span)
    return spans


def random_block_layout(
    batch: int,
    heads: int,
    seq_len_q: int,
    seq_len_kv: int,
    q_block_size: int,
    kv_block_size: int,
    density: float,
    *,
    causal: bool = True,
    seed: int = 0,
    device="cpu",
):
    """A random `BlockSparseLayout`: each (causally visible) block is kept with probability `density`.

    In causal mode every non-empty row also keeps its first block (the sink) and its diagonal block
    (the last visible one), as the engine benchmark's layouts do; density 0 gives empty rows.
    """
    from .layout import BlockSparseLayout, causal_block_mask

    generator = torch.Generator().manual_seed(seed)
    mq, n = -(-seq_len_q // q_block_size), -(-seq_len_kv // kv_block_size)
    visible = (
        causal_block_mask(seq_len_q, seq_len_kv, q_block_size, kv_block_size)
        if causal
        else torch.ones(mq, n, dtype=torch.bool)
    )
    mask = (torch.rand(batch, heads, mq, n, generator=generator) < density) & visible
    if causal and density > 0:
        has_visible = visible.any(-1)
        diagonal = visible.long().cumsum(-1).argmax(-1)
        rows = torch.arange(mq)[has_visible]
        mask[..., rows, diagonal[has_visible]] = True
        mask[..., rows, 0] = True
    return BlockSparseLayout.from_dense_mask(
        mask.to(device),
        q_block_size=q_block_size,
        kv_block_size=kv_block_size,
        seq_len_q=seq_len_q,
        seq_len_kv=seq_len_kv,
    )


def planted_indexer_inputs(
    seq_len: int,
    queries: int,
    heads: int,
    dim: int,
    *,
    spans: int,
    span_len: int = 100,
    block_size: int = 128,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
):
    """DSA indexer inputs with planted retrieval spans (spec hisa_dsa.md oracle 5): q (queries, heads, dim),
    k (seq_len, dim), weights (queries, heads), the last `queries` positions causal (ks = 0, ke = t + 1).

    `spans` runs of `span_len` keys, each starting `block_size // 2` into a distinct block, lie along one
    direction that every query follows, so they outscore the noise keys: a selection with a block
    structure (HISA) can keep what the flat top-k keeps. Returns (q, k, weights, ks, ke)."""
    if (seq_len // block_size - 2) < spans:
        raise ValueError(f"{spans} spans do not fit {seq_len // block_size} blocks of {block_size}")
    k = 0.3 * torch.randn(seq_len, dim, generator=generator)
    direction = torch.nn.functional.normalize(torch.randn(dim, generator=generator), dim=0)
    for start in torch.randperm(seq_len // block_size - 2, generator=generator)[:spans] * block_size + block_size // 2:
        k[start : start + span_len] += 3.0 * direction
    q = direction[None, None, :] * 2.0 + 0.1 * torch.randn(queries, heads, dim, generator=generator)
    weights = torch.ones(queries, heads)
    ks = torch.zeros(queries, dtype=torch.int64)
    ke = torch.arange(seq_len - queries + 1, seq_len + 1)
    return q.to(device, dtype), k.to(device, dtype), weights.to(device), ks.to(device), ke.to(device)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference in float64; NaN counts as infinite (it must never pass), equal infinities
    (an empty row's -inf LSE on both sides) as 0."""
    if a.numel() == 0:
        return 0.0
    a, b = a.double(), b.double()
    diff = torch.where(a == b, 0.0, (a - b).abs().nan_to_num(nan=float("inf"), posinf=float("inf")))
    return diff.max().item()


def assert_flash_rule(got, ref64, same_precision, factor, what):
    """FlashAttention's rule: error vs fp64 at most `factor` x that of a same-precision PyTorch implementation.

    FlashAttention uses factor 2 for outputs and 3 for gradients; one rounding step of slack covers
    the case where the same-precision implementation happens to be exact.
    """
    rounding = max_err(ref64 + 0.3 - 0.3, ref64)
    bound = factor * max_err(same_precision, ref64) + rounding + 1e-6
    err = max_err(got, ref64)
    assert err <= bound, f"{what}: error {err:.3e} exceeds bound {bound:.3e}"


def assert_flash_rule_with_grads(out, ref64, same_precision, inputs, generator, what="output"):
    """`assert_flash_rule` on the output (2x) and on the gradients of `inputs` (3x, named dq, dk, dv, ...)
    for one random upstream gradient drawn from `generator` (a CPU generator)."""
    assert_flash_rule(out, ref64, same_precision, 2, what)
    grad = torch.randn(out.shape, generator=generator).to(out.device, out.dtype)
    grads = zip(
        torch.autograd.grad(out, inputs, grad),
        torch.autograd.grad(ref64, inputs, grad.to(ref64.dtype)),
        torch.autograd.grad(same_precision, inputs, grad),
    )
    for name, (got, ref, same) in zip("qkvabcdefgh", grads):
        assert_flash_rule(got, ref, same, 3, f"d{name}")


def cache_argument(model, cache) -> dict:
    """{name: cache} for a transformers model's forward: `cache` from transformers 5.24, `past_key_values`
    before (5.24 renamed it, keeping the old name deprecated until 5.40)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def assert_patched_bf16_follows_flash_rule(model, ids, method, **options):
    """The fp32 transformers `model`, cast to bf16 and patched with `method`, gives logits no further from its
    fp32 logits than its own bf16 attention path does (2x, plus 1e-3 of slack). Leaves the model in bf16 and
    returns the patch's AttentionStats."""
    from . import hf

    with torch.no_grad():
        exact = model(ids).logits.double()
        model.to(torch.bfloat16)
        own = model(ids).logits
        with hf.patched(model, method, **options) as handle:
            patched = model(ids).logits
    own_error, patched_error = max_err(own, exact), max_err(patched, exact)
    assert patched_error <= 2 * own_error + 1e-3, f"{method}: logit error {patched_error:.3e}, bf16 own {own_error:.3e}"
    return handle.stats


# Tiny causal-LM dimensions for offline Hugging Face runs (random weights, no download): realistic
# head dim, GQA and room for many blocks (shared/specs/ecosystem.md section 7). Used by the demo and
# the HF tests with LlamaConfig, Qwen2Config, Qwen3Config and MistralConfig.
TINY_CAUSAL_LM = dict(
    vocab_size=1000,
    hidden_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=512,
    num_hidden_layers=2,
    max_position_embeddings=16384,
)
# A tiny DeepSeek-V3.2 (MLA, a lightning indexer keeping 128 keys per query, a small MoE) for the same runs.
TINY_DSA_LM = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=64,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    index_n_heads=4,
    index_head_dim=16,
    index_topk=128,
    max_position_embeddings=16384,
)


_ATEN = torch.ops.aten
# Ops whose CUDA implementation makes the host wait for the device: a scalar read (`item`, `bool`, `int`,
# `tolist` go through _local_scalar_dense), or an output whose size depends on the data.
_SYNCING_OPS = {
    _ATEN._local_scalar_dense.default,
    _ATEN.nonzero.default,
    _ATEN.masked_select.default,
    _ATEN._unique2.default,
    _ATEN.unique_consecutive.default,
    _ATEN.unique_dim.default,
    _ATEN.equal.default,
    _ATEN.is_nonzero.default,
}


class HostSyncs(TorchDispatchMode):
    """Counts the ops that would make a CUDA host wait for the device, by the package line that called them,
    so that a test on the CPU can check that a hot path (a decode step) has none: each one drains the launch
    queue on a GPU. `sites` maps (op, "module.py:line") to calls, the line being the innermost frame in
    sparse_attn outside this module ("-" when none: the caller's own or a library's)."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNCING_OPS or _indexes_by_mask(func, args) or _sized_by_data(func, kwargs):
            self.sites[(func.__name__, _package_line())] += 1
        return func(*args, **kwargs)

    def in_package(self) -> dict:
        """The sites inside sparse_attn."""
        return {site: count for site, count in self.sites.items() if site[1] != "-"}


def _sized_by_data(func, kwargs) -> bool:
    return func is _ATEN.repeat_interleave.Tensor and kwargs.get("output_size") is None


def _indexes_by_mask(func, args) -> bool:
    if func not in (_ATEN.index.Tensor, _ATEN.index_put_.default, _ATEN.index_put.default):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _package_line() -> str:
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(_PACKAGE_DIR) and frame.filename != __file__:
            return f"{os.path.relpath(frame.filename, _PACKAGE_DIR)}:{frame.lineno}"
    return "-"
