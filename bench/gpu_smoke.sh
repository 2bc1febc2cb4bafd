#!/usr/bin/env bash
# GPU smoke run of tune-train on a random-init Llama-3-8B-shaped model (issue 3, acceptance 6):
# NF4 base, seq 2048, micro-batch 1, gradient checkpointing on, 5 steps. Prints peak VRAM and
# tokens/s from the step events, and the memory planner's predicted peak against the measured one.
# Usage: [PRESET=tiny] [MICRO=1] [CKPT=on|off|offload|selective] bench/gpu_smoke.sh BUILD_DIR WORK_DIR  (PRESET default llama3-8b)
set -euo pipefail
build=$(cd "${1:?usage: gpu_smoke.sh BUILD_DIR WORK_DIR}" && pwd)
work=${2:?usage: gpu_smoke.sh BUILD_DIR WORK_DIR}
mkdir -p "$work"
work=$(cd "$work" && pwd)
bin=$build/bin
preset=${PRESET:-llama3-8b}
micro=${MICRO:-1}
ckpt=${CKPT:-on}
run=$preset-$micro-$ckpt
if [ ! -f "$work/model-$preset/config.json" ]; then
  "$bin/tune-train" init-model --preset "$preset" --tokenizer "$build/assets/llama3" --out "$work/model-$preset" --seed 1
fi
# Long random-ish English lines so every sequence fills the 2048-token window.
python3 - "$work/data8b.jsonl" <<'PY'
import json, random, sys
random.seed(0)
words = "the of and to in is was for on that with as by at from his her an which or be are this had not but were".split()
with open(sys.argv[1], "w") as f:
    for i in range(64):
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(3000))}) + "\n")
PY
rm -rf "$work/out-$run"
cat > "$work/job-$run.yaml" <<YAML
name: smoke-$preset
model: $work/model-$preset
dataset: {path: $work/data8b.jsonl, format: text, max_seq_length: 2048}
quantization: {base: nf4, double_quant: true}
lora: {r: 16, alpha: 16}
training: {precision: bf16, effective_batch_size: $micro, micro_batch_size: $micro, max_steps: 5, warmup_steps: 1,
           gradient_checkpointing: "$ckpt", optimizer: adamw_8bit}
checkpoint: {every_steps: 0}
output: {dir: $work/out-$run}
resources: {gpus: 1}
YAML
/usr/bin/time -v "$bin/tune-train" --config "$work/job-$run.yaml" 2>&1 | tee "$work/train-$run.log" | grep -vE '^\s+(Average|Major|Minor|Volunt|Invol|Swaps|File|Socket|Signals|Page|Exit)' || true
python3 - "$work/out-$run/events.jsonl" <<'PY'
import json, sys
events = [json.loads(l) for l in open(sys.argv[1])]
steps = [s for s in events if s.get("type") == "step"]
for s in steps:
    print(f"step {s['step']}: loss {s['loss']} tokens/s {s['tokens_per_s']:.0f} "
          f"vram_peak {s['vram_peak']/2**30:.2f} GiB reserved {s['vram_reserved']/2**30:.2f} GiB")
# The memory planner's prediction (plan event) against the measured peak.
plans = [e for e in events if e.get("type") == "plan"]
if plans and steps:
    predicted = plans[-1]["predicted_peak_bytes"]
    measured = max(s["vram_peak"] for s in steps)
    print(f"planner: predicted peak {predicted/2**30:.2f} GiB, measured {measured/2**30:.2f} GiB, "
          f"error {100.0*(predicted-measured)/measured:+.1f}%")
PY
