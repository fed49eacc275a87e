#!/usr/bin/env bash
# The main job on the embedded default (no model download): install, report the backends, self-check,
# then the demo: a small random Llama run dense and through each sparse method, compared with SDPA,
# and the benchmark suites' quick mode (CPU-sized shapes, every field and error check of a GPU run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHON
bash scripts/install.sh
"$PYTHON" -m sparse_attn info
"$PYTHON" -m sparse_attn selfcheck
"$PYTHON" -m sparse_attn demo "$@"
"$PYTHON" -m sparse_attn.bench all --quick --out-dir build/bench-quick
