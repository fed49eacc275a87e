#!/usr/bin/env bash
# The H100 check, one device call: build with CUDA, report the backends, run the gpu tests and the
# named benchmarks (--full, into bench/results/ and $OUT/bench-results/), print the benchmark report and
# a short table last. Copy bench-results/ from $OUT into bench/results/ and commit it.
# `tune` is a bench name too (the tile sweep, bench/results/tune.json). SKIP_TESTS=1 skips the
# self-check, gpu tests and demo, for a second call on a machine that already passed them.
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
if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m sparse_attn selfcheck --device cuda
  status[selfcheck]=$?

  python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT_DIR/pytest_gpu.log"
  status[pytest_gpu]=${PIPESTATUS[0]}

  # The main job's demo on the GPU (bf16, Triton engine); transformers is installed there.
  python3 -m sparse_attn demo --prompt-len 4096 --new-tokens 32 2>&1 | tee "$OUT_DIR/demo.txt"
  status[demo]=${PIPESTATUS[0]}
fi

# Benchmarks named on the command line (e.g. `engine decode`), the --full setups, one process per
# suite, into bench/results/ (the committed latest H100 run); a suite that fails leaves no stale JSON.
# The report (report.md, speedup.png, pareto.png) is rendered from whatever JSON is there.
RESULTS=bench/results
for bench in "$@"; do
  rm -f "$RESULTS/$bench.json"
  python3 "bench/$bench.py" --full --out "$RESULTS/$bench.json"
  status[bench_$bench]=$?
done
if [ "$#" -gt 0 ]; then
  # The report is of the suites (the tile sweep prints its own table): rendered when any suite ran.
  any_suite=""
  for name in engine decode moba xattention; do [ -f "$RESULTS/$name.json" ] && any_suite=1; done
  if [ -n "$any_suite" ]; then
    rm -f "$RESULTS/report.md"
    python3 -m sparse_attn.bench report "$RESULTS" >"$OUT_DIR/bench_report.log" 2>&1
    status[bench_report]=$?
  fi
  # Only $OUT comes back from the device machine: the results travel in it, to be copied to bench/results/.
  mkdir -p "$OUT_DIR/bench-results" && cp -r "$RESULTS"/. "$OUT_DIR/bench-results/"
fi

[ -f "$RESULTS/report.md" ] && [ "$#" -gt 0 ] && { echo; cat "$RESULTS/report.md"; }
echo
echo "| step | exit | note |"
echo "|---|---|---|"
echo "| build | ${status[build]} | ${build_s} s, archs ${SPARSE_ATTN_CUDA_ARCHS:-80;90a} |"
for step in "${!status[@]}"; do
  [ "$step" = build ] || echo "| $step | ${status[$step]} | |"
done
for step in "${!status[@]}"; do [ "${status[$step]}" -eq 0 ] || exit 1; done
