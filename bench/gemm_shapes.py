#!/usr/bin/env python3
"""bf16 GEMM rates at the shapes tune-train runs for Llama-3-8B (CUDA host).

For each projection GEMM of a 16k-token micro-batch (NF4 path, LoRA r=16
folded in: K or N grows by the group's rank), times torch's matmul in the
trainer's layout, at the size as trained, at the plain size and padded up to
multiples of 64 and 128, to show what the odd sizes cost. Each GEMM runs back
to back for --ms milliseconds (sustained clocks, not a burst) on random inputs;
prints ms per GEMM and TFLOP/s.
Usage: python3 bench/gemm_shapes.py [--tokens 16384] [--ms 300]
"""
import argparse

import torch


def timed(fn, ms):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    iters = max(5, int(ms / max(start.elapsed_time(end), 1e-3)))
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def round_up(x, m):
    return -(-x // m) * m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ms", type=float, default=300.0, help="how long each GEMM runs back to back")
    args = ap.parse_args()
    t = args.tokens
    bf = dict(device="cuda", dtype=torch.bfloat16)
    # (name, M, N, K, folded dimension or None, its plain size, layout):
    # "nt" is y = x @ w.T (forward), "nn" is dx = g @ w (input gradient).
    cases = [
        ("gate/up forward", t, 28672, 4128, "K", 4096, "nt"),
        ("gate/up input grad", t, 4128, 28672, "N", 4096, "nn"),
        ("q/k/v forward", t, 6144, 4144, "K", 4096, "nt"),
        ("q/k/v input grad", t, 4144, 6144, "N", 4096, "nn"),
        ("down forward", t, 4096, 14336, None, 0, "nt"),
        ("down input grad", t, 14336, 4112, "K", 4096, "nn"),
        ("o forward", t, 4096, 4096, None, 0, "nt"),
        ("square 8192", 8192, 8192, 8192, None, 0, "nt"),
    ]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| GEMM | M x N x K | ms | TFLOP/s |\n|---|---|---:|---:|")
    for name, m, n, k, dim, plain, layout in cases:
        trained = {"K": k, "N": n}.get(dim)
        variants = [trained] if dim is None else [trained, plain, round_up(trained, 64), round_up(trained, 128)]
        seen = set()
        for size in variants:
            mm, nn, kk = m, (size if dim == "N" else n), (size if dim == "K" else k)
            if (mm, nn, kk) in seen:
                continue
            seen.add((mm, nn, kk))
            x = torch.randn(mm, kk, **bf)
            w = torch.randn(nn, kk, **bf) if layout == "nt" else torch.randn(kk, nn, **bf)
            out = torch.empty(mm, nn, **bf)
            if layout == "nt":
                fn = lambda: torch.matmul(x, w.t(), out=out)  # noqa: E731
            else:
                fn = lambda: torch.matmul(x, w, out=out)  # noqa: E731
            ms = timed(fn, args.ms)
            tag = " (as trained)" if dim is not None and size == trained else ""
            print(f"| {name}{tag} | {mm} x {nn} x {kk} | {ms:.3f} | {2 * mm * nn * kk / ms / 1e9:.0f} |", flush=True)
            del x, w, out


if __name__ == "__main__":
    main()
