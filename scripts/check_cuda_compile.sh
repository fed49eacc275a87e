#!/usr/bin/env bash
# GPU-less compile check of the CUDA sources, as CI runs it:
#   * every csrc/**/*.cu is compiled to an object file (no link) for sm_90a and sm_80;
#   * every csrc/cuda/*_cuda.cpp (torch glue) is syntax-checked with g++ against the installed
#     torch's headers and the CUDA toolkit's include dir.
# Without nvcc it reports that and passes: CPU-only machines cannot check anything here.
# Usage (from anywhere): bash scripts/check_cuda_compile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CXX=${CXX:-g++}

nvcc_bin=""
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  nvcc_bin="$CUDA_HOME/bin/nvcc"
elif command -v nvcc >/dev/null 2>&1; then
  nvcc_bin="$(command -v nvcc)"
fi
if [ -z "$nvcc_bin" ]; then
  echo "[cuda-check] nvcc not found (set CUDA_HOME or PATH); skipping the CUDA compile check"
  exit 0
fi
# The toolkit headers for g++: $CUDA_HOME/include, next to nvcc, or (when nvcc is a wrapper
# script elsewhere) under the toolkit root that nvcc itself reports.
nvcc_top="$("$nvcc_bin" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
cuda_include=""
for candidate in ${CUDA_HOME:+"$CUDA_HOME/include"} "$(dirname "$nvcc_bin")/../include" ${nvcc_top:+"$nvcc_top/include"}; do
  if [ -f "$candidate/cuda_runtime_api.h" ]; then
    cuda_include="$(cd "$candidate" && pwd)"
    break
  fi
done
if [ -z "$cuda_include" ]; then
  echo "[cuda-check] FAIL  no CUDA include dir with cuda_runtime_api.h found for $nvcc_bin (set CUDA_HOME)"
  exit 1
fi

work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT
failures=0
start=$SECONDS

# Sorted lists: the order of the report does not depend on the file system.
mapfile -t cu_files < <(find csrc -name '*.cu' -type f | LC_ALL=C sort)
mapfile -t glue_files < <(find csrc/cuda -maxdepth 1 -name '*_cuda.cpp' -type f 2>/dev/null | LC_ALL=C sort)
echo "[cuda-check] $("$nvcc_bin" --version | tail -n 1)"

# nvcc runs in the background while g++ checks the glue: two cores, two jobs. --threads 2 lets one
# nvcc compile its two architectures concurrently when there is nothing else to do.
nvcc_flags=(-std=c++17 -O3 --expt-relaxed-constexpr -Icsrc
  -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80)
compile_cu_files() {
  local threads=$1 status=0 src log
  for src in "${cu_files[@]}"; do
    log="$work_dir/$(echo "$src" | tr '/' '_').log"
    if "$nvcc_bin" "${nvcc_flags[@]}" --threads "$threads" -c "$src" -o "$work_dir/$(basename "$src").o" \
        >"$log" 2>&1; then
      echo "[cuda-check] ok    nvcc $src"
    else
      echo "[cuda-check] FAIL  nvcc $src"
      cat "$log"
      status=1
    fi
  done
  return $status
}

if [ "${#glue_files[@]}" -gt 0 ]; then
  compile_cu_files 1 >"$work_dir/nvcc_report.txt" 2>&1 &
  nvcc_pid=$!

  # The macros a torch extension build defines (torch.utils.cpp_extension), with this torch's ABI.
  if ! torch_info="$("$PYTHON" -c '
import torch
from torch.utils.cpp_extension import include_paths
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
for path in include_paths():
    print(path)
' 2>&1)"; then
    echo "[cuda-check] FAIL  cannot query torch's include paths with $PYTHON:"
    echo "$torch_info"
    failures=1
  else
    cxx11_abi="$(echo "$torch_info" | head -n 1)"
    include_flags=()
    # -isystem: warnings are reported for this project's code only, not for torch's headers.
    while IFS= read -r path; do include_flags+=(-isystem "$path"); done < <(echo "$torch_info" | tail -n +2)
    for src in "${glue_files[@]}"; do
      if output="$("$CXX" -std=c++17 -fsyntax-only -Wall "${include_flags[@]}" -isystem "$cuda_include" -Icsrc \
          -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI="$cxx11_abi" \
          -DSPARSE_ATTN_WITH_CUDA "$src" 2>&1)"; then
        echo "[cuda-check] ok    $CXX -fsyntax-only $src"
        if [ -n "$output" ]; then echo "$output"; fi
      else
        echo "[cuda-check] FAIL  $CXX -fsyntax-only $src"
        echo "$output"
        failures=1
      fi
    done
  fi

  wait "$nvcc_pid" || failures=1
  cat "$work_dir/nvcc_report.txt"
else
  compile_cu_files 2 || failures=1
fi

elapsed=$((SECONDS - start))
if [ "$failures" -ne 0 ]; then
  echo "[cuda-check] FAILED (${elapsed} s)"
  exit 1
fi
echo "[cuda-check] passed: ${#cu_files[@]} .cu file(s), ${#glue_files[@]} glue file(s) (${elapsed} s)"
