"""Launch configurations of the attention kernels: one table, overridable for tuning sweeps.

Each entry is a :class:`Tile` (BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages; for the
kernels in TMA_KERNELS `tma`: tiles through host-side tensor descriptors, TMA on Hopper; for those
in WS_KERNELS `ws`: Hopper's warp specialisation) per kernel and head-dim bound (64, 128, 256).
The values are starting points for Hopper chosen with
`scripts/triton_compile_check.py` (registers, spills and shared memory without a GPU); on a GPU,
`python -m sparse_attn.bench tune` times candidates around them and prints the winners.

Two ways to try other tiles without editing this file:

* ``with tiles.override("engine_fwd", 128, Tile(128, 128, 8, 2)): ...`` in Python;
* ``SPARSE_ATTN_TILES='{"engine_fwd:128": [128, 128, 8, 2]}'`` in the environment.

A block size that the tile does not divide gets the largest power-of-two tile that divides it.
"""

from __future__ import annotations

import functools
import json
import os
from contextlib import contextmanager
from typing import NamedTuple

import torch
import triton


class Tile(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False
    ws: bool = False


# Kernels that can load their contiguous tiles through tensor descriptors (USE_TMA): K/V in the
# query-major kernels, Q/dO in the engine's dK/dV (MoBA's dK/dV gathers its rows: no TMA there).
TMA_KERNELS = ("engine_fwd", "engine_dq", "engine_dkdv", "moba_fwd", "moba_dq")
# Kernels with a warp-specialised loop (`ws`): a TMA producer warpgroup feeding two consumer
# warpgroups (FA3's split). Triton 3.6 builds it on Hopper from 4-warp tiles only, with device-side
# descriptors (no `tma`); elsewhere (an A100, fp32) the same tile runs the pointer path.
WS_KERNELS = ("engine_fwd", "engine_dq", "engine_dkdv")
# The ws tile of each kernel and head-dim bound (not defaults: the compile check builds them and
# the tile sweep times them). The consumers split the query tile (forward, dQ) or the key tile
# (dK/dV) into two 64-row halves, so that axis takes 128: with 64, triton 3.6 gives both consumers
# the whole tile (the same work twice). Compile check, sm_90a, triton 3.6: no spills; no dK/dV
# tile at head dim 256 avoids them (its fp32 dK and dV of 64 keys each take 256 registers).
WS_TILES: dict[str, dict[int, Tile]] = {
    "engine_fwd": {
        64: Tile(128, 64, 4, 3, ws=True),
        128: Tile(128, 64, 4, 3, ws=True),
        256: Tile(128, 32, 4, 2, ws=True),
    },
    "engine_dq": {
        64: Tile(128, 64, 4, 2, ws=True),
        128: Tile(128, 64, 4, 2, ws=True),
        256: Tile(128, 32, 4, 2, ws=True),
    },
    "engine_dkdv": {64: Tile(32, 128, 4, 2, ws=True), 128: Tile(16, 128, 4, 2, ws=True)},
}


HEAD_DIM_BOUNDS = (64, 128, 256)

# Chosen with the compile check (bf16/fp16, sm_90a, triton 3.6 and 3.9): no register spills;
# Hopper's warpgroup MMA wherever a spill-free tile gets it (the key-major dK/dV kernels need at
# least 64 keys a tile for it at head dim 64 and 128; at 256 no such tile fits the registers); and
# no dot that two warpgroups compute alike (the check's "x2"): with 8 warps the compiler stacks both
# warpgroups along the rows of the backward's score dots, so their tiles need 128 rows (the first
# H100 run's 64-row backward tiles computed their scores twice).
# MoBA's forward and dQ share the gathered-row tile height through the logical block size.
TABLE: dict[str, dict[int, Tile]] = {
    "engine_fwd": {64: Tile(128, 64, 4, 3), 128: Tile(128, 64, 8, 3), 256: Tile(64, 32, 4, 2)},
    "engine_dq": {64: Tile(64, 64, 4, 2), 128: Tile(128, 64, 8, 2), 256: Tile(32, 32, 4, 1)},
    "engine_dkdv": {64: Tile(64, 128, 8, 2), 128: Tile(16, 128, 8, 2), 256: Tile(64, 16, 8, 2)},
    "moba_fwd": {64: Tile(64, 64, 4, 2), 128: Tile(64, 64, 8, 2), 256: Tile(32, 32, 4, 1)},
    "moba_dq": {64: Tile(64, 64, 4, 2), 128: Tile(128, 16, 8, 2), 256: Tile(32, 32, 4, 1)},
    "moba_dkdv": {64: Tile(64, 128, 8, 2), 128: Tile(32, 128, 8, 3), 256: Tile(32, 32, 4, 1)},
}

# fp32 tiles take twice the shared memory: the bf16 forward's 128 rows x 3 stages, or a dK/dV
# kernel's 128 keys, overflow an A100's 163 KB; so do 64 at head dims over 128 (the dK/dV kernel's
# 64 x 16 tile at D = 256 needs 168 KB, with one stage or two).
FP32_MAX_ROWS, FP32_WIDE_MAX_ROWS, FP32_MAX_STAGES = 64, 32, 2

ENV_VAR = "SPARSE_ATTN_TILES"
_overrides: dict[tuple[str, int], Tile] = {}


def head_dim_bound(head_dim: int) -> int:
    for bound in HEAD_DIM_BOUNDS:
        if head_dim <= bound:
            return bound
    raise ValueError(f"head dim {head_dim} is over the kernels' largest, {HEAD_DIM_BOUNDS[-1]}")


def _check_tile(kernel: str, tile, where: str) -> Tile:
    try:
        values = [int(x) for x in tile]
        tile = Tile(*values[:4], *(bool(x) for x in values[4:]))
    except (TypeError, ValueError):
        shape = "[BLOCK_M, BLOCK_N, num_warps, num_stages(, tma(, ws))]"
        raise ValueError(f"{where}: a tile is {shape}, got {tile!r}") from None
    powers = (tile.block_m, tile.block_n, tile.num_warps)
    if any(x < 1 or x & (x - 1) for x in powers) or min(tile.block_m, tile.block_n) < 16 or tile.num_stages < 1:
        raise ValueError(f"{where}: BLOCK_M, BLOCK_N >= 16 and num_warps must be powers of two, stages >= 1: {tile}")
    if tile.tma and kernel not in TMA_KERNELS:
        raise ValueError(f"{where}: {kernel} has no tensor-descriptor (tma) path; the kernels with one: {TMA_KERNELS}")
    if tile.ws and kernel not in WS_KERNELS:
        raise ValueError(f"{where}: {kernel} has no warp-specialised (ws) path; the kernels with one: {WS_KERNELS}")
    if tile.ws and tile.tma:
        raise ValueError(f"{where}: a ws tile makes its own device-side descriptors; tma must be off: {tile}")
    return tile


def _check_key(kernel: str, head_dim: int, where: str) -> tuple[str, int]:
    if kernel not in TABLE:
        raise ValueError(f"{where}: unknown kernel {kernel!r}; the kernels are {sorted(TABLE)}")
    if head_dim not in HEAD_DIM_BOUNDS:
        raise ValueError(f"{where}: head-dim bound must be one of {HEAD_DIM_BOUNDS}, got {head_dim}")
    return kernel, head_dim


@functools.cache
def _from_environment(text: str) -> dict[tuple[str, int], Tile]:
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_VAR} is not JSON: {exc}") from None
    if not isinstance(entries, dict):
        raise ValueError(f'{ENV_VAR} must be a JSON object like {{"engine_fwd:128": [128, 64, 8, 3]}}')
    parsed = {}
    for key, tile in entries.items():
        kernel, _, bound = str(key).partition(":")
        if not bound.isdigit():
            raise ValueError(f"{ENV_VAR}: key {key!r} must be 'kernel:head_dim_bound'")
        parsed[_check_key(kernel, int(bound), ENV_VAR)] = _check_tile(kernel, tile, f"{ENV_VAR}[{key!r}]")
    return parsed


