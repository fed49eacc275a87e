"""Compiles every Triton kernel the package launches for sm_90a and sm_80, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute but not that they compile:
it accepts code the GPU compiler rejects, and it has no registers or shared memory. This script
runs the real launch code of each op on CPU tensors with `wrap_triton` swapped for a recorder,
then compiles each recorded launch (its argument types and constexprs) with Triton's ahead-of-time
path and the bundled ptxas, specialised as the JIT specialises a real launch. It fails on a compile
error, on shared memory over the architecture's limit (a launch would fail there), and in a
16-bit sm_90a launch of the default tiles (pointer loads) on register spills, on a dot that two
warpgroups compute alike, or, up to head dim 128, on dots that did not become Hopper's warpgroup
MMA (wgmma). The int64-offset variants (WIDE_INDEX, family `wide`) must compile but may spill.
It prints registers, stack (spills), shared memory, the tensor-core instructions (wgmma or
mma.sync; "x2" where a dot has fewer rows than its warps span, so two warpgroups compute the same
values) and the number of asynchronous (pipelined) loads per launch: the numbers to watch when
tuning tiles, with or without a GPU.

Run without TRITON_INTERPRET (the kernels must be JIT functions): python scripts/triton_compile_check.py
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the compile check needs the JIT kernels, not the interpreter")

# Triton 3.9 warns unless this is set; 1 keeps fused multiply-adds, the default of the GPU's triton.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from sparse_attn import _engine_ops, _moba_ops, tiles
from sparse_attn.kernels import block_scores, indexer_scores, launch, s2o_attn, token_sparse_attn
from sparse_attn.layout import BlockSparseLayout
from sparse_attn.methods import proxyattn

# Usable shared memory per block (bytes): H100 228 KB minus 1 KB reserved, A100 164 KB minus 1 KB.
ARCHES = {"sm_90a": (90, 227 * 1024), "sm_80": (80, 163 * 1024)}


class _Recorder:
    """Stands in for `wrap_triton(kernel)[grid](*args, **kwargs)`: keeps the launch instead of running it."""

    launches: list = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _Recorder.launches.append((self.kernel, args, kwargs))

        return launch


def _specialize(kernel, args, kwargs, capability: int):
    """The launch as the JIT would compile it for `capability`: its own binder gives the argument
    types, the constexprs and the specializations (16-byte aligned pointers, integers divisible by 16
    or equal to 1). Without those attributes the compiler cannot vectorise the loads, and neither
    pipelines them nor reports the registers a real launch uses."""
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return target, ASTSource(kernel, signature, constexprs, attrs), options, specialization


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes: spills and local arrays) of the compiled kernel, read by cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        report = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(handle.name)
    usage = re.search(r"REG:(\d+) STACK:(\d+)", report)
    return (int(usage.group(1)), int(usage.group(2))) if usage else (0, 0)


def _input_dtype(args) -> torch.dtype:
    return next(a.dtype for a in args if isinstance(a, torch.Tensor))


def _is_16_bit(args) -> bool:
    return _input_dtype(args) in (torch.float16, torch.bfloat16)


def _label(kernel, kwargs, args) -> str:
    dtype = str(_input_dtype(args)).replace("torch.", "")
    tile = "x".join(
        str(kwargs[name])
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_R", "HEADS_PAD", "BLOCK_H", "TILE_K")
        if name in kwargs
    )
    if "SUB_N" in kwargs:
        tile += f" sub {kwargs.get('SUB_M', kwargs['BLOCK_M'])}x{kwargs['SUB_N']}"
    flags = [f"D={kwargs['HEAD_DIM']}", dtype, tile, f"w{kwargs.get('num_warps', 4)}"]  # triton's default warps
    flags += [name.lower() for name in ("CAUSAL", "VARLEN", "BACKWARD") if kwargs.get(name)]
    flags += ["tma"] if kwargs.get("USE_TMA") else []
    flags += ["ws"] if kwargs.get("WARP_SPECIALIZE") else []
    flags += ["wide"] if kwargs.get("WIDE_INDEX") else []
    return f"{kernel.fn.__name__}[{' '.join(flags)}]"


# ---------------------------------------------------------------------------------- the launches
def _qkv(dtype, dim, heads=(4, 2), seq=256):
    q = torch.randn(1, heads[0], seq, dim, dtype=dtype)
    k = torch.randn(1, heads[1], seq, dim, dtype=dtype)
    return q, k, torch.randn_like(k)


def _engine_launches(dtype, dim, varlen):
    q, k, v = _qkv(dtype, dim)
    layout = BlockSparseLayout.from_dense_mask(
        torch.ones(1, 4, 2, 2, dtype=torch.bool), q_block_size=128, kv_block_size=128, seq_len_q=256, seq_len_kv=256
    )
    cu = torch.tensor([0, 100, 256], dtype=torch.int32) if varlen else None
    args = (layout.kv_num_blocks, layout.kv_indices, cu, cu, 128, 128, 256, 256, 1, True, 0.1)
    out, lse = q.clone(), torch.zeros(q.shape[:3])
    _engine_ops.block_sparse_attn_fwd(q, k, v, *args)
    q_lists = (layout.kv_num_blocks, layout.kv_indices)  # any int32 lists of the right rank
    _engine_ops.block_sparse_attn_bwd(out, lse, q, k, v, out, lse, *args[:2], *q_lists, *args[2:])


def _with_tiles(tile_for, launches, dtype, dim, varlen):
    """A family's launches with the tiles `tile_for(kernel, head_dim)` gives (None: the default): K/V
    through tensor descriptors (`tma`), or the warp-specialised tiles (`ws`, built for sm_90a only;
    fp32 launches take the pointer path with the tile's 4 warps, as they do at run time)."""
    bound = tiles.head_dim_bound(dim)
    with contextlib.ExitStack() as stack:
        for kernel in tiles.TABLE:
            tile = tile_for(kernel, dim)
            if tile is not None:
                stack.enter_context(tiles.override(kernel, bound, tile))
        launches(dtype, dim, varlen)


def _tma_tile(kernel, dim):
    return tiles.lookup(kernel, dim)._replace(tma=True) if kernel in tiles.TMA_KERNELS else None


def _ws_tile(kernel, dim):
    return tiles.WS_TILES.get(kernel, {}).get(tiles.head_dim_bound(dim))


_TMA = functools.partial(_with_tiles, _tma_tile)
_WS = functools.partial(_with_tiles, _ws_tile)


def _moba_launches(dtype, dim, varlen):
    q, k, v = _qkv(dtype, dim)
    routes = torch.zeros(1, 4, 256, 4, dtype=torch.int32)
    cu = torch.tensor([0, 100, 256], dtype=torch.int32) if varlen else None
    if varlen:
        routes = routes.expand(2, -1, -1, -1).contiguous()
    _moba_ops.routed_attention(q, k, v, routes, 128, True, 0.1, 256, cu, cu)
    rows = _moba_ops.logical_rows(q, 2, 256)
    lists = (*_moba_ops.routed_pair_lists(routes, 2, 2, rows), cu, cu)
    lse = torch.zeros(q.shape[:3])
    _moba_ops.moba_attn_bwd(q, lse, q, k, v, q, lse, *lists, 128, rows, 256, 256, True, 0.1)


def _xattention_launches(dtype, dim, varlen):
    if varlen:
        return
    q, k, _ = _qkv(dtype, dim)
    block_scores.xattention_estimate_op(q, k, 8, 128, True)


def _proxyattn_launches(dtype, dim, varlen):
    """ProxyAttn's estimator (g = 1, strides 4 and 1) and budget at the default block of 128."""
    if varlen:
        return
    q, k, _ = _qkv(dtype, dim)
    proxyattn.proxy_estimate(q, k)
    proxyattn.proxy_estimate(q, k, stride=1)
    proxyattn.proxy_budget(q, k, gamma=0.9)


def _hisa_launches(dtype, dim, varlen):
    """The DSA/HISA indexer scores at DeepSeek-V3.2's 64 index heads: the flat scan, HISA's stage 1 over
    fp32 pooled keys and its stage 2 over 128-key candidate blocks."""
    if varlen or dtype == torch.float32:
        return
    rows, keys, heads = 256, 2048, 64
    q = torch.randn(rows, heads, dim, dtype=dtype)
    k = torch.randn(keys, dim, dtype=dtype)
    weights = torch.rand(rows, heads)
    ks = torch.zeros(rows, dtype=torch.int32)
    ke = torch.arange(keys - rows + 1, keys + 1, dtype=torch.int32)
    indexer_scores.indexer_scores_op(q, k, weights, ks, ke, None)
    indexer_scores.indexer_scores_op(q, torch.randn(keys // 128, dim), weights, ks, ke // 128 + 1, None)
    starts = torch.arange(0, 64 * 128, 128, dtype=torch.int32).repeat(rows, 1)
    indexer_scores.indexer_gathered_scores_op(q, k, weights, ks, ke, None, starts, 128)


def _token_sparse_launches(dtype, dim, varlen):
    """Token-sparse attention forward and backward: GQA (8 query heads per KV head, 2048 indices per row)
    at this head dim, and MLA's latent (128 heads, d_qk = 576, V its first 512 dims) once, at bf16."""
    if varlen:
        return
    q, k, v = _qkv(dtype, dim, heads=(16, 2), seq=64)
    k, v = (torch.randn(1, 2, 4096, dim, dtype=dtype) for _ in range(2))
    indices = torch.randint(0, 4096, (1, 64, 1, 2048), dtype=torch.int32)
    cases = [(q, k, v, indices)]
    if (dtype, dim) == (torch.bfloat16, 128):
        latent = torch.randn(1, 1, 4096, 576, dtype=dtype)
        cases.append((torch.randn(1, 64, 128, 576, dtype=dtype).transpose(1, 2), latent, latent[..., :512], indices))
    for q, k, v, indices in cases:
        out, lse = token_sparse_attn.token_sparse_attn_fwd(q, k, v, indices, 0.1)
        token_sparse_attn.token_sparse_attn_bwd(out, None, q, k, v, out, lse, indices, 0.1)


def _s2o_launches(dtype, dim, varlen):
    """S2O forward (both stop rules) and backward at Llama-3.1-8B's GQA (4 query heads per KV head) with
    the spec's 64 x 64 tiles, two segments of 1024 after a 2048-key history (chunked prefill)."""
    if varlen:
        return
    q, k, v = _qkv(dtype, dim, heads=(8, 2), seq=2048)
    k, v = (torch.randn(1, 2, 4096, dim, dtype=dtype) for _ in range(2))
    key_order = torch.randint(0, 2048, (1, 2, 2048 + 3072), dtype=torch.int32)
    query_order = torch.arange(2048, dtype=torch.int32).repeat(1, 8, 1)
    for stop_mean in (False, True):
        out, lse, n_blocks = s2o_attn.s2o_attn_fwd(q, k, v, key_order, query_order, 1024, 64, 64, 0.01, stop_mean, 0.1)
    s2o_attn.s2o_attn_bwd(out, None, q, k, v, out, lse, key_order, query_order, n_blocks, 1024, 64, 64, 0.1)


def _wide_launches(dtype, dim, varlen):
    """The int64-offset variants (WIDE_INDEX: a tensor spans 2^31 elements) of every kernel, at D=128
    bf16 only: they must compile; they may spill (only launches that large take them)."""
    if (dtype, dim, varlen) != (torch.bfloat16, 128, False):
        return
    modules = (_engine_ops, _moba_ops, block_scores)
    saved = [module.wide_index for module in modules]
    for module in modules:
        module.wide_index = lambda *tensors: True
    try:
        for launches in (_engine_launches, _moba_launches, _xattention_launches, _proxyattn_launches):
            launches(dtype, dim, varlen)
    finally:
        for module, function in zip(modules, saved):
            module.wide_index = function


FAMILIES = {
    "engine": _engine_launches,
    "engine_tma": functools.partial(_TMA, _engine_launches),
    "engine_ws": functools.partial(_WS, _engine_launches),
    "moba": _moba_launches,
    "moba_tma": functools.partial(_TMA, _moba_launches),
    "xattention": _xattention_launches,
    "proxyattn": _proxyattn_launches,
    "hisa": _hisa_launches,
    "token_sparse": _token_sparse_launches,
    "s2o": _s2o_launches,
    "wide": _wide_launches,
}
DEFAULT_TILE_FAMILIES = ("engine", "moba", "xattention", "proxyattn")
CASES = [  # (dtype, head dim, varlen)
    (torch.bfloat16, 128, False),
    (torch.bfloat16, 128, True),
    (torch.float16, 64, False),
    (torch.bfloat16, 256, False),
    (torch.float32, 128, False),
]


@functools.cache
def record(families: tuple) -> list:
    launch.wrap_triton = _Recorder
    # The launch code picks GPU or interpreter settings from the tensors' device: take the GPU's
    # (and an H100's 132 SMs for persistent grids) for these CPU tensors.
    _moba_ops._persistent_programs = lambda device: 132 * _moba_ops._PROGRAMS_PER_SM
    _moba_ops._ITEM_ROWS_INTERPRETER = _moba_ops._ITEM_ROWS_CUDA
    block_scores._INTERPRETER_TILES = block_scores._TILE
    proxyattn.block_scores_kernel_runs = lambda *args: True  # on CPU tensors it would take the PyTorch path for bf16
    launch._device_descriptors = lambda device: True
    launches = []  # (kernel, args, kwargs, family)
    for dtype, dim, varlen in CASES:
        for name in families:
            _Recorder.launches = []
            FAMILIES[name](dtype, dim, varlen)
            launches += [(*recorded, name) for recorded in _Recorder.launches]
    unique = {}
    for kernel, args, kwargs, family in launches:
        *_, options, specialization = _specialize(kernel, args, kwargs, ARCHES["sm_90a"][0])
        key = (kernel.fn.__name__, str(specialization), str(options))
        unique.setdefault(key, (kernel, args, kwargs, family))
    return list(unique.values())


def _lowering(ttgir: str) -> tuple[str, int]:
    """(the tensor-core instruction family the dots became, the number of asynchronous global loads:
    cp.async or TMA, which appear when the pipeliner prefetched a loop's tiles)."""
    mma = "wgmma" if "warp_group_dot " in ttgir else "mma" if "nvidia_mma" in ttgir else "none"
    return mma, ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy")


def _mma_copies(ttgir: str) -> int:
    """How many warpgroups compute each element of the most replicated warpgroup dot. A Hopper MMA
    layout gives each warp 16 rows: warpsPerCTA [8, 1] spans 128 rows, so a 64-row dot on it (a
    64-key dK/dV or 64-query dQ tile with 8 warps, whose scores feed the next dot) is computed by
    both warpgroups, 2x the tensor-core work for that dot. 1 when every dot fills its warps."""
    hopper_layout = r"(#mma\d*) = #ttg\.nvidia_mma<\{versionMajor = 3, [^}]*?warpsPerCTA = \[(\d+),"
    rows_per_layout = {name: 16 * int(warps_m) for name, warps_m in re.findall(hopper_layout, ttgir)}
    dots = re.findall(r"ttng\.warp_group_dot [^\n]*-> tensor<(\d+)x\d+x\w+, (#mma\d*)>", ttgir)
    if ttgir.count("ttng.warp_group_dot ") != len(dots) or any(name not in rows_per_layout for _, name in dots):
        raise RuntimeError("could not read the warpgroup dots' layouts: has the TTGIR format changed?")
    return max((rows_per_layout[name] // int(rows) for rows, name in dots), default=1)


# The tile axis that a warp-specialised kernel's consumer warpgroups split between them.
_WS_SPLIT_AXIS = {"_block_sparse_dkdv_kernel": "BLOCK_N"}


def _ws_copies(ttgir: str, split_rows: int) -> int:
    """How many consumer warpgroups of a warp-specialised loop compute each row of the split axis:
    1 when they split it (two 64-row halves of 128), 2 when triton 3.6 could not split it and gave
    each consumer the whole tile (64 rows): the same work twice (triton-lang/triton#10436)."""
    partitions = re.split(r"\n\s*partition\d+\(", ttgir)[1:]
    rows = [re.search(r"warp_group_dot [^\n]*-> tensor<(\d+)x", p) for p in partitions]
    return max(sum(int(match.group(1)) for match in rows if match) // split_rows, 1)


def _compile(job) -> tuple:
    """Compiles launch `index` of the recorded list for `arch` (in a worker process, which records again)."""
    index, arch, families = job
    kernel, kargs, kwargs, family = record(families)[index]
    capability, shared_limit = ARCHES[arch]
    start = time.perf_counter()
    registers = stack = shared = async_loads = 0
    mma = "-"
    try:
        target, source, options, _ = _specialize(kernel, kargs, kwargs, capability)
        compiled = triton.compile(source, target=target, options=options.__dict__)
        registers, stack = _resource_usage(compiled.asm["cubin"])
        ttgir = compiled.asm["ttgir"]
        mma, async_loads = _lowering(ttgir)
        shared = compiled.metadata.shared
        result = f"FAILED: shared memory {shared} B > {shared_limit} B" if shared > shared_limit else "ok"
        copies = _mma_copies(ttgir)
        if kwargs.get("WARP_SPECIALIZE"):
            copies = max(copies, _ws_copies(ttgir, kwargs[_WS_SPLIT_AXIS.get(kernel.fn.__name__, "BLOCK_M")]))
            if "ttg.warp_specialize(" not in ttgir:
                result = "FAILED: a ws tile whose loop the compiler did not warp-specialise"
            elif copies > 1:
                result = f"FAILED: {copies} consumer warpgroups of a ws tile compute the same rows"
        # The rules for the default tiles: not a family's other tiles (a ws tile that takes the pointer
        # path, for one, is still its family's tile).
        default_tile = family in DEFAULT_TILE_FAMILIES
        if arch == "sm_90a" and default_tile and _is_16_bit(kargs):
            if stack:
                result = f"FAILED: {stack} B of register spills in a default 16-bit Hopper tile"
            elif mma != "wgmma" and kwargs["HEAD_DIM"] <= 128 and re.search(r"tt\.dot\b|warp_group_dot", ttgir):
                result = f"FAILED: dots lowered to {mma}, not wgmma (a tile under 64 rows a warpgroup?)"
            elif copies > 1:
                result = f"FAILED: {copies} warpgroups compute the same dot in a default 16-bit Hopper tile"
        mma += f" x{copies}" if copies > 1 else ""
    except Exception as error:  # noqa: BLE001 - every compiler error is a finding
        result = f"FAILED: {type(error).__name__}: {' '.join(str(error).split())[:300]}"
    label = _label(kernel, kwargs, kargs)
    return label, arch, registers, stack, shared, mma, async_loads, time.perf_counter() - start, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHES), action="append", help="default: all")
    parser.add_argument("--family", choices=sorted(FAMILIES), action="append", help="default: all")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--expect-triton", help="fail unless this triton version is the one imported")
    args = parser.parse_args(argv)
    if args.expect_triton and triton.__version__ != args.expect_triton:
        print(f"expected triton {args.expect_triton}, imported {triton.__version__} from {triton.__file__}")
        return 1
    families = tuple(args.family or sorted(FAMILIES))
    # Warp-specialised launches run on Hopper only.
    jobs = [
        (i, arch, families)
        for i, (_, _, kwargs, _) in enumerate(record(families))
        for arch in args.arch or sorted(ARCHES)
        if arch == "sm_90a" or not kwargs.get("WARP_SPECIALIZE")
    ]
    print(f"triton {triton.__version__}: {len(jobs)} kernel builds ahead of time, no GPU used", flush=True)
    print(
        "| kernel | arch | registers | stack B (spills) | shared KB | MMA (xN: N warpgroups compute the same dot) "
        "| async loads | seconds | result |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    failures = 0
    with ProcessPoolExecutor(max_workers=max(args.jobs, 1), mp_context=get_context("spawn")) as pool:
        for label, arch, registers, stack, shared, mma, async_loads, seconds, result in pool.map(_compile, jobs):
            failures += result != "ok"
            cells = (label, arch, registers, stack, f"{shared / 1024:.0f}", mma, async_loads, f"{seconds:.1f}", result)
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
