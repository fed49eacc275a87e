"""Sparse-attention methods built on the selection primitives and the block-sparse engine."""

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
from .xattention import calibrate_xattention, xattention_attn, xattention_estimate, xattention_select

__all__ = [
    "KeyShortConv",
    "MoBABlockMeans",
    "calibrate_xattention",
    "moba_attn",
    "moba_attn_varlen",
    "moba_attn_varlen_qk",
    "moba_decode",
    "moba_route",
    "moba_route_varlen",
    "xattention_attn",
    "xattention_estimate",
    "xattention_select",
]
