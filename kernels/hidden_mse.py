"""Normalised hidden-state MSE over layers, forward and backward in one pass (Triton).

Formula (L layers, rows n, hidden units h, eps = 1e-12 as ``F.normalize``)::

    ŝ_ln = s_ln / max(‖s_ln‖₂, eps)        t̂_ln = t_ln / max(‖t_ln‖₂, eps)
    ℓ_n  = 1/(L·H) · Σ_l Σ_h (ŝ_lnh − t̂_lnh)²
    loss = Σ_n w_n ℓ_n,   w_n = mask_n / max(#selected, 1)

    gradient, with d = ŝ − t̂ and g = 2·w_n·d/(L·H):
        ∂loss/∂s_ln = (g − ŝ_ln (ŝ_ln·g)) / ‖s_ln‖      if ‖s_ln‖ > eps
                    = g / eps                              otherwise (the clamp is active)

Teacher states are constants. An all-zero vector normalises to zero (no NaN; finite gradient).

Shape letters: L layers — a *sequence* of L tensors [N, H], never stacked or copied into one —
N rows, H hidden size.

Algorithm: one launch per layer, one program per row; the row's H values sit in registers
(``BLOCK_H = next_pow2(H)``), so each layer's student and teacher states are read once and the
gradient written once — the op is bound by memory bandwidth (3·N·H elements per layer). Per-row
sums accumulate over layers in an fp32 [N] buffer (launches run in order, no atomics); gradients are
computed in the forward pass and backward scales them by ``grad_output``.

Dtype policy: inputs fp32/bf16/fp16; norms, differences and sums in fp32 (loaded values converted
before any arithmetic, which the Triton CPU interpreter also needs for bf16); gradients stored in the
states' dtype. The plain-PyTorch reference and PyTorch path live in ``kernels/hidden_mse_torch.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.hidden_mse_torch import EPS, hidden_mse_backward, hidden_mse_torch

MAX_H = 1 << 16


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _hidden_mse_layer_kernel(
    s_ptr, t_ptr, g_ptr, rows_ptr, w_ptr,
    H, stride_s, stride_t, stride_g,
    grad_scale, eps,
    WRITE_GRAD: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One row of one layer: rows[n] += Σ_h (ŝ − t̂)²; g = ∂(w_n·…·grad_scale)/∂s."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    valid = offs < H
    s = tl.load(s_ptr + row * stride_s + offs, mask=valid, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + row * stride_t + offs, mask=valid, other=0.0).to(tl.float32)
    norm_s = tl.sqrt(tl.sum(s * s, 0))
    norm_t = tl.sqrt(tl.sum(t * t, 0))
    inv_s = 1.0 / tl.maximum(norm_s, eps)
    s_hat = s * inv_s
    d = s_hat - t / tl.maximum(norm_t, eps)
    tl.store(rows_ptr + row, tl.load(rows_ptr + row) + tl.sum(d * d, 0))
    if WRITE_GRAD:
        g = d * (grad_scale * tl.load(w_ptr + row))
        proj = tl.sum(s_hat * g, 0)
        grad = tl.where(norm_s > eps, (g - s_hat * proj) * inv_s, g * inv_s)
        tl.store(g_ptr + row * stride_g + offs, grad.to(g_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_hidden_mse(students: list[torch.Tensor], teachers: list[torch.Tensor],
                       w_N: torch.Tensor, want_grad: bool):
    L = len(students)
    N, H = students[0].shape
    rows_N = torch.zeros(N, device=students[0].device, dtype=torch.float32)
    grads = []
    block_h = triton.next_power_of_2(H)
    warps = max(1, min(16, block_h // 256))
    for s, t in zip(students, teachers):
        if s.stride(1) != 1:
            s = s.contiguous()  # rows must be unit-stride; row strides may be anything
        if t.stride(1) != 1:
            t = t.contiguous()
        g = torch.empty_like(s, memory_format=torch.contiguous_format) if want_grad else s
        _hidden_mse_layer_kernel[(N,)](
            s, t, g, rows_N, w_N,
            H, s.stride(0), t.stride(0), g.stride(0),
            2.0 / (L * H), EPS,
            WRITE_GRAD=want_grad, BLOCK_H=block_h, num_warps=warps)
        if want_grad:
            grads.append(g)
    return (rows_N * w_N).sum() / (L * H), grads


class _HiddenMSETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mask, L: int, *states):
        students, teachers = list(states[:L]), list(states[L:])
        N = students[0].shape[0]
        w_N = torch.ones(N, device=students[0].device) if mask is None else mask.float()
        w_N = w_N / w_N.sum().clamp_min(1)
        need = any(ctx.needs_input_grad[2:2 + L])
        loss, grads = _triton_hidden_mse(students, teachers, w_N, need)
        if need:
            ctx.save_for_backward(*grads)
        ctx.L = L
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        return hidden_mse_backward(ctx, grad_out)


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def normalized_hidden_mse(student_states: Sequence[torch.Tensor],
                          teacher_states: Sequence[torch.Tensor], *,
                          mask: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """Mean over selected rows of the layer- and unit-averaged squared difference of L2-normalised
    states. ``student_states``/``teacher_states``: sequences of L tensors [N, H]; ``mask`` [N] bool.
    Gradient to the student states only. ``impl``: "triton" (CUDA, or CPU under
    ``TRITON_INTERPRET=1``), "torch", or "auto" (Triton on CUDA, torch elsewhere)."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    students, teachers = list(student_states), list(teacher_states)
    if not students or len(students) != len(teachers):
        raise ValueError(f"need the same non-zero number of student and teacher layers, got "
                         f"{len(students)} and {len(teachers)}")
    shape = students[0].shape
    if len(shape) != 2 or any(x.shape != shape for x in students + teachers):
        raise ValueError(f"every state must be [N, H] with one shape; got "
                         f"{sorted({tuple(x.shape) for x in students + teachers})}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (shape[0],)):
        raise ValueError(f"mask must be a bool tensor of shape [{shape[0]}]")
    teachers = [t.detach() for t in teachers]
    use_triton = impl == "triton" or (impl == "auto" and students[0].is_cuda)
    if not use_triton:
        return hidden_mse_torch(students, teachers, mask)
    if not students[0].is_cuda and not _interpreting():
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         "importing triton, for CPU tests); use impl='torch' on CPU")
    if shape[1] > MAX_H:
        raise ValueError(f"hidden size {shape[1]} exceeds the Triton kernel's limit {MAX_H}; "
                         "use impl='torch'")
    return _HiddenMSETriton.apply(mask, len(students), *students, *teachers)
