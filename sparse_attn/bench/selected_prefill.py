"""Shared parts of the suites whose method selects a block layout and runs the engine on it (XAttention,
ProxyAttn): structured inputs, the dense peers' timings, the attention on the selected layout beside
its same-layout peer, the quality fields, and the speedup ratios of the whole call."""

from __future__ import annotations

from ..engine import block_sparse_attn
from ..testing import structured_qkv
from . import quality
from .common import dense_peers, layout_peers, time_passes, timed


def inputs(config, seq, device):
    """The structured q, k, v of one sequence length (seeded by it), in the suite's dtype."""
    inputs = structured_qkv(
        config["batch"], config["q_heads"], config["kv_heads"], seq, config["head_dim"], seed=seq, device=device
    )
    return tuple(t.to(config["dtype"]) for t in (inputs.q, inputs.k, inputs.v))


def layout_work(row, q, k, v, layout, rows, selection: quality.Reference, device):
    """Attention on the selected layout: ours and the same-layout peer, timed with TFLOP/s on its pairs,
    and the peer's error against the layout's oracle."""
    hq, hkv = q.shape[1], k.shape[1]
    pairs = layout.computed_pairs(hq, hkv)
    row.update(density=layout.density(), pairs=pairs)

    def ours(q, k, v):
        return block_sparse_attn(q, k, v, layout)

    time_passes(row, "attention", None, ours, (q, k, v), None, device, pairs, peer=False)
    for name, run in layout_peers(device, layout, hq, hkv).items():
        if time_passes(row, name, None, run, (q, k, v), None, device, pairs) is not None:
            row[f"{name}_output_rel_error"] = quality.rel_error(run(q, k, v)[:, :, rows], selection.out)


def method_quality(config, q, k, v, layout, tau, rows, selection: quality.Reference, dense: quality.Reference) -> dict:
    """The kernel's error against the layout's oracle and the output's against dense: FlashAttention's rule
    when every causal block is selected, else relative error <= `tolerance_factor` * (1 - tau)."""
    ours = block_sparse_attn(q, k, v, layout)[:, :, rows]
    fields = quality.kernel_fields(ours, selection)
    lossless = layout.density() >= 1.0
    tolerance = config["tolerance_factor"] * (1 - tau)
    fields.update(quality.dense_fields(ours, dense, selection, lossless=lossless, tolerance=tolerance))
    return fields


def dense_timings(q, k, v, device) -> dict:
    timings = {}
    for name, peer in dense_peers(device).items():
        timed(timings, name, lambda peer=peer: peer(q, k, v), device)
    return timings


def add_ratios(row: dict, call: str) -> None:
    """Speedups (> 1: faster) of the whole call (`call`_ms) over each dense peer, and of the attention over
    the same-layout peer."""
    for peer in ("sdpa_flash", "sdpa_cudnn", "flash_attn", "sdpa_cpu"):
        if row.get(f"{peer}_ms"):
            row[f"speedup_over_{peer}"] = row[f"{peer}_ms"] / row[f"{call}_ms"]
    for peer in ("flex", "reference"):
        if row.get(f"{peer}_ms"):
            row[f"attention_speedup_over_{peer}"] = row[f"{peer}_ms"] / row["attention_ms"]
