"""Fused linear (lm_head) + KL divergence without the N×V logits: the public function.

    fused_linear_kl(x, x̃, W, W̃=None, *, bias=None, teacher_bias=None, mask=None,
                    temperature=1.0, logit_scale=1.0, softcap=None, reduction="mean", impl="auto")

per row ``T²·KL(softmax(t/T) ‖ softmax(s/T))`` with ``s = softcap(scale·(x·Wᵀ + b))`` and the
teacher's ``t`` from ``(x̃, W̃, b̃)`` (``W̃=None``: the student's head, bias included), reduced by
"mean" over selected rows (0 when none), "sum" or "none". Gradients reach ``x``, ``W`` and ``b``
only. The formula, shapes and dtype policy are in ``linear_kl_torch.py`` (the reference and the
chunked PyTorch path) and ``linear_kl_triton.py`` (the Triton kernels); this module checks the
arguments and picks the path: ``impl="triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``),
``"torch"`` (any device) or ``"auto"`` (Triton on CUDA, torch elsewhere).
"""

from __future__ import annotations

import torch

from ._common import REDUCTIONS, LinearKLFunction, LogitSpec, use_triton
from .linear_kl_torch import _chunked_pass
from .linear_kl_triton import _triton_pass


def _check(x, xt, w, wt, b, bt, mask, reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if x.dim() != 2 or xt.dim() != 2 or w.dim() != 2 or wt.dim() != 2:
        raise ValueError("student_hidden [N, H], teacher_hidden [N, Ht], weight [V, H] and "
                         "teacher_weight [V, Ht] must be 2-D")
    if x.shape[0] != xt.shape[0]:
        raise ValueError(f"student and teacher rows differ: {x.shape[0]} vs {xt.shape[0]}")
    if w.shape[1] != x.shape[1] or wt.shape[1] != xt.shape[1] or w.shape[0] != wt.shape[0]:
        raise ValueError(f"shape mismatch: student_hidden {tuple(x.shape)}, weight {tuple(w.shape)}, "
                         f"teacher_hidden {tuple(xt.shape)}, teacher_weight {tuple(wt.shape)}")
    if x.dtype != w.dtype or xt.dtype != wt.dtype:
        raise ValueError(f"dtype mismatch: student_hidden {x.dtype} vs weight {w.dtype}, "
                         f"teacher_hidden {xt.dtype} vs teacher_weight {wt.dtype}")
    for name, bias in (("bias", b), ("teacher_bias", bt)):
        if bias is not None and bias.shape != (w.shape[0],):
            raise ValueError(f"{name} must have shape [{w.shape[0]}], got {tuple(bias.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (x.shape[0],)):
        raise ValueError(f"mask must be a bool tensor of shape [{x.shape[0]}]")
    tensors = [t for t in (x, xt, w, wt, b, bt, mask) if t is not None]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """``a`` and ``b`` are views of the same memory with the same layout (the same values)."""
    return (a is not None and b is not None and a.device == b.device and a.dtype == b.dtype
            and a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())


def fused_linear_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                    weight: torch.Tensor, teacher_weight: torch.Tensor | None = None, *,
                    bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None, temperature: float = 1.0,
                    logit_scale: float = 1.0, softcap: float | None = None,
                    reduction: str = "mean", impl: str = "auto",
                    chunk_rows: int | None = None) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` per row, reduced, without materialising [N, V].

    ``student_hidden`` [N, H], ``teacher_hidden`` [N, Ht], ``weight`` [V, H] (student lm_head),
    ``teacher_weight`` [V, Ht] or ``None`` (the same head, with ``bias``); ``bias`` /
    ``teacher_bias`` [V] or ``None``. ``logit_scale`` and ``softcap``: the model's own logit
    transform (see :class:`~._common.LogitSpec`). ``mask`` [N] bool selects rows; ``reduction``:
    "mean" over selected rows (0 when none), "sum", or "none" ([N], zeros on unselected rows).
    Gradients reach ``student_hidden``, ``weight`` and ``bias`` only. ``chunk_rows``: rows per
    chunk (default: chosen from the shapes; smaller saves memory, larger is faster up to a point)."""
    spec = LogitSpec(float(temperature), float(logit_scale),
                     None if softcap is None else float(softcap))
    # the same head also when passed again (e.g. ``weight.detach()``): one GEMM over [x̃; x]
    shared = teacher_weight is None or (_same_tensor(teacher_weight, weight) and (
        (teacher_bias is None and bias is None) or _same_tensor(teacher_bias, bias)))
    wt = weight if shared else teacher_weight.detach()
    bt = bias if shared else (None if teacher_bias is None else teacher_bias.detach())
    _check(student_hidden, teacher_hidden, weight, wt, bias, bt, mask, reduction)
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    run_pass = _triton_pass if use_triton(impl, student_hidden) else _chunked_pass
    return LinearKLFunction.apply(run_pass, student_hidden, teacher_hidden.detach(), weight, wt,
                                  bias, bt, mask, spec, reduction, chunk_rows)
