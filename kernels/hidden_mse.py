"""Normalised hidden-state MSE over layers, forward and backward in one pass: the public function.

    normalized_hidden_mse(student_states, teacher_states, *, mask=None, impl="auto")

The mean over selected rows of the layer- and unit-averaged squared difference of L2-normalised
states (the paper's hidden-state term). The formula, shapes and dtype policy are in
``hidden_mse_torch.py`` (the reference and the PyTorch path) and ``hidden_mse_triton.py`` (the
Triton kernels); this module checks the arguments and picks the path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import HiddenMSEFunction, use_triton
from .hidden_mse_torch import _torch_hidden_mse
from .hidden_mse_triton import _triton_hidden_mse


def normalized_hidden_mse(student_states: Sequence[torch.Tensor],
                          teacher_states: Sequence[torch.Tensor], *,
                          mask: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """Mean over selected rows of the layer- and unit-averaged squared difference of L2-normalised
    states. ``student_states``/``teacher_states``: sequences of L tensors [N, H]; ``mask`` [N] bool.
    Gradient to the student states only. ``impl``: "triton" (CUDA, or CPU under
    ``TRITON_INTERPRET=1``), "torch", or "auto" (Triton on CUDA, torch elsewhere)."""
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
    run_pass = _triton_hidden_mse if use_triton(impl, students[0]) else _torch_hidden_mse
    return HiddenMSEFunction.apply(run_pass, mask, len(students), *students,
                                   *[t.detach() for t in teachers])
