"""Tile sweep: times launch configurations of each attention kernel around its default and prints
the fastest, with the `SPARSE_ATTN_TILES` value that applies them (`sparse_attn/tiles.py`).

`python -m sparse_attn.bench tune [--quick | --full] [--out bench/results/tune.json]`

Coordinate search per kernel: every single-field change of the default tile (BLOCK_M, BLOCK_N,
warps, stages, and for the engine's row kernels K/V through tensor descriptors, `tma`), the
config's `candidates` for that kernel (tiles several fields away that the compile check finds
spill-free or nearly so with the GPU's triton) and its `ws_candidates` (the engine's
warp-specialised tiles, which take 4 warps and no `tma`, so they are never one field from a
default), then the default with all improving single changes combined. `--kernels` (or the
config's `kernels`) limits the sweep to some kernels, so that one device call can sweep and then
benchmark with the winners. Each candidate runs under
`tiles.override`; its output (or gradients) must match the default tile's, the same computation
in another summation order, within `match_tolerance` (relative), so a candidate that miscompiles is
recorded and never chosen; one that fails to compile records the error. MoBA's persistent schedule
(rows per work item, programs per SM) is swept the same way on forward + backward.

Shapes (--full): the engine at issue 3's setup at 32K (bf16, B=1, Hq=32, Hkv=8, D=128, 128x128
blocks, 10% of the causal blocks); MoBA at FlashMoBA's setup at 64K (fp16, B=2, H=16, D=128,
block 128, topk 8, routes of the structured inputs). Engine dQ and dK/dV, and MoBA's, are timed
as the whole backward with only that kernel's tile changed.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import torch

from .. import _moba_ops, tiles
from ..engine import _default_scale, block_sparse_attn, triton_available
from ..methods.moba import moba_route
from ..testing import random_block_layout, structured_qkv
from .common import error_text, median_ms
from .quality import rel_error

KERNELS = ("engine_fwd", "engine_dq", "engine_dkdv", "moba_fwd", "moba_dq", "moba_dkdv")
SWEEPS = (*KERNELS, "moba_schedule")  # what `kernels` may name: the tiles, and MoBA's persistent schedule
# Warp-specialised candidates at head dim 128 (tiles.WS_TILES and variants): 4 warps, no `tma`.
# Compile check, sm_90a, triton 3.6: producer + two consumer warpgroups, each a 64-row half of the
# query tile (forward, dQ) or key tile (dK/dV); shared KB; spills 0 unless noted.
_WS_CANDIDATES = {
    "engine_fwd": [(128, 64, 4, 3), (128, 64, 4, 2), (128, 128, 4, 2)],  # 144, 112, 176
    "engine_dq": [(128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2)],  # 145, 177, 214
    "engine_dkdv": [(16, 128, 4, 2), (16, 128, 4, 3), (32, 128, 4, 2)],  # 96, 104, 115 (8 B spilled)
}
FULL = dict(
    engine=dict(seq_len=32768, batch=1, q_heads=32, kv_heads=8, head_dim=128, block=128, density=0.10),
    moba=dict(seq_len=65536, batch=2, heads=16, head_dim=128, block=128, topk=8),
    engine_dtype=torch.bfloat16,
    moba_dtype=torch.float16,
    block_m=(16, 32, 64, 128),
    block_n=(32, 64, 128),
    num_warps=(4, 8),
    num_stages=(1, 2, 3, 4),
    tma=(False, True),  # the kernels with a descriptor path (tiles.TMA_KERNELS)
    # Two or more fields from the default. Compile check, sm_90a, triton 3.6 (the H100's), D=128
    # bf16: spilled bytes; x2: both warpgroups compute the same scores.
    candidates={
        "engine_fwd": [(128, 128, 8, 2, True)],  # 0
        "engine_dq": [(64, 64, 4, 2, False)],  # 0 (8 varlen); one warpgroup, two programs an SM
        # 32x64: 16, x2 (beside the first run's 16x64); 32x128 through descriptors: 168
        "engine_dkdv": [(32, 64, 8, 2, False), (32, 128, 8, 2, True)],
        "moba_dq": [(64, 32, 8, 2, False)],  # 0 x2 (the first run's)
    },
    ws_candidates=_WS_CANDIDATES,
    kernels=SWEEPS,
    seconds=None,  # time budget (None: none), shared out evenly over the kernels swept
    item_rows=(256, 512, 1024, 2048, 4096),
    programs_per_sm=(1, 2, 4),
    match_tolerance=1e-2,
)
QUICK = dict(  # the interpreter on the CPU: shows the sweep works (one change per kernel), not speed
    engine=dict(seq_len=128, batch=1, q_heads=2, kv_heads=1, head_dim=32, block=32, density=0.5),
    moba=dict(seq_len=256, batch=1, heads=2, head_dim=32, block=32, topk=2),
    engine_dtype=torch.float16,
    moba_dtype=torch.float16,
    block_m=(16,),
    block_n=(),
    num_warps=(),
    num_stages=(),
    tma=(True,),
    candidates={"engine_dq": [(16, 32, 4, 1, True)]},
    ws_candidates={"engine_fwd": [(16, 32, 4, 1)], "engine_dkdv": [(16, 32, 4, 1)]},
    kernels=SWEEPS,
    seconds=None,
    item_rows=(32, 64),
    programs_per_sm=(2,),
    match_tolerance=1e-2,
)


class _Workload(NamedTuple):
    qkv: tuple
    grad: torch.Tensor
    attend: Callable  # (q, k, v) -> output
    q_block: int | None  # None: the kernel gathers rows, any tile height
    kv_block: int


def _engine_workload(config, device) -> _Workload:
    shape = config["engine"]
    b, hq, hkv, seq, d, block = (shape[k] for k in ("batch", "q_heads", "kv_heads", "seq_len", "head_dim", "block"))
    gen = torch.Generator(device=device).manual_seed(seq)
    q, k, v = (
        torch.randn(b, h, seq, d, device=device, dtype=config["engine_dtype"], generator=gen) for h in (hq, hkv, hkv)
    )
    layout = random_block_layout(b, hq, seq, seq, block, block, shape["density"], seed=seq, device=device)
    return _Workload((q, k, v), torch.randn_like(q), lambda q, k, v: block_sparse_attn(q, k, v, layout), block, block)


def _moba_workload(config, device) -> _Workload:
    shape = config["moba"]
    b, h, seq, d, block = (shape[k] for k in ("batch", "heads", "seq_len", "head_dim", "block"))
    made = structured_qkv(b, h, h, seq, d, seed=seq, device=device)
    q, k, v = (t.to(config["moba_dtype"]) for t in (made.q, made.k, made.v))
    grad = torch.randn(q.shape, device=device, dtype=q.dtype, generator=torch.Generator(device).manual_seed(seq))
    routes = moba_route(q, k, block_size=block, topk=shape["topk"])
    scale = _default_scale(None, d)

    def attend(q, k, v):
        return _moba_ops.routed_attention(q, k, v, routes, block, True, scale, seq)[0]

    return _Workload((q, k, v), grad, attend, None, block)


def _measure(kernel: str, work: _Workload, device):
    """(median ms, what the kernel writes): the forward output, a backward kernel's gradients, or
    (kernel 'schedule') every gradient of forward + backward."""
    if kernel.endswith("_fwd"):
        with torch.no_grad():
            return median_ms(lambda: work.attend(*work.qkv), device), (work.attend(*work.qkv),)
    leaves = [t.detach().requires_grad_() for t in work.qkv]
    saved = None if kernel == "schedule" else work.attend(*leaves)  # a backward kernel: one forward

    def step():
        out = work.attend(*leaves) if saved is None else saved
        return torch.autograd.grad(out, leaves, work.grad, retain_graph=saved is not None)

    grads = step()
    written = {"dq": grads[:1], "dkdv": grads[1:]}.get(kernel.rsplit("_", 1)[-1], grads)
    return median_ms(step, device), written


def _try(row: dict, measure, baseline, tolerance: float) -> dict:
    try:
        ms, produced = measure()
    except Exception as exc:  # a tile the compiler rejects (shared memory, registers) is a result too
        return {**row, "error": error_text(exc), "ok": False}
    diff = max(rel_error(p, b) for p, b in zip(produced, baseline))
    return {**row, "ms": ms, "rel_diff_vs_default": diff, "ok": diff <= tolerance}


def _single_changes(kernel: str, default: tiles.Tile, config) -> list[tuple[str, tiles.Tile]]:
    """(field, tile) for every tile that differs from the default in exactly that field (tma only
    where the kernel has it; ws tiles are candidates)."""
    fields = [f for f in tiles.Tile._fields if f != "ws" and (f != "tma" or kernel in tiles.TMA_KERNELS)]
    return [
        (field, default._replace(**{field: value}))
        for field in fields
        for value in config[field]
        if value != getattr(default, field)
    ]


def _effective(kernel: str, work: _Workload, tile: tiles.Tile) -> tuple:
    """The launch a tile really gets (block-size divisibility and dtype caps applied)."""
    bound = tiles.head_dim_bound(work.qkv[0].shape[-1])
    with tiles.override(kernel, bound, tile):
        config = tiles.launch_config(kernel, work.qkv[0], work.q_block, work.kv_block)
    keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "USE_TMA", "WARP_SPECIALIZE")
    return tuple(config.get(key, False) for key in keys)


def _sweep_kernel(kernel: str, work: _Workload, config, device, deadline: float) -> list[dict]:
    """The default, then the ws candidates and the other candidates (the tiles furthest from what
    the first GPU run timed), then the single-field changes and their combination, until `deadline`
    (time.monotonic()); the default always runs."""
    bound = tiles.head_dim_bound(work.qkv[0].shape[-1])
    default = tiles.lookup(kernel, bound)
    _, baseline = _measure(kernel, work, device)
    rows, seen, untimed = [], set(), []

    def run(tile):
        effective = _effective(kernel, work, tile)
        if effective in seen:  # the block size or dtype folds it into a tile already timed
            return None
        if rows and time.monotonic() > deadline:
            untimed.append(_text(effective))
            return None
        seen.add(effective)
        row = {"kernel": kernel, "head_dim_bound": bound, "tile": list(tile), "tile_text": _text(effective)}
        row["default"] = tile == default
        with tiles.override(kernel, bound, tile):
            rows.append(_try(row, lambda: _measure(kernel, work, device), baseline, config["match_tolerance"]))
        return rows[-1]

    default_ms = run(default).get("ms", float("inf"))
    for tile in config["ws_candidates"].get(kernel, ()):
        run(tiles.Tile(*tile, ws=True))
    for tile in config["candidates"].get(kernel, ()):
        run(tiles.Tile(*tile))
    improving = {}
    for field, tile in _single_changes(kernel, default, config):
        row = run(tile)
        if row and row["ok"] and row["ms"] < improving.get(field, (default_ms, None))[0]:
            improving[field] = (row["ms"], getattr(tile, field))
    if len(improving) > 1:
        run(default._replace(**{field: value for field, (_, value) in improving.items()}))
    if untimed:
        print(f"{kernel}: time budget spent, untimed: {', '.join(untimed)}", flush=True)
    _mark_speedups(rows)
    return rows


def _text(effective: tuple) -> str:
    block_m, block_n, warps, stages, tma, ws = effective
    return f"{block_m}x{block_n} w{warps} s{stages}" + (" tma" if tma else "") + (" ws" if ws else "")


@contextmanager
def _schedule(item_knob: str, item_rows: int, programs_per_sm: int):
    with (
        mock.patch.object(_moba_ops, item_knob, item_rows),
        mock.patch.object(_moba_ops, "_PROGRAMS_PER_SM", programs_per_sm),
    ):
        yield


def _sweep_moba_schedule(work: _Workload, config, device, deadline: float) -> list[dict]:
    """Rows per persistent work item and programs per SM, timed on forward + backward (both read
    them): the default first, the others until `deadline`."""
    item_knob = "_ITEM_ROWS_CUDA" if device.type == "cuda" else "_ITEM_ROWS_INTERPRETER"
    default = (getattr(_moba_ops, item_knob), _moba_ops._PROGRAMS_PER_SM)
    _, baseline = _measure("schedule", work, device)
    rows = []
    schedules = sorted(itertools.product(config["item_rows"], config["programs_per_sm"]), key=lambda s: s != default)
    for item_rows, per_sm in schedules:
        if rows and time.monotonic() > deadline:
            print("moba_schedule: time budget spent", flush=True)
            break
        row = {"kernel": "moba_schedule", "item_rows": item_rows, "programs_per_sm": per_sm}
        row["default"] = (item_rows, per_sm) == default
        with _schedule(item_knob, item_rows, per_sm):
            rows.append(_try(row, lambda: _measure("schedule", work, device), baseline, config["match_tolerance"]))
    _mark_speedups(rows)
    return rows


# A tile replaces the default only when it is this much faster: medians of one long kernel come from
# few calls, and repeated sweeps differ by a few percent.
MIN_GAIN = 0.03


def _mark_speedups(rows: list[dict]) -> None:
    """Speedup of each candidate over the default (> 1 is faster), and the pick: the fastest matching
    tile, unless the default matches and is within MIN_GAIN of it."""
    default_ms = next((r.get("ms") for r in rows if r["default"]), None)
    for row in rows:
        if default_ms and row.get("ms"):
            row["speedup_vs_default"] = default_ms / row["ms"]
    matching = [r for r in rows if r["ok"] and r.get("ms")]
    if matching:
        pick = min(matching, key=lambda r: r["ms"])
        default = next((r for r in matching if r["default"]), None)
        if default is not None and default["ms"] <= pick["ms"] * (1 + MIN_GAIN):
            pick = default
        pick["pick"] = "best"


def run(config: dict, device: torch.device) -> Iterator[dict]:
    if not triton_available(device):
        raise RuntimeError("the tile sweep runs the Triton kernels: it needs a CUDA GPU or TRITON_INTERPRET=1")
    selected = config["kernels"]
    if not selected or set(selected) - set(SWEEPS):
        raise ValueError(f"kernels must name some of {list(SWEEPS)}, got {list(selected)}")
    makers = {"engine": _engine_workload, "moba": _moba_workload}
    workloads = {family: makers[family](config, device) for family in {kernel.split("_")[0] for kernel in selected}}
    rows = []
    swept = [kernel for kernel in KERNELS if kernel in selected]
    start, seconds = time.monotonic(), config["seconds"]
    for i, kernel in enumerate(swept):  # a kernel that ends early leaves its time to the next ones
        deadline = float("inf") if seconds is None else start + seconds * (i + 1) / len(selected)
        swept_rows = _sweep_kernel(kernel, workloads[kernel.split("_")[0]], config, device, deadline)
        rows += swept_rows
        yield from swept_rows
        best = next((r for r in rows if r.get("pick") and r["kernel"] == kernel), None)
        if best is not None:
            print(f"{kernel}: best {best['tile_text']}, {best['ms']:.3f} ms, {best.get('speedup_vs_default', 1):.2f}x")
    if "moba_schedule" in selected:
        deadline = float("inf") if seconds is None else start + seconds
        schedule_rows = _sweep_moba_schedule(workloads["moba"], config, device, deadline)
        rows += schedule_rows
        yield from schedule_rows
    print("SPARSE_ATTN_TILES=" + best_tiles_setting(rows))


def _best_tiles(rows: list[dict]) -> dict:
    """{"kernel:head_dim_bound": tile} of every kernel's fastest matching tile."""
    return {f"{r['kernel']}:{r['head_dim_bound']}": r["tile"] for r in rows if r.get("pick") and "tile" in r}


