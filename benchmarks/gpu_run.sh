#!/usr/bin/env bash
# GPU session runner (the device tool's `run`): one command = one or more stages, all finishing
# inside the tool's 10-minute limit (LIMIT_S, default 570 s, shared by the stages in order).
#
#   OUT=$OUT bash benchmarks/gpu_run.sh build tests            # ~build, then the whole suite
#   OUT=$OUT BENCH_ARGS="--ops chain_linear,chain_swiglu" bash benchmarks/gpu_run.sh build bench
#
# Stages:
#   build  pip install --no-build-isolation --no-deps -e . (the image has torch, triton, pytest,
#          pytest-xdist/-timeout, matplotlib and no network), then `python -m colm_kernels.info`.
#          Incremental on a machine that is still warm.
#   tests  pytest $TESTS (default: tests) on 8 xdist workers with autotuning on, as users run: every
#          kept config benchmarked into the live buffers on each kernel's first call of a key (the
#          first-call bugs of GPU execution semantics live there).
#   tests-untuned  the same with COLM_KERNELS_AUTOTUNE=0: the first kept config of each kernel (what
#          a deterministic-config run gets); tests/ops/test_triton_configs.py checks every config.
#   sanitize  compute-sanitizer memcheck over the kernel tests, racecheck over the CUDA ones
#          (SANITIZE_TESTS / RACECHECK_TESTS / SANITIZE_K narrow them; slow: give it its own call).
#   bench  colm-bench $BENCH_ARGS at default sizes.
# At the time limit pytest and colm-bench get SIGINT: pytest still prints its summary and writes
# tests.xml; colm-bench writes the rows measured so far. Split TESTS / --ops over calls if needed.
# Files in $OUT: info.txt build.log tests{,-untuned}.log/.xml sanitize.log bench.log results.json
# table.txt plots.tar.gz; the device tool returns 8 a call, so no call runs all four stages.
# Commit them under benchmarks/results/<device>-<date>/.
set -uo pipefail
OUT=${OUT:?set OUT to the folder that comes back}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COLM_KERNELS_CUDA_ARCHS=${COLM_KERNELS_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16}
deadline=$(( $(date +%s) + ${LIMIT_S:-570} ))
left() { echo $(( deadline - $(date +%s) )); }
rc=0

for stage in "${@:-build}"; do
    echo "== $stage ($(left) s left)"
    case "$stage" in
    build)
        timeout "$(left)" python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || {
            echo "build failed"; tail -50 "$OUT/build.log"; exit 1; }
        python3 -m colm_kernels.info | tee "$OUT/info.txt" ;;
    tests|tests-untuned)
        tag=${stage#tests}
        tune=1; [ "$stage" = tests-untuned ] && tune=0
        # shellcheck disable=SC2086
        COLM_KERNELS_AUTOTUNE=$tune timeout -s INT -k 20 "$(left)" python3 -m pytest ${TESTS:-tests} -q -p no:cacheprovider \
            -n 8 --dist loadgroup --timeout=500 -rfEs --junitxml="$OUT/tests$tag.xml" 2>&1 \
            | tee "$OUT/tests$tag.log" | tail -40 || rc=1 ;;
    sanitize)
        # compute-sanitizer over the kernels' GPU tests (small sizes). No caching allocator, so an
        # access past a tensor's end leaves its allocation; racecheck on the shared-memory kernels.
        for tool in memcheck racecheck; do
            files=${SANITIZE_TESTS:-tests/ops/test_chain_rmsnorm_cuda.py tests/ops/test_chain_linear_cuda.py tests/ops/test_chain_attention_decode.py tests/ops/test_chain_linear.py tests/ops/test_chain_attention.py}
            [ "$tool" = racecheck ] && files=${RACECHECK_TESTS:-tests/ops/test_chain_rmsnorm_cuda.py tests/ops/test_chain_attention_decode.py}
            # shellcheck disable=SC2086
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -s INT -k 20 "$(left)" compute-sanitizer --tool "$tool" \
                --error-exitcode 99 --target-processes all python3 -m pytest $files -q -p no:cacheprovider -x \
                -k "${SANITIZE_K:-not compile and not opcheck}" >>"$OUT/sanitize.log" 2>&1
            code=$?; echo "$tool: exit $code" | tee -a "$OUT/sanitize.log"; [ $code -eq 0 ] || rc=1
        done
        tail -30 "$OUT/sanitize.log" ;;
    bench)
        # shellcheck disable=SC2086
        timeout -s INT -k 20 "$(left)" python3 -m colm_kernels.bench.cli --out "$OUT/bench" ${BENCH_ARGS:-} 2>&1 \
            | tee "$OUT/bench.log" | tail -80 || rc=1
        cp "$OUT/bench/results.json" "$OUT/bench/table.txt" "$OUT/" 2>/dev/null
        (cd "$OUT/bench" && tar czf "$OUT/plots.tar.gz" ./*.png 2>/dev/null)
        rm -rf "$OUT/bench" ;;
    *) echo "unknown stage '$stage' (build, tests, tests-untuned, sanitize, bench)"; exit 2 ;;
    esac
done
exit $rc
