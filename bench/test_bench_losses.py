"""Microbenchmarks of the loss terms on distilled rows (plain PyTorch, CPU-sized shapes).

Run with ``make bench``. These time rdcore's current unfused terms; the fused kernels get their own
benchmarks next to them.
"""

import pytest
import torch

from rdcore.losses import hidden_mse_rows, kl_rows

SHAPES = [(64, 576, 49152), (256, 256, 8192)]  # (N rows, H, V): SmolLM2's vocabulary, a small one


@pytest.mark.parametrize("N,H,V", SHAPES)
def test_kl_forward_backward(benchmark, N, H, V):
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(N, H, generator=g, requires_grad=True)
    ht = torch.randn(N, H, generator=g)
    w = (torch.randn(V, H, generator=g) * H**-0.5).requires_grad_()

    def step():
        loss = kl_rows(hs @ w.T, ht @ w.T).sum()
        loss.backward()
        return loss

    loss = benchmark(step)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("L,N,H", [(30, 64, 576)])
def test_hidden_mse_forward_backward(benchmark, L, N, H):
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(N, H, generator=g, requires_grad=True) for _ in range(L)]
    t = [torch.randn(N, H, generator=g) for _ in range(L)]

    def step():
        loss = hidden_mse_rows(s, t).sum()
        loss.backward()
        return loss

    assert torch.isfinite(benchmark(step))
