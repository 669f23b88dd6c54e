#!/usr/bin/env bash
# Compile-check every csrc/**/*.cu through CMakeLists.txt (no GPU, no torch needed).
#
#   bash .ci/compile_cuda.sh            # from the repository root (or anywhere)
#
# Environment:
#   COLM_KERNELS_CUDA_ARCHS   architectures, ';' or ',' separated (default 90a = sm_90a)
#   COLM_KERNELS_WERROR=1     warnings (host -Wall and nvcc) become errors
#   COLM_CI_BUILD_DIR         build directory (default build/cmake)
#   COLM_CI_CLEAN=1           start from an empty build directory (re-shows every warning)
#   NVCC                      nvcc to use (default: $CUDA_HOME/bin/nvcc, nvcc on PATH, else
#                             /usr/local/cuda/bin/nvcc)
#   CUBLAS_INCLUDE_DIR        folder with cublas_v2.h when the toolkit has none (default: the pip
#                             package nvidia-cublas of $PYTHON / python / python3, if installed:
#                             site-packages/nvidia/cu13/include or nvidia/cublas/include)
#
# Prints one line per .cu file (ok / FAIL), the compiler errors of each failing file, and the
# number of warning lines. Exits non-zero when any file fails to compile.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

die() { echo "compile_cuda: $*" >&2; exit 2; }

