import pytest
import torch

from rdcore.kernels.hidden_mse import normalized_hidden_mse
from rdcore.kernels.hidden_mse_torch import normalized_hidden_mse_reference

IMPLS = ["torch", "triton"]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
"""Where the op under test runs (fp64 truths on the CPU): a GPU when there is one."""

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def states(L, N, H, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(N, H, generator=g, dtype=torch.float64) for _ in range(L)]
    t = [x + 0.5 * torch.randn(N, H, generator=g, dtype=torch.float64) for x in s]
    return s, t


def run(fn, s, t, dtype, grad_out=1.0, **kw):
    dev = torch.device("cpu") if dtype == torch.float64 else DEVICE
    kw = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    leaves = [x.detach().to(dev, dtype).clone().requires_grad_() for x in s]
    out = fn(leaves, [x.to(dev, dtype) for x in t], **kw)
    (out * grad_out).backward()
    return [out.double().detach().cpu()] + [x.grad.double().cpu() for x in leaves]


def err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L,N,H", [(3, 41, 40), (1, 1, 7), (5, 17, 129)])
@pytest.mark.parametrize("impl", IMPLS)
def test_against_fp64_truth(L, N, H, dtype, impl):
    s, t = states(L, N, H)
    mask = torch.rand(N, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[0] = True
    truth = run(normalized_hidden_mse_reference, s, t, torch.float64, 0.41, mask=mask)
    ours = run(lambda a, b, **k: normalized_hidden_mse(a, b, impl=impl, **k), s, t, dtype, 0.41,
               mask=mask)
    plain = run(normalized_hidden_mse_reference, s, t, dtype, 0.41, mask=mask)
    for o, tr, p in zip(ours, truth, plain):
        assert err(o, tr) <= err(p, tr) + TOL[dtype]


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_vectors_masks_and_constant_teacher(impl):
    s, t = states(2, 6, 8)
    s[0][2] = 0.0
    t[1][3] = 0.0
    leaves = [x.float().to(DEVICE).requires_grad_() for x in s]
    teach = [x.float().to(DEVICE).requires_grad_() for x in t]
    out = normalized_hidden_mse(leaves, teach, impl=impl)
    out.backward()
    assert torch.isfinite(out) and all(torch.isfinite(x.grad).all() for x in leaves)
    assert all(x.grad is None for x in teach)
    ref = normalized_hidden_mse_reference([x.detach() for x in leaves], [x.detach() for x in teach])
    torch.testing.assert_close(out, ref)
    none = normalized_hidden_mse(leaves, teach, mask=torch.zeros(6, dtype=torch.bool, device=DEVICE),
                                 impl=impl)
    assert none.item() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_and_bad_arguments(impl):
    s, t = states(2, 8, 16)
    strided = [torch.stack([x, x], -1).reshape(8, 32)[:, ::2] for x in s]
    assert not strided[0].is_contiguous()
    a = normalized_hidden_mse([x.float().to(DEVICE) for x in strided],
                              [x.float().to(DEVICE) for x in t], impl=impl)
    b = normalized_hidden_mse([x.float().to(DEVICE) for x in s], [x.float().to(DEVICE) for x in t], impl=impl)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="same non-zero number"):
        normalized_hidden_mse(s, t[:1])
    with pytest.raises(ValueError, match="one shape"):
        normalized_hidden_mse([s[0], s[1][:4]], t)
    with pytest.raises(ValueError, match="impl must be"):
        normalized_hidden_mse(s, t, impl="cuda")


@pytest.mark.parametrize("H", [4100, 20000])
def test_long_and_odd_rows(H):
    """Rows longer than a register block go in tiles (Triton); an H that is not a multiple of 16."""
    s, t = states(2, 5, H)
    truth = run(normalized_hidden_mse_reference, s, t, torch.float64, 0.7)
    for impl in IMPLS:
        ours = run(lambda a, b, impl=impl, **k: normalized_hidden_mse(a, b, impl=impl, **k), s, t,
                   torch.float32, 0.7)
        for o, w in zip(ours, truth):
            assert err(o, w) < 1e-5, (impl, H)
