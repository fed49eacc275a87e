#!/usr/bin/env bash
# Builds the wheel with CUDA (`pip wheel . --no-build-isolation`, against the given Python's torch),
# installs it into a fresh virtual environment that sees that torch but not this checkout, imports
# it there and lists the CUDA ops it registered; with a GPU it also runs one of them and compares it
# with the reference. scripts/gpu_check.sh runs it on the H100, scripts/gpu_versions_check.sh
# against torch 2.11 on a machine without a GPU. (The CPU wheel is tested in CI: test_package.py.)
# Usage: bash scripts/wheel_check.sh [python]   (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

SPARSE_ATTN_FORCE_BUILD=1 "$PYTHON" -m pip wheel . --no-build-isolation --no-deps -q -w "$work/wheels"
"$PYTHON" -m venv "$work/venv"
fresh="$work/venv/bin/python"
# torch's site directory appended by a .pth line: no download, and none of this checkout.
purelib=$("$fresh" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PYTHON" -c "import pathlib, torch; print(pathlib.Path(torch.__file__).resolve().parents[1])" >"$purelib/outer_torch.pth"
"$fresh" -m pip install -q --no-deps --disable-pip-version-check "$work"/wheels/sparse_attn-*.whl
cd "$work"
env -u PYTHONPATH "$fresh" - "$work/venv" <<'EOF'
import sys

import torch

import sparse_attn
from sparse_attn import reference
from sparse_attn._native import NATIVE_KERNELS

assert sparse_attn.__file__.startswith(sys.argv[1]), f"imported {sparse_attn.__file__}, not the installed wheel"
cuda_ops = sorted(op for op, key in NATIVE_KERNELS if key == "CUDA")
assert sparse_attn.native_available("cpu") and cuda_ops, f"CPU ops {sparse_attn.native_available('cpu')}, CUDA {cuda_ops}"
print(f"[wheel] {sparse_attn.__file__}: torch {torch.__version__}, CUDA ops {', '.join(cuda_ops)}")
if torch.cuda.is_available():
    keys = torch.randn(2, 4, 1000, 128, device="cuda", dtype=torch.bfloat16)
    got = sparse_attn.block_mean_pool(keys, 64)
    torch.testing.assert_close(got, reference.block_mean_pool_reference(keys, 64), rtol=1e-5, atol=1e-5)
    print(f"[wheel] block_mean_pool on {torch.cuda.get_device_name()} matches the reference")
EOF
