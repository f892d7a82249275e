"""Ahead-of-time compile every Triton launch of this package for an NVIDIA target, without a GPU.

A launcher run inside :func:`._common.recording` on ``meta`` tensors (which hold no data; their
``data_ptr()`` is ``storage_offset · itemsize``, as a fresh CUDA allocation's offsets) notes each
launch instead of running it. :func:`compile_launch` then binds the launch's arguments exactly as
``JITFunction.run`` would on a device of the given compute capability — the same binder triton
generates (ints equal to 1 become constants, 16-divisible ints and 16-byte-aligned pointers get
``tt.divisibility``), only the driver replaced by a ``GPUTarget`` — and runs the whole pipeline
to a cubin with the ``ptxas`` and ``cuobjdump`` that ship in the triton wheel. The report holds
registers, spilled bytes, shared memory, and whether tensor-core instructions appear.

    python -m rdcore.kernels.aot                       # every configuration, sm_80 and sm_90
    python -m rdcore.kernels.aot --out bench/results/gpu_compile.jsonl

exits 1 if any compile fails, spills or needs more shared memory than the target has. Must run
without ``TRITON_INTERPRET`` (the interpreter replaces the kernels). Tested with triton 3.6–3.9.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

from ._common import Launch, recording

MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
"""Shared memory a block may use on each compute capability (opt-in maximum), bytes."""
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class Report:
    """One compiled launch."""

    case: str
    kernel: str
    target: str
    constexprs: dict
    num_warps: int
    num_stages: int
    regs: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    shared_limit: int
    tensor_core: str | None
    """``wgmma`` (sm_90 HGMMA) or ``mma`` (HMMA) when the SASS holds tensor-core instructions."""
    async_copies: int
    """``LDGSTS`` (cp.async) instructions: 0 means every load is staged through registers."""
    compile_s: float

    @property
    def ok(self) -> bool:
        return self.spill_stores == 0 and self.spill_loads == 0 and \
            self.shared_bytes <= self.shared_limit


def _bind(fn, args, kwargs, capability: int):
    """(target, options, signature, constexprs, attrs) as ``fn[grid](*args, **kwargs)`` binds
    them on a device of ``capability``."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what run() adds (3.9)
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    kwargs.setdefault("enable_fp_fusion", True)  # the default of triton <= 3.9, pinned
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                          options)
    return target, options, signature, constexprs, attrs


