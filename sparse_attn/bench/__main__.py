"""`python -m sparse_attn.bench SUITE [--quick | --full] [--out PATH]`: benchmarks with their peers in one process."""

from __future__ import annotations

import argparse
import sys

import torch

from . import decode, engine, moba, xattention
from .common import environment, print_table, write_json

SUITES = {"engine": engine, "decode": decode, "moba": moba, "xattention": xattention}


def _shapes(config: dict) -> dict:
    return {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in config.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_attn.bench", description=__doc__)
    parser.add_argument("suite", choices=sorted(SUITES))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small shapes, runs on the CPU in seconds")
    mode.add_argument("--full", action="store_true", help="the issue's GPU setup (default on a GPU)")
    parser.add_argument("--out", help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or (device.type == "cpu" and not args.full)
    if device.type == "cpu" and not quick:
        parser.error("--full needs a CUDA GPU")
    config = suite.QUICK if quick else suite.FULL
    print(f"suite {args.suite} ({'quick' if quick else 'full'}) on {device}", flush=True)
    rows = suite.run(config, device)
    print_table(rows, suite.COLUMNS)
    write_json(
        args.out,
        {
            "suite": args.suite,
            "mode": "quick" if quick else "full",
            "environment": environment(),
            "config": _shapes(config),
            "results": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
