#!/usr/bin/env bash
# The whole GPU check in one call, for a session lent a GPU machine for a few minutes (the device tool): build the
# CUDA kernels with the system g++, run the whole test suite with the CUDA tests enabled, then the benchmarks
# (bench_step, train_loop, bench_low_precision). Every log and result goes under $OUT; the last lines printed are
# a short summary, since only the end of the output comes back.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh                  # everything (about 14 minutes at the limits)
#   STAGES="build tests" bash benchmarks/gpu_check.sh          # a device call may run 10 minutes at most: this,
#   STAGES="bench_step train_loop low_precision" bash benchmarks/gpu_check.sh   # then this, while still warm
#
# Stages run in order, each under its own time limit (seconds, overridable below), and a stage that fails or
# times out does not stop the next ones, except the build. Commit what $OUT holds under benchmarks/results/
# with the device named. Why the system g++: the GPU image's default compiler (/opt/gcc) once miscompiled our
# error formatting; -ccbin follows $CC (torch.utils.cpp_extension).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
STAGES=${STAGES:-"build tests bench_step train_loop low_precision"}
PY=${PYTHON:-python3}
WORKERS=${WORKERS:-8}
BUILD_S=${BUILD_S:-240} TESTS_S=${TESTS_S:-300} BENCH_S=${BENCH_S:-180} LOOP_S=${LOOP_S:-180} LOWP_S=${LOWP_S:-90}
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"

note() { echo "$*" | tee -a "$summary"; }

# stage NAME LIMIT_S COMMAND...: runs COMMAND with its output in $OUT/NAME.log; notes the exit status and time.
stage() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  note "$(printf '%-14s rc %-3s %4ss (limit %ss)' "$name" "$rc" "$((SECONDS - start))" "$limit")"
  return $rc
}

note "# fusedopt $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
note "# $($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")' 2>&1 | tail -1)"
note "# $(nvcc --version 2>/dev/null | tail -1), $(nproc) CPUs"

for name in $STAGES; do
  case $name in
    build)
      CC=${CC:-/usr/bin/gcc} CXX=${CXX:-/usr/bin/g++} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
        MAX_JOBS=${MAX_JOBS:-$(nproc)} stage build "$BUILD_S" "$PY" setup.py build_ext --inplace \
        || { tail -40 "$OUT/build.log"; exit 1; } ;;
    tests)
      stage tests "$TESTS_S" "$PY" -m pytest -q -n "$WORKERS" -p no:cacheprovider tests
      tail -3 "$OUT/tests.log" | tee -a "$summary" ;;
    bench_step)
      stage bench_step "$BENCH_S" "$PY" -m benchmarks.bench_step --quick --dtypes fp32 bf16 --out "$OUT" ;;
    train_loop)
      stage train_loop "$LOOP_S" "$PY" -m benchmarks.train_loop --out "$OUT"
      grep -E "^(hf|amp_fp16|sgd_steplr)|fusedopt|torch" "$OUT/train_loop.log" | tail -20 ;;
    low_precision)
      stage low_precision "$LOWP_S" "$PY" -m benchmarks.bench_low_precision --devices cuda --out "$OUT" ;;
    *)
      note "unknown stage $name (stages: build tests bench_step train_loop low_precision)" ;;
  esac
done
note "# logs and results in $OUT"
