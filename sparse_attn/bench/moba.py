"""MoBA suite: routed attention (routing included) against dense causal SDPA (flash, cuDNN).

FlashMoBA's published setup: fp16, causal, B=2, H=16 (MHA), D=128, block 128, topk 8, forward +
backward including routing, S = 64K and 128K; also forward only, block 64/256 and topk 4/16 at 64K.
FLOPs count the (query, key) pairs the routed blocks hold: 4*D per pair forward, 14*D forward +
backward; the peak memory of each method is recorded beside SDPA-flash's.
"""

from __future__ import annotations

import torch

from ..methods.moba import moba_attn, moba_route
from .common import median_ms, peak_memory, run_sdpa, sdpa_peers

FULL = dict(
    cases=[(65536, 128, 8), (131072, 128, 8), (65536, 64, 8), (65536, 256, 8), (65536, 128, 4), (65536, 128, 16)],
    batch=2,
    heads=16,
    head_dim=128,
    dtype=torch.float16,
)
QUICK = dict(cases=[(256, 32, 3)], batch=1, heads=2, head_dim=32, dtype=torch.float32)


def _routed_pairs(q, k, block_size, topk) -> int:
    """Pairs the routed attention computes: each query's selected blocks, causally cut."""
    routes = moba_route(q, k, block_size=block_size, topk=topk)
    seq = q.shape[2]
    positions = torch.arange(seq, device=q.device)
    starts = routes.clamp(min=0).long() * block_size
    visible = (positions[:, None] - starts + 1).clamp(min=0, max=block_size)
    return int(torch.where(routes >= 0, visible, 0).sum())


def _measure(row, name, fn, inputs, grad, device, flops):
    def fwd_bwd():
        torch.autograd.grad(fn(*inputs), inputs, grad)

    with torch.no_grad():
        row[f"{name}_fwd_ms"] = median_ms(lambda: fn(*inputs), device)
    with peak_memory(device, row, f"{name}_peak_bytes"):
        fwd_bwd()
    row[f"{name}_fwd_bwd_ms"] = median_ms(fwd_bwd, device)
    if flops:
        row[f"{name}_fwd_bwd_tflops"] = 3.5 * flops / (row[f"{name}_fwd_bwd_ms"] * 1e-3) / 1e12


def run(config: dict, device: torch.device) -> list[dict]:
    rows = []
    b, h, d = config["batch"], config["heads"], config["head_dim"]
    dense_cache: dict[int, dict] = {}
    for seq, block, topk in config["cases"]:
        gen = torch.Generator(device=device).manual_seed(seq + block + topk)
        q, k, v = (
            torch.randn(b, h, seq, d, device=device, dtype=config["dtype"], generator=gen).requires_grad_()
            for _ in range(3)
        )
        grad = torch.randn_like(q)
        if seq not in dense_cache:
            dense_cache[seq] = {}
            for name, backend in sdpa_peers(device).items():
                _measure(
                    dense_cache[seq],
                    name,
                    lambda q, k, v, backend=backend: run_sdpa(backend, q, k, v),
                    (q, k, v),
                    grad,
                    device,
                    4 * d * b * h * seq * (seq + 1) // 2,
                )
        pairs = _routed_pairs(q.detach(), k.detach(), block, topk)
        row = {"seq_len": seq, "block": block, "topk": topk, "routed_pairs": pairs, **dense_cache[seq]}
        _measure(
            row,
            "moba",
            lambda q, k, v: moba_attn(q, k, v, block_size=block, topk=topk),
            (q, k, v),
            grad,
            device,
            4 * d * pairs,
        )
        for peer in ("sdpa_flash", "sdpa_cudnn", "sdpa_cpu"):
            if f"{peer}_fwd_bwd_ms" in row:
                row[f"speedup_over_{peer}"] = row[f"{peer}_fwd_bwd_ms"] / row["moba_fwd_bwd_ms"]
        if "sdpa_flash_peak_bytes" in row and "moba_peak_bytes" in row:
            row["peak_memory_over_sdpa_flash"] = row["moba_peak_bytes"] / row["sdpa_flash_peak_bytes"]
        rows.append(row)
        print(f"S={seq} block={block} topk={topk} moba f+b {row['moba_fwd_bwd_ms']:.2f} ms", flush=True)
    return rows


COLUMNS = [
    ("S", "seq_len", "d"),
    ("block", "block", "d"),
    ("topk", "topk", "d"),
    ("MoBA fwd ms", "moba_fwd_ms", ".2f"),
    ("MoBA f+b ms", "moba_fwd_bwd_ms", ".2f"),
    ("FA2 f+b ms", "sdpa_flash_fwd_bwd_ms", ".2f"),
    ("x FA2", "speedup_over_sdpa_flash", ".2f"),
    ("x cuDNN", "speedup_over_sdpa_cudnn", ".2f"),
    ("mem / FA2", "peak_memory_over_sdpa_flash", ".2f"),
]
