#!/usr/bin/env bash
# The H100 check, one device call: build with CUDA, report the backends, run the gpu tests and the
# named benchmarks (--full, into bench/results/ and $OUT/bench-results/), print the benchmark report and
# a short table last. Copy bench-results/ from $OUT into bench/results/ and commit it.
# `tune` is a bench name too (the tile sweep, bench/results/tune.json). SKIP_TESTS=1 skips the
# self-check, gpu tests and demo, for a second call on a machine that already passed them.
# Each suite's JSON and log go to $OUT as soon as it ends, so a call cut off by its time limit
# still brings back what finished.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} SPARSE_ATTN_FORCE_BUILD=${SPARSE_ATTN_FORCE_BUILD:-1}
# On the device machine everything goes to $OUT (it comes back); elsewhere logs stay out of git.
OUT_DIR=${OUT:-build/gpu_check}
RESULTS=bench/results
mkdir -p "$OUT_DIR/bench-results"
declare -A status seconds
steps=()

# step NAME LOG COMMAND...: runs the command, its output shown and kept in $OUT_DIR/LOG.
step() {
  local name=$1 log=$2 start=$SECONDS
  shift 2
  "$@" 2>&1 | tee "$OUT_DIR/$log"
  status[$name]=${PIPESTATUS[0]}
  seconds[$name]=$((SECONDS - start))
  steps+=("$name")
}

# An in-place build needs nothing from a package index (the device machine has none).
step build build.log python3 setup.py build_ext --inplace >/dev/null
tail -n 30 "$OUT_DIR/build.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step info info.txt python3 -m sparse_attn info
if [ -z "${SKIP_TESTS:-}" ]; then
  step selfcheck selfcheck.txt python3 -m sparse_attn selfcheck --device cuda
  step pytest_gpu pytest_gpu.log python3 -m pytest -q -m gpu tests
  # The main job's demo on the GPU (bf16, Triton engine); transformers is installed there.
  step demo demo.txt python3 -m sparse_attn demo --prompt-len 4096 --new-tokens 32
fi

# Benchmarks named on the command line (e.g. `engine decode`), the --full setups, one process per
# suite, into bench/results/ (the committed latest H100 run); a suite that fails leaves no stale JSON.
for bench in "$@"; do
  rm -f "$RESULTS/$bench.json"
  step "bench_$bench" "bench_$bench.log" python3 "bench/$bench.py" --full --out "$RESULTS/$bench.json"
  [ -f "$RESULTS/$bench.json" ] && cp "$RESULTS/$bench.json" "$OUT_DIR/bench-results/"
done

# The report (report.md, speedup.png, pareto.png) is of the suites, rendered from whatever suite JSON
# is in bench/results/ (the tile sweep prints its own table).
any_suite=""
for name in engine decode moba moba_varlen xattention; do [ -f "$RESULTS/$name.json" ] && any_suite=1; done
if [ "$#" -gt 0 ] && [ -n "$any_suite" ]; then
  rm -f "$RESULTS/report.md"
  step bench_report bench_report.log python3 -m sparse_attn.bench report "$RESULTS" >/dev/null
  # Only $OUT comes back from the device machine: the results travel in it, to be copied to bench/results/.
  cp -r "$RESULTS"/. "$OUT_DIR/bench-results/"
  [ -f "$RESULTS/report.md" ] && { echo; cat "$RESULTS/report.md"; }
fi

echo
echo "| step | exit | seconds |"
echo "|---|---|---|"
for name in "${steps[@]}"; do echo "| $name | ${status[$name]} | ${seconds[$name]} |"; done
echo "archs ${SPARSE_ATTN_CUDA_ARCHS:-80;90a}, MAX_JOBS $MAX_JOBS"
for name in "${steps[@]}"; do [ "${status[$name]}" -eq 0 ] || exit 1; done
