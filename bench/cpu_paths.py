"""The PyTorch paths (backend='torch') against dense SDPA and the dense-mask oracle on the CPU.

Each case runs in its own process, so its peak RSS is its own. Shapes: fp32, B=1, Hq=8, Hkv=2,
D=128; the engine over a random layout per KV head (10% target density of the causal 64x64
blocks, diagonal and first block kept), MoBA with block 64, topk 6 on random q/k (routing
included). Median of 3 timed calls after one warm-up.

    python bench/cpu_paths.py [--out bench/results/cpu_paths.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CASES = [
    # (method, backend, seq_len, with backward)
    ("engine", "torch", 4096, False),
    ("engine", "sdpa", 4096, False),
    ("engine", "reference", 4096, False),
    ("engine", "torch", 8192, False),
    ("engine", "sdpa", 8192, False),
    ("engine", "reference", 8192, False),
    ("engine", "torch", 16384, False),
    ("engine", "sdpa", 16384, False),
    ("engine", "torch", 4096, True),
    ("engine", "sdpa", 4096, True),
    ("engine", "reference", 4096, True),
    ("engine", "torch", 8192, True),
    ("engine", "sdpa", 8192, True),
    ("moba", "torch", 4096, False),
    ("moba", "reference", 4096, False),
    ("moba", "torch", 8192, False),
    ("moba", "reference", 8192, False),
    ("moba", "torch", 16384, False),
    ("moba", "torch", 4096, True),
    ("moba", "torch", 8192, True),
]


def measure(method: str, backend: str, seq_len: int, backward: bool) -> dict:
    import torch

    from sparse_attn import block_sparse_attn, moba_attn
    from sparse_attn.testing import random_block_layout

    torch.manual_seed(0)
    q = torch.randn(1, 8, seq_len, 128, requires_grad=backward)
    k, v = (torch.randn(1, 2, seq_len, 128, requires_grad=backward) for _ in range(2))
    layout = random_block_layout(1, 2, seq_len, seq_len, 64, 64, 0.1, seed=0)

    def run():
        if backend == "sdpa":
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif method == "engine":
            out = block_sparse_attn(q, k, v, layout, backend=backend)
        else:
            out = moba_attn(q, k, v, block_size=64, topk=6, backend=backend)
        if backward:
            out.sum().backward()

    run()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {
        "method": method,
        "backend": backend,
        "seq_len": seq_len,
        "backward": backward,
        "median_ms": sorted(times)[1] * 1e3,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "engine_density": layout.density() if method == "engine" else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/cpu_paths.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # method,backend,seq_len,backward: one case, in-process
    args = parser.parse_args()
    if args.case:
        method, backend, seq_len, backward = args.case.split(",")
        print(json.dumps(measure(method, backend, int(seq_len), backward == "1")))
        return 0
    from sparse_attn.bench.common import environment

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    rows = []
    for method, backend, seq_len, backward in CASES:
        case = f"{method},{backend},{seq_len},{int(backward)}"
        done = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"case {case} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{method:7s} {backend:10s} S={seq_len:6d} {'fwd+bwd' if backward else 'fwd':8s} "
              f"{row['median_ms']:9.1f} ms  {row['peak_rss_mb']:7.0f} MB")  # fmt: skip
    shapes = {"batch": 1, "num_q_heads": 8, "num_kv_heads": 2, "head_dim": 128, "dtype": "float32"}
    config = {"engine_blocks": 64, "engine_target_density": 0.1, "moba_block_size": 64, "moba_topk": 6}
    with open(args.out, "w") as handle:
        json.dump({"environment": environment(), "shapes": shapes, "config": config, "rows": rows}, handle, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