def compile_launch(launch: Launch, capability: int, case: str = "") -> Report:
    """Compile one recorded launch for sm_<capability> and read its resources."""
    from triton import knobs
    from triton.compiler import ASTSource

    target, options, signature, constexprs, attrs = _bind(launch.kernel, launch.args,
                                                          launch.kwargs, capability)
    out = io.StringIO()
    t0 = time.perf_counter()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(out):
        knobs.compilation.always_compile = True  # ptxas runs (with triton's flags) every time
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                                target=target, options=options.__dict__)
    seconds = time.perf_counter() - t0
    log = out.getvalue()
    regs = int(_USED.search(log).group(1))
    spill = _SPILL.search(log)
    stores, loads = (int(spill.group(2)), int(spill.group(3))) if spill else (0, 0)
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(_BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
    tc = "wgmma" if re.search(r"\bHGMMA\b", sass) else "mma" if re.search(r"\bHMMA\b", sass) else None
    names = launch.kernel.arg_names
    return Report(case, launch.kernel.__name__, f"sm_{capability}",
                  {names[k[0]]: (v.value if hasattr(v, "value") else v)
                   for k, v in constexprs.items() if names[k[0]].isupper()},
                  kernel.metadata.num_warps, kernel.metadata.num_stages, regs, stores, loads,
                  kernel.metadata.shared, MAX_SHARED.get(capability, 0), tc,
                  len(re.findall(r"\bLDGSTS\b", sass)), round(seconds, 2))


# --------------------------------------------------------------------------------------------------
# The configurations the launchers can choose
# --------------------------------------------------------------------------------------------------
def _meta(*shape: int, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype, requires_grad=grad)


def linear_kl_launches(N: int, H: int, V: int, dtype: torch.dtype, *, frozen_head: bool = False,
                       softcap: float | None = None, bias: bool = False,
                       chunk_rows: int | None = None) -> list[Launch]:
    """Every launch of one forward (and the gradient) of the Triton fused linear-KL."""
    from .linear_kl import fused_linear_kl

    x = _meta(N, H, dtype=dtype, grad=True)
    w = _meta(V, H, dtype=dtype, grad=not frozen_head)
    b = _meta(V, dtype=dtype, grad=not frozen_head) if bias else None
    with recording() as seen:
        fused_linear_kl(x, _meta(N, H, dtype=dtype), w, bias=b, softcap=softcap, impl="triton",
                        chunk_rows=chunk_rows)
    return seen


def hidden_mse_launches(L: int, N: int, H: int, dtype: torch.dtype) -> list[Launch]:
    """The launches of the Triton hidden-state MSE."""
    from .hidden_mse import normalized_hidden_mse

    s = [_meta(N, H, dtype=dtype, grad=True) for _ in range(L)]
    with recording() as seen:
        normalized_hidden_mse(s, [_meta(N, H, dtype=dtype) for _ in range(L)], impl="triton")
    return seen


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cases() -> Iterator[tuple[str, list[Launch]]]:
    """(name, launches) for every configuration class the launchers choose: each dtype at the
    benchmark shape (N 8192, H 4096, V 128256: chunks of 837 rows), Gemma's vocabulary 262144, a
    hidden size that is not a multiple of 16 (unaligned rows), a trainable bias with a softcap,
    a head beyond 2³¹ elements (int64 offsets), and the hidden MSE at short, long and odd rows."""
    for name, dtype in DTYPES.items():
        yield f"linear_kl {name} 8192x4096x128256", linear_kl_launches(8192, 4096, 128256, dtype)
        yield f"linear_kl {name} 1024x640x262144", linear_kl_launches(1024, 640, 262144, dtype)
        yield f"linear_kl {name} 300x1000x50257", linear_kl_launches(300, 1000, 50257, dtype)
        yield f"linear_kl {name} 300x4100x32000", linear_kl_launches(300, 4100, 32000, dtype)
        yield (f"linear_kl {name} softcap+bias 300x640x262144",
               linear_kl_launches(300, 640, 262144, dtype, softcap=30.0, bias=True))
        yield f"hidden_mse {name} 4x8192x4096", hidden_mse_launches(4, 8192, 4096, dtype)
        yield f"hidden_mse {name} 4x64x4100", hidden_mse_launches(4, 64, 4100, dtype)
        yield f"hidden_mse {name} 2x64x65536", hidden_mse_launches(2, 64, 65536, dtype)
        yield f"hidden_mse {name} 2x64x100001", hidden_mse_launches(2, 64, 100001, dtype)
    yield ("linear_kl bf16 int64 64x16384x262144",
           linear_kl_launches(64, 16384, 262144, torch.bfloat16, chunk_rows=64))


def _key(launch: Launch, capability: int) -> str:
    _, options, signature, constexprs, attrs = _bind(launch.kernel, launch.args, launch.kwargs,
                                                     capability)
    return repr((capability, launch.kernel.__name__, signature, sorted(constexprs.items()),
                 sorted((k, repr(v)) for k, v in attrs.items()), options.num_warps,
                 options.num_stages))


def _compile_task(task: tuple[int, int, int]) -> Report:
    """Worker: compile launch ``j`` of case ``i`` for capability ``cap`` (launches hold kernels,
    which do not pickle: each worker rebuilds the cases, which costs milliseconds)."""
    i, j, cap = task
    case, launches = list(cases())[i]
    return compile_launch(launches[j], cap, case)


def compile_all(capabilities: tuple[int, ...] = (80, 90), workers: int | None = None
                ) -> list[Report]:
    """Each distinct binding of :func:`cases` compiled once per target, on ``workers`` processes
    (default: one per core)."""
    tasks, seen = [], set()
    for i, (_, launches) in enumerate(cases()):
        for j, launch in enumerate(launches):
            for cap in capabilities:
                key = _key(launch, cap)
                if key not in seen:
                    seen.add(key)
                    tasks.append((i, j, cap))
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [_compile_task(t) for t in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_task, tasks))


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(prog="python -m rdcore.kernels.aot", description=__doc__)
    ap.add_argument("--out", type=Path, help="append one JSON row per compiled launch here")
    ap.add_argument("--targets", default="80,90", help="compute capabilities (default 80,90)")
    args = ap.parse_args(argv)
    reports = compile_all(tuple(int(t) for t in args.targets.split(",")))
    print(f"{'case':40} {'kernel':16} {'target':6} {'warps':>5} {'stages':>6} {'regs':>4} "
          f"{'spill':>9} {'smem':>7} {'tc':>5} {'cp.async':>8}")
    for r in reports:
        print(f"{r.case:40} {r.kernel:16} {r.target:6} {r.num_warps:5} {r.num_stages:6} {r.regs:4} "
              f"{r.spill_stores:4}/{r.spill_loads:<4} {r.shared_bytes:7} {r.tensor_core or '-':>5} "
              f"{r.async_copies:8}{'' if r.ok else '  <-- FAIL'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as fh:
            stamp = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "triton": triton.__version__,
                     "torch": torch.__version__}
            for r in reports:
                fh.write(json.dumps({**stamp, **asdict(r), "ok": r.ok}) + "\n")
    bad = [r for r in reports if not r.ok]
    print(f"{len(reports)} launches compiled, {len(bad)} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
