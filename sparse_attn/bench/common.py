"""Shared benchmark plumbing: timing, environment record, peers, JSON and the printed table."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from contextlib import contextmanager

import torch


def environment() -> dict:
    """Device, driver and library versions, recorded with every result file."""
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            driver = None
        info["driver"] = driver
    return info


def median_ms(fn, device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of fn() in milliseconds: CUDA events through triton's do_bench, or a host clock on the CPU."""
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


def first_call_ms(fn) -> float:
    """Wall time of one call (compile and autotune included): reported apart from the medians."""
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


@contextmanager
def peak_memory(device: torch.device, record: dict, key: str):
    """Records the peak allocated bytes (over the baseline at entry) of the enclosed region, on CUDA."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    yield
    torch.cuda.synchronize()
    record[key] = torch.cuda.max_memory_allocated() - base


def sdpa_peers(device: torch.device):
    """Dense causal SDPA backends to compare against: flash and cuDNN on CUDA, the default on the CPU."""
    from torch.nn.attention import SDPBackend

    if device.type == "cuda":
        return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
    return {"sdpa_cpu": None}


def run_sdpa(backend, q, k, v):
    from torch.nn.attention import sdpa_kernel

    def call():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    if backend is None:
        return call()
    with sdpa_kernel(backend):
        return call()


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as handle:
            json.dump(payload, handle, indent=2)
        print(f"wrote {path}")


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Markdown table; columns are (header, key, format)."""
    print("| " + " | ".join(h for h, _, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, fmt))
        print("| " + " | ".join(cells) + " |")
