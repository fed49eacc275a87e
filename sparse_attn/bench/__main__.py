"""Benchmarks with their peers in one process.

`python -m sparse_attn.bench SUITE [--quick | --full] [--out PATH]`: one suite, its JSON to PATH.
`python -m sparse_attn.bench all [--quick | --full] [--out-dir DIR]`: every suite, DIR/<suite>.json,
DIR/report.md and the plots. `python -m sparse_attn.bench report DIR`: re-render DIR's report.
`python -m sparse_attn.bench tune [--quick | --full] [--kernels K,...] [--seconds S] [--out PATH]`: the
kernels' tile sweep (not in `all`), of every kernel or of those named, within S seconds if given.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

from . import report, tune
from .common import environment, error_text, write_json
from .suites import SUITES


def _mode_flags(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small shapes, runs on the CPU in seconds")
    mode.add_argument("--full", action="store_true", help="the issues' GPU setups (default on a GPU)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sparse_attn.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in (*SUITES, "tune"):
        single = commands.add_parser(name, help=f"the {name} {'sweep' if name == 'tune' else 'suite'}")
        _mode_flags(single)
        single.add_argument("--out", help="write the results as JSON to this path")
        if name == "tune":
            single.add_argument("--kernels", help=f"comma-separated, of {', '.join(tune.SWEEPS)}")
            single.add_argument("--seconds", type=float, help="time budget: the tiles not reached are left untimed")
    every = commands.add_parser("all", help="every suite in one process, then the report")
    _mode_flags(every)
    every.add_argument("--out-dir", default="build/bench", help="where the JSON, report.md and plots go")
    render = commands.add_parser("report", help="re-render report.md and the plots from DIR/<suite>.json")
    render.add_argument("directory")
    return parser


def _resolve_mode(parser, args) -> tuple[torch.device, bool]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or (device.type == "cpu" and not args.full)
    if device.type == "cpu" and not quick:
        parser.error("--full needs a CUDA GPU")
    return device, quick


def run_suite(name: str, device: torch.device, quick: bool, out=None, **overrides) -> dict:
    """One suite's payload: environment, the whole config (shapes and error rule, with `overrides`
    applied) and its rows. With `out`, the payload is written there after every row ("complete": false
    until the last), so a run cut off by a time limit keeps the rows it finished. A suite that fails
    keeps its finished rows too, and the payload records the "error"."""
    suite = tune if name == "tune" else SUITES[name]
    config = {**(suite.QUICK if quick else suite.FULL), **overrides}
    print(f"suite {name} ({'quick' if quick else 'full'}) on {device}", flush=True)
    start = time.perf_counter()
    payload = {
        "suite": name,
        "mode": "quick" if quick else "full",
        "environment": environment(),
        "config": {**config, "error_rule": suite.ERROR_RULE},
        "complete": False,
        "wall_s": 0.0,
        "results": [],
    }
    try:
        for row in suite.run(config, device):
            payload["results"].append(row)
            payload["wall_s"] = time.perf_counter() - start
            write_json(out, payload, quiet=True)
    except Exception as exc:
        traceback.print_exc()
        payload["error"] = error_text(exc)
    else:
        payload["complete"] = True
    payload["wall_s"] = time.perf_counter() - start
    print(report.markdown_table(payload["results"], suite.COLUMNS), flush=True)
    return payload


def run_all(device: torch.device, quick: bool, out_dir: Path) -> int:
    """Every suite; one that fails is recorded in its JSON and the report, and the others still run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    start, failed = time.perf_counter(), []
    for name in SUITES:
        payload = run_suite(name, device, quick, out=out_dir / f"{name}.json")
        if "error" in payload:
            failed.append(name)
        write_json(out_dir / f"{name}.json", payload)
    report.render(out_dir)
    print(f"all suites in {time.perf_counter() - start:.1f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "report":
        print(report.render(args.directory), end="")
        return 0
    device, quick = _resolve_mode(parser, args)
    if args.command == "all":
        return run_all(device, quick, Path(args.out_dir))
    overrides = {}
    if getattr(args, "kernels", None):
        overrides["kernels"] = tuple(name.strip() for name in args.kernels.split(",") if name.strip())
    if getattr(args, "seconds", None) is not None:
        overrides["seconds"] = args.seconds
    payload = run_suite(args.command, device, quick, out=args.out, **overrides)
    write_json(args.out, payload)
    return 1 if "error" in payload else 0


if __name__ == "__main__":
    sys.exit(main())
