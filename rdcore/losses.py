"""The rule-distillation loss terms on gathered rows, one value per row (normalised by the caller).

Shapes: N distilled rows, V vocabulary, H hidden size, L layers.

* ``kl_rows``: ``T² · KL(softmax(t_n/T) ‖ softmax(s_n/T))`` per row from student/teacher logits
  [N, V], computed in fp32. Only the N distilled rows ever get logits (never the whole sequence).
* ``hidden_mse_rows``: ``mean_{l,h} (ŝ_{l,n,h} − t̂_{l,n,h})²`` per row with ``x̂ = x / max(‖x‖₂, eps)``
  per row and layer (``F.normalize``), over L tensors [N, H].
* ``ce_rows``: token cross-entropy of student logits [N, V] against targets [N].

Each returns an fp32 vector [N]; the trainer weights and sums them.

These are plain-PyTorch terms on logits of the distilled rows; the fused lm_head+KL kernel
(``kernels``) removes the [N, V] logits altogether.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def kl_rows(student_logits_NV: torch.Tensor, teacher_logits_NV: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(teacher ‖ student) · T² per row [N]; the teacher side gets no gradient."""
    t = teacher_logits_NV.detach().float() / temperature
    s = student_logits_NV.float() / temperature
    log_p_t = F.log_softmax(t, dim=-1)
    log_p_s = F.log_softmax(s, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * temperature**2


def hidden_mse_rows(student_LNH: Sequence[torch.Tensor], teacher_LNH: Sequence[torch.Tensor]
                    ) -> torch.Tensor:
    """Normalised hidden-state MSE per row [N], averaged over layers and hidden units."""
    if len(student_LNH) != len(teacher_LNH) or not student_LNH:
        raise ValueError(f"need the same non-zero number of layers, got {len(student_LNH)} and "
                         f"{len(teacher_LNH)}")
    total = student_LNH[0].new_zeros(student_LNH[0].shape[0], dtype=torch.float32)
    for s, t in zip(student_LNH, teacher_LNH):
        diff = F.normalize(s.float(), dim=-1) - F.normalize(t.detach().float(), dim=-1)
        total = total + diff.pow(2).mean(-1)
    return total / len(student_LNH)


def ce_rows(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy per row [N] (fp32)."""
    return F.cross_entropy(logits_NV.float(), targets_N, reduction="none")
