"""ProxyAttn suite: proxy estimate, per-head budgets, selection and the end-to-end prefill against dense.

The XAttention suite's setup (shared/specs/proxyattn.md section 6 asks for the same comparison):
bf16, Llama-3.1-8B shapes (B=1, Hq=32, Hkv=8, D=128), block 128, S from 8K to 128K on the
structured inputs, one proxy group (g = 1), stride 4, the 2048-token floor, gamma in {0.9, 0.95}.
Per row: forward medians of the estimate, the budgets, the selection, the attention on the selected
layout (TFLOP/s on its pairs) and the whole `proxy_attn` call, beside the dense causal peers and the
same layout's attention in compiled Flex (CUDA) or the reference (CPU); the estimate + budget +
selection share of the fastest dense peer's time; density; accuracy as the XAttention suite measures it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..methods.proxyattn import proxy_attn, proxy_budget, proxy_estimate, proxy_select
from . import quality, selected_prefill
from .common import add_speedup, best_dense, timed

FULL = dict(
    seq_lens=[8192, 32768, 131072],
    gammas=[0.9, 0.95],
    stride=4,
    num_proxy_groups=1,
    min_budget_tokens=2048,
    batch=1,
    q_heads=32,
    kv_heads=8,
    head_dim=128,
    block=128,
    dtype=torch.bfloat16,
    error_rows=128,
    tolerance_factor=3.0,
)
QUICK = dict(
    seq_lens=[256, 512],
    gammas=[0.9, 0.95],
    stride=4,
    num_proxy_groups=1,
    min_budget_tokens=64,
    batch=1,
    q_heads=4,
    kv_heads=2,
    head_dim=32,
    block=32,
    dtype=torch.float32,
    error_rows=256,
    tolerance_factor=3.0,
)
ERROR_RULE = (
    "kernel: output vs the fp64 oracle of the selected layout, FlashAttention's rule; vs dense (fp64, structured "
    "inputs, `error_rows` sampled rows): FlashAttention's rule when every causal block is selected, else relative "
    "error <= `tolerance_factor` * (1 - gamma), the XAttention suite's bound with gamma for tau (gamma bounds the "
    "mass each head's budget leaves out of its last query block)"
)


def run(config: dict, device: torch.device) -> Iterator[dict]:
    with torch.no_grad():
        for seq in config["seq_lens"]:
            yield from _run_length(config, seq, device)


def _run_length(config: dict, seq: int, device: torch.device) -> Iterator[dict]:
    block, stride, groups = config["block"], config["stride"], config["num_proxy_groups"]
    q, k, v = selected_prefill.inputs(config, seq, device)
    dense_timings = selected_prefill.dense_timings(q, k, v, device)
    _, dense_ms = best_dense(dense_timings)
    sampled = quality.sample_rows(seq, config["error_rows"], device)
    dense = quality.dense_reference(q, k, v, sampled)

    def estimate_scores():
        return proxy_estimate(q, k, num_proxy_groups=groups, stride=stride, block_size=block)

    estimate = {}
    timed(estimate, "estimate", estimate_scores, device, peer=False)
    scores = estimate_scores()
    for gamma in config["gammas"]:
        row = {"seq_len": seq, "stride": stride, "gamma": gamma, **estimate, **dense_timings}
        row.update(_case(config, q, k, v, gamma, scores, sampled, dense, device))
        overhead = row["estimate_ms"] + row["budget_ms"] + row["select_ms"]
        row["estimate_select_over_dense"] = overhead / dense_ms if dense_ms else None
        selected_prefill.add_ratios(row, "proxyattn")
        add_speedup(row, "proxyattn_ms", "_ms")
        yield quality.finish(row)
        print(
            f"S={seq} gamma={gamma}: density {row['density']:.3f}, proxyattn {row['proxyattn_ms']:.2f} ms, "
            f"error vs dense {row['output_rel_error']:.3f}",
            flush=True,
        )


def _case(config, q, k, v, gamma, scores, rows, dense, device) -> dict:
    block = config["block"]

    def budget():
        return proxy_budget(q, k, gamma=gamma, block_size=block)

    head_blocks = budget()

    def select():
        return proxy_select(
            scores,
            head_blocks,
            seq_len_q=q.shape[2],
            seq_len_kv=k.shape[2],
            block_size=block,
            min_budget_tokens=config["min_budget_tokens"],
        )

    row = {}
    timed(row, "budget", budget, device, peer=False)
    timed(row, "select", select, device, peer=False)
    layout = select()
    selection = quality.reference(q, k, v, rows, quality.layout_rows(layout, rows, q.shape[1], k.shape[1]))
    selected_prefill.layout_work(row, q, k, v, layout, rows, selection, device)

    def end_to_end():
        return proxy_attn(
            q,
            k,
            v,
            gamma=gamma,
            num_proxy_groups=config["num_proxy_groups"],
            stride=config["stride"],
            block_size=block,
            min_budget_tokens=config["min_budget_tokens"],
        )

    timed(row, "proxyattn", end_to_end, device, peer=False)
    row.update(selected_prefill.method_quality(config, q, k, v, layout, gamma, rows, selection, dense))
    return row


def family(row: dict) -> str:
    """The rows that form one line of the speedup plot."""
    return f"gamma {row['gamma']:g}"


SEQ_KEY = "seq_len"
SPEEDUP = "forward, estimate + budget + selection included: proxyattn_ms vs the fastest dense causal peer"
COLUMNS = [
    ("S", "seq_len", "d"),
    ("gamma", "gamma", ".2f"),
    ("density", "density", ".3f"),
    ("recall", "mass_recall", ".3f"),
    ("est ms", "estimate_ms", ".2f"),
    ("budget ms", "budget_ms", ".2f"),
    ("sel ms", "select_ms", ".2f"),
    ("overhead/dense", "estimate_select_over_dense", ".3f"),
    ("attn ms", "attention_ms", ".2f"),
    ("attn x Flex", "attention_speedup_over_flex", ".2f"),
    ("proxy ms", "proxyattn_ms", ".2f"),
    ("FA2 ms", "sdpa_flash_ms", ".2f"),
    ("x best dense", "speedup_over_best_dense", ".2f"),
    ("kernel err", "kernel_rel_error", ".1e"),
    ("err vs dense", "output_rel_error", ".3f"),
    ("bound", "error_bound", ".3g"),
    ("check", "error_ok", "flag"),
]
