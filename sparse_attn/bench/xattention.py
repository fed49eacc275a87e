"""XAttention suite: estimation, selection and the end-to-end prefill against dense causal attention.

Issue 5's setup: bf16, Llama-3.1-8B shapes (B=1, Hq=32, Hkv=8, D=128), block 128, S from 8K to
128K on the structured inputs (`sparse_attn.testing.structured_qkv`), tau in {0.8, 0.9, 0.95} and
stride in {8, 16}. Per row: forward medians of the estimate, the selection, the attention on the
selected layout (with its TFLOP/s on the selected pairs) and the whole `xattention_attn` call,
beside the dense causal peers (SDPA flash and cuDNN, flash-attn when installed) on the same inputs
and the same layout's attention in compiled Flex (CUDA) or the reference (CPU); the estimate +
selection share of the fastest dense peer's time; density (of the causal blocks).

Accuracy, on sampled rows: the output against the fp64 oracle of the selected layout
(FlashAttention's rule) and against fp64 dense attention (FlashAttention's rule when every causal
block is selected, else relative error <= `tolerance_factor` * (1 - tau)), and the mass recall.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..methods.xattention import xattention_attn, xattention_estimate, xattention_select
from . import quality, selected_prefill
from .common import add_speedup, best_dense, timed

FULL = dict(
    seq_lens=[8192, 32768, 131072],
    strides=[8, 16],
    thresholds=[0.8, 0.9, 0.95],
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
    strides=[8, 16],
    thresholds=[0.8, 0.9, 0.95],
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
    "error <= `tolerance_factor` * (1 - tau): tau bounds the estimated mass left out, and on these inputs the "
    "measured error is 0.5-1.8 x (1 - tau) from 256 to 16K tokens, so 3x flags a selection that keeps markedly "
    "less than its tau promises"
)


def _case(config, q, k, v, stride, tau, scores, rows, dense, device) -> dict:
    block = config["block"]
    seq_q, seq_kv = q.shape[2], k.shape[2]

    def select():
        return xattention_select(scores, tau, seq_len_q=seq_q, seq_len_kv=seq_kv, block_size=block)

    row = {}
    timed(row, "select", select, device, peer=False)
    layout = select()
    selection = quality.reference(q, k, v, rows, quality.layout_rows(layout, rows, q.shape[1], k.shape[1]))
    selected_prefill.layout_work(row, q, k, v, layout, rows, selection, device)

    def end_to_end():
        return xattention_attn(q, k, v, stride=stride, threshold=tau, block_size=block)

    timed(row, "xattention", end_to_end, device, peer=False)
    row.update(selected_prefill.method_quality(config, q, k, v, layout, tau, rows, selection, dense))
    return row


def run(config: dict, device: torch.device) -> Iterator[dict]:
    with torch.no_grad():
        for seq in config["seq_lens"]:
            yield from _run_length(config, seq, device)


def _run_length(config: dict, seq: int, device: torch.device) -> Iterator[dict]:
    block = config["block"]
    q, k, v = selected_prefill.inputs(config, seq, device)
    dense_timings = selected_prefill.dense_timings(q, k, v, device)
    _, dense_ms = best_dense(dense_timings)
    sampled = quality.sample_rows(seq, config["error_rows"], device)
    dense = quality.dense_reference(q, k, v, sampled)
    for stride in config["strides"]:

        def estimate_scores():
            return xattention_estimate(q, k, stride=stride, block_size=block)

        estimate = {}
        timed(estimate, "estimate", estimate_scores, device, peer=False)
        scores = estimate_scores()
        for tau in config["thresholds"]:
            row = {"seq_len": seq, "stride": stride, "threshold": tau, **estimate, **dense_timings}
            row.update(_case(config, q, k, v, stride, tau, scores, sampled, dense, device))
            row["estimate_select_over_dense"] = (row["estimate_ms"] + row["select_ms"]) / dense_ms if dense_ms else None
            selected_prefill.add_ratios(row, "xattention")
            add_speedup(row, "xattention_ms", "_ms")
            yield quality.finish(row)
            print(
                f"S={seq} stride={stride} tau={tau}: density {row['density']:.3f}, "
                f"xattention {row['xattention_ms']:.2f} ms, error vs dense {row['output_rel_error']:.3f}",
                flush=True,
            )


def family(row: dict) -> str:
    """The rows that form one line of the speedup plot."""
    return f"stride {row['stride']} tau {row['threshold']:g}"


SEQ_KEY = "seq_len"
SPEEDUP = "forward, estimate + selection included: xattention_ms vs the fastest dense causal peer"
COLUMNS = [
    ("S", "seq_len", "d"),
    ("stride", "stride", "d"),
    ("tau", "threshold", ".2f"),
    ("density", "density", ".3f"),
    ("recall", "mass_recall", ".3f"),
    ("est ms", "estimate_ms", ".2f"),
    ("sel ms", "select_ms", ".2f"),
    ("(est+sel)/dense", "estimate_select_over_dense", ".3f"),
    ("attn ms", "attention_ms", ".2f"),
    ("attn x Flex", "attention_speedup_over_flex", ".2f"),
    ("xattn ms", "xattention_ms", ".2f"),
    ("FA2 ms", "sdpa_flash_ms", ".2f"),
    ("x best dense", "speedup_over_best_dense", ".2f"),
    ("kernel err", "kernel_rel_error", ".1e"),
    ("err vs dense", "output_rel_error", ".3f"),
    ("bound", "error_bound", ".3g"),
    ("check", "error_ok", "flag"),
]
