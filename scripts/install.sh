#!/usr/bin/env bash
# Installs sparse_attn and what its tests need into the current Python, idempotently.
# torch comes first and on its own: asking pip for a bare `torch` would pull several GB of CUDA
# packages, while `torch==2.13.0` is served here as a CPU wheel. A torch that is already
# installed (a CUDA build on a GPU machine, say) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check --no-input -q "$@"; }

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "[install] torch==2.13.0 (CPU)"
  pip_install torch==2.13.0
fi
echo "[install] build and test tools"
pip_install "setuptools>=64" wheel ninja numpy "pytest>=8" "triton>=3.2" ruff
echo "[install] sparse_attn with the test and hf extras (editable, --no-build-isolation: built against the installed torch)"
# transformers does not depend on torch, so the hf extra leaves the torch above untouched.
pip_install --no-build-isolation -e ".[test,hf]"
