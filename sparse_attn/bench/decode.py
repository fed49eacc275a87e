"""Decode suite: block-sparse decode (few queries, long KV cache) against compiled FlexAttention on the
identical layout and dense SDPA decode (flash, cuDNN) over the full cache.

Setup: bf16, B=16, Hq=32, Hkv=8, D=128, a 128K-token cache, 128-key blocks, one random layout per
KV head (the first and the last block always kept) at densities 5/10/25%, Sq = 1 and 4. Decode is
memory-bound, so the figure of merit is bandwidth: the bytes of the selected K/V blocks (each block
counted once per KV head, however many query heads read it) over the median time, and its fraction
of the H100's 3.0 TB/s. The dense peers read the whole cache without a mask (flash and cuDNN take
no bottom-right causal mask, and a decode reads every key anyway); their bandwidth counts the whole
cache.
"""

from __future__ import annotations

import torch

from ..decode import block_sparse_decode
from ..testing import random_block_layout
from .common import first_call_ms, median_ms, peak_memory, sdpa_peers

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


def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


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


def _timed(record: dict, name: str, fn, device, nbytes: int | None, *, peer: bool = True):
    """Median time of fn and, given the bytes it must read, its bandwidth. A failing peer (e.g. a
    backend without GQA support on this build) is recorded and skipped; our own failure raises."""
    try:
        record[f"{name}_first_call_ms"] = first_call_ms(fn)
        with peak_memory(device, record, f"{name}_peak_bytes"):
            fn()
        ms = median_ms(fn, device)
    except Exception as exc:
        if not peer:
            raise
        record[f"{name}_error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        print(f"  {name} failed: {record[f'{name}_error']}", flush=True)
        return None
    record[f"{name}_ms"] = ms
    if nbytes:
        gbps = nbytes / (ms * 1e-3) / 1e9
        record[f"{name}_gbps"] = gbps
        record[f"{name}_hbm_fraction"] = gbps / PEAK_HBM_GBPS
    return ms


def _dense_decode(backend, q, k, v):
    from torch.nn.attention import sdpa_kernel

    def call():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    if backend is None:
        return call()
    with sdpa_kernel(backend):
        return call()


def run(config: dict, device: torch.device) -> list[dict]:
    flex = _compiled_flex() if device.type == "cuda" else None
    b, hq, hkv, d, block = (config[key] for key in ("batch", "q_heads", "kv_heads", "head_dim", "block"))
    seq_kv, dtype = config["seq_len_kv"], config["dtype"]
    gen = torch.Generator(device=device).manual_seed(seq_kv)
    k = torch.randn(b, hkv, seq_kv, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(b, hkv, seq_kv, d, device=device, dtype=dtype, generator=gen)
    cache_bytes = 2 * k.numel() * k.element_size()
    rows = []
    for seq_q in config["seq_lens_q"]:
        q = torch.randn(b, hq, seq_q, d, device=device, dtype=dtype, generator=gen)
        dense = {}
        for name, backend in sdpa_peers(device).items():
            _timed(dense, name, lambda backend=backend: _dense_decode(backend, q, k, v), device, cache_bytes)
        for density in config["densities"]:
            # One query block holds all Sq rows: the layout's q block is the KV block size (>= 16).
            layout = random_block_layout(
                b, hkv, seq_q, seq_kv, block, block, density, seed=seq_q * 1000 + int(density * 1000), device=device
            )
            nbytes = selected_kv_bytes(layout, hq, hkv, b, d, k.element_size())
            row = {
                "seq_len_q": seq_q,
                "seq_len_kv": seq_kv,
                "target_density": density,
                "density": layout.density(),
                "selected_kv_bytes": nbytes,
                "selected_kv_mb": nbytes / 1e6,
                **dense,
            }
            _timed(row, "block_sparse_decode", lambda: block_sparse_decode(q, k, v, layout), device, nbytes, peer=False)
            if flex is not None:
                block_mask = layout.to_flex_block_mask(hq, hkv)

                def run_flex():
                    return flex(q, k, v, block_mask=block_mask, enable_gqa=True)

                if _timed(row, "flex", run_flex, device, nbytes) is not None:
                    ours = block_sparse_decode(q, k, v, layout)
                    row["max_abs_diff_vs_flex"] = (ours.float() - run_flex().float()).abs().max().item()
            _add_ratios(row)
            rows.append(row)
            print(_summary(row), flush=True)
    return rows


def _add_ratios(row: dict) -> None:
    """Time relative to the peers (< 1 means faster than the peer)."""
    ours = row.get("block_sparse_decode_ms")
    for peer in ("flex", "sdpa_flash", "sdpa_cudnn", "sdpa_cpu"):
        if ours is not None and f"{peer}_ms" in row:
            row[f"ratio_over_{peer}"] = ours / row[f"{peer}_ms"]


def _summary(row: dict) -> str:
    parts = [f"Sq={row['seq_len_q']} density={row['density']:.3f}"]
    for key in ("block_sparse_decode_ms", "block_sparse_decode_gbps", "flex_ms", "sdpa_flash_ms", "sdpa_cudnn_ms"):
        if key in row:
            parts.append(f"{key}={row[key]:.3f}")
    return "  ".join(parts)


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
    ("ours/cuDNN", "ratio_over_sdpa_cudnn", ".2f"),
    ("CPU SDPA ms", "sdpa_cpu_ms", ".3f"),
]
