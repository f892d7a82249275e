"""Fused loss kernels for rule distillation (Triton), each with a plain-PyTorch reference and a
PyTorch path that runs anywhere.

* :func:`fused_linear_kl` — lm_head + ``T²·KL(teacher ‖ student)`` without the [N, V] logits.
* :func:`normalized_hidden_mse` — per-layer L2-normalised hidden-state MSE over a sequence of layers.

This package imports only ``torch`` and ``triton`` (and the standard library); ``rdcore`` builds on
it and nothing here imports ``rdcore``. ``tests/test_import_layers.py`` enforces that.
"""

from kernels.hidden_mse import normalized_hidden_mse
from kernels.hidden_mse_torch import normalized_hidden_mse_reference
from kernels.linear_kl import fused_linear_kl
from kernels.linear_kl_torch import linear_kl_reference

__all__ = ["fused_linear_kl", "linear_kl_reference", "normalized_hidden_mse",
           "normalized_hidden_mse_reference"]
