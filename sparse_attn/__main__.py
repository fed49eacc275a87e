"""Command line: `python -m sparse_attn info`, `python -m sparse_attn selfcheck` and `python -m sparse_attn demo`."""

from __future__ import annotations

import argparse
import os
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
    """Each check returns its error against an oracle, or None when its backend is not available here (a NaN
    error is a failure: NaN outputs must not pass as a skipped check)."""
    from . import reference, selection
    from .layout import BlockSparseLayout, causal_block_mask
    from .testing import structured_qkv

    # Fresh inputs on every run: the fast paths must compute the same function on any valid input.
    seed = int(time.time_ns() % 2**31)
    gen = torch.Generator().manual_seed(seed)

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
        inputs = structured_qkv(
            batch=1, num_q_heads=4, num_kv_heads=2, seq_len=256, head_dim=64, seed=seed, device=device
        )
        causal = causal_block_mask(256, 256, 64, 64, device=device)
        layout = BlockSparseLayout.from_dense_mask(
            causal.expand(1, 1, 4, 4).clone(), q_block_size=64, kv_block_size=64, seq_len_q=256, seq_len_kv=256
        )
        out, _ = reference.block_sparse_attention_reference(inputs.q, inputs.k, inputs.v, layout)
        dense = torch.nn.functional.scaled_dot_product_attention(
            inputs.q.double(), inputs.k.double(), inputs.v.double(), is_causal=True, enable_gqa=True
        )
        return (out - dense).abs().max()

    def engine(backend):
        from .engine import block_sparse_attn, triton_available
        from .testing import random_block_layout

        def check():
            if backend == "triton" and not triton_available(device):
                return None
            inputs = structured_qkv(
                batch=2, num_q_heads=4, num_kv_heads=2, seq_len=256, head_dim=64, seed=seed, device=device
            )
            dtype = torch.float16 if device.type == "cuda" else torch.float32
            q, k, v = (t.to(dtype) for t in (inputs.q, inputs.k, inputs.v))
            layout = random_block_layout(2, 2, 256, 256, 64, 64, 0.5, seed=seed, device=device)
            out = block_sparse_attn(q, k, v, layout, backend=backend)
            ref, _ = reference.block_sparse_attention_reference(q, k, v, layout)
            return (out.double() - ref).abs().max() / ref.abs().max()

        return check

    def decode():
        from .decode import block_sparse_decode, decode_available
        from .testing import random_block_layout

        if not decode_available(device):
            return None
        inputs = structured_qkv(
            batch=2,
            num_q_heads=8,
            num_kv_heads=2,
            seq_len=1024,
            seq_len_q=4,
            head_dim=64,
            num_retrieval_spans=0,
            seed=seed,
            device=device,
        )
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        q, k, v = (t.to(dtype) for t in (inputs.q, inputs.k, inputs.v))
        layout = random_block_layout(2, 2, 4, 1024, 16, 64, 0.3, seed=seed, device=device)
        out = block_sparse_decode(q, k, v, layout, num_splits=3)
        ref, _ = reference.block_sparse_attention_reference(q, k, v, layout)
        return (out.double() - ref).abs().max() / ref.abs().max()

    def moba_routing():
        from .methods.moba import moba_route, moba_route_reference

        # Integer-valued inputs make block means and scores exact, so any backend must agree exactly.
        q = torch.randint(-3, 4, (1, 4, 512, 32), generator=gen).float().to(device)
        k = torch.randint(-3, 4, (1, 2, 512, 32), generator=gen).float().to(device)
        got = moba_route(q, k, block_size=64, topk=3)
        return (got != moba_route_reference(q, k, block_size=64, topk=3)).sum()

    def xattention():
        from .methods.xattention import xattention_estimate, xattention_estimate_reference

        inputs = structured_qkv(
            batch=1, num_q_heads=4, num_kv_heads=2, seq_len=512, head_dim=64, seed=seed, device=device
        )
        got = xattention_estimate(inputs.q, inputs.k, stride=8, block_size=64)
        ref = xattention_estimate_reference(inputs.q, inputs.k, stride=8, block_size=64)
        return (got.double() - ref).abs().max() / (64 / 8)

    def proxyattn():
        from .methods.proxyattn import proxy_estimate, proxy_estimate_reference

        inputs = structured_qkv(
            batch=1, num_q_heads=4, num_kv_heads=2, seq_len=512, head_dim=64, seed=seed, device=device
        )
        got = proxy_estimate(inputs.q, inputs.k, stride=4, block_size=64)
        return (got.double() - proxy_estimate_reference(inputs.q, inputs.k, stride=4, block_size=64)).abs().max()

    def dsa_indexer():
        from .methods.hisa import dsa_indexer_logits, dsa_indexer_logits_reference

        q, k, weights = rand(128, 8, 64) - 0.5, rand(256, 64) - 0.5, rand(128, 8)
        ks = torch.zeros(128, dtype=torch.int32, device=device)
        ke = torch.arange(129, 257, dtype=torch.int32, device=device)
        got, ref = dsa_indexer_logits(q, k, weights, ks, ke), dsa_indexer_logits_reference(q, k, weights, ks, ke)
        inside = torch.isfinite(ref)
        if not torch.equal(torch.isfinite(got), inside):
            return torch.tensor(float("inf"))
        return (got[inside].double() - ref[inside]).abs().max() / ref[inside].abs().max()

    def token_sparse():
        from .token_sparse import token_sparse_attn

        q, k, v = rand(1, 8, 64, 64) - 0.5, rand(1, 2, 512, 64) - 0.5, rand(1, 2, 512, 64)
        indices = torch.stack([torch.randperm(512, generator=gen)[:100] for _ in range(64 * 2)])
        indices = indices.view(1, 64, 2, 100).to(device)
        ref, _ = reference.token_sparse_attention_reference(q, k, v, indices, causal=False)
        return (token_sparse_attn(q, k, v, indices).double() - ref).abs().max()

    def s2o():
        from .methods.s2o import s2o_attention, s2o_reference

        q, k, v = rand(1, 4, 256, 64) - 0.5, rand(1, 2, 320, 64) - 0.5, rand(1, 2, 320, 64)
        out, stats = s2o_attention(q * 8, k, v, tau=0.05, segment_len=64, return_stats=True)
        ref, _ = s2o_reference(q * 8, k, v, stats.plan, stats.n_blocks)
        return (out.double() - ref).abs().max()

    # (name, check, tolerance): exact for the integer selections, rounding-level for the rest.
    return [
        ("block_mean_pool", mean_pool, 1e-5),
        ("topk_rows", topk, 0),
        ("threshold_select", threshold, 0),
        ("reference attention vs SDPA", attention_oracle, 1e-9),
        ("Triton block-sparse engine", engine("triton"), 2e-3),
        ("PyTorch block-sparse path", engine("torch"), 2e-3),
        ("block-sparse decode", decode, 2e-3),
        ("MoBA routing", moba_routing, 0),
        ("XAttention estimator", xattention, 1e-3),
        ("ProxyAttn estimator", proxyattn, 1e-3),
        ("DSA indexer scores", dsa_indexer, 1e-5),
        ("token-sparse attention", token_sparse, 2e-3),
        ("S2O attention", s2o, 2e-3),
    ]


def _selfcheck(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        # Without a GPU the Triton kernels run under the interpreter (set before triton is imported).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    print(f"self-check on {device}")
    failures = 0
    for name, check, tolerance in _selfcheck_cases(device):
        start = time.perf_counter()
        result = check()
        elapsed = time.perf_counter() - start
        if result is None:
            print(f"  skip {name:<30} (backend not available here)")
            continue
        error = float(result)
        ok = error <= tolerance  # False for NaN
        failures += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {name:<30} error {error:.2e} (tolerance {tolerance:.0e}, {elapsed:.2f} s)")
    print("self-check passed" if not failures else f"self-check FAILED ({failures})")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_attn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="report which backends work on this machine").set_defaults(run=_info)
    check = commands.add_parser("selfcheck", help="quick check of the native ops and oracles on this machine")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    check.set_defaults(run=_selfcheck)
    from .demo import add_demo_parser

    add_demo_parser(commands)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