def lookup(kernel: str, head_dim: int) -> Tile:
    """The tile of `kernel` at this head dim: an active override, else the environment's, else the table's."""
    key = (kernel, head_dim_bound(head_dim))
    if key in _overrides:
        return _overrides[key]
    environment = _from_environment(os.environ.get(ENV_VAR, "{}"))
    return environment.get(key, TABLE[kernel][key[1]])


@contextmanager
def override(kernel: str, head_dim: int, tile):
    """Runs the block with `tile` for `kernel` at head dims up to the bound `head_dim` (64, 128 or 256)."""
    key = _check_key(kernel, head_dim, "override")
    tile = _check_tile(kernel, tile, "override")
    previous = _overrides.get(key)
    _overrides[key] = tile
    try:
        yield tile
    finally:
        if previous is None:
            del _overrides[key]
        else:
            _overrides[key] = previous


def largest_dividing(block_size: int, cap: int) -> int:
    """The largest power-of-two tile up to `cap` that divides the block (block sizes are multiples of 16)."""
    tile = cap
    while block_size % tile:
        tile //= 2
    return tile


def launch_config(kernel: str, q: torch.Tensor, q_block_size: int | None, kv_block_size: int) -> dict:
    """Constexprs and launch options of `kernel` for q's head dim and dtype. BLOCK_M divides
    `q_block_size` (None: rows are gathered, any height) and BLOCK_N divides `kv_block_size`."""
    head_dim = q.shape[-1]
    block_m, block_n, warps, stages, tma, ws = lookup(kernel, head_dim)
    if q.dtype == torch.float32:
        rows = FP32_MAX_ROWS if head_dim <= 128 else FP32_WIDE_MAX_ROWS
        block_m, block_n = min(block_m, rows), min(block_n, rows)
        stages = min(stages, FP32_MAX_STAGES)
    # fp32 is not a speed path, and its descriptor staging overflows an A100's shared memory in dQ.
    tma_flag = {"USE_TMA": tma and q.dtype != torch.float32} if kernel in TMA_KERNELS else {}
    ws_flag = {"WARP_SPECIALIZE": ws and q.dtype != torch.float32} if kernel in WS_KERNELS else {}
    return {
        **tma_flag,
        **ws_flag,
        "BLOCK_M": block_m if q_block_size is None else largest_dividing(q_block_size, block_m),
        "BLOCK_N": largest_dividing(kv_block_size, block_n),
        "HEAD_DIM": head_dim,
        "HEAD_DIM_PAD": triton.next_power_of_2(max(head_dim, 16)),
        # fp32 inputs get exact fp32 products (no tensor cores); 16-bit inputs use them.
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "num_warps": warps,
        "num_stages": stages,
    }
