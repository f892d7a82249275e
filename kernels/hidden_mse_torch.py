"""Normalised hidden-state MSE over layers: the plain-PyTorch reference and the PyTorch path.

The Triton kernel lives in ``kernels/hidden_mse.py``, which also holds the public function.

Formula (L layers, rows n, hidden units h, eps = 1e-12 as ``F.normalize``)::

    ŝ_ln = s_ln / max(‖s_ln‖₂, eps)        t̂_ln = t_ln / max(‖t_ln‖₂, eps)
    ℓ_n  = 1/(L·H) · Σ_l Σ_h (ŝ_lnh − t̂_lnh)²
    loss = Σ_{n selected} ℓ_n / max(#selected, 1)

    gradient, with d = ŝ − t̂ and g = 2·w_n·d/(L·H):
        ∂loss/∂s_ln = (g − ŝ_ln (ŝ_ln·g)) / ‖s_ln‖      if ‖s_ln‖ > eps
                    = g / eps                              otherwise (the clamp is active)

Teacher states are constants. An all-zero vector normalises to zero (no NaN; finite gradient).

Shape letters: L layers (a *sequence* of tensors, never stacked into one), N rows, H hidden size.
Dtype policy: inputs fp32/bf16/fp16; norms, differences and the loss in fp32; gradients computed in
fp32 in the forward pass and stored in the states' dtype; backward scales them by ``grad_output``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

EPS = 1e-12


def normalized_hidden_mse_reference(student_states: Sequence[torch.Tensor],
                                    teacher_states: Sequence[torch.Tensor], *,
                                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch (autograd through ``F.normalize``); fp64 for fp64 inputs, else fp32."""
    acc = torch.float64 if student_states[0].dtype == torch.float64 else torch.float32
    rows = 0
    for s, t in zip(student_states, teacher_states):
        d = F.normalize(s.to(acc), dim=-1, eps=EPS) - F.normalize(t.detach().to(acc), dim=-1, eps=EPS)
        rows = rows + d.pow(2).mean(-1)
    rows = rows / len(student_states)
    if mask is None:
        return rows.mean()
    return torch.where(mask, rows, rows.new_zeros(())).sum() / mask.sum().clamp_min(1)


class _HiddenMSETorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mask, L: int, *states):
        students, teachers = states[:L], states[L:]
        N, H = students[0].shape
        w_N = (torch.ones(N, device=students[0].device) if mask is None else mask.float())
        w_N = w_N / w_N.sum().clamp_min(1)
        need = any(ctx.needs_input_grad[2:2 + L])
        rows_N = students[0].new_zeros(N, dtype=torch.float32)
        grads = []
        for s, t in zip(students, teachers):
            s32 = s.float()
            norm_s = s32.norm(dim=-1, keepdim=True)
            s_hat = s32 / norm_s.clamp_min(EPS)
            t32 = t.float()
            d = s_hat - t32 / t32.norm(dim=-1, keepdim=True).clamp_min(EPS)
            rows_N += d.pow(2).sum(-1)
            if need:
                g = d.mul_(2.0 / (L * H) * w_N[:, None])
                proj = (s_hat * g).sum(-1, keepdim=True)
                big = norm_s > EPS
                grad = torch.where(big, (g - s_hat * proj) / norm_s.clamp_min(EPS), g / EPS)
                grads.append(grad.to(s.dtype))
        if need:
            ctx.save_for_backward(*grads)
        ctx.L = L
        return (rows_N * w_N).sum() / (L * H)

    @staticmethod
    def backward(ctx, grad_out):
        return hidden_mse_backward(ctx, grad_out)


def hidden_mse_backward(ctx, grad_out):
    """Shared ``backward``: scale the gradients saved by the forward pass by ``grad_output``
    (skipped when it is exactly 1, checked on CPU only: on an accelerator the comparison would be a
    host sync). Inputs were ``(mask, L, *students, *teachers)``."""
    grads = ctx.saved_tensors
    if not (grad_out.device.type == "cpu" and bool(grad_out == 1)):
        grads = tuple(g * grad_out.to(g.dtype) for g in grads)
    return (None, None, *grads, *([None] * ctx.L))


def hidden_mse_torch(students: list[torch.Tensor], teachers: list[torch.Tensor],
                     mask: torch.Tensor | None) -> torch.Tensor:
    """The PyTorch path (arguments already checked; teacher tensors detached)."""
    return _HiddenMSETorch.apply(mask, len(students), *students, *teachers)
