"""Build of sparse_attn._C: the C++ CPU ops always, the CUDA ops when nvcc and a CUDA torch are present.

Environment (flash-attn's conventions with the SPARSE_ATTN_ prefix):
  SPARSE_ATTN_SKIP_CUDA_BUILD=1  build the CPU ops only
  SPARSE_ATTN_FORCE_BUILD=1      compile the CUDA sources and fail loudly if that is impossible
  SPARSE_ATTN_CUDA_ARCHS         explicit ';' list, default "80;90a"; the GPU is never queried
  MAX_JOBS, NVCC_THREADS         parallel compile jobs and nvcc threads (default 4)
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "80;90a"
# The extension touches only the stable ABI (PyInit__C makes an empty module; the ops register through
# TORCH_LIBRARY), so one cp310-abi3 wheel serves every CPython >= 3.10 (per torch and CUDA pair).
LIMITED_API = "cp310"
LIMITED_API_MACRO = "-DPy_LIMITED_API=0x030A0000"


def env_flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def gencode_flags(archs):
    flags = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        if not arch.rstrip("a").isdigit():
            raise ValueError(f"SPARSE_ATTN_CUDA_ARCHS entry {arch!r} is not like '80' or '90a'")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    if not flags:
        raise ValueError("SPARSE_ATTN_CUDA_ARCHS is empty")
    return flags


def default_max_jobs(nvcc_threads):
    # flash-attn's heuristic: nvcc jobs are memory-hungry, about 5 GB per thread.
    cpus = os.cpu_count() or 1
    try:
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        free_gb = 8
    return max(1, min(cpus // 2, int(free_gb / (5 * nvcc_threads))))


def locate_cuda_home():
    """Sets CUDA_HOME to the toolkit that `nvcc` runs, unless CUDA_HOME or CUDA_PATH is set.

    torch guesses CUDA_HOME as the parent of `which nvcc`'s folder: for an `nvcc` that is a wrapper
    script outside the toolkit (/usr/local/bin/nvcc on this project's machines) that is /usr/local,
    and the glue's `#include <cuda_bf16.h>` fails. nvcc's dry run names its own toolkit (TOP=...).
    Must run before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
    """
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or nvcc is None:
        return
    try:
        dry_run = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return
    match = re.search(r"^#\$ TOP=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
    if match and os.path.isfile(os.path.join(match.group(1).strip(), "include", "cuda_runtime.h")):
        os.environ["CUDA_HOME"] = os.path.realpath(match.group(1).strip())


def want_cuda():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if env_flag("SPARSE_ATTN_SKIP_CUDA_BUILD"):
        return False
    possible = CUDA_HOME is not None and torch.version.cuda is not None
    if env_flag("SPARSE_ATTN_FORCE_BUILD") and not possible:
        sys.exit(
            "SPARSE_ATTN_FORCE_BUILD=1 but the CUDA ops cannot be built: "
            f"CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch.version.cuda}"
        )
    return possible


def extensions():
    if not env_flag("SPARSE_ATTN_SKIP_CUDA_BUILD"):
        locate_cuda_home()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-std=c++17", LIMITED_API_MACRO]
    cpp_sources = sources("csrc/ops.cpp") + sources("csrc/cpu/*.cpp")
    if not want_cuda():
        return [CppExtension("sparse_attn._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, py_limited_api=True)]
    nvcc_threads = os.environ.get("NVCC_THREADS", "4")
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs(int(nvcc_threads))))
    # Explicit -gencode flags make torch skip its own arch detection, which would query the GPU.
    nvcc_flags = [
        "-O3", "-std=c++17", "--expt-relaxed-constexpr", "--use_fast_math", f"--threads={nvcc_threads}",
        *gencode_flags(os.environ.get("SPARSE_ATTN_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)),
    ]
    return [
        CUDAExtension(
            "sparse_attn._C",
            cpp_sources + sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu"),
            extra_compile_args={"cxx": cxx_flags + ["-DSPARSE_ATTN_WITH_CUDA"], "nvcc": nvcc_flags},
            py_limited_api=True,
        )
    ]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=extensions(), cmdclass=cmdclass(), options={"bdist_wheel": {"py_limited_api": LIMITED_API}})
