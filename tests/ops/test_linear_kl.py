"""fused_linear_kl (chunked PyTorch path) against an fp64 ground truth, ml-cross-entropy style: the
op's error may be no worse than plain PyTorch's at the same dtype plus a small tolerance."""

import pytest
import torch

from rdcore.kernels.linear_kl import fused_linear_kl
from rdcore.kernels.linear_kl_torch import linear_kl_reference

IMPLS = ["torch", "triton"]

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def make(N, H, V, Ht=None, dtype=torch.float32, scale=1.0, seed=0, separate=False):
    g = torch.Generator().manual_seed(seed)
    Ht = Ht or H
    x = torch.randn(N, H, generator=g, dtype=torch.float64) * scale
    noise = torch.randn(N, Ht, generator=g, dtype=torch.float64) * scale
    xt = x + 0.3 * noise if Ht == H else noise
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * H**-0.5
    wt = torch.randn(V, Ht, generator=g, dtype=torch.float64) * Ht**-0.5 if separate or Ht != H else None
    return x, xt, w, wt


def run(fn, x, xt, w, wt, dtype, grad_out=None, **kw):
    """Value and gradients (x, w) of fn at ``dtype``, returned in fp64."""
    xs = x.detach().to(dtype).clone().requires_grad_()
    ws = w.detach().to(dtype).clone().requires_grad_()
    out = fn(xs, xt.to(dtype), ws, None if wt is None else wt.to(dtype), **kw)
    g = torch.ones_like(out) if grad_out is None else grad_out.to(out.dtype)
    out.backward(g)
    return out.double().detach(), xs.grad.double(), ws.grad.double()


def err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


CASES = [
    dict(N=41, H=40, V=1271),                      # odd shapes
    dict(N=1, H=16, V=257),                        # one row
    dict(N=33, H=24, V=500, Ht=40),                # separate teacher weight, other hidden size
    dict(N=20, H=16, V=300, separate=True),        # separate teacher weight, same size
    dict(N=17, H=32, V=777, scale=60.0),           # extreme logits (|logit| ~ 1e3)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(str(v) for v in c.values()))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", IMPLS)
def test_against_fp64_truth(case, dtype, reduction, impl):
    case = dict(case)
    scale = case.pop("scale", 1.0)
    separate = case.pop("separate", False)
    x, xt, w, wt = make(**case, scale=scale, separate=separate)
    if dtype == torch.float16 and scale > 1:
        pytest.skip("fp16 overflows at |logit| ~ 1e3 in PyTorch itself")
    N = x.shape[0]
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(N, generator=g) > 0.3
    grad_out = torch.rand(N, dtype=torch.float64) if reduction == "none" else torch.tensor(0.37)
    kw = dict(mask=mask, temperature=1.7, reduction=reduction)
    truth = run(linear_kl_reference, x, xt, w, wt, torch.float64, grad_out, **kw)
    # chunks of 7 rows: several chunks, the last one partial
    ours = run(lambda *a, **k: fused_linear_kl(*a, impl=impl, chunk_rows=7, **k), x, xt, w, wt,
               dtype, grad_out, **kw)
    torch_same = run(linear_kl_reference, x, xt, w, wt, dtype, grad_out, **kw)
    for name, o, t, p in zip(("value", "dx", "dw"), ours, truth, torch_same):
        assert torch.isfinite(o).all(), name
        assert err(o, t) <= err(p, t) + TOL[dtype], (name, err(o, t), err(p, t))
    if reduction == "none":
        assert (ours[0][~mask] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_masked_gives_zero_not_nan(impl):
    x, xt, w, _ = make(9, 8, 100)
    xs = x.float().requires_grad_()
    ws = w.float().requires_grad_()
    out = fused_linear_kl(xs, xt.float(), ws, mask=torch.zeros(9, dtype=torch.bool), impl=impl)
    out.backward()
    assert out.item() == 0 and (xs.grad == 0).all() and (ws.grad == 0).all()


def test_real_vocabulary_and_chunking():
    x, xt, w, _ = make(12, 16, 50257)
    truth = run(linear_kl_reference, x, xt, w, None, torch.float64)
    ours = run(lambda *a, **k: fused_linear_kl(*a, impl="torch", chunk_rows=5, **k), x, xt, w,
               None, torch.float32)
    for o, t in zip(ours, truth):
        assert err(o, t) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_teacher_side_is_a_constant(impl):
    x, xt, w, _ = make(10, 8, 64)
    xs = x.float().requires_grad_()
    xts = xt.float().requires_grad_()
    ws = w.float().requires_grad_()
    fused_linear_kl(xs, xts, ws, impl=impl).backward()  # teacher_weight None: same tensor
    assert xts.grad is None and xs.grad is not None
    # the gradient through W is the student part only: compare with a detached teacher copy
    ws2 = w.float().requires_grad_()
    fused_linear_kl(x.float(), xt.float(), ws2, w.float().clone(), impl=impl).backward()
    torch.testing.assert_close(ws.grad, ws2.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    x, xt, w, _ = make(16, 24, 200)
    xw = torch.stack([x, torch.zeros_like(x)], -1).reshape(16, 48)[:, ::2]  # strided view of x
    assert not xw.is_contiguous()
    wT = w.T.contiguous().T  # column-major weight
    a = run(lambda *a, **k: fused_linear_kl(*a, impl=impl), xw, xt, wT, None, torch.float32)
    b = run(lambda *a, **k: fused_linear_kl(*a, impl=impl), x, xt, w, None, torch.float32)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("impl", IMPLS)
def test_identical_teacher_and_student_give_zero(impl):
    x, _, w, _ = make(7, 8, 50)
    out = fused_linear_kl(x.float(), x.float(), w.float(), impl=impl)
    assert abs(out.item()) < 1e-6


def test_bad_arguments():
    x, xt, w, _ = make(4, 8, 20)
    x, xt, w = x.float(), xt.float(), w.float()
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_kl(x, xt, w, reduction="avg")
    with pytest.raises(ValueError, match="shape mismatch"):
        fused_linear_kl(x, xt, w[:, :4])
    with pytest.raises(ValueError, match="mask must be a bool"):
        fused_linear_kl(x, xt, w, mask=torch.ones(4))
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_kl(x, xt, w, temperature=0)
    with pytest.raises(ValueError, match="dtype mismatch"):
        fused_linear_kl(x, xt, w.double())


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_weight_gets_no_gradient_and_dx_is_right(impl):
    x, xt, w, _ = make(11, 8, 90)
    xs = x.float().requires_grad_()
    fused_linear_kl(xs, xt.float(), w.float(), temperature=2.0, impl=impl).backward()
    xr = x.clone().requires_grad_()
    linear_kl_reference(xr, xt, w, temperature=2.0).backward()
    assert err(xs.grad.double(), xr.grad) < 1e-5
