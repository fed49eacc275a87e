"""Routed MoBA decode suite: one new query per sequence against a long KV cache (issue 4's routed decode).

Setup: bf16, B=16, Hq=32, Hkv=8, D=128, caches of 32K and 128K tokens, block 128 / topk 8 and block
64 / topk 16. A step routes the query against the cached block means (`MoBABlockMeans`, each block
pooled once) and runs the split-KV decode kernel over the routed blocks. Timed per case:

* `moba_decode`: the whole step with followed means (what `sparse_attn.hf` now runs);
* `moba_decode_pooling`: the same step pooling every block from the cache first (what it ran before,
  and what a caller without a `MoBABlockMeans` gets): it reads the whole K cache;
* `moba_route` (selection) and `block_sparse_decode` (attention) apart, and compiled Flex on the
  routed layout (the reference on the CPU);
* dense decode over the whole cache: SDPA flash and cuDNN (flash-attn when installed), SDPA on the CPU.

Bandwidth counts the routed K/V blocks (each once per (batch, KV head) however many query heads chose
it) plus the fp32 means the router reads. Accuracy: the step's output against the fp64 oracle of its
own routed selection (FlashAttention's rule), with the softmax mass it keeps of dense attention.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..decode import block_sparse_decode
from ..methods.moba import MoBABlockMeans, _route_with_means, moba_decode, routed_decode_layout
from . import quality
from .common import add_speedup, add_time_ratios, decode_layout_peers, dense_peers
from .decode import selected_kv_bytes, timed_with_bandwidth

FULL = dict(
    seq_lens_kv=[32768, 131072],
    routing=[(128, 8), (64, 16)],
    batch=16,
    q_heads=32,
    kv_heads=8,
    head_dim=128,
    dtype=torch.bfloat16,
)
QUICK = dict(
    seq_lens_kv=[2048],
    routing=[(64, 4)],
    batch=2,
    q_heads=4,
    kv_heads=2,
    head_dim=32,
    dtype=torch.float32,
)
ERROR_RULE = (
    "output vs the fp64 oracle of the step's own routed blocks: FlashAttention's rule (2x the same-precision "
    "PyTorch error + one unit roundoff); mass_recall is the share of dense attention's softmax mass it keeps"
)


def _case(q, k, v, block_size: int, topk: int, dense: dict, device) -> dict:
    b, hq, _, d = q.shape
    seq_kv, hkv = k.shape[2], k.shape[1]
    means = MoBABlockMeans(block_size)
    means.update(k)
    routes = _route_with_means(q, means.means, seq_kv, block_size, topk)
    layout = routed_decode_layout(routes, block_size, seq_kv)
    kv_bytes = selected_kv_bytes(layout, hq, hkv, b, d, k.element_size())
    step_bytes = kv_bytes + means.means.numel() * means.means.element_size()
    row = {
        "seq_len_q": 1,
        "seq_len_kv": seq_kv,
        "block": block_size,
        "topk": topk,
        "density": layout.density(),
        "selected_kv_bytes": kv_bytes,
        "step_bytes": step_bytes,
        **dense,
    }

    def step():
        return moba_decode(q, k, v, block_size=block_size, topk=topk, block_means=means)

    def pooling_step():
        return moba_decode(q, k, v, block_size=block_size, topk=topk)

    def route():
        return _route_with_means(q, means.update(k), seq_kv, block_size, topk)

    def attend():
        return block_sparse_decode(q, k, v, layout)

    timed_with_bandwidth(row, "moba_decode", step, device, step_bytes, peer=False)
    pool_bytes = step_bytes + k.numel() * k.element_size()
    timed_with_bandwidth(row, "moba_decode_pooling", pooling_step, device, pool_bytes, peer=False)
    timed_with_bandwidth(row, "moba_route", route, device, means.means.numel() * 4, peer=False)
    timed_with_bandwidth(row, "block_sparse_decode", attend, device, kv_bytes, peer=False)
    for name, run in decode_layout_peers(device, layout, hq, hkv).items():
        timed_with_bandwidth(row, name, lambda run=run: run(q, k, v), device, kv_bytes)
    row.update(_quality(q, k, v, step(), routes, block_size))
    _add_ratios(row)
    add_speedup(row, "moba_decode_ms", "_ms")
    return quality.finish(row)


def _quality(q, k, v, out, routes, block_size: int) -> dict:
    rows = torch.zeros(1, dtype=torch.long, device=q.device)
    selection = quality.reference(q, k, v, rows, quality.routed_rows(routes, rows, block_size, k.shape[2]))
    dense = quality.dense_reference(q, k, v, rows)
    return {
        **quality.selection_fields(out, selection),
        "mass_recall": quality.mass_recall(selection.lse, dense.lse),
        "output_rel_error_vs_dense": quality.rel_error(out, dense.out),
    }


def _add_ratios(row: dict) -> None:
    add_time_ratios(row, "moba_decode_pooling", ("moba_decode",), key="pooling_over_followed")
    add_time_ratios(row, "moba_decode", ("flex", "reference"))


def run(config: dict, device: torch.device) -> Iterator[dict]:
    b, hq, hkv, d = (config[key] for key in ("batch", "q_heads", "kv_heads", "head_dim"))
    with torch.no_grad():
        for seq_kv in config["seq_lens_kv"]:
            gen = torch.Generator(device=device).manual_seed(seq_kv)
            k = torch.randn(b, hkv, seq_kv, d, device=device, dtype=config["dtype"], generator=gen)
            v = torch.randn(b, hkv, seq_kv, d, device=device, dtype=config["dtype"], generator=gen)
            q = torch.randn(b, hq, 1, d, device=device, dtype=config["dtype"], generator=gen)
            cache_bytes = 2 * k.numel() * k.element_size()
            dense = {}
            for name, peer in dense_peers(device, causal=False).items():
                timed_with_bandwidth(dense, name, lambda peer=peer: peer(q, k, v), device, cache_bytes)
            for block_size, topk in config["routing"]:
                row = _case(q, k, v, block_size, topk, dense, device)
                yield row
                print(_summary(row), flush=True)


def _summary(row: dict) -> str:
    parts = [f"Skv={row['seq_len_kv']} block={row['block']} topk={row['topk']} density={row['density']:.4f}"]
    for key in ("moba_decode_ms", "moba_decode_pooling_ms", "moba_route_ms", "block_sparse_decode_ms", "flex_ms"):
        if row.get(key):
            parts.append(f"{key}={row[key]:.3f}")
    return "  ".join(parts)


def family(row: dict) -> str:
    """The rows that form one line of the speedup plot."""
    return f"block {row['block']} topk {row['topk']}"


SEQ_KEY = "seq_len_kv"
SPEEDUP = "routed MoBA decode step (followed block means): moba_decode_ms vs the fastest dense decode"
COLUMNS = [
    ("Skv", "seq_len_kv", "d"),
    ("block", "block", "d"),
    ("topk", "topk", "d"),
    ("density", "density", ".4f"),
    ("recall", "mass_recall", ".3f"),
    ("step ms", "moba_decode_ms", ".3f"),
    ("step GB/s", "moba_decode_gbps", ".0f"),
    ("of 3 TB/s", "moba_decode_hbm_fraction", ".0%"),
    ("route ms", "moba_route_ms", ".3f"),
    ("attend ms", "block_sparse_decode_ms", ".3f"),
    ("pooling ms", "moba_decode_pooling_ms", ".3f"),
    ("pool/followed", "pooling_over_followed", ".1f"),
    ("Flex ms", "flex_ms", ".3f"),
    ("flash ms", "sdpa_flash_ms", ".3f"),
    ("cuDNN ms", "sdpa_cudnn_ms", ".3f"),
    ("CPU SDPA ms", "sdpa_cpu_ms", ".3f"),
    ("x best dense", "speedup_over_best_dense", ".2f"),
    ("err", "output_rel_error", ".1e"),
    ("bound", "error_bound", ".1e"),
    ("check", "error_ok", "flag"),
]
