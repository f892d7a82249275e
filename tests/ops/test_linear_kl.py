"""fused_linear_kl (chunked PyTorch path) against an fp64 ground truth, ml-cross-entropy style: the
op's error may be no worse than plain PyTorch's at the same dtype plus a small tolerance."""

import pytest
import torch

from rdcore.kernels.linear_kl import fused_linear_kl
from rdcore.kernels.linear_kl_torch import linear_kl_reference

IMPLS = ["torch", "triton"]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
"""Where the op under test runs (the fp64 truth stays on the CPU): a GPU when there is one
(``make gpu-check``), else the CPU (Triton through its interpreter)."""

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
    """Value and gradients (x, w) of fn at ``dtype`` (on :data:`DEVICE` unless fp64), returned in
    fp64 on the CPU."""
    dev = torch.device("cpu") if dtype == torch.float64 else DEVICE
    kw = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    xs = x.detach().to(dev, dtype).clone().requires_grad_()
    ws = w.detach().to(dev, dtype).clone().requires_grad_()
    out = fn(xs, xt.to(dev, dtype), ws, None if wt is None else wt.to(dev, dtype), **kw)
    g = torch.ones_like(out) if grad_out is None else grad_out.to(dev, out.dtype)
    out.backward(g)
    return out.double().detach().cpu(), xs.grad.double().cpu(), ws.grad.double().cpu()


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
    # chunks of 14 rows: several chunks, the last one partial (41 = 14 + 14 + 13)
    ours = run(lambda *a, **k: fused_linear_kl(*a, impl=impl, chunk_rows=14, **k), x, xt, w, wt,
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
    xs = x.float().to(DEVICE).requires_grad_()
    ws = w.float().to(DEVICE).requires_grad_()
    none = torch.zeros(9, dtype=torch.bool, device=DEVICE)
    out = fused_linear_kl(xs, xt.float().to(DEVICE), ws, mask=none, impl=impl)
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
    xs = x.float().to(DEVICE).requires_grad_()
    xts = xt.float().to(DEVICE).requires_grad_()
    ws = w.float().to(DEVICE).requires_grad_()
    fused_linear_kl(xs, xts, ws, impl=impl).backward()  # teacher_weight None: same tensor
    assert xts.grad is None and xs.grad is not None
    # the gradient through W is the student part only: compare with a detached teacher copy
    ws2 = w.float().to(DEVICE).requires_grad_()
    fused_linear_kl(x.float().to(DEVICE), xt.float().to(DEVICE), ws2, w.float().to(DEVICE).clone(),
                    impl=impl).backward()
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
    out = fused_linear_kl(x.float().to(DEVICE), x.float().to(DEVICE), w.float().to(DEVICE), impl=impl)
    assert abs(out.item()) < 1e-6


def test_bad_arguments():
    x, xt, w, _ = make(4, 8, 20)
    x, xt, w = x.float().to(DEVICE), xt.float().to(DEVICE), w.float().to(DEVICE)
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
    xs = x.float().to(DEVICE).requires_grad_()
    fused_linear_kl(xs, xt.float().to(DEVICE), w.float().to(DEVICE), temperature=2.0, impl=impl).backward()
    xr = x.clone().requires_grad_()
    linear_kl_reference(xr, xt, w, temperature=2.0).backward()
    assert err(xs.grad.double().cpu(), xr.grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_logit_transform_and_bias_against_fp64_truth(dtype, impl):
    """The model's own logit transform — Gemma 2's final-logit softcap, Cohere/Granite's scale —
    and an lm_head bias (gradient included), several chunks, T ≠ 1, grad_output ≠ 1."""
    x, xt, w, _ = make(29, 24, 701, scale=3.0)
    g = torch.Generator().manual_seed(5)
    b = torch.randn(701, generator=g, dtype=torch.float64)
    kw = dict(temperature=1.4, logit_scale=0.6, softcap=2.5)

    def with_bias(fn, dt, impl_kw):
        dev = torch.device("cpu") if dt == torch.float64 else DEVICE
        xs = x.to(dev, dt).clone().requires_grad_()
        ws = w.to(dev, dt).clone().requires_grad_()
        bs = b.to(dev, dt).clone().requires_grad_()
        out = fn(xs, xt.to(dev, dt), ws, bias=bs, **kw, **impl_kw)
        (out * 0.8).backward()
        return [t.double().detach().cpu() for t in (out, xs.grad, ws.grad, bs.grad)]

    truth = with_bias(linear_kl_reference, torch.float64, {})
    same = with_bias(linear_kl_reference, dtype, {})
    ours = with_bias(fused_linear_kl, dtype, dict(impl=impl, chunk_rows=8))
    for name, o, t, p in zip(("value", "dx", "dw", "db"), ours, truth, same):
        assert err(o, t) <= err(p, t) + TOL[dtype], (name, err(o, t), err(p, t))
    # and the transform matters: without it the value is another one
    plain = fused_linear_kl(x.float().to(DEVICE), xt.float().to(DEVICE), w.float().to(DEVICE),
                            bias=b.float().to(DEVICE), temperature=1.4, impl=impl)
    assert abs(plain.item() - truth[0].item()) > 1e-2 * truth[0].item()


@pytest.mark.parametrize("overlap", [False, True], ids=["one-stream", "overlap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [dict(N=41, H=40, V=1271), dict(N=33, H=24, V=500, Ht=40)],
                         ids=["shared", "separate"])
def test_gradient_groups_against_fp64_truth(monkeypatch, case, dtype, overlap):
    """The Triton pass with chunks of 6 rows in groups of 18 (41 = 18 + 18 + 5: a partial last
    group, a partial chunk inside it): dX and dW once per group, g in a group buffer — also with
    the row kernel overlapping the next GEMM (two logits buffers; on a GPU, a second stream)."""
    from rdcore.kernels import linear_kl_triton as lkt

    monkeypatch.setattr(lkt, "GROUP_ROWS", 18)
    monkeypatch.setattr(lkt, "OVERLAP", overlap)
    x, xt, w, wt = make(**case, scale=2.0)
    N = x.shape[0]
    mask = torch.rand(N, generator=torch.Generator().manual_seed(5)) > 0.3
    grad_out = torch.tensor(0.45)
    kw = dict(mask=mask, temperature=1.2)
    truth = run(linear_kl_reference, x, xt, w, wt, torch.float64, grad_out, **kw)
    same = run(linear_kl_reference, x, xt, w, wt, dtype, grad_out, **kw)
    ours = run(lambda *a, **k: fused_linear_kl(*a, impl="triton", chunk_rows=6, **k), x, xt, w,
               wt, dtype, grad_out, **kw)
    for name, o, t, p in zip(("value", "dx", "dw"), ours, truth, same):
        assert err(o, t) <= err(p, t) + TOL[dtype], (name, err(o, t), err(p, t))


def test_overlap_with_the_gradient_over_the_student_logits(monkeypatch):
    """fp32 with one chunk per group: g is written over the student logits, in whichever of the
    two logits buffers the chunk used — dX and dW must read that one."""
    from rdcore.kernels import linear_kl_triton as lkt

    monkeypatch.setattr(lkt, "OVERLAP", True)
    x, xt, w, wt = make(N=23, H=24, V=301, scale=2.0)
    grad_out = torch.tensor(0.8)
    truth = run(linear_kl_reference, x, xt, w, wt, torch.float64, grad_out, temperature=1.1)
    same = run(linear_kl_reference, x, xt, w, wt, torch.float32, grad_out, temperature=1.1)
    ours = run(lambda *a, **k: fused_linear_kl(*a, impl="triton", chunk_rows=5, **k), x, xt, w,
               wt, torch.float32, grad_out, temperature=1.1)
    for name, o, t, p in zip(("value", "dx", "dw"), ours, truth, same):
        assert err(o, t) <= err(p, t) + TOL[torch.float32], (name, err(o, t), err(p, t))


def test_chunk_geometry_follows_the_problem():
    from rdcore.kernels.linear_kl_torch import CHUNK_ROWS, torch_chunk_rows
    from rdcore.kernels.linear_kl_triton import CHUNK_BUFFER_BYTES, triton_geometry

    # CPU: the GEMMs at their best (256 rows) whatever H and V, evened out over the chunks
    assert torch_chunk_rows(1024, 262144, 640) == CHUNK_ROWS
    assert torch_chunk_rows(4096, 32000, 2048) == CHUNK_ROWS
    assert torch_chunk_rows(8192, 128256, 64) == CHUNK_ROWS
    assert torch_chunk_rows(5000, 32000, 512) == 250  # 20 even chunks, not 19 + 136 rows
    assert torch_chunk_rows(300, 32000, 600) == 150
    # fits one chunk: cut into chunks of >= 80 rows where halving the buffer would save
    # >= SPLIT_SAVING of the op's memory (the [2N, V] buffer against the fp32 dW) and the
    # [2N, V] fp32 buffer is >= 128 MiB
    assert torch_chunk_rows(256, 262144, 512) == 86  # halving saves 25 %: 3 chunks
    assert torch_chunk_rows(256, 128256, 512) == 86  # 250 MiB
    assert torch_chunk_rows(256, 32000, 512) == 256  # saves 25 %, but of 62.5 MiB: whole
    assert torch_chunk_rows(200, 131072, 512) == 100  # 2 chunks of >= 80 rows
    assert torch_chunk_rows(240, 131072, 1024) == 240  # 16 %: one chunk
    assert torch_chunk_rows(256, 128256, 2048) == 256  # 10 %: one chunk, 10-18 % faster
    assert torch_chunk_rows(256, 128256, 2048, want_dw=False) == 86  # no dW: saves half
    assert torch_chunk_rows(150, 262144, 512) == 150  # halves below SPLIT_ROWS
    assert torch_chunk_rows(0, 32000, 512) == 1
    # Triton: logits chunk and gradient group within the buffer budget, evened out, C a multiple
    # of 64 and R of C
    for N, V in [(8192, 128256), (1024, 262144), (5000, 128256), (100000, 262144)]:
        C, R = triton_geometry(N, V, torch.bfloat16)
        assert C % 64 == 0 and R % C == 0 and C * V * 8 + R * V * 2 <= 1.05 * CHUNK_BUFFER_BYTES
        assert (N % C) % 64 == (N % 64)  # the last chunk too, when N is a multiple of 64
        assert R >= 4 * C or R >= N  # the dW update runs on several chunks' rows
    assert triton_geometry(8192, 128256, torch.bfloat16) == (256, 2048)  # 4 groups of 8 chunks
    assert triton_geometry(300, 32000, torch.float32) == (300, 300)  # fits: one chunk
    assert triton_geometry(300, 32000, torch.float32, chunk_rows=64) == (64, 64)
    assert triton_geometry(300, 32000, torch.float32, chunk_rows=64, group_rows=100) == (64, 128)
    assert triton_geometry(300, 32000, torch.float32, chunk_rows=64, group_rows=1000) == (64, 320)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory
                    < 60 * 2**30, reason="a head of more than 2^31 elements needs a large GPU")
def test_a_head_beyond_int32_offsets():
    """V·H ≥ 2³¹ (262144 × 8448 bf16): the GEMM's int64 offsets; against the chunked PyTorch path,
    whose matmuls are cuBLAS's."""
    V, H, N = 262144, 8448, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(V, H, device="cuda", generator=g) * H**-0.5).to(torch.bfloat16)
    x = torch.randn(N, H, device="cuda", generator=g, dtype=torch.bfloat16)
    xt = (x.float() + 0.3 * torch.randn(N, H, device="cuda", generator=g)).to(torch.bfloat16)
    assert w.numel() >= 2**31
    got, want = (fused_linear_kl(x, xt, w, impl=impl) for impl in ("triton", "torch"))
    assert abs(got.item() - want.item()) <= 2e-2 * abs(want.item())


def test_the_same_head_passed_again_takes_the_shared_path(monkeypatch):
    """``teacher_weight=weight.detach()`` (what a caller holding one head passes) is the shared
    head: one logits GEMM over [x̃; x] per chunk, the same result as ``teacher_weight=None``."""
    from rdcore.kernels import linear_kl_torch

    calls = []
    real = linear_kl_torch._logits_into
    monkeypatch.setattr(linear_kl_torch, "_logits_into",
                        lambda out, *a: calls.append(out.shape[0]) or real(out, *a))
    x, xt, w, _ = make(N=20, H=16, V=300)
    x, xt, w = x.float().requires_grad_(), xt.float(), w.float().requires_grad_()
    got = fused_linear_kl(x, xt, w, w.detach(), impl="torch", chunk_rows=8)
    assert calls == [16, 16, 8]  # [x̃; x] of 8, 8 and 4 rows
    calls.clear()
    want = fused_linear_kl(x, xt, w, None, impl="torch", chunk_rows=8)
    assert len(calls) == 3 and torch.equal(got, want)
    calls.clear()  # a different head (other memory, equal values) is not taken for the same one
    fused_linear_kl(x, xt, w, w.detach().clone(), impl="torch", chunk_rows=8)
    assert calls == [8, 8, 8, 8, 4, 4]


@pytest.mark.parametrize("group", [None, 20], ids=["group=chunk", "group=2chunks"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("head", ["shared", "separate"])
def test_library_gemm_path_against_fp64_truth(monkeypatch, head, reduction, group):
    """The Triton pass with every GEMM through the library (``torch.addmm``: on CUDA, cuBLAS with
    an fp32 output for bf16/fp16; forced here with fp32 operands so the CPU runs it): the scale,
    bias and softcap in its epilogue, the first chunk's dW written and the others added, one GEMM
    over [x̃; x] for a shared head — against the fp64 truth, several chunks, grad_output ≠ 1."""
    from rdcore.kernels import linear_kl_triton as lkt

    calls = {"library": 0, "triton": 0}
    real_lib, real_triton = lkt._library_addmm, lkt._matmul
    monkeypatch.setattr(lkt, "LIBRARY_GEMM", "always")
    monkeypatch.setattr(lkt, "GROUP_ROWS", group)
    monkeypatch.setattr(lkt, "_library_addmm", lambda *a: calls.__setitem__(
        "library", calls["library"] + 1) or real_lib(*a))
    monkeypatch.setattr(lkt, "_matmul", lambda *a, **k: calls.__setitem__(
        "triton", calls["triton"] + 1) or real_triton(*a, **k))
    x, xt, w, wt = make(N=23, H=24, V=301, scale=2.0, separate=head == "separate")
    bias = torch.randn(301, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    N = x.shape[0]
    mask = torch.rand(N, generator=torch.Generator().manual_seed(4)) > 0.3
    grad_out = torch.rand(N, dtype=torch.float64) if reduction == "none" else torch.tensor(0.6)
    kw = dict(mask=mask, temperature=1.3, logit_scale=0.8, softcap=3.0, reduction=reduction)
    if head == "shared":
        kw["bias"] = bias
    truth = run(linear_kl_reference, x, xt, w, wt, torch.float64, grad_out, **kw)
    same = run(linear_kl_reference, x, xt, w, wt, torch.float32, grad_out, **kw)
    ours = run(lambda *a, **k: fused_linear_kl(*a, impl="triton", chunk_rows=10, **k), x, xt, w,
               wt, torch.float32, grad_out, **kw)
    for name, o, t, p in zip(("value", "dx", "dw"), ours, truth, same):
        assert err(o, t) <= err(p, t) + TOL[torch.float32], (name, err(o, t), err(p, t))
    # 3 chunks (10, 10, 3 rows); per chunk 1 logits GEMM if shared, else 2; then per group (a
    # chunk, or 20 rows: 2 groups) dX and dW
    passes = 2 if reduction == "none" else 1  # "none": a losses-only pass, then the gradients
    logits = 1 if head == "shared" else 2
    groups = 3 if group is None else 2
    assert calls == {"library": 3 * logits * passes + groups * 2, "triton": 0}


def test_library_gemm_check_refuses_a_wrong_or_failing_product(monkeypatch):
    """``library_gemm_works`` says yes for a form only when it gives the fp32 product: a library
    that rounds, ignores the accumulation, drops the bias or raises is not used for that form."""
    from rdcore.kernels import linear_kl_triton as lkt

    cpu = torch.device("cpu")
    real = lkt._library_addmm

    def rounded(a, b, c, alpha, bias, accumulate):  # the product rounded through bf16
        real(a, b, c, alpha, bias, accumulate)
        c.copy_(c.bfloat16().float())

    def no_accumulation(a, b, c, alpha, bias, accumulate):
        real(a, b, c, alpha, bias, False)

    def no_bias(a, b, c, alpha, bias, accumulate):
        real(a, b, c, alpha, None, accumulate)

    def raising(*_):
        raise RuntimeError("out_dtype is not supported on this device")

    forms = ("plain", "bias", "accumulate")
    try:
        for fake, expected in ((real, (True, True, True)), (rounded, (False, False, False)),
                               (no_accumulation, (True, True, False)),
                               (no_bias, (True, False, True)), (raising, (False, False, False))):
            lkt.library_gemm_works.cache_clear()
            monkeypatch.setattr(lkt, "_library_addmm", fake)
            got = tuple(lkt.library_gemm_works(cpu, torch.float32, torch.float32, f)
                        for f in forms)
            assert got == expected, fake.__name__
        # an output in the operands' own dtype (dX) is judged to that dtype's rounding
        monkeypatch.setattr(lkt, "_library_addmm", real)
        lkt.library_gemm_works.cache_clear()
        assert all(lkt.library_gemm_works(cpu, torch.bfloat16, torch.bfloat16, f) for f in forms)
        monkeypatch.setattr(lkt, "_library_addmm", no_accumulation)
        lkt.library_gemm_works.cache_clear()
        assert not lkt.library_gemm_works(cpu, torch.bfloat16, torch.bfloat16, "accumulate")
    finally:
        lkt.library_gemm_works.cache_clear()


def test_the_triton_pass_makes_one_logits_gemm_for_a_shared_head(monkeypatch):
    """A shared head (``teacher_weight=None`` or the same tensor again): one logits GEMM over
    [x̃; x] per chunk (2·rows rows) into one buffer; a separate head: two."""
    from rdcore.kernels import linear_kl_triton as lkt

    rows = []
    real = lkt._gemm
    monkeypatch.setattr(lkt, "_gemm", lambda a, b, c, **k: rows.append(
        (a.shape[0], b.shape[1])) or real(a, b, c, **k))
    x, xt, w, _ = make(N=12, H=8, V=130)
    x, xt, w = x.float().to(DEVICE), xt.float().to(DEVICE), w.float().to(DEVICE)
    fused_linear_kl(x, xt, w, w, impl="triton", chunk_rows=8)  # no gradient wanted
    assert rows == [(16, 130), (8, 130)]
    rows.clear()
    fused_linear_kl(x, xt, w, w.clone(), impl="triton", chunk_rows=8)
    assert rows == [(8, 130), (8, 130), (4, 130), (4, 130)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 3, 64, 129, 1271])
def test_weight_grad_casts_in_its_own_storage(monkeypatch, V, dtype):
    """The fp32 dW accumulator of a 2-byte weight is two row pieces; ``result()`` writes the cast
    over the first piece's own storage (no second [V, H] allocation), bit-equal to ``.to(dtype)``
    of the whole fp32 matrix — with slabs small enough that many double-sized slabs run."""
    from rdcore.kernels._common import WeightGrad

    monkeypatch.setattr(WeightGrad, "FIRST_SLAB", 7)
    H = 13
    dw = WeightGrad(V, H, device=torch.device("cpu"), acc_dtype=torch.float32, out_dtype=dtype)
    full = torch.randn(V, H, generator=torch.Generator().manual_seed(V)) * 1e3
    for v0, piece in dw.pieces:
        piece.copy_(full[v0:v0 + piece.shape[0]])
    first = dw.pieces[0][1]
    assert sum(p.shape[0] for _, p in dw.pieces) == V and first.shape[0] % 64 in (0, V % 64)
    got = dw.result()
    assert got.dtype == dtype and got.shape == (V, H) and got.is_contiguous()
    assert torch.equal(got, full.to(dtype))
    if V > 64:  # split: the result lives in the first piece's memory
        assert len(dw.pieces) == 0 and got.data_ptr() == first.data_ptr()
        assert got.untyped_storage().nbytes() == first.untyped_storage().nbytes() < full.nbytes


def test_weight_grad_of_an_fp32_weight_is_the_accumulator():
    from rdcore.kernels._common import WeightGrad

    dw = WeightGrad(300, 5, device=torch.device("cpu"), acc_dtype=torch.float32,
                    out_dtype=torch.float32)
    assert len(dw.pieces) == 1
    piece = dw.pieces[0][1]
    assert dw.result() is piece
