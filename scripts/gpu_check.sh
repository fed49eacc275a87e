#!/usr/bin/env bash
# The H100 check, one device call: build with CUDA, report the backends, run the gpu tests and the
# named benchmarks, print a short table last. Copy the JSON results into bench/results/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} SPARSE_ATTN_FORCE_BUILD=${SPARSE_ATTN_FORCE_BUILD:-1}
# On the device machine everything goes to $OUT (it comes back); elsewhere logs stay out of git.
OUT_DIR=${OUT:-build/gpu_check}
mkdir -p "$OUT_DIR"
declare -A status

# An in-place build needs nothing from a package index (the device machine has none).
t0=$SECONDS
python3 setup.py build_ext --inplace >"$OUT_DIR/build.log" 2>&1
status[build]=$?
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
build_s=$((SECONDS - t0))
tail -n 30 "$OUT_DIR/build.log"

python3 -m sparse_attn info | tee "$OUT_DIR/info.txt"
python3 -m sparse_attn selfcheck --device cuda
status[selfcheck]=$?

python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT_DIR/pytest_gpu.log"
status[pytest_gpu]=${PIPESTATUS[0]}

# The main job's demo on the GPU (bf16, Triton engine); transformers is installed there.
python3 -m sparse_attn demo --prompt-len 4096 --new-tokens 32 2>&1 | tee "$OUT_DIR/demo.txt"
status[demo]=${PIPESTATUS[0]}

# Benchmarks named on the command line (e.g. `engine decode`); bench/*.py write JSON results.
for bench in "$@"; do
  python3 "bench/$bench.py" --out "$OUT_DIR/$bench.json"
  status[bench_$bench]=$?
done

echo
echo "| step | exit | note |"
echo "|---|---|---|"
echo "| build | ${status[build]} | ${build_s} s, archs ${SPARSE_ATTN_CUDA_ARCHS:-80;90a} |"
for step in "${!status[@]}"; do
  [ "$step" = build ] || echo "| $step | ${status[$step]} | |"
done
for step in "${!status[@]}"; do [ "${status[$step]}" -eq 0 ] || exit 1; done
