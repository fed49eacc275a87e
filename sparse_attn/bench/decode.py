"""Decode suite: block-sparse decode (few queries, long KV cache) against compiled FlexAttention on the
identical layout and dense decode (SDPA flash and cuDNN, flash-attn when installed) over the full cache.

Setup: bf16, B=16, Hq=32, Hkv=8, D=128, a 128K-token cache, 128-key blocks, one random layout per
KV head (the first and the last block always kept) at densities 5/10/25%, Sq = 1 and 4. Decode is
memory-bound, so the figure of merit is bandwidth: the bytes of the selected K/V blocks (each block
counted once per KV head, however many query heads read it) over the median time, and its fraction
of the H100's 3.0 TB/s. The dense peers read the whole cache without a mask (SDPA's flash and cuDNN
take no bottom-right causal mask, and a decode reads every key anyway); their bandwidth counts the whole
cache. Accuracy: all Sq rows against the fp64 oracle of the same layout (FlashAttention's rule).
On the CPU the peers are SDPA and the package's reference on the same layout.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..decode import block_sparse_decode
from ..testing import random_block_layout
from . import quality
from .common import add_speedup, add_time_ratios, decode_layout_peers, dense_peers, timed

PEAK_HBM_GBPS = 3000.0

FULL = dict(
    seq_len_kv=131072,
    seq_lens_q=[1, 4],
    densities=[0.10, 0.05, 0.25],
    batch=16,
    q_heads=32,
    kv_heads=8,
    head_dim=128,
    block=128,
    dtype=torch.bfloat16,
)
QUICK = dict(
    seq_len_kv=2048,
    seq_lens_q=[1, 4],
    densities=[0.10, 0.25],
    batch=2,
    q_heads=4,
    kv_heads=2,
    head_dim=32,
    block=64,
    dtype=torch.float32,
)
ERROR_RULE = (
    "output vs the fp64 oracle of the same random layout on every query row: FlashAttention's rule "
    "(2x the same-precision PyTorch error + one unit roundoff)"
)


def selected_kv_bytes(layout, num_q_heads: int, num_kv_heads: int, batch: int, head_dim: int, element_size: int):
    """Bytes of K and V in the selected blocks, each block once per (batch, KV head) that selects it."""
    selected = layout.to_dense_mask()[:, layout.head_map(num_q_heads, num_kv_heads), 0]  # [Bl, Hq, N]
    group = num_q_heads // num_kv_heads
    per_kv_head = selected.view(selected.shape[0], num_kv_heads, group, -1).any(dim=2)  # [Bl, Hkv, N]
    per_kv_head = per_kv_head.expand(batch, -1, -1)
    starts = torch.arange(layout.num_kv_blocks, device=layout.device) * layout.kv_block_size
    lengths = (layout.seq_len_kv - starts).clamp(max=layout.kv_block_size)
    keys = int((per_kv_head * lengths).sum().item())
    return 2 * keys * head_dim * element_size


def timed_with_bandwidth(record: dict, name: str, fn, device, nbytes: int, *, peer: bool = True):
    """`timed` of fn and, given the bytes it must read, its bandwidth and share of the H100's."""
    ms = timed(record, name, fn, device, peer=peer)
    if ms:
        gbps = nbytes / (ms * 1e-3) / 1e9
        record[f"{name}_gbps"] = gbps
        record[f"{name}_hbm_fraction"] = gbps / PEAK_HBM_GBPS
    return ms


def _case(q, k, v, layout, device) -> dict:
    b, hq, seq_q, d = q.shape
    hkv = k.shape[1]
    nbytes = selected_kv_bytes(layout, hq, hkv, b, d, k.element_size())
    row = {"density": layout.density(), "selected_kv_bytes": nbytes, "selected_kv_mb": nbytes / 1e6}
    timed_with_bandwidth(
        row, "block_sparse_decode", lambda: block_sparse_decode(q, k, v, layout), device, nbytes, peer=False
    )
    rows = torch.arange(seq_q, device=q.device)
    selection = quality.reference(q, k, v, rows, quality.layout_rows(layout, rows, hq, hkv))
    row.update(quality.selection_fields(block_sparse_decode(q, k, v, layout), selection))
    for name, run in decode_layout_peers(device, layout, hq, hkv).items():
        if timed_with_bandwidth(row, name, lambda run=run: run(q, k, v), device, nbytes) is not None:
            row[f"{name}_output_rel_error"] = quality.rel_error(run(q, k, v), selection.out)
    return row


