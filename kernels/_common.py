"""Shared by every op of this package: argument checks, the logit transform, row weights, the
autograd Functions (each takes the *pass* that computes losses and gradients: the PyTorch one of
``*_torch.py`` or the Triton one of ``*_triton.py``, handed down by the dispatcher) and the launch
indirection that lets a test compile every Triton launch for a GPU target without running it.

Nothing here imports the op modules: the dispatchers (``linear_kl.py``, ``hidden_mse.py``) import the
passes and hand them to these Functions, so no module calls a module above it.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

Reduction = Literal["mean", "sum", "none"]
Impl = Literal["auto", "torch", "triton"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
IMPLS: tuple[str, ...] = ("auto", "torch", "triton")


def interpreting() -> bool:
    """Triton kernels run on CPU tensors in the interpreter (``TRITON_INTERPRET=1``, set before
    triton is imported: the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(impl: str, x: torch.Tensor) -> bool:
    """``impl`` resolved for tensors like ``x``: "auto" is Triton on CUDA, torch elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    wanted = impl == "triton" or (impl == "auto" and x.is_cuda)
    if wanted and not x.is_cuda and not interpreting() and x.device.type != "meta":
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         "importing triton, for CPU tests); use impl='torch' on CPU")
    return wanted


# --------------------------------------------------------------------------------------------------
# The logit transform of a language-model head
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogitSpec:
    """How a model turns ``raw = x·Wᵀ (+ b)`` into the logits it samples from, and the
    distillation temperature::

        z = softcap(scale · raw) / T,     softcap(u) = cap · tanh(u / cap)   (no cap: u)

    ``scale``: Cohere's ``logit_scale``, 1 / Granite's ``logits_scaling``; ``softcap``: Gemma 2's
    ``final_logit_softcapping``. The derivative of ``z·T`` with respect to ``raw`` is
    ``scale · (1 − tanh²(scale·raw/cap))``."""

    temperature: float = 1.0
    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"logit scale must be a finite number > 0, got {self.scale}")
        if self.softcap is not None and not (self.softcap > 0 and math.isfinite(self.softcap)):
            raise ValueError(f"softcap must be a finite number > 0 or None, got {self.softcap}")

    @property
    def plain(self) -> bool:
        """``z`` is a multiple of ``raw`` (no softcap)."""
        return self.softcap is None


class KLProblem(NamedTuple):
    """The operands of one fused linear-KL call (teacher side detached; ``b``/``bt`` optional
    [V] biases; ``spec`` the shared logit transform)."""

    x: torch.Tensor
    xt: torch.Tensor
    w: torch.Tensor
    wt: torch.Tensor
    b: torch.Tensor | None
    bt: torch.Tensor | None
    spec: LogitSpec
    chunk_rows: int | None = None
    """Rows per chunk (``None``: the path chooses from the problem's shape)."""


class WeightGrad:
    """The fp32 (fp64 for fp64 operands) dW [V, H] accumulator of a pass, held as row pieces so that
    its cast to a 2-byte weight dtype needs no second [V, H] allocation.

    For a bf16/fp16 weight the accumulator is two pieces, the first of ⌈V/2⌉ rows or a few more (a
    multiple of 64), the second of the rest; the first one's storage (≥ V·H·2 bytes) holds the
    whole [V, H] result in the 2-byte dtype. :meth:`result` writes the first piece's values over
    the front half of its own storage (slabs that double in size, each read before anything writes
    over it: slab [a, b) is written to bytes [2a, 2b) and was read from [4a, 4b), so with b ≤ 2a
    the write only covers slabs already converted; the first slab goes through a small
    temporary), then the second piece's after them, and frees the second
    piece. Peak: the fp32 accumulator, never fp32 + bf16 together (on an H200 at V 128256,
    H 4096 the cast at the end of the forward held 2004 + 1002 MiB). For an fp32 (fp64) weight the
    accumulator is one piece and is the result itself.

    The pass writes each piece with ``GEMM(g[:, v0:v0+n]ᵀ, x)``: :attr:`pieces` gives ``(v0,
    piece)``; the first update writes (no zero-fill), the later ones accumulate."""

    FIRST_SLAB = 1 << 20
    """Elements of the first slab (converted through a temporary of this many 2-byte elements)."""

    def __init__(self, V: int, H: int, *, device: torch.device, acc_dtype: torch.dtype,
                 out_dtype: torch.dtype):
        self.V, self.H, self.out_dtype = V, H, out_dtype
        first = -(-V // 128) * 64  # ⌈V/2⌉ rounded up to 64 rows: aligned pieces
        split = first < V and out_dtype.itemsize == 2 and acc_dtype == torch.float32
        rows = [first, V - first] if split else [V]
        self.pieces: list[tuple[int, torch.Tensor]] = []
        v0 = 0
        for n in rows:
            self.pieces.append((v0, torch.empty((n, H), device=device, dtype=acc_dtype)))
            v0 += n

    def zero_(self) -> WeightGrad:
        for _, piece in self.pieces:
            piece.zero_()
        return self

    def result(self) -> torch.Tensor:
        """dW [V, H] in the weight's dtype; the pieces are consumed (do not use them after)."""
        pieces, self.pieces = self.pieces, []
        if len(pieces) == 1:
            return pieces[0][1].to(self.out_dtype)
        (_, first), (_, second) = pieces
        src = first.view(-1)
        out = src.view(self.out_dtype)[: self.V * self.H]  # 2 elements per fp32 element
        n, a = src.numel(), min(self.FIRST_SLAB, src.numel())
        out[:a].copy_(src[:a].to(self.out_dtype))  # overlaps its own source: via a temporary
        while a < n:
            b = min(2 * a, n)
            out[a:b].copy_(src[a:b])  # bytes [2a, 2b) lie below the source's [4a, 4b)
            a = b
        out[n:].copy_(second.view(-1))
        del first, second, pieces
        return out.view(self.V, self.H)


class KLGrads(NamedTuple):
    """What a pass returns: per-row losses [N] (fp32) and, as asked, dX [N, H] (x's dtype), dW of
    Σ_n w_n ℓ_n as its fp32 accumulator (:class:`WeightGrad`; its ``result()`` is the weight's
    dtype) and fp32 db [V]."""

    loss: torch.Tensor
    dx: torch.Tensor | None
    dw: WeightGrad | None
    db: torch.Tensor | None


KLPass = Callable[[KLProblem, torch.Tensor, bool, bool, bool], KLGrads]
"""``(problem, row_weights [N], want_dx, want_dw, want_db) -> KLGrads``."""


# --------------------------------------------------------------------------------------------------
# Row weights and reductions
# --------------------------------------------------------------------------------------------------
def row_weights(mask: torch.Tensor | None, N: int, reduction: str, device: torch.device
                ) -> torch.Tensor:
    """w_n of ``Σ_n w_n ℓ_n``: the mask as 0/1, divided by the selected count for "mean"."""
    w = torch.ones(N, device=device) if mask is None else mask.float()
    if reduction == "mean":
        w = w / w.sum().clamp_min(1)
    return w


def reduce_rows(rows_N: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """The reference reduction of per-row values: mean over selected rows (0 when none), sum, or
    the rows with unselected ones zeroed."""
    if mask is not None:
        rows_N = torch.where(mask, rows_N, rows_N.new_zeros(()))
    if reduction == "none":
        return rows_N
    if reduction == "sum":
        return rows_N.sum()
    count = rows_N.new_tensor(rows_N.shape[0]) if mask is None else mask.sum()
    return rows_N.sum() / count.clamp_min(1)


def scaled(grads: Sequence[torch.Tensor | None], grad_out: torch.Tensor
           ) -> tuple[torch.Tensor | None, ...]:
    """Each of ``grads`` times the scalar ``grad_out``, in place (the saved gradients are not used
    again); skipped when ``grad_out`` is exactly 1 — checked on CPU only: on an accelerator the
    comparison would be a host synchronisation, which costs more than the scale.

    One ``torch._foreach_mul_`` per dtype: ``grad.mul_(grad_out)`` with a 0-d CUDA tensor runs
    PyTorch's generic (unvectorised) elementwise kernel — 1.35–1.48 TB/s on an H200 (bench/results/
    kernel_sweep.jsonl), a third of the copy bandwidth — where the multi-tensor kernel reads the
    scalar once and the operands with vector loads."""
    if grad_out.device.type == "cpu" and bool(grad_out == 1):
        return tuple(grads)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        if g is not None:
            by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, group in by_dtype.items():
        torch._foreach_mul_(group, grad_out.to(dtype))
    return tuple(grads)


# --------------------------------------------------------------------------------------------------
# Autograd Functions (the pass is an argument: PyTorch or Triton)
# --------------------------------------------------------------------------------------------------
class LinearKLFunction(torch.autograd.Function):
    """Fused linear + KL with either pass.

    "mean"/"sum": the gradients are computed in forward and saved; backward scales them by
    ``grad_output``. "none": forward computes only the losses; backward re-runs the pass with
    ``grad_output`` as row weights (a per-row ``grad_output`` cannot be folded into a saved dW)."""

    @staticmethod
    def forward(ctx, run_pass: KLPass, x, xt, w, wt, b, bt, mask, spec: LogitSpec,
                reduction: str, chunk_rows: int | None):
        want = (ctx.needs_input_grad[1], ctx.needs_input_grad[3],
                b is not None and ctx.needs_input_grad[5])
        N = x.shape[0]
        prob = KLProblem(x, xt, w, wt, b, bt, spec, chunk_rows)
        ctx.run_pass, ctx.reduction, ctx.want = run_pass, reduction, want
        ctx.spec, ctx.chunk_rows = spec, chunk_rows
        if reduction == "none":
            row_w = row_weights(mask, N, "sum", x.device)
            out = run_pass(prob, row_w, False, False, False)
            ctx.save_for_backward(x, xt, w, wt, b, bt, row_w)
            return out.loss * row_w
        row_w = row_weights(mask, N, reduction, x.device)
        out = run_pass(prob, row_w, *want)
        ctx.save_for_backward(out.dx, None if out.dw is None else out.dw.result(),
                              None if out.db is None else out.db.to(b.dtype))
        return (out.loss * row_w).sum()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            x, xt, w, wt, b, bt, row_w = ctx.saved_tensors
            out = ctx.run_pass(KLProblem(x, xt, w, wt, b, bt, ctx.spec, ctx.chunk_rows),
                               row_w * grad_out.float(), *ctx.want)
            dx, dw, db = out.dx, out.dw, out.db
            dw = None if dw is None else dw.result()
            db = None if db is None else db.to(b.dtype)
        else:
            dx, dw, db = scaled(ctx.saved_tensors, grad_out)
        return None, dx, None, dw, None, db, None, None, None, None, None


HiddenPass = Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor, bool],
                      tuple[torch.Tensor, list[torch.Tensor]]]
"""``(students, teachers, row_weights [N], want_grad) -> (loss, per-layer gradients)``."""


class HiddenMSEFunction(torch.autograd.Function):
    """Normalised hidden MSE with either pass; gradients computed in forward, backward scales."""

    @staticmethod
    def forward(ctx, run_pass: HiddenPass, mask, L: int, *states):
        students, teachers = list(states[:L]), list(states[L:])
        N = students[0].shape[0]
        w_N = row_weights(mask, N, "mean", students[0].device)
        need = any(ctx.needs_input_grad[3:3 + L])
        loss, grads = run_pass(students, teachers, w_N, need)
        if need:
            ctx.save_for_backward(*grads)
        ctx.L = L
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grads = scaled(ctx.saved_tensors, grad_out)
        return (None, None, None, *grads, *([None] * ctx.L))


# --------------------------------------------------------------------------------------------------
# Launch indirection (ahead-of-time compile checks)
# --------------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One Triton launch as a launcher made it: the kernel, its grid, positional arguments and
    keyword (constexpr and compile option) arguments."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


_RECORDING: contextvars.ContextVar[list[Launch] | None] = contextvars.ContextVar(
    "rdcore_kernels_recording", default=None)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)`` — or, inside :func:`recording`, only note it (the tensors
    may then live on the ``meta`` device: nothing is computed)."""
    seen = _RECORDING.get()
    if seen is not None:
        seen.append(Launch(kernel, tuple(grid), args, dict(kwargs)))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Collect the launches a launcher makes instead of running them (see
    ``tests/ops/test_gpu_compile.py``: every launch is compiled for sm_80/sm_90)."""
    seen: list[Launch] = []
    token = _RECORDING.set(seen)
    try:
        yield seen
    finally:
        _RECORDING.reset(token)


def is_recording() -> bool:
    return _RECORDING.get() is not None
