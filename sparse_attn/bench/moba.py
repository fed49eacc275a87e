"""MoBA suite: routed attention (routing included) against dense causal attention (SDPA flash and
cuDNN, flash-attn when installed) and compiled FlexAttention on the same routes.

FlashMoBA's published setup: fp16, causal, B=2, H=16 (MHA), D=128, block 128, topk 8, forward +
backward including routing, S = 64K and 128K; also block 64/256 and topk 4/16 at 64K. The inputs
are the structured q/k/v of `sparse_attn.testing` (one draw per length), so routing, mass recall
and the error against dense are those of attention with sinks, local windows, heavy hitters and
retrieval spans rather than of near-uniform random rows. FLOPs count the (query, key) pairs the
routes hold: 4*D per pair forward, 14*D forward + backward. Routing (`route_ms`) is also timed
alone; the peers on the same routes (Flex on CUDA, the reference on the CPU) are timed without it.

Accuracy, on sampled rows: the output against the fp64 oracle of the same routes (FlashAttention's
rule) and against fp64 dense attention (FlashAttention's rule when the routes cover every causal
pair, else `tolerance`), and the mass recall of the routes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..methods.moba import moba_attention_reference, moba_attn, moba_route
from ..testing import structured_qkv
from . import quality
from .common import add_speedup, compiled_flex, dense_peers, time_passes, timed

FULL = dict(
    cases=[(65536, 128, 8), (131072, 128, 8), (65536, 64, 8), (65536, 256, 8), (65536, 128, 4), (65536, 128, 16)],
    batch=2,
    heads=16,
    head_dim=128,
    dtype=torch.float16,
    error_rows=128,
    tolerance=1.0,
    # (block, topk) cases that also run compiled Flex on the same routes: each is a new mask_mod to
    # compile (forward and backward), so only FlashMoBA's headline setting, to keep --full short.
    flex_for=[(128, 8)],
)
QUICK = dict(
    # The last case routes every block (4 x 64 = 256 keys): lossless, held to FlashAttention's rule.
    cases=[(256, 32, 3), (512, 32, 3), (256, 64, 4)],
    batch=1,
    heads=2,
    head_dim=32,
    dtype=torch.float32,
    error_rows=256,
    tolerance=1.0,
    flex_for=[],  # Flex runs on CUDA only; the CPU peer is the reference, for every case
)
ERROR_RULE = (
    "kernel: output vs the fp64 oracle of the same routes, FlashAttention's rule; vs dense (fp64, structured "
    "inputs, `error_rows` sampled rows): FlashAttention's rule when the routes hold every causal pair, else "
    "relative error <= `tolerance` (1.0 is the error of an all-zero output: MoBA's mean-pooled routing on "
    "inputs no model was trained for loses much of the mass at low density, so only a selection worse than "
    "no attention at all is out of bounds)"
)
FLEX_Q_TILE = 128  # Flex's query block: the routes of each 128-query tile are merged into one block list


def routed_pairs(routes: torch.Tensor, block_size: int) -> int:
    """Pairs the routed attention computes: each query's selected blocks, causally cut (Sq == Skv)."""
    seq = routes.shape[2]
    positions = torch.arange(seq, device=routes.device)[:, None]
    starts = routes.clamp(min=0).long() * block_size
    visible = (positions - starts + 1).clamp(min=0, max=block_size)
    return int(torch.where(routes >= 0, visible, 0).sum())


