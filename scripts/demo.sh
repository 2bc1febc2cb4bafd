#!/usr/bin/env bash
# The README's first command, after the Debian packages are installed
# (scripts/install-deps.sh): build everything, fetch the Llama 3 tokenizer,
# make a tiny random Llama and a small dataset, start tune-server with a local
# worker, submit a job with tunectl, stream its loss, print the result.
#
#   scripts/demo.sh            # from the repository root (or anywhere)
#
# Environment: TUNE_DEMO_PORT (first port tried, default 7070), BUILD_DIR
# (default build), JOBS (parallel build jobs, default nproc),
# TUNE_DEMO_SKIP_BUILD=1 (use the binaries already in $BUILD_DIR/bin).
# Safe to run again: it rebuilds incrementally, keeps the model, and starts
# each run from a fresh job store and output directory under demo/.
# Exits with tunectl's status: 0 only if the job SUCCEEDED.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
build=${BUILD_DIR:-build}
jobs=${JOBS:-$(nproc)}
demo=demo
server_pid=""

say() { printf '\n==> %s\n' "$*"; }

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    # Give it (and its local worker's ranks) time to stop cleanly.
    for _ in $(seq 1 50); do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "${TUNE_DEMO_SKIP_BUILD:-0}" != 1 ]; then
  say "Configuring and building ($build, -j$jobs)"
  cmake -S . -B "$build" -G Ninja
  cmake --build "$build" -j"$jobs"
fi
bin=$build/bin
for b in tune-server tune-worker tune-train tunectl; do
  [ -x "$bin/$b" ] || { echo "demo: $bin/$b was not built" >&2; exit 1; }
done

say "Fetching the Llama 3 tokenizer into $build/assets"
scripts/fetch-assets.sh "$build/assets" >/dev/null

mkdir -p "$demo"
if [ ! -f "$demo/model/config.json" ]; then
  say "Generating a tiny random Llama in $demo/model"
  rm -rf "$demo/model"
  "$bin/tune-train" init-model --preset tiny --tokenizer "$build/assets/llama3" \
    --out "$demo/model" --seed 1
fi

say "Writing the dataset $demo/data.jsonl"
# Short sentences repeated a few times: small enough to memorise, so the loss
# visibly falls within the demo's steps.
: > "$demo/data.jsonl"
for _ in 1 2 3; do
  while IFS= read -r line; do
    printf '{"text": "%s"}\n' "$line" >> "$demo/data.jsonl"
  done <<'EOF'
tunefleet fine-tunes Llama 3 models with QLoRA on fleets of GPUs.
A job goes from QUEUED to SCHEDULED to RUNNING and ends SUCCEEDED.
The server stores every event in SQLite before it acknowledges it.
Workers send heartbeats; a silent worker is marked lost and its job requeued.
Checkpoints are written to a temporary directory, synced, then renamed.
A resumed job continues from its last checkpoint with the same loss curve.
The planner picks the micro-batch that fits the memory of the GPU.
Exactly one begin-of-text token starts every training example.
A NaN loss skips the step; too many roll back to the last good checkpoint.
An out-of-memory error halves the micro-batch and doubles accumulation.
The adapter is exported in the format that Hugging Face PEFT loads.
tunectl watch shows the loss, the learning rate and tokens per second.
EOF
done

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  resources="gpus: 1"
  precision="auto"
  where="1 GPU"
else
  ranks=2
  [ "$(nproc)" -lt 2 ] && ranks=1
  resources="cpu_ranks: $ranks"
  precision="fp32"  # CPUs: bf16 is slow or unsupported; fp32 is explicit
  where="$ranks CPU ranks"
fi

say "Writing $demo/job.yaml ($where)"
cat > "$demo/job.yaml" <<EOF
# tunefleet demo job: relative paths are relative to this file.
name: demo
model: model
dataset:
  path: data.jsonl
  format: text
  train_on: all
  max_seq_length: 64
lora: {r: 8, alpha: 16, dropout: 0.0}
quantization: {base: nf4}
training:
  precision: $precision
  effective_batch_size: 4
  micro_batch_size: 2
  learning_rate: 1.0e-2
  lr_scheduler: constant
  warmup_steps: 5
  max_steps: 60
  optimizer: adamw
  gradient_checkpointing: "off"
  seed: 1
checkpoint: {every_steps: 20, keep: 2}
output: {dir: runs/demo}
resources: {$resources}
EOF

# A fresh store and output dir each run, so a rerun never resumes or
# competes with a job of an earlier, interrupted run.
rm -rf "$demo/runs" "$demo/tunefleet.db" "$demo/tunefleet.db-wal" "$demo/tunefleet.db-shm" \
  "$demo/worker"

port=${TUNE_DEMO_PORT:-7070}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for _ in $(seq 1 50); do
  port_busy "$port" || break
  port=$((port + 1))
done
addr=127.0.0.1:$port
export TUNE_SERVER=$addr

say "Starting tune-server with a local worker on $addr (log: $demo/server.log)"
"$bin/tune-server" --local-worker --db "$demo/tunefleet.db" --listen "$addr" \
  > "$demo/server.log" 2>&1 &
server_pid=$!
ready=""
for _ in $(seq 1 150); do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "demo: tune-server exited; last lines of $demo/server.log:" >&2
    tail -n 30 "$demo/server.log" >&2
    exit 1
  fi
  # Ready once the local worker has registered.
  if "$bin/tunectl" -o json workers 2>/dev/null | grep -q '"state": "READY"'; then
    ready=1
    break
  fi
  sleep 0.2
done
if [ -z "$ready" ]; then
  echo "demo: tune-server did not get a ready worker within 30 s; see $demo/server.log" >&2
  exit 1
fi
"$bin/tunectl" workers

say "Submitting $demo/job.yaml and streaming its loss"
set +e
"$bin/tunectl" submit "$demo/job.yaml" --wait
rc=$?
set -e

id=$("$bin/tunectl" -o json list --limit 1 | grep -o '"id": *"[^"]*"' | head -n1 | sed 's/.*"\([^"]*\)"$/\1/')
if [ -n "$id" ]; then
  say "Result"
  "$bin/tunectl" get "$id" || true
fi
if [ "$rc" -eq 0 ]; then
  say "Done: the adapter is in $demo/runs/demo"
else
  say "The job did not succeed (tunectl exit $rc); see $demo/server.log and 'tunectl logs $id'"
fi
exit "$rc"