def run(config: dict, device: torch.device) -> Iterator[dict]:
    b, hq, hkv, d, block = (config[key] for key in ("batch", "q_heads", "kv_heads", "head_dim", "block"))
    seq_kv, dtype = config["seq_len_kv"], config["dtype"]
    gen = torch.Generator(device=device).manual_seed(seq_kv)
    k = torch.randn(b, hkv, seq_kv, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(b, hkv, seq_kv, d, device=device, dtype=dtype, generator=gen)
    cache_bytes = 2 * k.numel() * k.element_size()
    with torch.no_grad():
        for seq_q in config["seq_lens_q"]:
            q = torch.randn(b, hq, seq_q, d, device=device, dtype=dtype, generator=gen)
            dense = {}
            # No mask: flash and cuDNN take no bottom-right causal mask, and a decode reads every key anyway.
            for name, peer in dense_peers(device, causal=False).items():
                timed_with_bandwidth(dense, name, lambda peer=peer: peer(q, k, v), device, cache_bytes)
            for density in config["densities"]:
                # One query block holds all Sq rows: the layout's q block is the KV block size (>= 16).
                layout = random_block_layout(
                    b, hkv, seq_q, seq_kv, block, block, density, seed=seq_q * 1000 + int(density * 1000), device=device
                )
                row = {"seq_len_q": seq_q, "seq_len_kv": seq_kv, "target_density": density, **dense}
                row.update(_case(q, k, v, layout, device))
                _add_ratios(row)
                add_speedup(row, "block_sparse_decode_ms", "_ms")
                yield quality.finish(row)
                print(_summary(row), flush=True)


def _add_ratios(row: dict) -> None:
    add_time_ratios(
        row, "block_sparse_decode", ("flex", "reference", "sdpa_flash", "sdpa_cudnn", "flash_attn", "sdpa_cpu")
    )


def _summary(row: dict) -> str:
    parts = [f"Sq={row['seq_len_q']} density={row['density']:.3f}"]
    for key in ("block_sparse_decode_ms", "block_sparse_decode_gbps", "flex_ms", "sdpa_flash_ms", "sdpa_cudnn_ms"):
        if key in row:
            parts.append(f"{key}={row[key]:.3f}")
    return "  ".join(parts)


def family(row: dict) -> str:
    """The rows that form one line of the speedup plot."""
    return f"Sq={row['seq_len_q']} density {row['target_density']:g}"


SEQ_KEY = "seq_len_kv"
SPEEDUP = "decode: block_sparse_decode_ms vs the fastest dense peer reading the whole cache"
COLUMNS = [
    ("Sq", "seq_len_q", "d"),
    ("density", "density", ".3f"),
    ("sel. KV MB", "selected_kv_mb", ".1f"),
    ("ours ms", "block_sparse_decode_ms", ".3f"),
    ("ours GB/s", "block_sparse_decode_gbps", ".0f"),
    ("of 3 TB/s", "block_sparse_decode_hbm_fraction", ".0%"),
    ("Flex ms", "flex_ms", ".3f"),
    ("ours/Flex", "ratio_over_flex", ".2f"),
    ("flash ms", "sdpa_flash_ms", ".3f"),
    ("cuDNN ms", "sdpa_cudnn_ms", ".3f"),
    ("CPU SDPA ms", "sdpa_cpu_ms", ".3f"),
    ("ref ms", "reference_ms", ".3f"),
    ("x best dense", "speedup_over_best_dense", ".2f"),
    ("err", "output_rel_error", ".1e"),
    ("bound", "error_bound", ".1e"),
    ("check", "error_ok", "flag"),
]
