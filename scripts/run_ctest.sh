#!/usr/bin/env bash
# Configure, build and run the C++ unit tests (CMake + ctest) against the installed torch.
#
#   bash scripts/run_ctest.sh            # from the repository root
#
# Environment: PYTHON (interpreter with torch, default python3/python), BUILD_DIR (default
# build/cmake), JOBS (default 2), CMAKE_BUILD_TYPE (default Release), CMAKE_ARGS (extra
# configure arguments, e.g. -DSPARSE_ATTN_WITH_CUDA=ON). Exits non-zero when a step fails;
# exits 0 with a message when cmake is not installed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS

if ! command -v cmake >/dev/null 2>&1; then
  echo "run_ctest.sh: cmake not found; skipping the C++ tests."
  exit 0
fi

PYTHON=${PYTHON:-$(command -v python3 || command -v python || true)}
if [[ -z "$PYTHON" ]]; then
  echo "run_ctest.sh: no python interpreter found (needed to locate torch)." >&2
  exit 1
fi
TORCH_PREFIX=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')

BUILD_DIR=${BUILD_DIR:-build/cmake}
JOBS=${JOBS:-2}
generator=()
if command -v ninja >/dev/null 2>&1 && [[ ! -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  generator=(-G Ninja)
fi

echo "== configure ($BUILD_DIR)"
mkdir -p "$BUILD_DIR"
# shellcheck disable=SC2086  # CMAKE_ARGS is deliberately word-split
cmake -S . -B "$BUILD_DIR" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-Release}" \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DPython3_EXECUTABLE="$PYTHON" \
  ${CMAKE_ARGS:-} >"$BUILD_DIR/configure.log" 2>&1 || {
  cat "$BUILD_DIR/configure.log"
  echo "run_ctest.sh: configure failed after $((SECONDS - start))s" >&2
  exit 1
}
grep -E "sparse_attn:" "$BUILD_DIR/configure.log" || true
configured=$SECONDS

echo "== build (-j$JOBS)"
if ! cmake --build "$BUILD_DIR" -j"$JOBS"; then
  echo "run_ctest.sh: build failed after $((SECONDS - start))s" >&2
  exit 1
fi
built=$SECONDS

echo "== test"
status=0
(cd "$BUILD_DIR" && ctest --output-on-failure) || status=$?

echo "run_ctest.sh: configure $((configured - start))s, build $((built - configured))s," \
  "test $((SECONDS - built))s, total $((SECONDS - start))s"
if [[ $status -ne 0 ]]; then
  echo "run_ctest.sh: ctest FAILED" >&2
fi
exit $status
