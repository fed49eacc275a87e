"""`python -m sparse_attn demo`: a causal LM run dense and through each sparse method, side by side.

Offline by default: a small Llama-style model with seeded random weights (`--arch deepseek_v32`: a
small DeepSeek-V3.2, whose indexer's selection runs through its own indexer and through HISA; or
`--model PATH`, a local checkpoint). The prompt repeats random token segments, so attention has
structure to find.
For each method the table gives the prefill time, the density of the blocks computed, and how far
the prefill logits and the greedy continuation move from the model's own SDPA run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .hf_dsa import is_indexed_config

# The methods each built-in model runs by default (a DSA model takes its own indexer or HISA's).
DEFAULT_METHODS = {"llama": "dense,xattention,moba,s2o", "deepseek_v32": "dense,hisa"}


def add_demo_parser(commands) -> None:
    """Add the `demo` subcommand to the CLI's subparsers."""
    demo = commands.add_parser(
        "demo", help="run a small causal LM dense and with each sparse method (needs transformers)"
    )
    demo.add_argument("--model", default=None, help="local checkpoint directory (default: a random tiny model)")
    demo.add_argument(
        "--arch", choices=sorted(DEFAULT_METHODS), default="llama", help="the random tiny model (default llama)"
    )
    demo.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods (default: " + "; ".join(f"{a}: {m}" for a, m in DEFAULT_METHODS.items()) + ")",
    )
    demo.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens (default 1024)")
    demo.add_argument("--new-tokens", type=int, default=16, help="greedily generated tokens (default 16)")
    demo.add_argument("--block-size", type=int, default=None, help="block size (default 64 on CPU, 128 on GPU)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=run_demo)


def _method_names(text: str) -> list:
    return [name.strip() for name in text.split(",") if name.strip()]


def _method_options(method: str, block_size: int) -> dict:
    # Moderate budgets: visibly sparse, still close to dense on a structured prompt.
    if method == "xattention":
        return {"threshold": 0.9, "block_size": block_size, "stride": 8}
    if method == "moba":
        return {"block_size": block_size, "topk": 3}
    if method == "s2o":
        segment = -(-2 * block_size // 64) * 64  # S2O's segments hold whole 64-row tiles
        return {"segment_len": segment, "tau": 0.1, "stop_rule": "mean", "block_m": 64, "block_n": 64}
    if method == "hisa":
        return {"block_size": block_size, "block_topk": 4}  # 4 blocks hold the indexer's 128 keys
    return {}


def _tiny_model(arch: str, seed: int):
    import transformers

    from .testing import TINY_CAUSAL_LM, TINY_DSA_LM

    torch.manual_seed(seed)
    if arch == "deepseek_v32":
        if not hasattr(transformers, "DeepseekV32Config"):
            raise ImportError(f"transformers {transformers.__version__} has no DeepSeek-V3.2 model (5.x has)")
        model = transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(**TINY_DSA_LM))
        return model, "random tiny DeepSeek-V3.2 (2 layers, MLA with 4 heads, an indexer keeping 128 keys)"
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_CAUSAL_LM))
    return model, "random tiny Llama (2 layers, 4 q / 2 kv heads, head dim 64)"


