#!/usr/bin/env python3
"""Times torch SDPA backends on Llama-3-8B attention shapes (CUDA host).

Causal GQA attention (32 query heads, 8 K/V heads, head_dim 128, bf16), forward + backward,
for each backend that accepts the shape; prints ms and achieved TFLOP/s (model FLOPs:
6 * seq * d_model per token and layer for causal attention, see bench/README.md "MFU").
Usage: python3 bench/sdpa_backends.py [--batch 8] [--seq 2048] [--iters 20]
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--backends", default="FLASH_ATTENTION,CUDNN_ATTENTION,EFFICIENT_ATTENTION",
                    help="comma-separated SDPBackend names (long sequences: one backend, --warmup 1 --iters 1)")
    args = ap.parse_args()
    hq, hkv, d = 32, 8, 128
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| backend | batch x seq | fwd+bwd ms | TFLOP/s |\n|---|---|---:|---:|")
    for seq in args.seq:
        b = max(1, args.batch * 2048 // seq)
        q = torch.randn(b, hq, seq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, hkv, seq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, hkv, seq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(b, hq, seq, d, device="cuda", dtype=torch.bfloat16)
        flops = 6 * seq * hq * d * b * seq  # per layer: 6*seq*d_model per token, b*seq tokens
        for name in args.backends.split(","):
            backend = getattr(SDPBackend, name, None)
            if backend is None:
                continue
            try:
                with sdpa_kernel([backend]):
                    for _ in range(args.warmup):
                        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(g)
                    torch.cuda.synchronize()
                    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    t0.record()
                    for _ in range(args.iters):
                        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(g)
                    t1.record()
                    torch.cuda.synchronize()
                ms = t0.elapsed_time(t1) / args.iters
                print(f"| {name} | {b} x {seq} | {ms:.2f} | {flops / ms / 1e9:.0f} |")
            except RuntimeError as e:
                print(f"| {name} | {b} x {seq} | unsupported: {str(e).splitlines()[0][:80]} | |")


def layouts():
    """Which backend SDPA picks, with cuDNN first, for the layouts tune-train passes:
    q/k/v as [B, heads, T, d] views of [B, T, heads, d] projections, or contiguous."""
    torch._C._set_sdp_priority_order([int(SDPBackend.CUDNN_ATTENTION), int(SDPBackend.FLASH_ATTENTION),
                                      int(SDPBackend.EFFICIENT_ATTENTION), int(SDPBackend.MATH),
                                      int(SDPBackend.OVERRIDEABLE)])
    b, t, hq, hkv, d = 8, 2048, 32, 8, 128
    mk = lambda h: torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    for name, (q, k, v) in {"BTHD views": (mk(hq), mk(hkv), mk(hkv)),
                            "q/k BTHD views, v contiguous": (mk(hq), mk(hkv), mk(hkv).contiguous()),
                            "contiguous": (mk(hq).contiguous(), mk(hkv).contiguous(), mk(hkv).contiguous())}.items():
        choice = torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=None, enable_gqa=True)
        names = {int(getattr(SDPBackend, n)): n for n in dir(SDPBackend) if n.isupper() and n != "ERROR"}
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
        g = torch.randn_like(q)
        for _ in range(3):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(g)
        torch.cuda.synchronize()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(10):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(g)
        t1.record()
        torch.cuda.synchronize()
        print(f"layout {name}: backend {names.get(choice, choice)}, fwd+bwd {t0.elapsed_time(t1) / 10:.2f} ms")


def memory(backend_names, shapes):
    """Device memory SDPA allocates beyond its inputs, per token (b x seq), as tune-train calls it
    (q/k as [B, heads, T, d] views of [B, T, heads, d], v contiguous, grad_out a transposed view):
    the forward's saved output + statistics, and the backward's peak on top of those (dq/dk/dv and
    the kernel's workspace). The memory planner's attention terms are checked against these."""
    hq, hkv, d = 32, 8, 128
    print("| backend | batch x seq | forward kept (bytes/token) | backward peak extra (bytes/token) |")
    print("|---|---|---:|---:|")
    for b, t in shapes:
        for name in backend_names:
            mk = lambda h: torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            q, k, v = mk(hq).requires_grad_(True), mk(hkv).requires_grad_(True), mk(hkv).contiguous().requires_grad_(True)
            g = torch.randn(b, t, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            with sdpa_kernel([getattr(SDPBackend, name)]):
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                torch.cuda.synchronize()
                kept = torch.cuda.memory_allocated() - base
                before_bwd = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                out.backward(g)
                torch.cuda.synchronize()
                bwd = torch.cuda.max_memory_allocated() - before_bwd
            n = b * t
            print(f"| {name} | {b} x {t} | {kept / n:,.0f} | {bwd / n:,.0f} |", flush=True)
            del q, k, v, g, out
            torch.cuda.empty_cache()


if __name__ == "__main__":
    argv = __import__("sys").argv
    if "--layouts" in argv:
        layouts()
        raise SystemExit(0)
    if "--memory" in argv:
        # python3 bench/sdpa_backends.py --memory [BxT ...]   e.g. 8x2048 1x344064
        shapes = [tuple(int(x) for x in a.split("x")) for a in argv[argv.index("--memory") + 1:]] or [(8, 2048)]
        memory(["CUDNN_ATTENTION", "FLASH_ATTENTION"], shapes)
        raise SystemExit(0)
    main()
