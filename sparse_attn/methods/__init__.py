"""Sparse-attention methods built on the selection primitives, the block-sparse engine and token-sparse attention."""

from .hisa import (
    HISABlockMeans,
    HISASegments,
    dsa_indexer,
    dsa_indexer_logits,
    dsa_select,
    hisa_indexer,
    hisa_segments,
    hisa_select,
    topk_indices,
)
from .indexer_loss import indexer_kl_loss
from .moba import (
    KeyShortConv,
    MoBABlockMeans,
    moba_attn,
    moba_attn_varlen,
    moba_attn_varlen_qk,
    moba_decode,
    moba_route,
    moba_route_varlen,
)
from .proxyattn import proxy_attn, proxy_attn_varlen, proxy_budget, proxy_estimate, proxy_select
from .s2o import S2OPlan, S2OStats, s2o_attention, s2o_plan, s2o_processed_mask, s2o_reference
from .xattention import calibrate_xattention, xattention_attn, xattention_estimate, xattention_select

__all__ = [
    "HISABlockMeans",
    "HISASegments",
    "KeyShortConv",
    "MoBABlockMeans",
    "S2OPlan",
    "S2OStats",
    "calibrate_xattention",
    "dsa_indexer",
    "dsa_indexer_logits",
    "dsa_select",
    "hisa_indexer",
    "hisa_segments",
    "hisa_select",
    "indexer_kl_loss",
    "moba_attn",
    "moba_attn_varlen",
    "moba_attn_varlen_qk",
    "moba_decode",
    "moba_route",
    "moba_route_varlen",
    "proxy_attn",
    "proxy_attn_varlen",
    "proxy_budget",
    "proxy_estimate",
    "proxy_select",
    "s2o_attention",
    "s2o_plan",
    "s2o_processed_mask",
    "s2o_reference",
    "topk_indices",
    "xattention_attn",
    "xattention_estimate",
    "xattention_select",
]
