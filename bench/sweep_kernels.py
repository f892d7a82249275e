"""The Triton path's geometry on a GPU, swept in one process, and where its time goes.

``linear_kl``: fwd+bwd of ``fused_linear_kl(impl="triton")`` at one shape (default the issue's
GPU target: N 8192, H 4096, V 128256, bf16, shared head) for several ``C:R`` geometries (rows per
logits chunk : rows per gradient group; ``auto`` is :func:`triton_geometry`'s choice; ``:o`` with
the row kernel on a second stream, ``OVERLAP``), trainable and frozen head. The configurations
are timed round-robin (every repeat runs each once, so a drifting clock touches all alike) with
CUDA events; gradients by ``torch.autograd.grad`` (nothing
accumulated into ``.grad``); peak memory beyond the inputs per configuration. Then, for the
``profile`` geometries, one step under ``torch.profiler``: device time per aten op and input
shapes (the logits, dX and dW GEMMs are told apart by their shapes) and per kernel.

``hidden_mse``: the row kernel's ``num_warps`` swept at 32 × 8192 × 4096 (bf16), forward (which
computes the gradient) and backward (the in-place scale) separately, against the copy bandwidth
measured in the same process (``torch.Tensor.copy_`` of 2 GiB).

Rows go to ``bench/results/kernel_sweep.jsonl``; the tables are printed::

    python bench/sweep_kernels.py
    python bench/sweep_kernels.py --configs auto,832:832,512:1024 --profile auto,832:832
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import RESULTS, append_rows, git_sha, parse, versions

OUT = RESULTS / "kernel_sweep.jsonl"


@dataclass
class Options:
    op: str = "linear_kl,hidden_mse"
    """Which sweeps (comma-separated): linear_kl, hidden_mse."""
    shape: str = "8192,4096,128256"
    """N,H,V of the linear-KL sweep."""
    configs: str = "auto,auto:o,832:832,256:1024,512:1024,512:2048,512:2048:o,384:1536"
    """Linear-KL geometries: ``C:R`` or ``auto``, with ``:o`` the row kernel on a second stream
    beside the next chunk's GEMM."""
    profile: str = "auto,auto:o"
    """Geometries profiled per op and kernel (empty: none)."""
    hidden_shape: str = "32,8192,4096"
    """L,N,H of the hidden-MSE sweep."""
    warps: str = "4,8,16,32"
    """Hidden-MSE row-kernel warp counts."""
    repeats: int = 5
    """Timed runs per configuration (after one warm-up), median reported."""
    out: str = str(OUT)
    """Where the rows are appended."""
    trace: str = ""
    """Where to write the Chrome trace of the first profiled step (trainable head; empty: none) —
    the timeline shows where the device waits between kernels."""


def _geometry(spec: str) -> tuple[int | None, int | None, bool]:
    """``auto``, ``C:R``, either with ``:o`` (the row kernel on a second stream) →
    (C, R, overlap)."""
    parts = spec.split(":")
    overlap = parts[-1] == "o"
    parts = parts[:-1] if overlap else parts
    if parts == ["auto"]:
        return None, None, overlap
    if len(parts) != 2:
        raise SystemExit(f"--configs: {spec!r} is not auto, C:R, auto:o or C:R:o")
    return int(parts[0]), int(parts[1]), overlap


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    """Milliseconds of ``fn`` (CUDA events; the wall clock without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _memory(reset: bool = False) -> float:
    """Bytes allocated now (``reset``: and restart the peak count), or the peak since; 0 without
    a GPU."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    if reset:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def linear_kl_sweep(opt: Options, base: dict) -> list[dict]:
    import torch

    from rdcore.kernels import fused_linear_kl
    from rdcore.kernels import linear_kl_triton as lkt

    N, H, V = (int(v) for v in opt.shape.split(","))
    dev, dtype = _device()
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, H, device=dev, dtype=dtype, generator=g)
    xt = torch.randn(N, H, device=dev, dtype=dtype, generator=g)
    w = torch.randn(V, H, device=dev, dtype=dtype, generator=g) * H**-0.5
    configs = [c for c in opt.configs.split(",") if c]
    rows = []
    for frozen in (False, True):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_(not frozen)
        wrt = [xs] if frozen else [xs, ws]

        def step(spec: str, xs=xs, ws=ws, wrt=wrt) -> None:
            C, R, overlap = _geometry(spec)
            lkt.GROUP_ROWS, lkt.OVERLAP = R, overlap
            try:
                loss = fused_linear_kl(xs, xt, ws, ws.detach(), impl="triton", chunk_rows=C)
                torch.autograd.grad(loss, wrt)
            finally:
                lkt.GROUP_ROWS, lkt.OVERLAP = None, False

        times: dict[str, list[float]] = {c: [] for c in configs}
        peaks = {}
        for spec in configs:  # warm-up and peak memory, one configuration at a time
            before = _memory(reset=True)
            step(spec)
            peaks[spec] = max(_memory() - before, 0) / 2**20
        stats: dict[str, dict[str, int]] = {c: {} for c in configs}
        for _ in range(opt.repeats):
            for spec in configs:
                before = _allocator_counts()
                times[spec].append(_timed(lambda spec=spec: step(spec)))
                for key, n in _allocator_counts().items():  # cudaMalloc/cudaFree inside a step
                    stats[spec][key] = stats[spec].get(key, 0) + n - before.get(key, 0)
        flops = 2.0 * N * V * H * (3 if frozen else 4)  # logits over [x̃; x] (2), dX, dW
        for spec in configs:
            C, R, overlap = _geometry(spec)
            C, R = lkt.triton_geometry(N, V, dtype, C, R)
            ms = statistics.median(times[spec])
            rows.append({**base, "op": "linear_kl", "shape": opt.shape, "frozen_head": frozen,
                         "config": spec, "chunk_rows": C, "group_rows": R, "overlap": overlap,
                         "ms": ms,
                         "ms_all": times[spec], "tflops": flops / ms / 1e9,
                         "dw_mib": 0 if frozen else V * H * 4 / 2**20,
                         "peak_extra_mib": peaks[spec], "allocator": stats[spec],
                         "host_syncs": _host_syncs(lambda spec=spec: step(spec))})
        for i, spec in enumerate(p for p in opt.profile.split(",") if p):
            trace = Path(opt.trace) if opt.trace and i == 0 and not frozen else None
            try:
                found = _profile(lambda spec=spec: step(spec), trace)
            except Exception as e:  # the timings above stand without it
                found = {"failed": f"{type(e).__name__}: {e}"[:300]}
            rows.append({**base, "op": "linear_kl_profile", "shape": opt.shape,
                         "frozen_head": frozen, "config": spec, **found})
    return rows


