#!/usr/bin/env bash
# One batched GPU session (the device tool's `run`): build the CUDA extension, run the whole test
# suite on the GPU (bf16/fp16 cases and the 2x-eager-error rule included), then colm-bench at its
# default sizes. Everything lands in $OUT as at most 8 files (the device tool's limit):
#   info.txt build.log tests.log bench.log results.json table.txt plots.tar.gz
# Usage there: OUT=$OUT bash benchmarks/gpu_run.sh [extra colm-bench args, e.g. --ops chain_linear]
# Then commit results.json, table.txt and the plots under benchmarks/results/<device>-<date>/.
set -uo pipefail
OUT=${OUT:?set OUT to the folder that comes back}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COLM_KERNELS_CUDA_ARCHS=${COLM_KERNELS_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16}

# The image has torch, triton, numpy, pytest(-benchmark), hypothesis, matplotlib and no network:
# install without resolving dependencies, building against the torch that is there.
python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || {
    echo "build failed"; tail -50 "$OUT/build.log"; exit 1; }
python3 -m colm_kernels.info | tee "$OUT/info.txt"

python3 -m pytest tests -q -p no:cacheprovider --timeout=900 2>&1 | tee "$OUT/tests.log" | tail -30
python3 -m colm_kernels.bench.cli --out "$OUT/bench" "$@" 2>&1 | tee "$OUT/bench.log" | tail -80
cp "$OUT/bench/results.json" "$OUT/bench/table.txt" "$OUT/" 2>/dev/null
(cd "$OUT/bench" && tar czf "$OUT/plots.tar.gz" ./*.png 2>/dev/null)
rm -rf "$OUT/bench"
