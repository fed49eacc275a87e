"""DeepSeek Sparse Attention models in transformers (DeepSeek-V3.2, GLM-MoE-DSA), spec hisa_dsa.md.

Such a model's attention module runs a lightning indexer that picks `index_topk` key positions per query
and hands them to the attention function as `indices=` (its eager and SDPA paths fold them into a dense
mask instead). Under sparse_attn the selection is the model's semantics, so every method attends over
exactly those positions with token-sparse attention (`indexed_attention`), causal and padding limits
taken from the indexer's 4D mask. `method="hisa"` also swaps each chosen layer's indexer for a
`HISAIndexer`: the same projections (shared parameters, same state_dict keys) with HISA's two-stage
selection in place of the flat scan over every key.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch

from . import hf_block_means
from .decode import MAX_DECODE_QUERIES
from .host_memo import HostMemo
from .methods.hisa import HISABlockMeans, _batched_indices, check_options, hisa_indexer, hisa_segments
from .token_sparse import token_sparse_attn

__all__ = ["HISAIndexer", "dsa_indexers", "indexed_attention", "is_indexed_config"]

# What HISAIndexer reads off the model's indexer: its layers and the attributes its forward uses.
_INDEXER_PARTS = ("wq_b", "wk", "k_norm", "weights_proj")
_INDEXER_ATTRS = ("layer_idx", "n_heads", "head_dim", "qk_rope_head_dim", "index_topk", "softmax_scale")
# The RoPE function (in the indexer's modeling module) each indexer applies to its q and k: DeepSeek-V3.2's
# is rotate-half (non-interleaved, DeepSeek's 2025-11-17 fix), GLM-MoE-DSA's is interleaved.
_INDEXER_ROPE = {"DeepseekV32Indexer": "apply_rotary_pos_emb", "GlmMoeDsaIndexer": "apply_rotary_pos_emb_interleave"}


def is_indexed_config(config) -> bool:
    """Whether a transformers config describes a DSA model (its attention takes indexer selections)."""
    return getattr(config, "index_topk", None) is not None


def dsa_indexers(model) -> list:
    """(attention module, the model's own indexer) for every attention module of `model` that runs an
    indexer; where a HISAIndexer stands in, the indexer it replaced."""
    return [
        (module, module.indexer.dsa_indexer if isinstance(module.indexer, HISAIndexer) else module.indexer)
        for module in model.modules()
        if isinstance(getattr(module, "indexer", None), torch.nn.Module)
    ]


def _allowed_keys(mask):
    """transformers' (B, Sq, Skv) attention mask (bool, or additive with 0 where allowed) as bool."""
    return mask if mask.dtype == torch.bool else mask == 0


def indexed_attention(query, key, value, attention_mask, indices, scaling, *, attn_sink=None, return_density=False):
    """Attention of query (B, H, Sq, D) over the positions `indices` int (B, Sq, K) of key (B, H, Skv, D)
    and value (B, H, Skv, Dv) that the mask also allows (-1 and masked positions are dropped: DSA's top-k
    of a row with fewer than K visible keys names masked ones).

    attention_mask: transformers' 4D (B, 1, Sq, Skv) mask (bool, or additive with 0 where allowed), or
    None for plain bottom-right causal attention. `attn_sink`: one logit per head (transformers' s_aux), or
    None. Returns the output (B, H, Sq, Dv), and with
    `return_density` also the fraction of visible keys attended, averaged over the rows that see any
    (a 0-d tensor: reading it is the caller's device sync).
    """
    seq_q, seq_kv = query.shape[2], key.shape[2]
    if indices.dim() != 3 or tuple(indices.shape[:2]) != (query.shape[0], seq_q):
        raise ValueError(f"indices must be (B, Sq, K) = ({query.shape[0]}, {seq_q}, K), got {tuple(indices.shape)}")
    positions = indices.long()
    valid = (positions >= 0) & (positions < seq_kv)
    columns = positions.clamp(0, max(seq_kv - 1, 0))
    if attention_mask is None:
        rows = torch.arange(seq_q, device=query.device)[:, None] + (seq_kv - seq_q)
        allowed = torch.arange(seq_kv, device=query.device)[None, :] <= rows
    else:
        allowed = _allowed_keys(attention_mask[:, 0])
    allowed = allowed.expand(query.shape[0], seq_q, seq_kv)
    valid &= allowed.gather(-1, columns)
    chosen = torch.where(valid, positions, -1).to(torch.int32)[:, :, None]
    out = token_sparse_attn(query, key, value, chosen, softmax_scale=scaling, attn_sink=attn_sink)
    if not return_density:
        return out
    visible = allowed.sum(dim=-1)
    fractions = valid.sum(dim=-1) / visible.clamp(min=1)
    return out, fractions.sum() / (visible > 0).sum().clamp(min=1)


def _key_ranges(allowed):
    """Per query row the [first, end) interval of keys it may see, as (first, end) int64 (B, Sq), or None
    when some row's visible keys are not one interval (a custom mask: HISA's blocks need a sequence start).
    Rows that see no key get (0, 0)."""
    seq_kv = allowed.shape[-1]
    as_int = allowed.int()
    count = as_int.sum(dim=-1)
    first = as_int.argmax(dim=-1)
    end = seq_kv - as_int.flip(-1).argmax(dim=-1)
    empty = count == 0
    if not bool(((count == end - first) | empty).all()):
        return None
    return first.masked_fill(empty, 0), end.masked_fill(empty, 0)


@dataclass(frozen=True)
class _RowRanges:
    """What HISA needs of a DSA mask (B, Sq, Skv), derived once per pass: the keys [ks, ke) each query row
    sees, as int32 positions into the batch's flattened keys (B * Skv), or None when some row's keys are not
    one interval; and `spans`, when each batch row's queries share their first key, per row its (first key,
    end of its last query's keys) on the host."""

    ks: torch.Tensor | None
    ke: torch.Tensor | None
    spans: list | None

    @classmethod
    def of(cls, allowed, batch: int, seq_q: int) -> _RowRanges:
        seq_kv = allowed.shape[-1]
        ranges = _key_ranges(allowed.expand(batch, seq_q, seq_kv))
        if ranges is None:
            return cls(None, None, None)
        first, end = ranges
        shared = (first == first[:, :1]).all(dim=1)
        rows = torch.stack([shared.long(), first[:, 0], end[:, -1]], dim=1).tolist()  # one sync
        spans = [(start, stop) for _, start, stop in rows] if all(row[0] for row in rows) else None
        offsets = (torch.arange(batch, device=first.device) * seq_kv)[:, None]
        ks, ke = ((offsets + bound).flatten().to(torch.int32) for bound in (first, end))
        return cls(ks, ke, spans)


# Every layer of a pass gets the same mask: its key ranges and HISA's block grid are derived once.
_ranges_memo = HostMemo()


class HISAIndexer(torch.nn.Module):
    """HISA in place of a DSA model's indexer (spec section 2), a drop-in module with its forward signature.

    It holds the model indexer's own layers (so the state_dict keys and the weights are the model's) and
    computes the same index queries, keys (the model's RoPE on the first `qk_rope_head_dim` dims, the cache
    update) and head weights; HISA then selects `index_topk` keys per query (-1 padding). Where HISA
    equals the flat scan, because every eligible block is a candidate (at most `block_topk` blocks of
    `block_size` keys, `block_topk + 2` in 'union' mode), and for decode steps with decode='dense', the
    model's indexer runs unchanged; so it does for masks whose rows do not see one interval of keys.
    """

    def __init__(self, dsa_indexer, *, block_size=128, block_topk=64, forced="slots", decode="dense"):
        super().__init__()
        kind = type(dsa_indexer).__name__
        if kind not in _INDEXER_ROPE:
            raise NotImplementedError(f"HISA knows the indexers {sorted(_INDEXER_ROPE)}, not {kind}")
        from transformers.cache_utils import Cache

        missing = [name for name in (*_INDEXER_PARTS, *_INDEXER_ATTRS) if not hasattr(dsa_indexer, name)]
        rope = getattr(sys.modules.get(type(dsa_indexer).__module__), _INDEXER_ROPE[kind], None)
        if rope is None:
            missing.append(f"{_INDEXER_ROPE[kind]} in its module")
        if not hasattr(Cache, "update_indexer"):
            missing.append("Cache.update_indexer (the indexer key cache)")
        if missing:
            raise NotImplementedError(f"HISA cannot replace {kind}: this transformers version lacks {missing}")
        check_options(block_size=block_size, block_topk=block_topk, topk=dsa_indexer.index_topk, forced=forced)
        for name in _INDEXER_PARTS:
            setattr(self, name, getattr(dsa_indexer, name))
        for name in _INDEXER_ATTRS:
            setattr(self, name, getattr(dsa_indexer, name))
        # Unregistered, so the parameters appear once under the model's own names.
        self.__dict__["dsa_indexer"] = dsa_indexer
        self._rope = rope
        self.block_size, self.block_topk, self.forced, self.decode = block_size, block_topk, forced, decode
        self.all_candidates = (block_topk + (2 if forced == "union" else 0)) * block_size

    def extra_repr(self) -> str:
        return (
            f"layer_idx={self.layer_idx}, block_size={self.block_size}, block_topk={self.block_topk}, "
            f"topk={self.index_topk}, forced={self.forced!r}, decode={self.decode!r}"
        )

    @torch.no_grad()
    def forward(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids=None, **cache):
        """The model indexer's call. `cache` holds the model's cache object under the name this transformers
        passes it by (`past_key_values` up to 5.23, `cache` from 5.24), handed on as it came."""
        if set(cache) - {"cache", "past_key_values"} or len(cache) > 1:
            raise TypeError(f"HISAIndexer takes one cache argument (cache= or past_key_values=), got {sorted(cache)}")
        batch, seq_q = hidden_states.shape[:2]
        allowed = _allowed_keys(attention_mask)
        seq_kv = allowed.shape[-1]
        decoding = seq_q <= MAX_DECODE_QUERIES and seq_q < seq_kv
        ranges = (
            None
            if seq_kv <= self.all_candidates or (decoding and self.decode == "dense")
            else _ranges_memo.get(
                attention_mask, (batch, seq_q), lambda: _RowRanges.of(allowed, batch, seq_q), layer=self.layer_idx
            )
        )
        if ranges is None or ranges.ks is None:
            return self.dsa_indexer(hidden_states, q_resid, position_embeddings, attention_mask, position_ids, **cache)
        cache = next(iter(cache.values()), None)
        follow = decoding and cache is not None and not torch.compiler.is_compiling()
        unchanged = follow and hf_block_means.keys_unchanged(cache, self.layer_idx, "indexer_keys")
        q, k, weights = self._index_inputs(hidden_states, q_resid, position_embeddings, cache)
        offsets = (torch.arange(batch, device=q.device) * seq_kv)[:, None]
        block_means = self._followed_means(cache, k, seq_q, unchanged, ranges.spans) if follow else None
        segments = _ranges_memo.get(
            attention_mask,
            (batch, seq_q, self.block_size),
            lambda: hisa_segments(ranges.ks, ranges.ke, batch * seq_kv, block_size=self.block_size),
            layer=self.layer_idx,
        )
        selected = hisa_indexer(
            q.flatten(0, 1),
            k.flatten(0, 1),
            weights.flatten(0, 1),
            ranges.ks,
            ranges.ke,
            block_size=self.block_size,
            block_topk=self.block_topk,
            topk=self.index_topk,
            forced=self.forced,
            block_means=block_means,
            segments=segments,
        )
        return _batched_indices(selected, offsets.expand(batch, seq_q).flatten(), batch, seq_q)[:, :, 0]

    def _followed_means(self, cache, k, new_tokens: int, unchanged: bool, spans):
        """The indexer key blocks' means, every sequence's concatenated, from the HISABlockMeans that follow
        this layer's cache (sparse_attn.hf_block_means): each step pools only its new keys. `spans`: per batch
        row the keys [start, stop) of its sequence (stop < Skv in a StaticCache); one state serves an
        unpadded batch, one per row a left-padded one. None when `spans` is (a row's queries do not share
        their first key: the pooling then runs)."""
        if spans is None:
            return None
        make = functools.partial(HISABlockMeans, self.block_size)
        means = hf_block_means.followed_means(
            cache, self.layer_idx, "indexer_keys", k, new_tokens, unchanged, make, self.block_size
        )
        if all(start == 0 and stop == spans[0][1] for start, stop in spans):
            return means.of(None).update(k[:, : spans[0][1]]).flatten(0, 1)
        return torch.cat([means.of((b, start)).update(k[b, start:stop]) for b, (start, stop) in enumerate(spans)])

    def _index_inputs(self, hidden_states, q_resid, position_embeddings, cache):
        """The indexer's (q (B, Sq, H, D), cached k (B, Skv, D), weights (B, Sq, H)) as the model computes
        them, the softmax scale folded into the weights (ReLU(c x) = c ReLU(x) for c > 0)."""
        batch, seq_q = hidden_states.shape[:2]
        cos, sin = position_embeddings
        rope_dim = self.qk_rope_head_dim
        q = self.wq_b(q_resid).view(batch, seq_q, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(hidden_states))[:, :, None]
        q_rot, k_rot = self._rope(q[..., :rope_dim], k[..., :rope_dim], cos, sin, unsqueeze_dim=2)
        q = torch.cat([q_rot, q[..., rope_dim:]], dim=-1)
        k = torch.cat([k_rot, k[..., rope_dim:]], dim=-1)[:, :, 0]
        if cache is not None:
            k = cache.update_indexer(k, self.layer_idx)
        weights = self.weights_proj(hidden_states.to(self.weights_proj.weight.dtype)).float()
        return q, k, weights * (self.n_heads**-0.5 * self.softmax_scale)