def _allocator_counts() -> dict[str, int]:
    """The caching allocator's device allocations, frees and retries so far (empty on a CPU)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in ("num_device_alloc", "num_device_free",
                                         "num_alloc_retries")}


def _host_syncs(fn) -> list[str]:
    """Where one call of ``fn`` makes the host wait for the device (``torch.cuda``'s sync debug
    mode, which warns at each synchronising call): the first few warnings."""
    import warnings

    import torch

    if not torch.cuda.is_available():
        return []
    _sync()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync()
    return [str(w.message)[:200] for w in seen if "synchroniz" in str(w.message)][:5]


def _device():
    """(device, dtype): CUDA and bf16, or — to try the script — the CPU and fp32 (Triton then
    needs ``TRITON_INTERPRET=1``, and tiny shapes)."""
    import torch

    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def _profile(fn, trace: Path | None = None) -> dict:
    """One call of ``fn`` under the profiler: device ms per aten op (by input shapes) and per
    kernel, the step's own time (CUDA events) and so the time no kernel ran (``idle_ms``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    fn()
    _sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                 record_shapes=True) as prof:
        step_ms = _timed(fn)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))

    def device_ms(e) -> float:
        if not cuda:
            return e.cpu_time_total / 1e3
        return getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) / 1e3

    ops = [{"op": e.key, "shapes": str(e.input_shapes)[:160], "calls": e.count,
            "ms": round(device_ms(e), 3)}
           for e in prof.key_averages(group_by_input_shape=True)
           if (e.key.startswith("aten::") and device_ms(e) > 0.05 and e.key not in (
               "aten::copy_", "aten::to", "aten::_to_copy")) or e.key.startswith("_kl_rows")]
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name[:80]
            k = kernels.setdefault(name, {"kernel": name, "calls": 0, "ms": 0.0})
            k["calls"] += 1
            k["ms"] += e.time_range.elapsed_us() / 1e3
    kernel_rows = sorted(kernels.values(), key=lambda k: -k["ms"])
    for k in kernel_rows:
        k["ms"] = round(k["ms"], 3)
    busy = sum(k["ms"] for k in kernel_rows)
    return {"device_ms": round(busy, 3), "step_ms": round(step_ms, 3),
            "idle_ms": round(step_ms - busy, 3),
            "ops": sorted(ops, key=lambda o: -o["ms"])[:16], "kernels": kernel_rows[:16]}


def _copy_gbps(elements: int) -> float:
    """GB/s (read + write) of ``copy_`` between two int16 tensors, median of 5 after a warm-up."""
    import torch

    dev = _device()[0]
    src = torch.empty(elements, device=dev, dtype=torch.int16)
    dst = torch.empty_like(src)
    copy = [_timed(lambda: dst.copy_(src)) for _ in range(6)][1:]
    return 2 * elements * 2 / statistics.median(copy) / 1e6


