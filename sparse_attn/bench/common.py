"""Shared benchmark plumbing: environment record, timing, guarded peers, dense baselines, JSON."""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import tiles
from .._native import backend_report
from ..layout import flex_lists
from ..reference import block_sparse_attention_reference


def environment() -> dict:
    """Device, driver and library versions and the backends in use, recorded with every result file."""
    cuda = torch.cuda.is_available()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "device": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "driver": _driver_version() if cuda else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "backends": {key: _jsonable(value) for key, value in backend_report().items()},
        # Tiles other than sparse_attn/tiles.py's table (a sweep's winners): None when the table's.
        "tiles_setting": os.environ.get(tiles.ENV_VAR),
    }


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (platform.processor() is often just the ISA)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _driver_version() -> str | None:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None


def _jsonable(value):
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


# Past this warm time a call is timed LONG_CALL_SAMPLES times directly: do_bench's budget of 100 ms
# would give one sample after eight calls.
LONG_CALL_MS = 20.0
LONG_CALL_SAMPLES = 3


def median_ms(fn, device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100, estimate_ms=None) -> float:
    """Median time of fn() in milliseconds: CUDA events through triton's do_bench, or a host clock on the
    CPU. `estimate_ms` (a warm call's wall time) above LONG_CALL_MS: the median of LONG_CALL_SAMPLES
    event-timed calls, each after an L2 flush, as do_bench's are."""
    if device.type == "cuda" and estimate_ms is not None and estimate_ms > LONG_CALL_MS:
        return _long_call_median_ms(fn)
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # warm-up
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _long_call_median_ms(fn) -> float:
    from triton import runtime

    cache = runtime.driver.active.get_empty_cache_for_benchmark()  # do_bench's L2 flush
    times = []
    for _ in range(LONG_CALL_SAMPLES):
        runtime.driver.active.clear_cache(cache)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def first_call_ms(fn) -> float:
    """Wall time of one call (compile and autotune included): reported apart from the medians.

    It is the first call in this process: with `all`, a kernel an earlier suite compiled for the
    same specialisation is not compiled again."""
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


@contextmanager
def peak_memory(device: torch.device, record: dict, key: str):
    """Records the peak allocated bytes (over the baseline at entry) of the enclosed region on CUDA;
    None elsewhere, so every row has the same fields on every device."""
    if device.type != "cuda":
        record[key] = None
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    yield
    torch.cuda.synchronize()
    record[key] = torch.cuda.max_memory_allocated() - base


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def timed(record: dict, name: str, fn, device: torch.device, *, peer: bool = True) -> float | None:
    """First-call time, peak memory and median time of fn under `name`_*.

    A failing peer (a backend this build lacks, an unsupported shape) records `name`_error and
    returns None, so one peer never ends the run; our own failure raises."""
    try:
        record[f"{name}_first_call_ms"] = first_call_ms(fn)
        with peak_memory(device, record, f"{name}_peak_bytes"):
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()  # peak_memory synchronized on entry: this waits for fn alone
            warm_ms = (time.perf_counter() - start) * 1e3
        ms = median_ms(fn, device, estimate_ms=warm_ms)
    except Exception as exc:
        if not peer:
            raise
        record[f"{name}_error"] = error_text(exc)
        print(f"  {name} failed: {record[f'{name}_error']}", flush=True)
        return None
    record[f"{name}_ms"] = ms
    return ms


