"""Engine suite: block-sparse attention against compiled FlexAttention on the identical layout and
dense causal SDPA (flash, cuDNN), forward and forward+backward.

Setup of issue 3: bf16, B=1, Hq=32, Hkv=8, D=128, causal, 128x128 blocks, random causal layouts
(one per query head) that keep the diagonal and the first block, densities 5/10/25/100% of the
causal blocks, S = 32K and 128K. FLOPs count only the (query, key) pairs the selected blocks
compute: 4*D per pair forward, 2.5x that backward (FlashAttention's convention).
"""

from __future__ import annotations

import torch

from ..engine import block_sparse_attn
from ..testing import random_block_layout
from .common import first_call_ms, median_ms, peak_memory, run_sdpa, sdpa_peers

FULL = dict(
    seq_lens=[32768, 131072],
    densities=[0.05, 0.10, 0.25, 1.0],
    batch=1,
    q_heads=32,
    kv_heads=8,
    head_dim=128,
    block=128,
    dtype=torch.bfloat16,
    backward=True,
)
QUICK = dict(
    seq_lens=[256],
    densities=[0.25, 1.0],
    batch=1,
    q_heads=4,
    kv_heads=2,
    head_dim=32,
    block=32,
    dtype=torch.float32,
    backward=True,
)


def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _timed(record: dict, name: str, fn, device, flops: float | None, backward_of=None):
    """Median time (and TFLOP/s) of fn; with `backward_of`, of a forward plus backward."""
    inputs, grad = backward_of or (None, None)

    def step():
        out = fn()
        if inputs is not None:
            torch.autograd.grad(out, inputs, grad)

    record[f"{name}_first_call_ms"] = first_call_ms(step)
    with peak_memory(device, record, f"{name}_peak_bytes"):
        step()
    ms = median_ms(step, device)
    record[f"{name}_ms"] = ms
    if flops:
        record[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12
    return ms


def run(config: dict, device: torch.device) -> list[dict]:
    flex = _compiled_flex() if device.type == "cuda" else None
    b, hq, hkv, d, block = (config[k] for k in ("batch", "q_heads", "kv_heads", "head_dim", "block"))
    rows = []
    for seq in config["seq_lens"]:
        gen = torch.Generator(device=device).manual_seed(seq)
        q = torch.randn(b, hq, seq, d, device=device, dtype=config["dtype"], generator=gen)
        k = torch.randn(b, hkv, seq, d, device=device, dtype=config["dtype"], generator=gen)
        v = torch.randn(b, hkv, seq, d, device=device, dtype=config["dtype"], generator=gen)
        grad = torch.randn_like(q)
        dense = {}
        dense_pairs = b * hq * seq * (seq + 1) // 2
        for name, backend in sdpa_peers(device).items():
            _timed(dense, name, lambda backend=backend: run_sdpa(backend, q, k, v), device, 4 * d * dense_pairs)
            if config["backward"]:
                qkv = [t.detach().requires_grad_() for t in (q, k, v)]
                _timed(
                    dense,
                    f"{name}_fwd_bwd",
                    lambda backend=backend, t=qkv: run_sdpa(backend, *t),
                    device,
                    14 * d * dense_pairs,
                    backward_of=(qkv, grad),
                )
        for density in config["densities"]:
            layout = random_block_layout(
                b, hq, seq, seq, block, block, density, seed=seq + int(density * 1000), device=device
            )
            pairs = layout.computed_pairs(hq, hkv)
            row = {"seq_len": seq, "target_density": density, "density": layout.density(), "pairs": pairs, **dense}
            row["block_sparse_attn"] = _timed(
                row, "block_sparse_attn", lambda: block_sparse_attn(q, k, v, layout), device, 4 * d * pairs
            )
            if flex is not None:
                block_mask = layout.to_flex_block_mask(hq, hkv)
                reference_out = flex(q, k, v, block_mask=block_mask, enable_gqa=True)
                ours = block_sparse_attn(q, k, v, layout)
                row["max_abs_diff_vs_flex"] = (ours.float() - reference_out.float()).abs().max().item()
                _timed(
                    row, "flex", lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True), device, 4 * d * pairs
                )
            if config["backward"]:
                qkv = [t.detach().requires_grad_() for t in (q, k, v)]
                _timed(
                    row,
                    "block_sparse_attn_fwd_bwd",
                    lambda t=qkv: block_sparse_attn(*t, layout),
                    device,
                    14 * d * pairs,
                    backward_of=(qkv, grad),
                )
                if flex is not None:
                    _timed(
                        row,
                        "flex_fwd_bwd",
                        lambda t=qkv: flex(*t, block_mask=block_mask, enable_gqa=True),
                        device,
                        14 * d * pairs,
                        backward_of=(qkv, grad),
                    )
            _add_ratios(row)
            rows.append(row)
            print(_summary(row), flush=True)
    return rows


def _add_ratios(row: dict) -> None:
    """Speed relative to the peers (< 1 means faster than the peer)."""
    for ours, peers in (
        ("block_sparse_attn_ms", ("flex_ms", "sdpa_cudnn_ms", "sdpa_flash_ms")),
        ("block_sparse_attn_fwd_bwd_ms", ("flex_fwd_bwd_ms", "sdpa_cudnn_fwd_bwd_ms")),
    ):
        for peer in peers:
            if ours in row and peer in row:
                row[f"ratio_{ours[:-3]}_over_{peer[:-3]}"] = row[ours] / row[peer]


def _summary(row: dict) -> str:
    parts = [f"S={row['seq_len']} density={row['density']:.3f}"]
    for key in ("block_sparse_attn_ms", "flex_ms", "block_sparse_attn_fwd_bwd_ms", "flex_fwd_bwd_ms"):
        if key in row:
            parts.append(f"{key}={row[key]:.3f}")
    return "  ".join(parts)


COLUMNS = [
    ("S", "seq_len", "d"),
    ("density", "density", ".3f"),
    ("ours fwd ms", "block_sparse_attn_ms", ".3f"),
    ("TFLOP/s", "block_sparse_attn_tflops", ".0f"),
    ("Flex fwd ms", "flex_ms", ".3f"),
    ("ours/Flex", "ratio_block_sparse_attn_over_flex", ".2f"),
    ("ours/cuDNN", "ratio_block_sparse_attn_over_sdpa_cudnn", ".2f"),
    ("ours f+b ms", "block_sparse_attn_fwd_bwd_ms", ".3f"),
    ("Flex f+b ms", "flex_fwd_bwd_ms", ".3f"),
    ("f+b ours/Flex", "ratio_block_sparse_attn_fwd_bwd_over_flex_fwd_bwd", ".2f"),
]