is_elf() { [[ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" == '177ELF' ]]; }

if [[ -z "${NVCC:-}" ]]; then
  if [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
    NVCC="${CUDA_HOME}/bin/nvcc"
  elif command -v nvcc >/dev/null 2>&1; then
    NVCC="$(readlink -f "$(command -v nvcc)")"
    # a wrapper script (e.g. /usr/local/bin/nvcc -> exec /usr/local/cuda-X/bin/nvcc) works, but
    # the toolkit's own binary keeps the CMake cache identical to a hand-run configure
    if ! is_elf "$NVCC" && [[ -x /usr/local/cuda/bin/nvcc ]]; then
      NVCC=/usr/local/cuda/bin/nvcc
    fi
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    NVCC=/usr/local/cuda/bin/nvcc
  else
    die "nvcc not found on PATH or at /usr/local/cuda/bin/nvcc (set NVCC=...)"
  fi
fi
command -v cmake >/dev/null 2>&1 || die "cmake not found on PATH"

# cuBLAS headers: the toolkit's when it has them, else those of a pip nvidia-cublas (CMake fails
# with a hint when neither is there).
find_pip_cublas_include() {
  local py
  for py in "${PYTHON:-}" python python3; do
    [[ -n "$py" ]] && command -v "$py" >/dev/null 2>&1 || continue
    "$py" - 2>/dev/null <<'PY' && return 0
import importlib.util, os, sys
spec = importlib.util.find_spec("nvidia")
for root in (list(spec.submodule_search_locations) if spec else []):
    for sub in ("cu13", "cublas", "cu12"):
        inc = os.path.join(root, sub, "include")
        if os.path.isfile(os.path.join(inc, "cublas_v2.h")):
            print(inc)
            sys.exit(0)
sys.exit(1)
PY
  done
  return 1
}
TOOLKIT_INCLUDE="$(dirname "$(dirname "$NVCC")")/include"
if [[ -z "${CUBLAS_INCLUDE_DIR:-}" && ! -f "$TOOLKIT_INCLUDE/cublas_v2.h" ]]; then
  CUBLAS_INCLUDE_DIR="$(find_pip_cublas_include || true)"
fi
CUBLAS_INCLUDE_DIR="${CUBLAS_INCLUDE_DIR:-}"

ARCHS="${COLM_KERNELS_CUDA_ARCHS:-90a}"
ARCHS="${ARCHS//,/;}"
ARCHS="${ARCHS// /;}"
BUILD_DIR="${COLM_CI_BUILD_DIR:-build/cmake}"
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
if [[ "${COLM_KERNELS_WERROR:-0}" == "1" ]]; then WERROR=ON; else WERROR=OFF; fi

mapfile -t SOURCES < <(find csrc -name '*.cu' -type f | LC_ALL=C sort)
[[ ${#SOURCES[@]} -gt 0 ]] || die "no .cu files under csrc/"

echo "compile_cuda: $("$NVCC" --version | tail -n 1)"
echo "compile_cuda: $(cmake --version | head -n 1); archs ${ARCHS}; werror ${WERROR}; ${#SOURCES[@]} file(s)"
echo "compile_cuda: cuBLAS headers: ${CUBLAS_INCLUDE_DIR:-$TOOLKIT_INCLUDE}"

if [[ "${COLM_CI_CLEAN:-0}" == "1" ]]; then rm -rf "$BUILD_DIR"; fi
if [[ -f "$BUILD_DIR/CMakeCache.txt" ]] &&
   ! grep -q '^CMAKE_GENERATOR:INTERNAL=Unix Makefiles$' "$BUILD_DIR/CMakeCache.txt"; then
  die "$BUILD_DIR was configured with another generator; remove it or set COLM_CI_BUILD_DIR"
fi

LOG_DIR="$BUILD_DIR/ci-logs"
mkdir -p "$LOG_DIR" || die "cannot create $LOG_DIR"

# The Makefile generator gives one target per object (csrc/<op>/<op>.cu.o), used below.
if ! cmake -S . -B "$BUILD_DIR" -G "Unix Makefiles" \
    -DCMAKE_CUDA_COMPILER="$NVCC" \
    "-DCMAKE_CUDA_ARCHITECTURES=${ARCHS}" \
    -DCOLM_KERNELS_WERROR="$WERROR" \
    "-DCUBLAS_INCLUDE_DIR=${CUBLAS_INCLUDE_DIR}" >"$LOG_DIR/configure.log" 2>&1; then
  cat "$LOG_DIR/configure.log"
  die "CMake configure failed"
fi

# Parallel build, keep going past failures; its log shows every warning.
cmake --build "$BUILD_DIR" -j"$JOBS" -- -k >"$LOG_DIR/build.log" 2>&1
build_rc=$?
grep -E -i 'warning' "$LOG_DIR/build.log" | grep -v -E '^(g?make|\[)' || true
n_warn=$(grep -E -c -i 'warning' "$LOG_DIR/build.log" || true)

failed=()
for src in "${SOURCES[@]}"; do
  obj_log="$LOG_DIR/$(echo "$src" | tr '/' '_').log"
  # A no-op for objects the build above produced; recompiles (and shows the errors of) the rest.
  if cmake --build "$BUILD_DIR" --target "${src}.o" >"$obj_log" 2>&1; then
    echo "ok   $src"
  else
    echo "FAIL $src"
    grep -v -E '^(g?make(\[[0-9]+\])?:|\[ *[0-9]+%\])' "$obj_log" | sed 's/^/     /'
    failed+=("$src")
  fi
done

echo "compile_cuda: ${n_warn} warning line(s); full log: $LOG_DIR/build.log"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "compile_cuda: FAILED: ${failed[*]}"
  exit 1
fi
if [[ $build_rc -ne 0 ]]; then
  tail -n 40 "$LOG_DIR/build.log"
  echo "compile_cuda: FAILED: every object compiled but the library step failed (see above)"
  exit 1
fi
echo "compile_cuda: all ${#SOURCES[@]} CUDA file(s) compile for ${ARCHS}"

# bindings.cpp (the torch glue: tensor checks, allocations, the pybind11 module) is host C++ that
# only a CUDA torch build compiles. Syntax-check it against the installed torch's headers (a CPU
# wheel ships the c10/cuda and ATen/cuda headers but not one generated macro header, stubbed here)
# so a typo in it fails CI instead of the first GPU build. Skipped when torch is not importable.
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if TORCH_INC="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null)"; then
  PY_INC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  STUB="$BUILD_DIR/bindings-stub"
  mkdir -p "$STUB/c10/cuda/impl"
  [[ -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]] ||
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$STUB/c10/cuda/impl/cuda_cmake_macros.h"
  CXX_BIN="${CXX:-g++}"
  if "$CXX_BIN" -std=c++20 -fsyntax-only -Wall -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
      -I"$STUB" -I"$TORCH_INC" -I"$TORCH_INC/torch/csrc/api/include" -I"$PY_INC" \
      -I"$TOOLKIT_INCLUDE" ${CUBLAS_INCLUDE_DIR:+-I"$CUBLAS_INCLUDE_DIR"} -Icsrc \
      csrc/bindings.cpp >"$LOG_DIR/bindings.log" 2>&1; then
    echo "ok   csrc/bindings.cpp (host syntax check against torch $("$PY" -c 'import torch; print(torch.__version__)'))"
  else
    grep -E 'error' "$LOG_DIR/bindings.log" | head -n 40
    echo "compile_cuda: FAILED: csrc/bindings.cpp does not compile against the installed torch headers"
    exit 1
  fi
else
  echo "compile_cuda: torch is not importable: csrc/bindings.cpp not checked"
fi
