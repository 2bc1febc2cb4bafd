#!/usr/bin/env bash
# Everything the CUDA host checks in one go (see bench/README.md): build tune-train with the
# CUDA kernels, run the `gpu`-labelled tests and the planner tests, then the planner's
# prediction against the measured peak for the tiny and the Llama-3-8B-shaped model
# (gpu_smoke.sh), then a reduced side-by-side QLoRA benchmark (qlora_bench).
# Usage: bench/cuda_host_check.sh BUILD_DIR WORK_DIR OUT_DIR [qlora_bench args...]
# GPU_TESTS_EXCLUDE: a ctest -E regex of gpu tests to leave out. Each stage has its own time limit and log under OUT_DIR; a failed stage does not stop the next.
# QLORA_BENCH_TIMEOUT: the benchmark stage's limit in seconds (default 330; `--targets` needs ~1,800 on one GPU).
set -uo pipefail
build=${1:?usage: cuda_host_check.sh BUILD_DIR WORK_DIR OUT_DIR [qlora_bench args...]}
work=${2:?usage: cuda_host_check.sh BUILD_DIR WORK_DIR OUT_DIR}
out=${3:?usage: cuda_host_check.sh BUILD_DIR WORK_DIR OUT_DIR}
shift 3
root=$(cd "$(dirname "$0")/.." && pwd)
assets=${TUNE_ASSETS:-$root/.gpu-assets}
mkdir -p "$work" "$out"
export NCCL_NVLS_ENABLE=0

stage() {  # stage LOG NAME SECONDS CMD...  (appends to OUT_DIR/LOG)
  local log=$1 name=$2 limit=$3
  shift 3
  local t0=$SECONDS
  echo "== $name" >>"$out/$log"
  timeout "$limit" "$@" >>"$out/$log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$out/$log"
}

stage build.log cmake 120 cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DTUNE_BUILD_CONTROL_PLANE=OFF -DTUNE_ASSETS_DIR="$assets"
grep -E "CUDA kernels|fused" "$out/build.log"
stage build.log ninja 300 ninja -C "$build" -j"$(nproc)" -k 0
grep -E "error|FAILED" "$out/build.log" | head -20
ln -sfn "$assets" "$build/assets"
stage ctest.log ctest-gpu 240 ctest --test-dir "$build" -L gpu -E "${GPU_TESTS_EXCLUDE:-^$}" -j2 --output-on-failure \
  --timeout 230
stage ctest.log ctest-plan 60 ctest --test-dir "$build" -R plan --output-on-failure
grep -E "Test +#|tests passed|calibration|capped|Expected|Failure" "$out/ctest.log" | head -40
PRESET=tiny MICRO=4 CKPT=off stage smoke.log smoke-tiny 60 "$root/bench/gpu_smoke.sh" "$build" "$work"
stage smoke.log smoke-8b 240 "$root/bench/gpu_smoke.sh" "$build" "$work"
grep -E "^step|planner|Elapsed" "$out/smoke.log"
if [ $# -gt 0 ]; then
  stage qlora-bench.log qlora-bench "${QLORA_BENCH_TIMEOUT:-330}" "$root/bench/qlora_bench" --tune-train "$build/bin/tune-train" \
    --tokenizer "$assets/llama3" --model "$work/model-llama3-8b" --work "$work/qlora" --out "$work/qlora-out" "$@"
  cp "$work/qlora-out/results.md" "$work/qlora-out/results.json" "$out/" 2>/dev/null
  tail -30 "$out/qlora-bench.log"
fi
