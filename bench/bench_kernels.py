"""Kernel benchmark: fused linear+KL and normalised hidden MSE, forward / backward / total time and peak
memory per provider; prints a table and appends rows to ``bench/results/kernels.jsonl``.

    python bench/bench_kernels.py --op linear_kl --shape 4096,512,32000 --dtype fp32       # CPU target
    python bench/bench_kernels.py --op linear_kl --shape 8192,4096,128256 --dtype bf16     # GPU target
    python bench/bench_kernels.py --op hidden_mse --shape 32,8192,4096 --dtype bf16
    python bench/plot.py                                                             # figures

Providers: ``naive`` (plain PyTorch: full [N, V] logits, autograd), ``torch`` (rdcore's chunked PyTorch
path), ``triton`` (rdcore's Triton kernels; CUDA only) and ``liger`` (Liger-Kernel's fused linear JSD
with β=0, i.e. forward KL, when ``liger-kernel`` is installed; CUDA only).

Each (provider, shape) runs in its own subprocess, so peak memory is measured cleanly: on CUDA
``max_memory_allocated`` beyond the inputs, on CPU the growth of the peak resident set (ru_maxrss) over
the resident set after the inputs and their gradients are allocated (glibc told to mmap every large
block, so freed memory leaves the resident set). Times are medians over ``--repeats`` runs after one
warm-up. Throughput: linear_kl against the GEMM floor ``2·N·V·(H_t + 3·H)`` FLOPs (teacher logits,
student logits, dX, dW); hidden_mse as bytes moved ``L·N·H·(2 reads + 1 write)·itemsize`` per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "kernels.jsonl"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _provider_fn(op: str, provider: str):
    import torch

    if op == "linear_kl":
        if provider == "naive":
            from rdcore.kernels.linear_kl_torch import linear_kl_reference as fn
            return fn
        if provider in ("torch", "triton"):
            from rdcore.kernels import fused_linear_kl

            return lambda *a, **k: fused_linear_kl(*a, impl=provider, **k)
        if provider == "liger":
            from liger_kernel.transformers import LigerFusedLinearJSD

            jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
            return lambda x, xt, w, wt: jsd(x, w, xt, wt)
    else:
        from rdcore.kernels import normalized_hidden_mse
        from rdcore.kernels.hidden_mse_torch import normalized_hidden_mse_reference

        if provider == "naive":
            return normalized_hidden_mse_reference
        if provider in ("torch", "triton"):
            return lambda s, t: normalized_hidden_mse(s, t, impl=provider)
    del torch
    raise SystemExit(f"provider {provider!r} does not exist for {op}")


def worker(op: str, provider: str, shape: list[int], dtype_name: str, repeats: int) -> dict:
    """Runs in a subprocess: time and measure one (provider, shape)."""
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    if op == "linear_kl":
        N, H, V = shape
        x = torch.randn(N, H, device=dev, dtype=dtype, generator=g).requires_grad_()
        xt = torch.randn(N, H, device=dev, dtype=dtype, generator=g)
        w = (torch.randn(V, H, device=dev, dtype=dtype, generator=g) * H**-0.5).requires_grad_()
        args = (x, xt, w, w.detach())
        leaves = [x, w]
        work = 2.0 * N * V * (H + 3 * H)  # FLOPs of the GEMM floor
    else:
        L, N, H = shape
        s = [torch.randn(N, H, device=dev, dtype=dtype, generator=g).requires_grad_() for _ in range(L)]
        t = [torch.randn(N, H, device=dev, dtype=dtype, generator=g) for _ in range(L)]
        args = (s, t)
        leaves = s
        work = 3.0 * L * N * H * torch.finfo(dtype).bits / 8  # bytes moved
    fn = _provider_fn(op, provider)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def once():
        for p in leaves:
            p.grad.zero_()  # accumulate into the preallocated gradients
        sync()
        t0 = time.perf_counter()
        loss = fn(*args)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    for p in leaves:  # gradients are part of the inputs' footprint, not the op's extra memory
        p.grad = torch.zeros_like(p)
    sync()
    base_rss = _rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    once()  # warm-up (compilation, autotuning, allocator)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base_cuda
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    fwd, bwd = zip(*(once() for _ in range(repeats)))
    fwd_ms, bwd_ms = statistics.median(fwd) * 1e3, statistics.median(bwd) * 1e3
    total_ms = statistics.median(f + b for f, b in zip(fwd, bwd)) * 1e3
    rate = work / (total_ms / 1e3)
    return {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "total_ms": total_ms, "peak_extra_bytes": max(peak, 0),
            ("tflops" if op == "linear_kl" else "gbps"): rate / (1e12 if op == "linear_kl" else 1e9),
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__}


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=["linear_kl", "hidden_mse"], default="linear_kl")
    ap.add_argument("--shape", action="append", help="N,H,V (linear_kl) or L,N,H (hidden_mse)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--providers", default="naive,torch,triton,liger")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-save", action="store_true", help="print only, do not append rows")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.op, args.worker, [int(v) for v in args.shape[0].split(",")],
                                args.dtype, args.repeats)))
        return 0

    import torch
    import triton

    shapes = args.shape or (["4096,512,32000"] if args.op == "linear_kl" else ["32,4096,512"])
    cuda = torch.cuda.is_available()
    providers = [p for p in args.providers.split(",")
                 if cuda or p not in ("triton", "liger")]
    if "liger" in providers:
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            providers.remove("liger")
    sha = git_sha()
    rows = []
    rate_key = "tflops" if args.op == "linear_kl" else "gbps"
    print(f"{args.op} {args.dtype} on {'CUDA' if cuda else 'CPU'}; git {sha}; "
          f"torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'shape':>20} {'provider':>8} {'fwd ms':>9} {'bwd ms':>9} {'total ms':>9} "
          f"{'extra MiB':>10} {rate_key:>8}")
    for shape in shapes:
        for provider in providers:
            cmd = [sys.executable, __file__, "--op", args.op, "--shape", shape, "--dtype",
                   args.dtype, "--repeats", str(args.repeats), "--worker", provider]
            # glibc: serve every large block by mmap so that freed memory leaves the resident set
            # and ru_maxrss measures what was live (CUDA measures its allocator directly).
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{shape:>20} {provider:>8}   failed: {err}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "op": args.op, "shape": shape,
                   "dtype": args.dtype, "provider": provider, "git": sha,
                   "triton": triton.__version__, "repeats": args.repeats, **r}
            rows.append(row)
            print(f"{shape:>20} {provider:>8} {r['fwd_ms']:9.1f} {r['bwd_ms']:9.1f} "
                  f"{r['total_ms']:9.1f} {r['peak_extra_bytes'] / 2**20:10.1f} {r[rate_key]:8.3f}")
    if rows and not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        print(f"appended {len(rows)} rows to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
