"""Command line: `python -m sparse_attn info` and `python -m sparse_attn selfcheck`."""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _info(_args) -> int:
    from ._native import backend_report

    report = backend_report()
    width = max(map(len, report))
    for name, value in report.items():
        print(f"{name:<{width}}  {value}")
    return 0


def _selfcheck_cases(device: torch.device):
    """(name, check) pairs; each check returns the max abs error against its oracle."""
    from . import reference, selection
    from .layout import BlockSparseLayout, causal_block_mask
    from .testing import structured_qkv

    gen = torch.Generator().manual_seed(int(time.time()))

    def rand(*shape):
        return torch.rand(*shape, generator=gen).to(device)

    def mean_pool():
        keys = rand(2, 4, 300, 64)
        return (selection.block_mean_pool(keys, 64) - reference.block_mean_pool_reference(keys, 64)).abs().max()

    def topk():
        scores = torch.floor(rand(512, 64) * 8)
        return (selection.topk_rows(scores, 8) != reference.topk_rows_reference(scores, 8)).sum()

    def threshold():
        scores, tau = rand(512, 64), rand(512).double()
        forced, allowed = rand(512, 64) < 0.05, rand(512, 64) < 0.9
        got = selection.threshold_select(scores, tau, forced=forced, allowed=allowed)
        ref = reference.threshold_select_reference(scores, tau, forced, allowed)
        return sum((a != b).sum() for a, b in zip(got, ref))

    def attention_oracle():
        inputs = structured_qkv(batch=1, num_q_heads=4, num_kv_heads=2, seq_len=256, head_dim=64, device=device)
        causal = causal_block_mask(256, 256, 64, 64, device=device)
        layout = BlockSparseLayout.from_dense_mask(
            causal.expand(1, 1, 4, 4).clone(), q_block_size=64, kv_block_size=64, seq_len_q=256, seq_len_kv=256
        )
        out, _ = reference.block_sparse_attention_reference(inputs.q, inputs.k, inputs.v, layout)
        dense = torch.nn.functional.scaled_dot_product_attention(
            inputs.q.double(), inputs.k.double(), inputs.v.double(), is_causal=True, enable_gqa=True
        )
        return (out - dense).abs().max()

    return [
        ("block_mean_pool", mean_pool),
        ("topk_rows", topk),
        ("threshold_select", threshold),
        ("reference attention vs SDPA", attention_oracle),
    ]


def _selfcheck(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"self-check on {device}")
    failures = 0
    for name, check in _selfcheck_cases(device):
        start = time.perf_counter()
        error = float(check())
        ok = error <= 1e-5
        failures += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {name:<30} max error {error:.2e}  ({time.perf_counter() - start:.2f} s)")
    print("self-check passed" if not failures else f"self-check FAILED ({failures})")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_attn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="report which backends work on this machine").set_defaults(run=_info)
    check = commands.add_parser("selfcheck", help="quick check of the native ops and oracles on this machine")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    check.set_defaults(run=_selfcheck)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
