#!/usr/bin/env bash
# The main job on the embedded default (no downloads): install, report the backends, self-check.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHON
bash scripts/install.sh
"$PYTHON" -m sparse_attn info
"$PYTHON" -m sparse_attn selfcheck
