"""Sparse-attention methods built on the selection primitives and the block-sparse engine."""

from .moba import KeyShortConv, moba_attn, moba_route
from .xattention import calibrate_xattention, xattention_attn, xattention_estimate, xattention_select

__all__ = [
    "KeyShortConv",
    "calibrate_xattention",
    "moba_attn",
    "moba_route",
    "xattention_attn",
    "xattention_estimate",
    "xattention_select",
]