def best_tiles_setting(rows: list[dict]) -> str:
    """The environment value that applies every kernel's fastest matching tile (JSON, single-quote it in a shell)."""
    return json.dumps(_best_tiles(rows), separators=(",", ":"))


def setting_after_sweep(results_path: str) -> str:
    """The SPARSE_ATTN_TILES value for the runs after a sweep: the environment's tiles (the sweep's
    defaults) with the winners of the sweep's JSON over them."""
    rows = json.loads(Path(results_path).read_text())["results"]
    current = json.loads(os.environ.get(tiles.ENV_VAR) or "{}")
    return json.dumps({**current, **_best_tiles(rows)}, separators=(",", ":"))


def family(row: dict) -> str:
    return row["kernel"]


SEQ_KEY = None
SPEEDUP = None
ERROR_RULE = (
    "each candidate's output (or gradients) vs the default tile's: relative error <= `match_tolerance`, "
    "the same computation in another summation order"
)
COLUMNS = [
    ("kernel", "kernel", "s"),
    ("tile", "tile_text", "s"),
    ("item rows", "item_rows", "d"),
    ("programs/SM", "programs_per_sm", "d"),
    ("ms", "ms", ".3f"),
    ("x default", "speedup_vs_default", ".2f"),
    ("diff vs default", "rel_diff_vs_default", ".1e"),
    ("pick", "pick", "s"),
    ("error", "error", "s"),
]


if __name__ == "__main__":  # `python -m sparse_attn.bench.tune RESULTS.json`: print that value (scripts/gpu_check.sh)
    print(setting_after_sweep(sys.argv[1]))
