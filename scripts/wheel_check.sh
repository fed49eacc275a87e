#!/usr/bin/env bash
# Builds the wheel (`pip wheel . --no-build-isolation`, against the given Python's torch), installs
# it into a fresh virtual environment that sees that torch but not this checkout, and imports it
# there: the native CPU ops must load and, unless SPARSE_ATTN_SKIP_CUDA_BUILD=1, the CUDA ops must
# be registered too (the build is forced); with a GPU one of them runs against the reference.
# Callers: the CPU wheel in CI (tests/test_package.py, SPARSE_ATTN_SKIP_CUDA_BUILD=1), the CUDA
# wheel on the H100 (scripts/gpu_check.sh) and against torch 2.11 without a GPU
# (scripts/gpu_versions_check.sh).
# Usage: bash scripts/wheel_check.sh [python]   (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

want_cuda=1
if [ -n "${SPARSE_ATTN_SKIP_CUDA_BUILD:-}" ]; then want_cuda=0; else export SPARSE_ATTN_FORCE_BUILD=1; fi
# setuptools packs every extension binary it finds in build/lib: one left by a build against another
# torch, or under another file name (before the abi3 tag), would ride along and shadow the new one.
rm -f build/lib*/sparse_attn/_C*.so
"$PYTHON" -m pip wheel . --no-build-isolation --no-deps -q -w "$work/wheels"
# One wheel per (torch, CUDA) pair, for every CPython >= 3.10: the stable-ABI tag.
wheel=$(ls "$work"/wheels/sparse_attn-*.whl)
case "$(basename "$wheel")" in
  *-cp310-abi3-*) echo "[wheel] $(basename "$wheel")" ;;
  *) echo "[wheel] expected a cp310-abi3 wheel, got $(basename "$wheel")" >&2; exit 1 ;;
esac
# Without pip (Debian-style Pythons lack ensurepip): the given Python's pip installs the wheel into it.
"$PYTHON" -m venv --without-pip "$work/venv"
fresh="$work/venv/bin/python"
# torch's site directory (the base interpreter's, or a virtual environment's) appended by a .pth
# line, after the fresh one's where the wheel goes: no download, and none of this checkout. Lines of
# a .pth file add paths without running that directory's own .pth files, so an editable install
# there stays inert.
purelib=$("$fresh" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PYTHON" -c "import pathlib, torch; print(pathlib.Path(torch.__file__).resolve().parents[1])" >"$purelib/outer_torch.pth"
"$PYTHON" -m pip install -q --no-deps --disable-pip-version-check --target "$purelib" "$wheel"
cd "$work"
env -u PYTHONPATH "$fresh" - "$work/venv" "$want_cuda" <<'EOF'
import sys

import torch

import sparse_attn
from sparse_attn import reference
from sparse_attn._native import NATIVE_KERNELS

assert sparse_attn.__file__.startswith(sys.argv[1]), f"imported {sparse_attn.__file__}, not the installed wheel"
want_cuda = sys.argv[2] == "1"
cuda_ops = sorted(op for op, key in NATIVE_KERNELS if key == "CUDA")
assert sparse_attn.native_available("cpu"), "the wheel's native CPU ops did not load"
assert cuda_ops or not want_cuda, "the wheel registered no CUDA ops"
print(f"[wheel] {sparse_attn.__file__}: torch {torch.__version__}, CUDA ops {', '.join(cuda_ops) or 'none'}")
if want_cuda and torch.cuda.is_available():
    keys = torch.randn(2, 4, 1000, 128, device="cuda", dtype=torch.bfloat16)
    got = sparse_attn.block_mean_pool(keys, 64)
    torch.testing.assert_close(got, reference.block_mean_pool_reference(keys, 64), rtol=1e-5, atol=1e-5)
    print(f"[wheel] block_mean_pool on {torch.cuda.get_device_name()} matches the reference")
EOF
