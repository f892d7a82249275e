"""The hard-label term of the trainer (the KL and hidden-state terms are the fused ops of
:mod:`kernels`).

``ce_rows``: token cross-entropy per row [N] (fp32) from logits [N, V] of the distilled rows only
(never full-sequence logits); the trainer weights and sums the rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ce_rows(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy per row [N] (fp32)."""
    return F.cross_entropy(logits_NV.float(), targets_N, reduction="none")