def hidden_mse_sweep(opt: Options, base: dict) -> list[dict]:
    import torch

    from rdcore.kernels import hidden_mse_triton as hmt
    from rdcore.kernels import normalized_hidden_mse

    L, N, H = (int(v) for v in opt.hidden_shape.split(","))
    dev, dtype = _device()
    g = torch.Generator(device=dev).manual_seed(0)
    s = [torch.randn(N, H, device=dev, dtype=dtype, generator=g).requires_grad_()
         for _ in range(L)]
    t = [torch.randn(N, H, device=dev, dtype=dtype, generator=g) for _ in range(L)]
    copy_gbps = _copy_gbps(2**30 if dev == "cuda" else 2**20)
    warps = [int(w) for w in opt.warps.split(",") if w]
    fwd: dict[int, list[float]] = {w: [] for w in warps}
    bwd: dict[int, list[float]] = {w: [] for w in warps}
    box: dict = {}

    def forward() -> None:
        box["loss"] = normalized_hidden_mse(s, t, impl="triton")

    def backward() -> None:
        torch.autograd.grad(box.pop("loss"), s)

    for rep in range(opt.repeats + 1):  # the first round warms up
        for w in warps:
            hmt.ROW_WARPS = w
            f, b = _timed(forward), _timed(backward)
            if rep:
                fwd[w].append(f)
                bwd[w].append(b)
    hmt.ROW_WARPS = None
    elem = L * N * H * s[0].element_size()
    rows = []
    for w in warps:
        f, b = statistics.median(fwd[w]), statistics.median(bwd[w])
        # forward reads s and t and writes g; backward reads and writes g (the scale, in place)
        f_gbps, b_gbps = 3 * elem / f / 1e6, 2 * elem / b / 1e6
        rows.append({**base, "op": "hidden_mse", "shape": opt.hidden_shape, "num_warps": w,
                     "fwd_ms": f, "bwd_ms": b, "total_ms": f + b, "fwd_gbps": f_gbps,
                     "bwd_gbps": b_gbps, "total_gbps": 5 * elem / (f + b) / 1e6,
                     "copy_gbps": copy_gbps, "fwd_of_copy": f_gbps / copy_gbps,
                     "total_of_copy": 5 * elem / (f + b) / 1e6 / copy_gbps})
    return rows


def main(argv: list[str] | None = None) -> int:
    opt = parse(Options, argv, __doc__, "bench/sweep_kernels.py")
    import torch
    from common import device_name

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        print("sweep_kernels.py: needs a CUDA device (or, to try it on tiny shapes, "
              "TRITON_INTERPRET=1)")
        return 2
    base = {"device": device_name(), "git": git_sha(),
            "run": time.strftime("%Y-%m-%dT%H:%M:%S"), **versions()}
    ops = [o for o in opt.op.split(",") if o]
    rows = []
    if "linear_kl" in ops:
        rows += linear_kl_sweep(opt, base)
        append_rows(Path(opt.out), rows)
        print(f"linear_kl {opt.shape} {_device()[1]}, fwd+bwd, shared head, on {base['device']}")
        print(f"{'head':>9} {'config':>9} {'C':>5} {'R':>5} {'ms':>8} {'TFLOP/s':>8} "
              f"{'extra MiB':>10}")
        for r in rows:
            if r["op"] == "linear_kl":
                print(f"{'frozen' if r['frozen_head'] else 'trainable':>9} {r['config']:>9} "
                      f"{r['chunk_rows']:>5} {r['group_rows']:>5} {r['ms']:8.2f} "
                      f"{r['tflops']:8.1f} {r['peak_extra_mib']:10.0f}")
        for r in rows:
            if r["op"] == "linear_kl_profile":
                head = "frozen" if r["frozen_head"] else "trainable"
                if "failed" in r:
                    print(f"\nprofile {head} {r['config']}: {r['failed']}")
                    continue
                print(f"\nprofile {head} {r['config']}: {r['device_ms']:.2f} ms of kernel time in a "
                      f"{r['step_ms']:.2f} ms step")
                for o in r["ops"]:
                    print(f"  {o['ms']:8.2f} ms {o['calls']:4d}x {o['op']:<28} {o['shapes'][:90]}")
    if "hidden_mse" in ops:
        hrows = hidden_mse_sweep(opt, base)
        append_rows(Path(opt.out), hrows)
        print(f"\nhidden_mse {opt.hidden_shape} {_device()[1]} on {base['device']} "
              f"(copy: {hrows[0]['copy_gbps']:.0f} GB/s)")
        print(f"{'warps':>5} {'fwd ms':>7} {'bwd ms':>7} {'fwd GB/s':>9} {'bwd GB/s':>9} "
              f"{'fwd/copy':>8} {'total/copy':>10}")
        for r in hrows:
            print(f"{r['num_warps']:>5} {r['fwd_ms']:7.2f} {r['bwd_ms']:7.2f} "
                  f"{r['fwd_gbps']:9.0f} {r['bwd_gbps']:9.0f} {r['fwd_of_copy']:8.2f} "
                  f"{r['total_of_copy']:10.2f}")
        rows += hrows
    return 0


if __name__ == "__main__":
    sys.exit(main())
