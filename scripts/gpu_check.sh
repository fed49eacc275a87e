#!/usr/bin/env bash
# The H100 check, one device call: build with CUDA, report the backends, run the gpu tests and the
# named benchmarks (--full, into bench/results/ and $OUT/bench-results.tgz), print the benchmark report
# and a short table last. Unpack bench-results.tgz from $OUT into bench/results/ and commit it.
# `tune` is a bench name too (the tile sweep, bench/results/tune.json; TUNE_KERNELS=a,b limits it):
# the benchmarks named after it run with its winners (SPARSE_ATTN_TILES, recorded in each JSON's
# environment), so one call can sweep and then measure the tuned kernels. SKIP_TESTS=1 skips the
# self-check, gpu tests and demo, for a second call on a machine that already passed them.
# The device tool ends a call at 600 s and brings back what $OUT holds then, so the script keeps its own
# deadline, CALL_SECONDS (default 560) from its start: each step may run until RESERVE_SECONDS (30)
# before it, a step that cannot get MIN_STEP_SECONDS (20) is skipped, and the archive, report and
# table come within the reserve. The suites write their JSON after every row, so a suite stopped at the
# deadline keeps its finished rows ("complete": false). PYTEST_ARGS adds pytest arguments (--deselect ...).
# $OUT/triton_cache.tgz holds the compiled Triton kernels: unpacked into .triton_cache/ here and
# named in the next call's `carry`, it spares that call the compiles (the device keeps nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} SPARSE_ATTN_FORCE_BUILD=${SPARSE_ATTN_FORCE_BUILD:-1}
# On the device machine everything goes to $OUT (it comes back); elsewhere logs stay out of git.
OUT_DIR=${OUT:-build/gpu_check}
RESULTS=bench/results
# $OUT brings back at most 8 files: one log of every step, the results as one archive, the Triton cache.
STAGE=build/gpu_check_stage
rm -rf "$STAGE" && mkdir -p "$STAGE/bench-results" "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
declare -A status seconds
steps=()
DEADLINE=$((SECONDS + ${CALL_SECONDS:-560}))

# Seconds a step may still take: up to RESERVE_SECONDS before the deadline.
left() { echo $((DEADLINE - SECONDS - ${RESERVE_SECONDS:-30})); }

# step NAME COMMAND...: runs the command within what is left of the call, its output shown and
# appended to $LOG; exit 124 when the deadline stopped it.
step() {
  local name=$1 start=$SECONDS budget
  shift
  steps+=("$name")
  budget=$(left)
  if [ "$budget" -lt "${MIN_STEP_SECONDS:-20}" ]; then
    echo "[gpu_check] $name skipped: ${budget} s left before the call's deadline" | tee -a "$LOG"
    status[$name]=skipped
    seconds[$name]=0
    return
  fi
  echo "===== $name: $*" >>"$LOG"
  timeout --kill-after=5 "$budget" "$@" 2>&1 | tee -a "$LOG"
  status[$name]=${PIPESTATUS[0]}
  seconds[$name]=$((SECONDS - start))
}

# Triton's compiled kernels persist in .triton_cache/ (ignored): a later call that carries it back
# skips recompiling what an earlier call compiled.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton_cache}
# An in-place build needs nothing from a package index (the device machine has none).
step build python3 setup.py build_ext --inplace >/dev/null
tail -n 30 "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step info python3 -m sparse_attn info
if [ -z "${SKIP_TESTS:-}" ]; then
  step selfcheck python3 -m sparse_attn selfcheck --device cuda
  # A hung kernel must not eat the whole call: the tests get at most PYTEST_SECONDS. A crashing test
  # must not end the run (the first H100 run lost its last 17 tests to a segfault): pytest-xdist,
  # where installed (the device image has it), runs them in 2 workers and replaces a crashed one.
  isolate=""
  python3 -c "import xdist" 2>/dev/null && isolate="-n 2"
  step pytest_gpu timeout "${PYTEST_SECONDS:-360}" python3 -m pytest -q -m gpu --tb=short -rfE $isolate ${PYTEST_ARGS:-} tests
  # The CUDA wheel: built, installed into a fresh environment, imported, one op run on the GPU.
  step wheel bash scripts/wheel_check.sh
  # The main job's demo on the GPU (bf16, Triton engine); transformers is installed there.
  step demo python3 -m sparse_attn demo --prompt-len 4096 --new-tokens 32
  if python3 -c "import sys, transformers; sys.exit(not hasattr(transformers, 'DeepseekV32Config'))"; then
    step demo_dsa python3 -m sparse_attn demo --arch deepseek_v32 --prompt-len 4096 --new-tokens 32
  fi
