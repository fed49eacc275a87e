"""sparse_attn: native sparse-attention kernels for PyTorch.

The compiled extension is optional: without it, every function runs through Triton or the
PyTorch reference, and `python -m sparse_attn info` says which backends work here.
"""

from ._native import HAS_NATIVE, backend_report, native_available
from .engine import block_sparse_attn, block_sparse_attn_varlen
from .layout import BlockSparseLayout, causal_block_mask, validate_token_indices
from .selection import block_mean_pool, layout_transpose, threshold_select, topk_rows

__version__ = "0.1.0"

__all__ = [
    "HAS_NATIVE",
    "BlockSparseLayout",
    "backend_report",
    "block_mean_pool",
    "block_sparse_attn",
    "block_sparse_attn_varlen",
    "causal_block_mask",
    "layout_transpose",
    "native_available",
    "threshold_select",
    "topk_rows",
    "validate_token_indices",
]
