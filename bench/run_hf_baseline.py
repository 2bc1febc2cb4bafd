#!/usr/bin/env python3
"""Hugging Face transformers + PEFT LoRA baseline for bench/qlora_bench.

Trains LoRA (r=16, alpha=16, dropout 0, all seven linears) on a local Llama
directory in bf16 with SDPA attention, on the pre-tokenized JSONL that
tune-train reads (dataset.format: tokens), and prints one JSON object on
stdout: tokens/s over the measured steps, peak allocated/reserved device
memory, the step-0 loss. Nothing is downloaded (HF_HUB_OFFLINE=1,
local_files_only=True).

Batches: the JSONL's sequences in file order, `--micro` consecutive lines per
step (wrapping around when the file is shorter than micro x steps). Every
sequence of a batch must have the same length (no padding, no attention mask).
Labels: the line's "labels" (Hugging Face convention) or, without them,
labels = input_ids (every next token is a target), as tune-train does.

LoRA weights are float32 by default (PEFT's autocast_adapter_dtype=True upcasts
adapters of a bf16 base; their matmuls then run in float32), or bf16 with
--lora-dtype bf16. The optimizer is torch.optim.AdamW(fused=True) on CUDA
(the fused kernel is CUDA-only in older torch; on CPU it is the default
implementation), constant learning rate, gradients clipped to --max-grad-norm
like tune-train.

Exit codes: 0 done, 2 bad arguments or data, 3 out of device memory (the JSON
then has "error": "OOM"). `--self-test` checks argument parsing and the JSONL
reader without importing torch.
"""

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

# Must be set before transformers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE_INDEX = -100
EXIT_BAD_INPUT = 2
EXIT_OOM = 3


class DataError(Exception):
    """Bad token JSONL; the message names the line and the fix."""


