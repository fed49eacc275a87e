"""Engine suite: block-sparse attention against compiled FlexAttention on the identical layout and
dense causal attention (SDPA flash and cuDNN, flash-attn when installed), forward and forward+backward.

Setup of issue 3: bf16, B=1, Hq=32, Hkv=8, D=128, causal, 128x128 blocks, random causal layouts
(one per query head) that keep the diagonal and the first block, densities 5/10/25/100% of the
causal blocks, S = 32K and 128K. FLOPs count only the (query, key) pairs the selected blocks
compute: 4*D per pair forward, 2.5x that backward (FlashAttention's convention).

Accuracy: the layouts are random, so the output is checked against the fp64 oracle of the same
layout (FlashAttention's rule, at every density) on sampled rows, and Flex's output likewise. On
the CPU the peers are SDPA and the package's reference on the same layout.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..engine import block_sparse_attn
from ..testing import random_block_layout
from . import quality
from .common import add_speedup, add_time_ratios, dense_peers, layout_peers, time_passes

FULL = dict(
    seq_lens=[8192, 32768, 131072],  # the 8K..128K sweep
    densities=[0.05, 0.10, 0.25, 1.0],
    batch=1,
    q_heads=32,
    kv_heads=8,
    head_dim=128,
    block=128,
    dtype=torch.bfloat16,
    backward=True,
    error_rows=64,
)
QUICK = dict(
    seq_lens=[256, 512],
    densities=[0.25, 1.0],
    batch=1,
    q_heads=4,
    kv_heads=2,
    head_dim=32,
    block=32,
    dtype=torch.float32,
    backward=True,
    error_rows=64,
)
ERROR_RULE = (
    "output vs the fp64 oracle of the same random layout on `error_rows` sampled query rows: "
    "FlashAttention's rule (2x the same-precision PyTorch error + one unit roundoff) at every density"
)


def _passes(config, name: str) -> tuple[str, str | None]:
    return name, (f"{name}_fwd_bwd" if config["backward"] else None)


def _dense(config, q, k, v, grad, device) -> dict:
    """Dense causal peers' forward and forward+backward over all S*(S+1)/2 pairs per head."""
    b, hq, seq, _ = q.shape
    pairs = b * hq * seq * (seq + 1) // 2
    dense = {}
    for name, run in dense_peers(device).items():
        time_passes(dense, *_passes(config, name), run, (q, k, v), grad, device, pairs)
    return dense


def _case(config, q, k, v, grad, layout, rows, device) -> dict:
    hq, hkv = q.shape[1], k.shape[1]
    pairs = layout.computed_pairs(hq, hkv)
    row = {"density": layout.density(), "pairs": pairs}

    def ours(q, k, v):
        return block_sparse_attn(q, k, v, layout)

    time_passes(row, *_passes(config, "block_sparse_attn"), ours, (q, k, v), grad, device, pairs, peer=False)
    with torch.no_grad():
        selection = quality.reference(q, k, v, rows, quality.layout_rows(layout, rows, hq, hkv))
        row.update(quality.selection_fields(ours(q, k, v)[:, :, rows], selection))
    for name, run in layout_peers(device, layout, hq, hkv).items():
        if time_passes(row, *_passes(config, name), run, (q, k, v), grad, device, pairs) is not None:
            with torch.no_grad():
                row[f"{name}_output_rel_error"] = quality.rel_error(run(q, k, v)[:, :, rows], selection.out)
    return row


def run(config: dict, device: torch.device) -> Iterator[dict]:
    b, hq, hkv, d, block = (config[k] for k in ("batch", "q_heads", "kv_heads", "head_dim", "block"))
    for seq in config["seq_lens"]:
        gen = torch.Generator(device=device).manual_seed(seq)
        q = torch.randn(b, hq, seq, d, device=device, dtype=config["dtype"], generator=gen)
        k = torch.randn(b, hkv, seq, d, device=device, dtype=config["dtype"], generator=gen)
        v = torch.randn(b, hkv, seq, d, device=device, dtype=config["dtype"], generator=gen)
        grad = torch.randn_like(q)
        sampled = quality.sample_rows(seq, config["error_rows"], device)
        dense = _dense(config, q, k, v, grad, device)
        for density in config["densities"]:
            layout = random_block_layout(
                b, hq, seq, seq, block, block, density, seed=seq + int(density * 1000), device=device
            )
            row = {"seq_len": seq, "target_density": density, **dense}
            row.update(_case(config, q, k, v, grad, layout, sampled, device))
            _add_ratios(row)
            add_speedup(row, "block_sparse_attn_ms", "_ms")
            yield quality.finish(row)
            print(_summary(row), flush=True)


def _add_ratios(row: dict) -> None:
    for ours, peers in (
        ("block_sparse_attn", ("flex", "reference", "sdpa_cudnn", "sdpa_flash", "flash_attn", "sdpa_cpu")),
        ("block_sparse_attn_fwd_bwd", ("flex_fwd_bwd", "reference_fwd_bwd", "sdpa_cudnn_fwd_bwd")),
    ):
        add_time_ratios(row, ours, peers, key="ratio_{ours}_over_{peer}")


def _summary(row: dict) -> str:
    parts = [f"S={row['seq_len']} density={row['density']:.3f}"]
    for key in ("block_sparse_attn_ms", "flex_ms", "block_sparse_attn_fwd_bwd_ms", "flex_fwd_bwd_ms"):
        if key in row:
            parts.append(f"{key}={row[key]:.3f}")
    return "  ".join(parts)


def family(row: dict) -> str:
    """The rows that form one line of the speedup plot."""
    return f"density {row['target_density']:g}"


SEQ_KEY = "seq_len"
SPEEDUP = "forward: block_sparse_attn_ms vs the fastest dense causal peer"
COLUMNS = [
    ("S", "seq_len", "d"),
    ("density", "density", ".3f"),
    ("ours fwd ms", "block_sparse_attn_ms", ".3f"),
    ("TFLOP/s", "block_sparse_attn_tflops", ".3g"),
    ("Flex fwd ms", "flex_ms", ".3f"),
    ("ours/Flex", "ratio_block_sparse_attn_over_flex", ".2f"),
    ("ours/cuDNN", "ratio_block_sparse_attn_over_sdpa_cudnn", ".2f"),
    ("ref ms", "reference_ms", ".3f"),
    ("x best dense", "speedup_over_best_dense", ".2f"),
    ("ours f+b ms", "block_sparse_attn_fwd_bwd_ms", ".3f"),
    ("f+b ours/Flex", "ratio_block_sparse_attn_fwd_bwd_over_flex_fwd_bwd", ".2f"),
    ("first call ms", "block_sparse_attn_first_call_ms", ".0f"),
    ("err", "output_rel_error", ".1e"),
    ("bound", "error_bound", ".1e"),
    ("check", "error_ok", "flag"),
]
