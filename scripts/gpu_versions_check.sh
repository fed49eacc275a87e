#!/usr/bin/env bash
# The GPU machine's software on a machine without a GPU: torch 2.11.0+cu130, triton 3.6.0 and
# transformers 5.17.0 in a side virtual environment (about 5 GB of downloads, so not part of CI).
# It builds the extension with CUDA against that torch (the build the H100 runs, linked, with this
# machine's nvcc), then runs the test suite: the Triton kernels under triton 3.6's interpreter,
# torch.library registration, opcheck and the HF patcher under those versions.
# Usage: bash scripts/gpu_versions_check.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=build/gpu-versions
venv=$work/venv
tree=$work/tree

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  # triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4 refuses.
  "$venv/bin/python" -m pip install --disable-pip-version-check -q "torch==2.11.0" "triton==3.6.0" \
    "transformers==5.17.0" "numpy<2.3" pytest ninja pybind11 setuptools wheel matplotlib
fi
"$venv/bin/python" -c "import torch, triton, transformers; print('torch', torch.__version__, \
'triton', triton.__version__, 'transformers', transformers.__version__)"

# A copy of the working tree, so the in-place build does not replace this checkout's extension.
rm -rf "$tree" && mkdir -p "$tree"
tar --exclude=./build --exclude=./.git --exclude='*.so' --exclude=__pycache__ -cf - . | tar -xf - -C "$tree"
cd "$tree"
start=$SECONDS
MAX_JOBS=${MAX_JOBS:-2} SPARSE_ATTN_FORCE_BUILD=1 "$root/$venv/bin/python" setup.py build_ext --inplace \
  >build.log 2>&1 || { tail -n 40 build.log; exit 1; }
echo "[gpu-versions] CUDA build against torch 2.11: $((SECONDS - start)) s"
PYTHONPATH=$PWD "$root/$venv/bin/python" -m sparse_attn info
# The CUDA wheel against that torch: built, installed into a fresh environment and imported.
bash scripts/wheel_check.sh "$root/$venv/bin/python"
# The wheel test is wheel_check.sh's CPU variant (a second build): the CUDA one above covers it here.
PYTHONPATH=$PWD "$root/$venv/bin/python" -m pytest -q -p no:cacheprovider -k "not wheel_installs" "$@"