def _structured_prompt(vocab_size: int, length: int, seed: int) -> torch.Tensor:
    """Random 32-token segments drawn from a pool of 8 and repeated in random order: recurring content."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randint(3, vocab_size, (8, 32), generator=gen)
    order = torch.randint(0, 8, (-(-length // 32),), generator=gen)
    return pool[order].reshape(-1)[:length][None]


class _Progress:
    """A tqdm bar on a terminal (when installed), plain lines otherwise (logs, CI)."""

    def __init__(self, total: int):
        self._bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, desc="demo", leave=False)
        self._done, self._total = 0, total

    def step(self, label: str) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label)
            self._bar.update(1)
        else:
            print(f"  [{self._done}/{self._total}] {label}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _run(model, ids, new_tokens: int, device):
    """(prefill seconds, fp32 prefill logits, generated tokens); the prefill runs once to warm up, then timed."""
    with torch.no_grad():
        model(ids)
        _sync(device)
        start = time.perf_counter()
        logits = model(ids).logits.float()
        _sync(device)
        seconds = time.perf_counter() - start
        generated = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return seconds, logits[0], generated[0, ids.shape[1] :]


def run_demo(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from . import hf

        hf._require_transformers()
    except ImportError as err:
        print(f"demo: {err}")
        return 1
    from .engine import triton_available

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    block_size = args.block_size or (128 if device.type == "cuda" else 64)
    try:  # unknown names and options the methods refuse: before any work
        for method in _method_names(args.methods or ""):
            hf.SparseAttnConfig(method, **_method_options(method, block_size))
    except (ValueError, TypeError, NotImplementedError) as err:
        print(f"demo: {err}")
        return 1

    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
        description = f"{type(model).__name__} from {args.model}"
    else:
        try:
            model, description = _tiny_model(args.arch, args.seed)
        except ImportError as err:
            print(f"demo: {err}")
            return 1
    model = model.to(device=device, dtype=dtype).eval()
    # A DSA model (a checkpoint, or --arch deepseek_v32) runs its own indexer and HISA by default.
    dsa = any(is_indexed_config(c) for c in hf._model_configs(model))
    methods = _method_names(args.methods or DEFAULT_METHODS["deepseek_v32" if dsa else "llama"])
    try:
        for method in methods:  # whether this model takes the method: patch's own check, before any work
            hf._hisa_indexers(model, hf.SparseAttnConfig(method, **_method_options(method, block_size)))
    except ValueError as err:
        print(f"demo: {err}")
        return 1
    ids = _structured_prompt(model.config.vocab_size, args.prompt_len, args.seed).to(device)
    engine = "triton" if triton_available(device) else "PyTorch paths"
    print(
        f"sparse_attn demo: {description}; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
        f"{device.type} {str(dtype).removeprefix('torch.')}, block size {block_size}, engine: {engine}"
    )

    progress = _Progress(len(methods) + 1)
    base_seconds, base_logits, base_tokens = _run(model, ids, args.new_tokens, device)
    progress.step("sdpa baseline")
    base_logprobs = base_logits.log_softmax(dim=-1)
    rows = [("sdpa (baseline)", base_seconds, 1.0, 1.0, 0.0, 1.0)]
    for method in methods:
        options = _method_options(method, block_size)
        with hf.patched(model, method, track_density=True, **options) as handle:
            seconds, logits, tokens = _run(model, ids, args.new_tokens, device)
        logprobs = logits.log_softmax(dim=-1)
        agree = (logits.argmax(-1) == base_logits.argmax(-1)).float().mean().item()
        kl = (base_logprobs.exp() * (base_logprobs - logprobs)).sum(-1).mean().item()
        match = (tokens == base_tokens).float().mean().item() if len(tokens) else 1.0
        density = handle.stats.mean_density()
        density = 1.0 if density is None and method == "dense" else density
        rows.append((method, seconds, density, agree, kl, match))
        progress.step(method)
    progress.close()

    header = f"{'method':<16} {'prefill ms':>10} {'density':>8} {'top-1 agree':>11} {'KL vs sdpa':>10} {'gen match':>9}"
    print(header)
    print("-" * len(header))
    for name, seconds, density, agree, kl, match in rows:
        density_text = "n/a" if density is None else f"{density:.3f}"
        print(f"{name:<16} {seconds * 1e3:>10.1f} {density_text:>8} {agree:>11.3f} {kl:>10.2e} {match:>9.3f}")
    print(
        "density: computed blocks (for DSA models' token selections, keys) over causally visible ones in the "
        "sparse prefill calls (decode runs dense); "
        "top-1 agree and KL compare prefill logits per position; gen match: greedy tokens equal to the baseline's."
    )
    if not args.model:
        print(
            "Random weights spread attention almost evenly and leave near-ties among the top logits, so these "
            "agreement numbers are pessimistic; --model PATH runs a trained checkpoint."
        )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_attn demo")
    add_demo_parser(parser.add_subparsers(dest="command"))
    return run_demo(parser.parse_args(["demo", *(argv or [])]))