def add_tflops(record: dict, name: str, flops: float) -> None:
    """`name`_tflops from `name`_ms, when the timing succeeded."""
    ms = record.get(f"{name}_ms")
    if ms:
        record[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12


def time_passes(record, fwd_name, fwd_bwd_name, fn, qkv, grad, device, pairs: int, *, peer: bool = True):
    """The forward of fn(q, k, v) without autograd as `fwd_name`_*, and forward + backward as
    `fwd_bwd_name`_* (None: skipped), each with TFLOP/s on `pairs` (query, key) pairs: 4*D FLOPs per
    pair forward, 14*D forward + backward (FlashAttention's convention). Returns the forward ms."""
    head_dim = qkv[0].shape[-1]

    def forward():
        with torch.no_grad():
            return fn(*qkv)

    ms = timed(record, fwd_name, forward, device, peer=peer)
    add_tflops(record, fwd_name, 4 * head_dim * pairs)
    if fwd_bwd_name:
        inputs = [t.detach().requires_grad_() for t in qkv]
        timed(record, fwd_bwd_name, lambda: torch.autograd.grad(fn(*inputs), inputs, grad), device, peer=peer)
        add_tflops(record, fwd_bwd_name, 14 * head_dim * pairs)
    return ms


# ---------------------------------------------------------------------------------- peers
def dense_peers(device: torch.device, *, causal: bool = True) -> dict:
    """Dense attention baselines, name -> fn(q, k, v) on (B, H, S, D) tensors, GQA native.

    CUDA: SDPA's flash and cuDNN backends, and flash-attn's `flash_attn_func` when it is installed
    (bottom-right causal, as ours). CPU: SDPA's default. `causal=False` gives unmasked attention
    (decode: every key is visible to a single query anyway)."""
    from torch.nn.attention import SDPBackend

    if device.type != "cuda":
        return {"sdpa_cpu": functools.partial(run_sdpa, None, causal=causal)}
    peers = {
        "sdpa_flash": functools.partial(run_sdpa, SDPBackend.FLASH_ATTENTION, causal=causal),
        "sdpa_cudnn": functools.partial(run_sdpa, SDPBackend.CUDNN_ATTENTION, causal=causal),
    }
    flash = flash_attn_function("flash_attn_func")
    if flash is not None:
        peers["flash_attn"] = functools.partial(run_flash_attn, flash, causal=causal)
    return peers


DENSE_PEER_NAMES = ("sdpa_flash", "sdpa_cudnn", "flash_attn", "sdpa_cpu")


@functools.cache
def flash_attn_function(name: str):
    """flash-attn's function `name`, or None when flash-attn is not installed (or built against another torch)."""
    try:
        import flash_attn
    except Exception:
        return None
    return getattr(flash_attn, name, None)


def run_sdpa(backend, q, k, v, *, causal: bool = True):
    from torch.nn.attention import sdpa_kernel

    def call():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    if backend is None:
        return call()
    with sdpa_kernel(backend):
        return call()


def run_flash_attn(flash_attn_func, q, k, v, *, causal: bool = True):
    """flash-attn takes (B, S, H, D): the transposes are views, and its output comes back as (B, H, S, D)."""
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    return out.transpose(1, 2)


@functools.cache
def compiled_flex():
    """FlexAttention compiled once per process (each suite's shapes and masks still specialise it)."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    # Every length, layout shape and MoBA mask_mod of a full run is a recompile; past dynamo's default
    # limit of 8, flex_attention would silently run eagerly, materialising the whole score matrix.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention)


def layout_peers(device, layout, hq, hkv) -> dict:
    """Peers on the identical layout: compiled Flex on CUDA, the reference (fp32 dense masks) on the CPU."""
    if device.type == "cuda":
        block_mask = layout.to_flex_block_mask(hq, hkv)
        flex = compiled_flex()
        return {"flex": lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=True)}
    return {
        "reference": lambda q, k, v: block_sparse_attention_reference(q, k, v, layout, compute_dtype=torch.float32)[0]
    }


def decode_layout_peers(device, layout, hq, hkv) -> dict:
    """`layout_peers` of a decode step (all Sq rows in one query block). On CUDA, Flex runs with each
    GQA group folded into the query axis, q (B, Hkv, G * Sq, D) against a per-KV-head mask: torch
    2.11 sends GQA with a per-query-head mask to its prefill kernel (128-row tiles for a few queries,
    K/V read once per query head), and the folded call takes its decoding kernel."""
    if device.type != "cuda":
        return layout_peers(device, layout, hq, hkv)
    block_mask = folded_decode_block_mask(layout, hq, hkv)
    flex = compiled_flex()

    def run(q, k, v):
        batch, _, seq_q, dim = q.shape
        out = flex(q.reshape(batch, hkv, -1, dim), k, v, block_mask=block_mask)  # a group's heads are adjacent
        return out.reshape(batch, hq, seq_q, -1)

    return {"flex": run}


_FLEX_Q_BLOCK = 128  # Flex's default query block


def folded_decode_block_mask(layout, hq: int, hkv: int):
    """Flex BlockMask over (B, Hkv, G * Sq) folded queries: row r is query head hk * G + r // Sq at
    position r % Sq (bottom-right causal), attending the blocks its head's list selects; each KV
    head's list is its group's union (every block partial: the mask_mod tells the heads apart)."""
    from torch.nn.attention.flex_attention import BlockMask

    group, seq_q, block = hq // hkv, layout.seq_len_q, layout.kv_block_size
    if layout.num_q_blocks != 1:
        raise ValueError(f"a decode layout has one query block, got {layout.num_q_blocks}")
    selected = layout.to_dense_mask()[:, layout.head_map(hq, hkv), 0]  # [B, Hq, N]
    offset, rows = layout.causal_offset, group * seq_q

    def mask_mod(b, h, q_idx, kv_idx):
        row = q_idx.clamp(max=rows - 1)  # Flex may evaluate the padding rows and keys of ragged blocks
        head = h * group + row // seq_q
        chosen = selected[b if selected.shape[0] > 1 else 0, head, (kv_idx // block).clamp(max=selected.shape[-1] - 1)]
        return chosen & (kv_idx <= row % seq_q + offset)

    union = selected.view(selected.shape[0], hkv, group, -1).any(2)  # [B, Hkv, N]
    union = union[:, :, None].expand(-1, -1, -(-rows // _FLEX_Q_BLOCK), -1)  # each query block of the rows
    return BlockMask.from_kv_blocks(
        *flex_lists(union), BLOCK_SIZE=(_FLEX_Q_BLOCK, block), mask_mod=mask_mod, seq_lengths=(rows, layout.seq_len_kv)
    )


def best_dense(record: dict, suffix: str = "_ms") -> tuple[str | None, float | None]:
    """The fastest dense peer of a row for the timings ending in `suffix`: (name, ms)."""
    times = {name: record.get(f"{name}{suffix}") for name in DENSE_PEER_NAMES}
    times = {name: ms for name, ms in times.items() if ms}
    if not times:
        return None, None
    name = min(times, key=times.get)
    return name, times[name]


def add_speedup(record: dict, ours_key: str, dense_suffix: str) -> None:
    """speedup_over_best_dense: the fastest dense peer's time over ours, for the same pass."""
    name, dense_ms = best_dense(record, dense_suffix)
    ours = record.get(ours_key)
    record["best_dense_peer"] = name
    record["speedup_over_best_dense"] = dense_ms / ours if dense_ms and ours else None


def add_time_ratios(record: dict, ours: str, peers, key: str = "ratio_over_{peer}") -> None:
    """Our time (`{ours}_ms`) over each measured peer's (< 1 means faster than the peer), as record[key]."""
    for peer in peers:
        if record.get(f"{ours}_ms") and record.get(f"{peer}_ms"):
            record[key.format(ours=ours, peer=peer)] = record[f"{ours}_ms"] / record[f"{peer}_ms"]


# ---------------------------------------------------------------------------------- output
def write_json(path: str | os.PathLike | None, payload: dict, *, quiet: bool = False) -> None:
    """payload as JSON at path (None: nowhere), replaced whole: a reader never sees half a file."""
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with open(partial, "w") as handle:
            json.dump(payload, handle, indent=2, default=_json_default)
        os.replace(partial, path)
        if not quiet:
            print(f"wrote {path}")


def _json_default(value):
    """dtypes in the configs are written by name."""
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
