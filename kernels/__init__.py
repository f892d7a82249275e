"""Fused loss kernels for rule distillation (Triton, with PyTorch reference and chunked paths).

This package imports only ``torch`` and ``triton`` (and the standard library); ``rdcore`` builds on
it and nothing here imports ``rdcore``. A test (``tests/test_import_layers.py``) enforces that.
"""