def flex_block_mask(routes: torch.Tensor, block_size: int):
    """The routes as a Flex `BlockMask` (Sq == Skv): per 128-query tile the union of its rows' blocks,
    all partial, with a mask_mod that keeps a key when its block is among the query's routes and it
    is causally visible, so Flex computes exactly MoBA's pairs."""
    from torch.nn.attention.flex_attention import BlockMask

    batch, heads, seq, topk = routes.shape
    num_blocks = -(-seq // block_size)
    num_tiles = -(-seq // FLEX_Q_TILE)
    tile = torch.arange(seq, device=routes.device) // FLEX_Q_TILE
    slots = torch.where(routes < 0, num_blocks, routes).long() + (tile * (num_blocks + 1))[:, None]
    union = torch.zeros(batch, heads, num_tiles * (num_blocks + 1), dtype=torch.bool, device=routes.device)
    union.scatter_(2, slots.reshape(batch, heads, -1), True)
    union = union.view(batch, heads, num_tiles, num_blocks + 1)[..., :num_blocks]
    # A stable sort of "not selected" puts each tile's selected blocks first, ascending.
    order = torch.sort((~union).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        block = kv_idx // block_size
        row = q_idx.clamp(max=seq - 1)  # Flex may evaluate the padding rows of a ragged last tile
        routed = routes[b, h, row, 0] == block
        for j in range(1, topk):
            routed = routed | (routes[b, h, row, j] == block)
        return routed & (kv_idx <= q_idx)

    return BlockMask.from_kv_blocks(
        union.sum(-1, dtype=torch.int32),
        order,
        BLOCK_SIZE=(FLEX_Q_TILE, block_size),
        mask_mod=mask_mod,
        seq_lengths=(seq, seq),
    )


def _peers(config, device, routes, block, topk) -> dict:
    """Attention on the same routes: compiled Flex on CUDA (the `flex_for` cases), the fp32 reference on the CPU."""
    if device.type == "cuda":
        if (block, topk) not in {tuple(case) for case in config["flex_for"]}:
            return {}
        block_mask = flex_block_mask(routes, block)
        flex = compiled_flex()
        return {"flex": lambda q, k, v: flex(q, k, v, block_mask=block_mask)}
    return {
        "reference": lambda q, k, v: moba_attention_reference(
            q, k, v, routes, block_size=block, compute_dtype=torch.float32
        )[0]
    }


@dataclass
class _Length:
    """What the cases of one sequence length share: inputs, dense timings, sampled rows and their dense oracle."""

    qkv: tuple
    grad: torch.Tensor
    dense_timings: dict
    rows: torch.Tensor
    dense: quality.Reference


def _length(config, seq, device) -> _Length:
    b, h, d = config["batch"], config["heads"], config["head_dim"]
    made = structured_qkv(b, h, h, seq, d, seed=seq, device=device)
    q, k, v = (t.to(config["dtype"]).requires_grad_() for t in (made.q, made.k, made.v))
    grad = torch.randn(q.shape, device=device, dtype=q.dtype, generator=torch.Generator(device).manual_seed(seq))
    timings = {}
    for name, peer in dense_peers(device).items():
        time_passes(
            timings, f"{name}_fwd", f"{name}_fwd_bwd", peer, (q, k, v), grad, device, b * h * seq * (seq + 1) // 2
        )
    rows = quality.sample_rows(seq, config["error_rows"], device)
    dense = quality.dense_reference(q.detach(), k.detach(), v.detach(), rows)
    return _Length((q, k, v), grad, timings, rows, dense)


def _quality(config, qkv, routes, block, topk, shared: _Length, lossless: bool) -> dict:
    q, k, v = (t.detach() for t in qkv)
    rows = shared.rows
    selection = quality.reference(q, k, v, rows, quality.routed_rows(routes, rows, block, k.shape[2]))
    with torch.no_grad():
        ours = moba_attn(q, k, v, block_size=block, topk=topk)[:, :, rows]
    fields = quality.kernel_fields(ours, selection)
    fields.update(quality.dense_fields(ours, shared.dense, selection, lossless=lossless, tolerance=config["tolerance"]))
    return fields


def _case(config, shared: _Length, block, topk, device) -> dict:
    q, k, v = shared.qkv
    b, h, seq, _ = q.shape
    row = {"block": block, "topk": topk}
    q_, k_ = q.detach(), k.detach()  # routing takes no gradient
    timed(row, "route", lambda: moba_route(q_, k_, block_size=block, topk=topk), device, peer=False)
    routes = moba_route(q_, k_, block_size=block, topk=topk)
    pairs = routed_pairs(routes, block)
    causal_pairs = b * h * seq * (seq + 1) // 2
    row.update(routed_pairs=pairs, density=pairs / causal_pairs)

    def moba(q, k, v):
        return moba_attn(q, k, v, block_size=block, topk=topk)

    time_passes(row, "moba_fwd", "moba_fwd_bwd", moba, shared.qkv, shared.grad, device, pairs, peer=False)
    row["route_share_of_fwd"] = row["route_ms"] / row["moba_fwd_ms"]
    for name, peer in _peers(config, device, routes, block, topk).items():
        time_passes(row, f"{name}_fwd", f"{name}_fwd_bwd", peer, shared.qkv, shared.grad, device, pairs)
    row.update(_quality(config, shared.qkv, routes, block, topk, shared, lossless=pairs == causal_pairs))
    return row


def run(config: dict, device: torch.device) -> Iterator[dict]:
    lengths: dict[int, _Length] = {}
    for seq, block, topk in config["cases"]:
        if seq not in lengths:
            lengths[seq] = _length(config, seq, device)
        row = {"seq_len": seq, **lengths[seq].dense_timings, **_case(config, lengths[seq], block, topk, device)}
        _add_ratios(row)
        add_speedup(row, "moba_fwd_bwd_ms", "_fwd_bwd_ms")
        yield quality.finish(row)
        print(
            f"S={seq} block={block} topk={topk}: density {row['density']:.3f}, "
            f"moba f+b {row['moba_fwd_bwd_ms']:.2f} ms, error vs dense {row['output_rel_error']:.3f}",
            flush=True,
        )


def _add_ratios(row: dict) -> None:
    """Speedups over each peer's forward + backward (> 1 means faster), and peak memory over SDPA flash's."""
    for peer in ("sdpa_flash", "sdpa_cudnn", "flash_attn", "sdpa_cpu", "flex", "reference"):
        if row.get(f"{peer}_fwd_bwd_ms"):
            row[f"speedup_over_{peer}"] = row[f"{peer}_fwd_bwd_ms"] / row["moba_fwd_bwd_ms"]
    if row.get("sdpa_flash_fwd_bwd_peak_bytes") and row.get("moba_fwd_bwd_peak_bytes"):
        row["peak_memory_over_sdpa_flash"] = row["moba_fwd_bwd_peak_bytes"] / row["sdpa_flash_fwd_bwd_peak_bytes"]


def family(row: dict) -> str:
    """The rows that form one line of the speedup plot."""
    return f"block {row['block']} topk {row['topk']}"


SEQ_KEY = "seq_len"
SPEEDUP = "forward + backward, routing included: moba_fwd_bwd_ms vs the fastest dense causal peer"
COLUMNS = [
    ("S", "seq_len", "d"),
    ("block", "block", "d"),
    ("topk", "topk", "d"),
    ("density", "density", ".3f"),
    ("recall", "mass_recall", ".3f"),
    ("route ms", "route_ms", ".2f"),
    ("MoBA fwd ms", "moba_fwd_ms", ".2f"),
    ("MoBA f+b ms", "moba_fwd_bwd_ms", ".2f"),
    ("TFLOP/s f+b", "moba_fwd_bwd_tflops", ".3g"),
    ("Flex f+b ms", "flex_fwd_bwd_ms", ".2f"),
    ("FA2 f+b ms", "sdpa_flash_fwd_bwd_ms", ".2f"),
    ("x best dense", "speedup_over_best_dense", ".2f"),
    ("mem / FA2", "peak_memory_over_sdpa_flash", ".2f"),
    ("kernel err", "kernel_rel_error", ".1e"),
    ("err vs dense", "output_rel_error", ".3f"),
    ("bound", "error_bound", ".3g"),
    ("check", "error_ok", "flag"),
]
