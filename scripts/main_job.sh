#!/usr/bin/env bash
# The main job on the embedded default (no model download): install, report the backends, self-check,
# then the demos: a small random Llama run dense and through XAttention, MoBA and S2O, compared with SDPA,
# and a small random DeepSeek-V3.2 through its own indexer and through HISA,
# and the benchmark suites' quick mode (CPU-sized shapes, every field and error check of a GPU run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHON
bash scripts/install.sh
"$PYTHON" -m sparse_attn info
"$PYTHON" -m sparse_attn selfcheck
"$PYTHON" -m sparse_attn demo "$@"
# The DSA model (a lightning indexer selecting each query's keys) through its own indexer and HISA's.
if "$PYTHON" -c "import sys, transformers; sys.exit(not hasattr(transformers, 'DeepseekV32Config'))"; then
  "$PYTHON" -m sparse_attn demo --arch deepseek_v32
else
  echo "[main] the installed transformers has no DeepSeek-V3.2 model: the DSA demo is skipped"
fi
"$PYTHON" -m sparse_attn.bench all --quick --out-dir build/bench-quick