def log(msg):
    print("run_hf_baseline: " + msg, file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local Hugging Face Llama directory (config.json + *.safetensors)")
    p.add_argument("--data", help="token JSONL: {\"input_ids\": [...], optional \"labels\"} per line")
    p.add_argument("--seq", type=int, help="expected length of every sequence (checked)")
    p.add_argument("--micro", type=int, help="sequences per step (no gradient accumulation)")
    p.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on")
    p.add_argument("--warmup", type=int, default=10, help="steps run before timing starts (>= 1)")
    p.add_argument("--steps", type=int, default=30, help="timed steps (>= 1)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="base weight dtype (default bf16; fp32 only for CPU smoke runs)")
    p.add_argument("--lora-dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--self-test", action="store_true", help="check parsing and the JSONL reader; no torch")
    args = p.parse_args(argv)
    if args.self_test:
        return args
    missing = [f"--{k}" for k in ("model", "data", "seq", "micro") if getattr(args, k) is None]
    if missing:
        p.error("missing " + ", ".join(missing))
    for name in ("seq", "micro", "warmup", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if args.dtype is None:
        args.dtype = "bf16"
    return args


def read_token_jsonl(path, seq, vocab_size=None):
    """Sequences of `path` as (input_ids, labels) lists, labels None when absent.

    Raises DataError naming the 1-based line for anything tune-train's tokens
    format would reject, and for sequences whose length is not `seq` (this
    baseline never pads)."""
    out = []
    try:
        f = open(path, "r", encoding="utf-8")
    except OSError as e:
        raise DataError(f"--data: cannot open {path}: {e.strerror}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}: "
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(where + f"invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "input_ids" not in obj:
                raise DataError(where + 'expected an object with "input_ids" (dataset.format: tokens)')
            ids = _id_list(obj["input_ids"], "input_ids", where, vocab_size, allow_ignore=False)
            if len(ids) != seq:
                raise DataError(where + f"{len(ids)} ids but --seq is {seq}; every sequence must be exactly "
                                "--seq long (this baseline never pads)")
            labels = None
            if "labels" in obj:
                labels = _id_list(obj["labels"], "labels", where, vocab_size, allow_ignore=True)
                if len(labels) != len(ids):
                    raise DataError(where + f'"labels" has {len(labels)} entries, "input_ids" {len(ids)}; '
                                    "they must be the same length")
            out.append((ids, labels))
    if not out:
        raise DataError(f"--data: {path} has no sequences")
    return out


def _id_list(value, key, where, vocab_size, allow_ignore):
    if not isinstance(value, list) or not value:
        raise DataError(where + f'"{key}" must be a non-empty array of token ids')
    for i, v in enumerate(value):
        # bool is an int subclass in Python; JSON true/false are not ids.
        if not isinstance(v, int) or isinstance(v, bool):
            raise DataError(where + f"{key}[{i}] must be an integer token id (got {json.dumps(v)})")
        if allow_ignore and v == IGNORE_INDEX:
            continue
        if v < 0 or (vocab_size is not None and v >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise DataError(where + f"{key}[{i}] = {v} is outside the vocabulary {bound}")
    return value


def batches(sequences, micro, count):
    """`count` batches of `micro` consecutive sequences, wrapping around."""
    out = []
    pos = 0
    for _ in range(count):
        rows = []
        for _ in range(micro):
            rows.append(sequences[pos % len(sequences)])
            pos += 1
        out.append(rows)
    return out


def self_test():
    """Argument parsing and the reader, without torch. Raises AssertionError."""
    a = parse_args(["--model", "m", "--data", "d", "--seq", "4", "--micro", "2", "--device", "cpu"])
    assert (a.seq, a.micro, a.warmup, a.steps, a.dtype, a.gradient_checkpointing) == (4, 2, 10, 30, "bf16", "on")
    for bad in (["--model", "m", "--data", "d", "--seq", "0", "--micro", "1"], ["--model", "m"]):
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                parse_args(bad)
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(f"accepted {bad}")

    def expect_error(text, fragment, seq=3, vocab=100):
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
            f.write(text)
        try:
            read_token_jsonl(f.name, seq, vocab)
        except DataError as e:
            assert fragment in str(e), f"{fragment!r} not in {e}"
        else:
            raise AssertionError(f"accepted {text!r}")
        finally:
            os.unlink(f.name)

    expect_error('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2]}\n', ":2: 2 ids but --seq is 3")
    expect_error('{"input_ids": [1, 2, 100]}\n', ":1: input_ids[2] = 100 is outside the vocabulary [0, 100)")
    expect_error('\n{"input_ids": [1, 2.5, 3]}\n', ":2: input_ids[1] must be an integer")
    expect_error('{"input_ids": [1, true, 3]}\n', ":1: input_ids[1] must be an integer")
    expect_error('{"input_ids": [1, 2, 3], "labels": [1, 2]}\n', ":1: \"labels\" has 2 entries")
    expect_error('{"text": "hi"}\n', ':1: expected an object with "input_ids"')
    expect_error('{"input_ids": [1, 2, 3]\n', ":1: invalid JSON")
    expect_error("\n", "has no sequences")
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write('{"input_ids": [1, 2, 3]}\n\n{"input_ids": [4, 5, 6], "labels": [-100, 5, 6]}\n'
                '{"input_ids": [7, 8, 9]}\n')
    try:
        seqs = read_token_jsonl(f.name, 3, 100)
    finally:
        os.unlink(f.name)
    assert seqs == [([1, 2, 3], None), ([4, 5, 6], [-100, 5, 6]), ([7, 8, 9], None)], seqs
    b = batches(seqs, 2, 2)
    assert [[r[0][0] for r in rows] for rows in b] == [[1, 4], [7, 1]], b
    print(json.dumps({"self_test": "ok"}))


def run(args):
    import torch  # noqa: E402  (imported late so --self-test needs no torch)
    import transformers
    import peft

    cfg_path = os.path.join(args.model, "config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            vocab_size = int(json.load(f)["vocab_size"])
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"--model: cannot read vocab_size from {cfg_path} ({e})") from None
    sequences = read_token_jsonl(args.data, args.seq, vocab_size)
    total_steps = args.warmup + args.steps
    if len(sequences) < args.micro * total_steps:
        log(f"{len(sequences)} sequences for {args.micro * total_steps} batch rows: reusing them in order")

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda but torch sees no CUDA device; use --device cpu for a smoke run")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    # transformers >= 4.56 (and 5.x) name the argument `dtype`; older ones `torch_dtype`.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    t_load = time.time()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, local_files_only=True, attn_implementation="sdpa", **{dtype_kw: dtype})
    model.to(device)
    model.config.use_cache = False
    lora_cfg = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                               target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora_cfg, autocast_adapter_dtype=(args.lora_dtype == "fp32"))
    if args.gradient_checkpointing == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lora_param_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
    fused = args.device == "cuda"
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=fused)
    load_s = time.time() - t_load
    log(f"loaded in {load_s:.1f} s; {sum(p.numel() for p in params)} trainable parameters ({lora_param_dtypes})")

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    losses, step_s = [], []
    measured_s = 0.0
    t_measure = None
    for step, rows in enumerate(batches(sequences, args.micro, total_steps)):
        if step == args.warmup:
            sync()
            t_measure = time.perf_counter()
        t0 = time.perf_counter()
        input_ids = torch.tensor([r[0] for r in rows], dtype=torch.long, device=device)
        labels = (torch.tensor([r[1] if r[1] is not None else r[0] for r in rows], dtype=torch.long, device=device))
        out = model(input_ids=input_ids, labels=labels)
        out.loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())  # syncs, like tune-train's per-step loss
        del out
        step_s.append(time.perf_counter() - t0)
        log(f"step {step + 1}/{total_steps} loss {losses[-1]:.4f} {step_s[-1]:.3f} s")
    sync()
    measured_s = time.perf_counter() - t_measure
    tokens = args.micro * args.seq * args.steps
    result = {
        "system": "hf-peft-bf16" if args.dtype == "bf16" else "hf-peft-fp32",
        "seq": args.seq,
        "micro": args.micro,
        "gradient_checkpointing": args.gradient_checkpointing,
        "warmup": args.warmup,
        "steps": args.steps,
        "tokens_per_s": tokens / measured_s,
        "measured_s": measured_s,
        "step0_loss": losses[0],
        "losses": losses,
        "step_s": step_s,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if args.device == "cuda" else 0,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if args.device == "cuda" else 0,
        "load_s": load_s,
        "lora_param_dtypes": lora_param_dtypes,
        "fused_adamw": fused,
        "device_name": torch.cuda.get_device_name(device) if args.device == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }
    print(json.dumps(result), flush=True)


def main(argv):
    args = parse_args(argv)
    if args.self_test:
        self_test()
        return 0
    try:
        run(args)
    except DataError as e:
        log(str(e))
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 - OOM is reported, anything else re-raised
        if type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower():
            print(json.dumps({"error": "OOM", "message": str(e).splitlines()[0] if str(e) else "",
                              "seq": args.seq, "micro": args.micro,
                              "gradient_checkpointing": args.gradient_checkpointing}), flush=True)
            log("out of memory: " + (str(e).splitlines()[0] if str(e) else ""))
            return EXIT_OOM
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
