"""Fused loss kernels for rule distillation (Triton), each with a plain-PyTorch reference and a
PyTorch path that runs anywhere. Installed and imported as ``rdcore.kernels`` (the source folder is
``kernels/`` at the top of the repository; nothing named ``kernels`` is put on ``sys.path``).

* :func:`fused_linear_kl` — lm_head + ``T²·KL(teacher ‖ student)`` without the [N, V] logits.
* :func:`normalized_hidden_mse` — per-layer L2-normalised hidden-state MSE over a sequence of layers.

Layout (as ml-cross-entropy's): a public dispatcher per op (``linear_kl.py``, ``hidden_mse.py``),
its Triton kernels (``*_triton.py``) and PyTorch reference and path (``*_torch.py``), and the shared
helpers (``_common.py``). This package imports only ``torch`` and ``triton`` (and the standard
library); ``tests/test_import_layers.py`` enforces that.
"""

if __name__.endswith("rdcore.kernels"):
    from ._common import LogitSpec
    from .hidden_mse import normalized_hidden_mse
    from .hidden_mse_torch import normalized_hidden_mse_reference
    from .linear_kl import fused_linear_kl
    from .linear_kl_torch import linear_kl_reference

    __all__ = ["LogitSpec", "fused_linear_kl", "linear_kl_reference", "normalized_hidden_mse",
               "normalized_hidden_mse_reference"]
else:  # reached as `kernels` from the checkout's root: see _shadow.py
    from ._shadow import step_aside

    step_aside(__name__, __file__)