fi

# Benchmarks named on the command line (e.g. `engine decode`), the --full setups, one process per
# suite, into bench/results/ (the committed latest H100 run); a suite that fails leaves no stale JSON.
for bench in "$@"; do
  rm -f "$RESULTS/$bench.json"
  args=()
  [ "$bench" = tune ] && [ -n "${TUNE_KERNELS:-}" ] && args=(--kernels "$TUNE_KERNELS")
  # The sweep stops starting tiles 30 s before TUNE_SECONDS (or the call's deadline) and keeps what it
  # timed (its JSON grows by kernel); it tries tiles no test ran at its size (the warp-specialised ones
  # among them), so a hang still costs it only that, and the benchmarks after it run with the default tiles.
  limit=()
  if [ "$bench" = tune ]; then
    tune_seconds=${TUNE_SECONDS:-240}
    [ "$(left)" -lt "$tune_seconds" ] && tune_seconds=$(left)
    limit=(timeout "$tune_seconds") && args+=(--seconds $((tune_seconds - 30)))
  fi
  step "bench_$bench" "${limit[@]}" python3 "bench/$bench.py" --full --out "$RESULTS/$bench.json" "${args[@]}"
  [ -f "$RESULTS/$bench.json" ] && cp "$RESULTS/$bench.json" "$STAGE/bench-results/"
  tar czf "$OUT_DIR/bench-results.tgz" -C "$STAGE" bench-results
  if [ "$bench" = tune ] && [ -f "$RESULTS/tune.json" ]; then
    SPARSE_ATTN_TILES=$(python3 -m sparse_attn.bench.tune "$RESULTS/tune.json") && export SPARSE_ATTN_TILES
    echo "[gpu_check] the benchmarks after the sweep run with SPARSE_ATTN_TILES='${SPARSE_ATTN_TILES:-}'" | tee -a "$LOG"
  fi
done

# The report (report.md, speedup.png, pareto.png) is of the suites, rendered from whatever suite JSON
# is in bench/results/ (the tile sweep prints its own table).
any_suite=""
for name in engine decode moba moba_varlen moba_decode xattention proxyattn s2o hisa; do [ -f "$RESULTS/$name.json" ] && any_suite=1; done
if [ "$#" -gt 0 ] && [ -n "$any_suite" ]; then
  rm -f "$RESULTS/report.md"
  step bench_report python3 -m sparse_attn.bench report "$RESULTS" >/dev/null
  # Only $OUT comes back from the device machine: the results travel as one archive, to be
  # unpacked into bench/results/.
  cp -r "$RESULTS"/. "$STAGE/bench-results/"
  tar czf "$OUT_DIR/bench-results.tgz" -C "$STAGE" bench-results
  [ -f "$RESULTS/report.md" ] && { echo; cat "$RESULTS/report.md"; }
fi

# The Triton cache travels back as one file (when small enough), to be carried by the next call.
if [ -n "${OUT:-}" ] && [ -d "$TRITON_CACHE_DIR" ]; then
  tar czf "$OUT_DIR/triton_cache.tgz" -C "$TRITON_CACHE_DIR" .
  [ "$(stat -c %s "$OUT_DIR/triton_cache.tgz")" -lt 16000000 ] || rm -f "$OUT_DIR/triton_cache.tgz"
fi

echo
echo "| step | exit | seconds |"
echo "|---|---|---|"
for name in "${steps[@]}"; do echo "| $name | ${status[$name]} | ${seconds[$name]} |"; done
echo "archs ${SPARSE_ATTN_CUDA_ARCHS:-80;90a}, MAX_JOBS $MAX_JOBS; $((SECONDS)) s of CALL_SECONDS ${CALL_SECONDS:-560}"
for name in "${steps[@]}"; do [ "${status[$name]}" = 0 ] || exit 1; done
