"""XAttention suite: estimation, selection and the end-to-end prefill against dense causal SDPA.

Issue 5's setup: bf16, Llama-3.1-8B shapes (B=1, Hq=32, Hkv=8, D=128), block 128, S from 8K to
128K on the structured inputs (`sparse_attn.testing.structured_qkv`), tau in {0.8, 0.9, 0.95} and
stride in {8, 16}. Per row: forward medians of the estimate, the selection, the attention on the
selected layout and the whole `xattention_attn` call, beside SDPA-flash and SDPA-cuDNN forward on
the same inputs; the estimate + selection share of SDPA-flash's time; density (of the causal
blocks); output relative error against dense; and, up to `quality_max_seq`, the recall of the true
attention mass (computed densely in fp32, so limited to moderate lengths).
"""

from __future__ import annotations

import torch

from ..engine import block_sparse_attn
from ..methods.xattention import _dense_block_mass, xattention_attn, xattention_estimate, xattention_select
from ..testing import structured_qkv
from .common import median_ms, run_sdpa, sdpa_peers

FULL = dict(
    seq_lens=[8192, 32768, 131072],
    strides=[8, 16],
    thresholds=[0.8, 0.9, 0.95],
    batch=1,
    q_heads=32,
    kv_heads=8,
    head_dim=128,
    block=128,
    quality_max_seq=32768,
    dtype=torch.bfloat16,
)
QUICK = dict(
    seq_lens=[256],
    strides=[8, 16],
    thresholds=[0.9],
    batch=1,
    q_heads=4,
    kv_heads=2,
    head_dim=32,
    block=32,
    quality_max_seq=256,
    dtype=torch.float32,
)


def _inputs(config, seq, device):
    inputs = structured_qkv(
        config["batch"], config["q_heads"], config["kv_heads"], seq, config["head_dim"], seed=seq, device=device
    )
    return tuple(t.to(config["dtype"]) for t in (inputs.q, inputs.k, inputs.v))


def _dense(q, k, v, device) -> tuple[dict, torch.Tensor]:
    timings = {}
    with torch.no_grad():
        for name, backend in sdpa_peers(device).items():
            timings[f"{name}_ms"] = median_ms(lambda backend=backend: run_sdpa(backend, q, k, v), device)
        reference = run_sdpa(next(iter(sdpa_peers(device).values())), q, k, v).float()
    return timings, reference


def _case(config, q, k, v, stride, tau, scores, mass, reference, device) -> dict:
    block = config["block"]
    seq_q, seq_kv = q.shape[2], k.shape[2]

    def select():
        return xattention_select(scores, tau, seq_len_q=seq_q, seq_len_kv=seq_kv, block_size=block)

    layout = select()
    with torch.no_grad():
        row = {
            "select_ms": median_ms(select, device),
            "attention_ms": median_ms(lambda: block_sparse_attn(q, k, v, layout), device),
            "xattention_ms": median_ms(
                lambda: xattention_attn(q, k, v, stride=stride, threshold=tau, block_size=block), device
            ),
        }
        out = block_sparse_attn(q, k, v, layout).float()
    row["density"] = layout.density()
    row["output_rel_error"] = ((out - reference).norm() / reference.norm()).item()
    if mass is not None:
        row["mass_recall"] = ((mass * layout.to_dense_mask()).sum() / mass.sum()).item()
    return row


def run(config: dict, device: torch.device) -> list[dict]:
    return [row for seq in config["seq_lens"] for row in _run_length(config, seq, device)]


def _run_length(config: dict, seq: int, device: torch.device) -> list[dict]:
    rows = []
    block = config["block"]
    q, k, v = _inputs(config, seq, device)
    dense, reference = _dense(q, k, v, device)
    mass = None
    if seq <= config["quality_max_seq"]:
        with torch.no_grad():
            mass = _dense_block_mass(q, k, block, chunk_size=block)
    flash = dense.get("sdpa_flash_ms", dense.get("sdpa_cpu_ms"))
    for stride in config["strides"]:
        with torch.no_grad():
            estimate_ms = median_ms(lambda: xattention_estimate(q, k, stride=stride, block_size=block), device)
            scores = xattention_estimate(q, k, stride=stride, block_size=block)
        for tau in config["thresholds"]:
            row = {"seq_len": seq, "stride": stride, "threshold": tau, "estimate_ms": estimate_ms, **dense}
            row.update(_case(config, q, k, v, stride, tau, scores, mass, reference, device))
            row["estimate_select_over_dense"] = (estimate_ms + row["select_ms"]) / flash
            for peer in ("sdpa_flash", "sdpa_cudnn", "sdpa_cpu"):
                if f"{peer}_ms" in row:
                    row[f"speedup_over_{peer}"] = row[f"{peer}_ms"] / row["xattention_ms"]
            rows.append(row)
            print(
                f"S={seq} stride={stride} tau={tau}: density {row['density']:.3f}, "
                f"xattention {row['xattention_ms']:.2f} ms",
                flush=True,
            )
    return rows


COLUMNS = [
    ("S", "seq_len", "d"),
    ("stride", "stride", "d"),
    ("tau", "threshold", ".2f"),
    ("density", "density", ".3f"),
    ("recall", "mass_recall", ".3f"),
    ("out err", "output_rel_error", ".3f"),
    ("est ms", "estimate_ms", ".2f"),
    ("sel ms", "select_ms", ".2f"),
    ("(est+sel)/FA2", "estimate_select_over_dense", ".3f"),
    ("xattn ms", "xattention_ms", ".2f"),
    ("FA2 ms", "sdpa_flash_ms", ".2f"),
    ("x FA2", "speedup_over_sdpa_flash", ".2f"),
    ("x cuDNN", "speedup_over_sdpa_cudnn", ".2f"),
]
