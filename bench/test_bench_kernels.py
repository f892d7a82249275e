"""pytest-benchmark microbenchmarks of the two loss ops (``make bench``), forward+backward.

Providers: ``naive`` (plain PyTorch, full logits), ``torch`` (chunked PyTorch path) and, on CUDA,
``triton``. CPU-sized shapes here; ``bench/bench_kernels.py`` measures memory and the target shapes.
"""

import pytest
import torch

from rdcore.kernels import fused_linear_kl, normalized_hidden_mse
from rdcore.kernels.hidden_mse_torch import normalized_hidden_mse_reference
from rdcore.kernels.linear_kl_torch import linear_kl_reference

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
PROVIDERS = ["naive", "torch"] + (["triton"] if CUDA else [])


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("N,H,V", [(256, 576, 49152), (1024, 256, 8192)])
def test_linear_kl(benchmark, provider, N, H, V):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(N, H, generator=g, device=DEV, requires_grad=True)
    xt = torch.randn(N, H, generator=g, device=DEV)
    w = (torch.randn(V, H, generator=g, device=DEV) * H**-0.5).requires_grad_()
    fn = linear_kl_reference if provider == "naive" else (
        lambda *a: fused_linear_kl(*a, impl=provider))

    def step():
        loss = fn(x, xt, w)
        loss.backward()
        _sync()
        return loss

    assert torch.isfinite(benchmark(step))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("L,N,H", [(30, 1024, 576)])
def test_hidden_mse(benchmark, provider, L, N, H):
    g = torch.Generator(device=DEV).manual_seed(0)
    s = [torch.randn(N, H, generator=g, device=DEV, requires_grad=True) for _ in range(L)]
    t = [torch.randn(N, H, generator=g, device=DEV) for _ in range(L)]
    fn = normalized_hidden_mse_reference if provider == "naive" else (
        lambda a, b: normalized_hidden_mse(a, b, impl=provider))

    def step():
        loss = fn(s, t)
        loss.backward()
        _sync()
        return loss

    assert torch.isfinite(benchmark(step))
