"""sparse_attn: native sparse-attention kernels for PyTorch.

The compiled extension is optional: without it, every function runs through Triton or PyTorch
ops (`sparse_attn.gathered` for the engine, `sparse_attn.routed_torch` for MoBA, or the reference
oracles), and `python -m sparse_attn info` says which backends work here.
`sparse_attn.patch(model, method, ...)` runs a Hugging Face model's attention through a method
(transformers is imported only when a model is patched).
"""

from ._native import HAS_NATIVE, backend_report, native_available
from .decode import block_sparse_decode
from .engine import block_sparse_attn, block_sparse_attn_varlen
from .hf import configure, patch, patched, unpatch
from .layout import BlockSparseLayout, causal_block_mask, validate_token_indices
from .methods import (
    HISABlockMeans,
    HISASegments,
    KeyShortConv,
    MoBABlockMeans,
    S2OPlan,
    S2OStats,
    dsa_indexer,
    dsa_indexer_logits,
    dsa_select,
    hisa_indexer,
    hisa_segments,
    hisa_select,
    indexer_kl_loss,
    moba_attn,
    moba_attn_varlen,
    moba_attn_varlen_qk,
    moba_decode,
    moba_route,
    moba_route_varlen,
    proxy_attn,
    proxy_attn_varlen,
    proxy_budget,
    proxy_estimate,
    proxy_select,
    s2o_attention,
    s2o_plan,
    s2o_processed_mask,
    s2o_reference,
    topk_indices,
)
from .methods.xattention import calibrate_xattention, xattention_attn, xattention_estimate, xattention_select
from .selection import block_mean_pool, layout_transpose, threshold_select, topk_rows
from .token_sparse import sparse_mla, token_sparse_attn

__version__ = "0.1.0"

__all__ = [
    "HAS_NATIVE",
    "BlockSparseLayout",
    "HISABlockMeans",
    "HISASegments",
    "KeyShortConv",
    "MoBABlockMeans",
    "S2OPlan",
    "S2OStats",
    "backend_report",
    "block_mean_pool",
    "block_sparse_attn",
    "block_sparse_attn_varlen",
    "block_sparse_decode",
    "calibrate_xattention",
    "causal_block_mask",
    "configure",
    "dsa_indexer",
    "dsa_indexer_logits",
    "dsa_select",
    "hisa_indexer",
    "hisa_segments",
    "hisa_select",
    "indexer_kl_loss",
    "layout_transpose",
    "moba_attn",
    "moba_attn_varlen",
    "moba_attn_varlen_qk",
    "moba_decode",
    "moba_route",
    "moba_route_varlen",
    "native_available",
    "patch",
    "patched",
    "proxy_attn",
    "proxy_attn_varlen",
    "proxy_budget",
    "proxy_estimate",
    "proxy_select",
    "s2o_attention",
    "s2o_plan",
    "s2o_processed_mask",
    "s2o_reference",
    "sparse_mla",
    "threshold_select",
    "token_sparse_attn",
    "topk_indices",
    "topk_rows",
    "unpatch",
    "validate_token_indices",
    "xattention_attn",
    "xattention_estimate",
    "xattention_select",
]
