"""Normalised hidden-state MSE over layers in PyTorch: the plain reference and the PyTorch path.

Formula (L layers, rows n, hidden units h, eps = 1e-12 as ``F.normalize``)::

    ŝ_ln = s_ln / max(‖s_ln‖₂, eps)        t̂_ln = t_ln / max(‖t_ln‖₂, eps)
    ℓ_n  = 1/(L·H) · Σ_l Σ_h (ŝ_lnh − t̂_lnh)²
    loss = Σ_n w_n ℓ_n,   w_n = mask_n / max(#selected, 1)

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


def _torch_hidden_mse(students: list[torch.Tensor], teachers: list[torch.Tensor],
                      w_N: torch.Tensor, want_grad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The PyTorch pass: the loss and, with ``want_grad``, each layer's gradient."""
    L = len(students)
    N, H = students[0].shape
    rows_N = students[0].new_zeros(N, dtype=torch.float32)
    grads = []
    for s, t in zip(students, teachers):
        s32 = s.float()
        norm_s = s32.norm(dim=-1, keepdim=True)
        s_hat = s32 / norm_s.clamp_min(EPS)
        t32 = t.float()
        d = s_hat - t32 / t32.norm(dim=-1, keepdim=True).clamp_min(EPS)
        rows_N += d.pow(2).sum(-1)
        if want_grad:
            g = d.mul_(2.0 / (L * H) * w_N[:, None])
            proj = (s_hat * g).sum(-1, keepdim=True)
            big = norm_s > EPS
            grad = torch.where(big, (g - s_hat * proj) / norm_s.clamp_min(EPS), g / EPS)
            grads.append(grad.to(s.dtype))
    return (rows_N * w_N).sum() / (L * H), grads
