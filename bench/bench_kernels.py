"""Kernel benchmark: fused linear+KL and normalised hidden MSE, forward / backward / total time and peak
memory per provider; prints a table and appends rows to ``bench/results/kernels.jsonl``.

    python bench/bench_kernels.py --op linear_kl --shapes 4096,512,32000 --dtype fp32     # CPU
    python bench/bench_kernels.py --grid on                                         # the CPU grid
    python bench/bench_kernels.py --op linear_kl --shapes 8192,4096,128256 --dtype bf16  # GPU target
    python bench/bench_kernels.py --op hidden_mse --shapes 32,8192,4096 --dtype bf16
    python bench/plot.py                                                            # figures

Providers (a missing one is skipped with a message):

* ``naive`` — plain PyTorch: full [N, V] logits, autograd (``rdcore.kernels.linear_kl_reference``);
* ``torch`` / ``triton`` — rdcore's chunked PyTorch path / Triton kernels (Triton: CUDA only);
* ``liger`` / ``liger_eager`` — Liger-Kernel 0.8.5's ``LigerFusedLinearJSDLoss(beta=0,
  weight_hard_loss=0, weight_soft_loss=1)`` (forward KL(teacher ‖ student), mean over tokens, the
  same quantity) with and without ``torch.compile`` — its chunked PyTorch loss, which runs on CPU;
* ``liger_triton`` — Liger's Triton ``LigerFusedLinearJSD`` (CUDA only).

Each (provider, shape) runs in its own process. Times are medians over ``--repeats`` runs after one
warm-up (compilation, allocator). Memory: on CUDA ``max_memory_allocated`` beyond the inputs and
their gradient buffers; on CPU the growth of the peak resident set (``VmHWM``, reset after the
warm-up through ``/proc/self/clear_refs`` so that compilation's transient memory is not counted)
over the resident set after the inputs and gradient buffers exist, and the process's whole peak
resident set. glibc is told to ``mmap`` every block of 32 MiB or more (its own ceiling for the
dynamic threshold, where a long-running process settles): freed large buffers leave the resident
set, while the small per-block temporaries are reused from the heap as in real use (a threshold of
128 KiB would page-fault every one of them on every call and make every provider slower than it is).
Throughput: against the GEMM floor
``2·N·V·(H_t + 3·H)`` FLOPs (``2·N·V·(H_t + 2·H)`` with a frozen head: no dW), and for rdcore's
Triton path the bytes its design moves through memory (:func:`linear_kl_traffic`); hidden MSE as
``L·N·H·(2 reads + 1 write)·itemsize`` per second.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common import RESULTS, append_rows, device_name, git_sha, parse, read_rows, versions

OUT = RESULTS / "kernels.jsonl"
GRID_TABLE = RESULTS / "kernels_grid.md"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
GRID = [(N, H, V) for V in (32000, 128256, 262144) for N in (256, 1024, 4096) for H in (512, 2048)]
"""The CPU target grid of issue 18: V × N × H."""
CUDA_ONLY = {"triton", "liger_triton"}


@dataclass
class Options:
    op: Literal["linear_kl", "hidden_mse"] = "linear_kl"
    """Which op to time."""
    shapes: str = ""
    """Semicolon-separated N,H,V (linear_kl) or L,N,H (hidden_mse) (default: 4096,512,32000 /
    32,4096,512)."""
    grid: bool = False
    """Time the CPU target grid (V 32000/128256/262144 × N 256/1024/4096 × H 512/2048)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Operand dtype."""
    providers: str = "naive,torch,triton,liger,liger_eager,liger_triton"
    """Comma-separated providers (see the module docstring)."""
    frozen_head: bool = False
    """linear_kl: the head weight gets no gradient (LoRA, the paper's setting): no dW."""
    repeats: int = 3
    """Timed runs per (provider, shape), after one warm-up."""
    budget_s: float = 0.0
    """Stop repeating once the timed runs of a (provider, shape) have taken this many seconds (at
    least one timed run; 0: always ``--repeats``). The grid uses 60 s: its largest points take
    minutes per run on two cores, where one run varies far less than the providers differ."""
    rounds: int = 1
    """Sweeps over the providers at each shape, the providers' order reversed every other sweep
    (ABC, CBA, …; a process per provider and sweep): a slow spell of the machine then falls on
    every provider alike. The row keeps the median of the sweeps (time and memory) and each
    sweep's total (``round_total_ms``); the verdict table adds rdcore's time over the faster peer
    *within* each sweep (median and range)."""
    table: str = ""
    """Also write the verdict table (rdcore against naive and compiled Liger) to this file (the
    grid writes ``bench/results/kernels_grid.md``)."""
    report: str = ""
    """Time nothing: write the verdict table (``--table``, else ``bench/results/kernels_grid.md``)
    from the linear-KL rows these runs recorded (comma-separated ``run`` ids of ``kernels.jsonl``;
    e.g. a grid measured in two invocations, one with more sweeps than the other)."""
    no_save: bool = False
    """Print only, append no rows."""
    worker: str = ""
    """Internal: time one provider (in a child process)."""


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident set (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _proc_kib_bytes(path: str, key: str) -> int:
    """``key`` of a ``/proc`` file of ``Key: value kB`` lines, in bytes (0 if absent)."""
    with open(path) as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes() -> int:
    peak = _proc_kib_bytes("/proc/self/status", "VmHWM")
    if not peak:
        raise RuntimeError("no VmHWM in /proc/self/status")
    return peak


def linear_kl_traffic(N: int, H: int, V: int, itemsize: int, C: int, frozen: bool,
                      shared: bool = True, R: int | None = None) -> int:
    """Bytes rdcore's Triton path moves through device memory (a model of its design, chunks of
    C rows in groups of R, default R = C; the same whether its GEMMs are cuBLAS's or its own):
    per chunk, the logits GEMM reads x̃, x and W — once over [x̃; x] for a shared head (the
    concatenation written and read), twice otherwise — and writes the fp32 [2C, V] buffer; the
    row kernel reads both halves twice and writes g (in the input dtype unless fp32); per group,
    dX reads g and W and writes dX; dW reads g and x and reads and writes the fp32 dW (written
    only, by the first group)."""
    R = R or C
    total = 0
    for r0 in range(0, N, R):
        group = min(R, N - r0)
        for c0 in range(r0, r0 + group, C):
            rows = min(C, r0 + group - c0)
            x_bytes = 2 * rows * H * itemsize
            total += (3 * x_bytes if shared else x_bytes) + (1 if shared else 2) * V * H * itemsize
            total += 2 * rows * V * 4
            total += 4 * rows * V * 4 + rows * V * (4 if itemsize == 4 else itemsize)
        total += group * V * itemsize + V * H * itemsize + group * H * itemsize
        if not frozen:
            total += group * V * itemsize + group * H * itemsize + V * H * 4 * (2 if r0 else 1)
    return total


def _provider_fn(op: str, provider: str):
    if op == "linear_kl":
        if provider == "naive":
            from rdcore.kernels import linear_kl_reference

            return lambda x, xt, w, wt: linear_kl_reference(x, xt, w, wt)
        if provider in ("torch", "triton"):
            from rdcore.kernels import fused_linear_kl

            return lambda x, xt, w, wt: fused_linear_kl(x, xt, w, wt, impl=provider)
        if provider in ("liger", "liger_eager"):
            import torch
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

            loss = LigerFusedLinearJSDLoss(beta=0.0, weight_hard_loss=0.0, weight_soft_loss=1.0,
                                           compiled=provider == "liger")
            labels = {}

            def liger(x, xt, w, wt):
                n = x.shape[0]
                if n not in labels:
                    labels[n] = torch.zeros(n, dtype=torch.long, device=x.device)
                return loss(x, w, xt, wt, labels[n])

            return liger
        if provider == "liger_triton":
            from liger_kernel.transformers import LigerFusedLinearJSD

            jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
            return lambda x, xt, w, wt: jsd(x, w, xt, wt, None)  # no labels: every row
    else:
        from rdcore.kernels import normalized_hidden_mse, normalized_hidden_mse_reference

        if provider == "naive":
            return normalized_hidden_mse_reference
        if provider in ("torch", "triton"):
            return lambda s, t: normalized_hidden_mse(s, t, impl=provider)
    raise SystemExit(f"provider {provider!r} does not exist for {op}")


def worker(opt: Options, provider: str, shape: list[int]) -> dict:
    """Runs in a child process: time and measure one (provider, shape)."""
    import torch

    dtype = getattr(torch, DTYPES[opt.dtype])
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    if opt.op == "linear_kl":
        N, H, V = shape
        x = torch.randn(N, H, device=dev, dtype=dtype, generator=g).requires_grad_()
        xt = torch.randn(N, H, device=dev, dtype=dtype, generator=g)
        w = (torch.randn(V, H, device=dev, dtype=dtype, generator=g) * H**-0.5)
        w.requires_grad_(not opt.frozen_head)
        wt = w.detach()
        args, leaves = (x, xt, w, wt), [x] + ([] if opt.frozen_head else [w])
        work = 2.0 * N * V * (H + (2 if opt.frozen_head else 3) * H)
    else:
        L, N, H = shape
        s = [torch.randn(N, H, device=dev, dtype=dtype, generator=g).requires_grad_()
             for _ in range(L)]
        t = [torch.randn(N, H, device=dev, dtype=dtype, generator=g) for _ in range(L)]
        args, leaves = (s, t), s
        work = 3.0 * L * N * H * torch.finfo(dtype).bits / 8  # bytes moved
    fn = _provider_fn(opt.op, provider)

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
        return t1 - t0, time.perf_counter() - t1, float(loss)

    for p in leaves:  # gradients are part of the inputs' footprint, not the op's extra memory
        p.grad = torch.zeros_like(p)
    sync()
    base_rss = _rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    value = once()[2]  # warm-up (compilation, autotuning, allocator)
    hwm_reset = not cuda and _reset_peak_rss()
    times: list[tuple[float, float, float]] = []
    while len(times) < opt.repeats:
        times.append(once())
        if opt.budget_s and sum(f + b for f, b, _ in times) >= opt.budget_s:
            break
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base_cuda
        rss = torch.cuda.max_memory_allocated()
    else:
        rss = _peak_rss_bytes() if hwm_reset else (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        peak = rss - base_rss
    fwd_ms = statistics.median(f for f, _, _ in times) * 1e3
    bwd_ms = statistics.median(b for _, b, _ in times) * 1e3
    total_ms = statistics.median(f + b for f, b, _ in times) * 1e3
    row = {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "total_ms": total_ms, "value": value,
           "peak_extra_mib": max(peak, 0) / 2**20, "peak_total_mib": rss / 2**20,
           "threads": torch.get_num_threads(), "timed_runs": len(times),
           "peak_after_warmup": bool(cuda or hwm_reset)}
    if opt.op == "linear_kl":
        row["tflops"] = work / (total_ms / 1e3) / 1e12
        if provider == "triton":
            from rdcore.kernels.linear_kl_triton import triton_geometry

            C, R = triton_geometry(N, V, dtype)
            moved = linear_kl_traffic(N, H, V, torch.finfo(dtype).bits // 8, C,
                                      opt.frozen_head, R=R)
            row.update(chunk_rows=C, group_rows=R, model_gb=moved / 1e9,
                       model_gbps=moved / (total_ms / 1e3) / 1e9)
    else:
        row["gbps"] = work / (total_ms / 1e3) / 1e9
    return row


def available(provider: str, cuda: bool) -> str | None:
    """Why ``provider`` cannot run here (None: it can)."""
    import importlib.util

    if provider in CUDA_ONLY and not cuda:
        return "needs CUDA"
    if provider.startswith("liger") and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install --no-deps liger-kernel==0.8.5)"
    return None


def main(argv: list[str] | None = None) -> int:
    opt = parse(Options, argv, __doc__, "bench/bench_kernels.py")
    if opt.worker:
        shape = [int(v) for v in opt.shapes.split(",")]
        print("RESULT " + json.dumps(worker(opt, opt.worker, shape)))
        return 0
    if opt.report:
        return report(opt)
    import torch

    cuda = torch.cuda.is_available()
    default = "4096,512,32000" if opt.op == "linear_kl" else "32,4096,512"
    shapes = ([",".join(map(str, s)) for s in GRID] if opt.grid else
              [s for s in (opt.shapes or default).split(";") if s])
    if opt.grid:  # the grid's peers: the targets name naive and compiled Liger
        if opt.providers == Options.providers:
            opt.providers = "naive,torch,liger"
        opt.budget_s = opt.budget_s or 60.0
    providers = []
    for p in opt.providers.split(","):
        why = available(p, cuda) if opt.op == "linear_kl" or p in ("naive", "torch", "triton") \
            else "not a hidden_mse provider"
        if why:
            print(f"skipping {p}: {why}")
        else:
            providers.append(p)
    sha, run_id = git_sha(), time.strftime("%Y-%m-%dT%H:%M:%S")
    meta = {"device": device_name() if cuda else None, "git": sha, "run": run_id, **versions(
        "liger-kernel")}
    rate = "tflops" if opt.op == "linear_kl" else "gbps"
    print(f"{opt.op} {opt.dtype}{' frozen head' if opt.frozen_head else ''} on "
          f"{'CUDA' if cuda else 'CPU'}; git {sha}; torch {meta['torch']}")
    print(f"{'shape':>18} {'provider':>12} {'fwd ms':>9} {'bwd ms':>9} {'total ms':>9} "
          f"{'extra MiB':>10} {'peak MiB':>9} {rate:>7}")
    rows: list[dict] = []
    cpu_name = meta["device"] or f"CPU ({torch.get_num_threads()} threads)"

    def keep(row: dict) -> None:  # appended shape by shape: an interrupted grid keeps the rest
        rows.append(row)
        if not opt.no_save:
            append_rows(OUT, [row])
    for shape in shapes:
        heads = {p: {"op": opt.op, "shape": shape, "dtype": opt.dtype,
                     "frozen_head": opt.frozen_head, "provider": p, "repeats": opt.repeats,
                     **meta} for p in providers}
        got: dict[str, list[dict]] = {p: [] for p in providers}
        failed: dict[str, str] = {}  # a provider that failed or was skipped is not tried again
        for sweep in range(max(opt.rounds, 1)):
            for provider in (providers if sweep % 2 == 0 else providers[::-1]):
                if provider in failed:
                    continue
                r = _measure(opt, provider, shape, cuda)
                heads[provider]["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")  # when it ended
                if "failed" in r:
                    failed[provider] = r["failed"]
                    print(f"{shape:>18} {provider:>12}   {r['failed'][:200]}", flush=True)
                    continue
                got[provider].append(r)
                label = provider if opt.rounds <= 1 else f"{provider} #{sweep + 1}"
                print(f"{shape:>18} {label:>12} {r['fwd_ms']:9.1f} {r['bwd_ms']:9.1f} "
                      f"{r['total_ms']:9.1f} {r['peak_extra_mib']:10.1f} "
                      f"{r['peak_total_mib']:9.0f} {r[rate]:7.3f}", flush=True)
        for provider in providers:
            if got[provider]:
                row = {**heads[provider], **combine(got[provider])}
                keep({**row, "device": row["device"] or cpu_name})
            elif provider in failed:
                keep({**heads[provider], "failed": failed[provider], "device": cpu_name})
    if opt.grid or opt.table:
        table = grid_verdict(rows + earlier_peer_rows(rows, providers),
                             "--grid on" if opt.grid else " ".join(sys.argv[1:]))
        print(table)
        for path in ([GRID_TABLE] if opt.grid and not opt.no_save else []) + (
                [Path(opt.table)] if opt.table else []):
            path.write_text(table)
            print(f"wrote {path}")
    if rows and not opt.no_save:
        print(f"appended {len(rows)} rows to {OUT.relative_to(OUT.parents[2])}")
    return 0


def report(opt: Options) -> int:
    """``--report``: the verdict table from recorded rows (grid points in the grid's order)."""
    runs = [r for r in opt.report.split(",") if r]
    rows = [r for r in read_rows(OUT) if r.get("run") in runs and r.get("op") == "linear_kl"]
    if not rows:
        print(f"bench_kernels.py: no linear_kl rows of run(s) {', '.join(runs)} in {OUT}")
        return 2
    order = {",".join(map(str, s)): i for i, s in enumerate(GRID)}
    rows.sort(key=lambda r: (order.get(r["shape"], len(order)), runs.index(r["run"])))
    table = grid_verdict(rows, f"--report {opt.report}")
    path = Path(opt.table) if opt.table else GRID_TABLE
    path.write_text(table)
    print(table + f"wrote {path}")
    return 0


def _measure(opt: Options, provider: str, shape: str, cuda: bool) -> dict:
    """One (provider, shape) in its own process: the worker's row, or ``{"failed": why}``."""
    need = _naive_cpu_bytes(opt, provider, shape, cuda)
    if need:
        return {"failed": f"skipped: needs about {need / 2**30:.0f} GiB (8 fp32 [N, V] tensors "
                          f"at once, measured 7.6 at 4096 x 512 x 128256), the machine has "
                          f"{_available_bytes() / 2**30:.0f} GiB available"}
    cmd = [sys.executable, __file__, "--op", opt.op, "--shapes", shape, "--dtype", opt.dtype,
           "--repeats", str(opt.repeats), "--budget_s", str(opt.budget_s), "--frozen_head",
           "on" if opt.frozen_head else "off", "--worker", provider]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(32 << 20))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        if proc.returncode < 0:  # killed: on this machine, by the kernel's OOM killer
            err = f"killed by signal {-proc.returncode} (out of memory?) {err}"
        return {"failed": f"failed: {err[:290]}"}
    return json.loads(line[-1][7:])


def combine(sweeps: list[dict]) -> dict:
    """One row from a provider's sweeps at one shape: medians of the times and memory, the sum of
    the timed runs, every sweep's total time. A single sweep is returned as it is."""
    if len(sweeps) == 1:
        return sweeps[0]
    row = dict(sweeps[0])
    for key in ("fwd_ms", "bwd_ms", "total_ms", "peak_extra_mib", "peak_total_mib", "tflops",
                "gbps", "model_gbps"):
        if key in row:
            row[key] = statistics.median(r[key] for r in sweeps)
    row["timed_runs"] = sum(r["timed_runs"] for r in sweeps)
    row["rounds"] = len(sweeps)
    row["round_total_ms"] = [r["total_ms"] for r in sweeps]
    return row


def _available_bytes() -> int:
    return _proc_kib_bytes("/proc/meminfo", "MemAvailable")


def _naive_cpu_bytes(opt: Options, provider: str, shape: str, cuda: bool) -> int:
    """The naive provider's memory need on CPU when it exceeds what the machine has (0 otherwise):
    run anyway, it would compute for minutes and then be killed by the kernel's OOM killer."""
    if provider != "naive" or cuda or opt.op != "linear_kl":
        return 0
    N, _, V = (int(v) for v in shape.split(","))
    need = 8 * N * V * 4
    return need if need > _available_bytes() else 0


def earlier_peer_rows(rows: list[dict], ran: list[str]) -> list[dict]:
    """For a grid run of only some providers (``--providers torch`` after a change to rdcore):
    the newest recorded rows of the grid's other providers at the same shape, dtype, head mode,
    device and torch version (their code did not change), marked with the run they come from."""
    if not rows:
        return []
    first = rows[0]
    same = ("dtype", "frozen_head", "device", "torch")
    shapes = {r["shape"] for r in rows}
    newest: dict[tuple, dict] = {}
    for r in read_rows(OUT):
        if (r.get("op") == "linear_kl" and r["provider"] in ("naive", "torch", "liger")
                and r["provider"] not in ran and r["shape"] in shapes
                and all(r.get(k) == first.get(k) for k in same)):
            newest[(r["shape"], r["provider"])] = {**r, "from_run": r.get("run")}
    return list(newest.values())


def sweep_ratios(t: dict, peers: list[dict]) -> list[float]:
    """rdcore's total time over the faster peer's within each sweep (rows of one run with
    ``round_total_ms``; empty otherwise)."""
    if "round_total_ms" not in t or not peers or any(
            p.get("run") != t.get("run") or "round_total_ms" not in p for p in peers):
        return []
    n = min(len(r["round_total_ms"]) for r in [t, *peers])
    return [t["round_total_ms"][i] / min(p["round_total_ms"][i] for p in peers) for i in range(n)]


def grid_verdict(rows: list[dict], command: str = "--grid on") -> str:
    """Markdown: per grid point, rdcore's ``torch`` path against the faster of ``naive`` and
    ``liger`` (time) and against ``liger`` (peak extra memory), with issue 18's CPU targets
    (time ≤ the faster peer, memory ≤ ½ Liger's); with sweeps, the within-sweep ratios too."""
    by = {(r["shape"], r["provider"]): r for r in rows}
    first = next(iter(rows), {})
    out = [f"# Fused linear + KL on the CPU grid ({first.get('dtype', 'fp32')}, forward + backward)",
           "", f"`python bench/bench_kernels.py {command}`; git "
           f"{', '.join(dict.fromkeys(str(r.get('git', '?')) for r in rows))}, torch "
           f"{first.get('torch', '?')}, liger-kernel {first.get('liger-kernel', '-')}, device "
           f"{first.get('device', '?')}. Time: median of the timed runs after a warm-up (runs "
           "column; with sweeps, the median of the sweeps' medians, and the time target is judged "
           "on the per-sweep ratio); memory: peak resident set beyond the inputs and their "
           "gradients. Rows in `kernels.jsonl` (this run's `run` field).", "",
           "| N × H × V | rdcore s | naive s | Liger s | runs | rdcore / faster peer | per sweep "
           "(median, range) | rdcore MiB | naive MiB | Liger MiB | rdcore / Liger mem | targets |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    met = 0
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    for shape in shapes:
        cell = {p: by.get((shape, p)) for p in ("torch", "naive", "liger")}

        def ok(r):
            return r is not None and "failed" not in r

        def sec(r):
            if ok(r):
                return f"{r['total_ms'] / 1e3:.2f}"
            return ("skipped" if r["failed"].startswith("skipped") else "failed") if r else "–"

        def mib(r):
            return f"{r['peak_extra_mib']:.0f}" if ok(r) else "–"

        t = cell["torch"]
        peers = [r for r in (cell["naive"], cell["liger"]) if ok(r)]
        verdict, t_ratio, m_ratio, s_ratio = "no rdcore row", "–", "–", "–"
        if ok(t) and peers:
            fast = min(r["total_ms"] for r in peers)
            t_ratio = f"{t['total_ms'] / fast:.2f}"
            per = sweep_ratios(t, peers)
            time_ok = t["total_ms"] <= fast
            if per:  # the paired estimate decides: each sweep's providers ran back to back
                s_ratio = f"{statistics.median(per):.2f} ({min(per):.2f}–{max(per):.2f})"
                time_ok = statistics.median(per) <= 1.0
            mem_ok = True
            if ok(cell["liger"]):
                m_ratio = f"{t['peak_extra_mib'] / max(cell['liger']['peak_extra_mib'], 1e-9):.2f}"
                mem_ok = t["peak_extra_mib"] <= 0.5 * cell["liger"]["peak_extra_mib"]
            verdict = ("met" if time_ok and mem_ok else
                       ", ".join(x for x, bad in (("time", not time_ok), ("memory", not mem_ok))
                                 if bad) + " missed")
            met += time_ok and mem_ok
        n, h, v = shape.split(",")
        runs = "/".join(str(r.get("timed_runs", "?")) if ok(r) else "–"
                        for r in (t, cell["naive"], cell["liger"]))
        out.append(f"| {n} × {h} × {v} | {sec(t)} | {sec(cell['naive'])} | {sec(cell['liger'])} | "
                   f"{runs} | {t_ratio} | {s_ratio} | {mib(t)} | {mib(cell['naive'])} | {mib(cell['liger'])} "
                   f"| {m_ratio} | {verdict} |")
    reused = sorted({f"{r['provider']} from run {r['from_run']} (git {r.get('git')})"
                     for r in rows if r.get("from_run")})
    out += ["", f"Both targets met at {met} of {len(shapes)} points."]
    if reused:
        out += ["", "Rows of earlier runs (code unchanged since): " + "; ".join(reused) + "."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
