"""Linear (lm_head) + KL divergence in Triton: forward and backward without the N×V logits.

Formula: see ``linear_kl_torch.py`` (the same per-row loss and gradient; the logit transform of
:class:`~._common.LogitSpec`)::

    u_n = scale·(x_n·Wᵀ + b)      z_n = softcap(u_n) / T      ℓ_n = T²·KL(softmax(z̃_n) ‖ softmax(z_n))
    g_nv = T·scale·w_n·(q_nv − p_nv)·(1 − tanh²(u_nv/cap))   (the last factor only with a softcap)

Shape letters: N rows, H student hidden size, Ht teacher hidden size, V vocabulary, C rows of a chunk.

Algorithm (gradient in the forward pass): rows go in groups of R, each group in chunks of C
(:func:`triton_geometry`); only [2C, V] and [R, V] buffers exist, never [N, V]. Per chunk

1. GEMM: teacher and student logits (``u``, or ``z`` directly when there is no softcap: the scale
   and 1/T are folded into the epilogue, with the bias) into fp32 [C, V] buffers, straight from the
   fp32 accumulator — one GEMM over ``[x̃; x]`` into one [2C, V] buffer when the head is shared;
2. ``_kl_rows_kernel``: per row, online log-sum-exp over V of both, then ℓ_n and g, written into
   the group's [R, V] buffer of the input dtype (over the student logits when fp32 and R = C);

then per group

3. GEMM: dx = g·W and dW (+)= gᵀ·x into an fp32 accumulator (the first group writes it: no
   zero-fill); db = Σ_n g by a column sum. A group of several chunks reads and writes the fp32 dW
   fewer times, and gives both GEMMs R rows: the traffic a small-K dW update costs is what bounds
   a one-chunk group on a GPU.

The GEMMs (:func:`_gemm`): for bf16/fp16 operands on CUDA, the vendor library (cuBLAS through
``torch.addmm`` with ``out_dtype=torch.float32``: bf16 tensor-core products written as fp32, the
scale, bias and accumulation in its epilogue), where this torch supports it — checked once per
device, operand and output dtype and form on a small product (:func:`library_gemm_works`);
otherwise ``_matmul_kernel`` (fp32 IEEE dots, the CPU interpreter, a torch without ``out_dtype``).

Pointer offsets are int32 unless an operand spans 2³¹ elements or more (``INT64``: e.g. a 262144
vocabulary with H > 8192), so the common case keeps the cheaper address arithmetic and the large
one cannot wrap.

Dtype policy: fp32 inputs use IEEE fp32 dots (not TF32); bf16/fp16 inputs use tensor-core dots with
an fp32 accumulator. Logits, softmax statistics and losses are fp32; g is rounded to the input dtype
only as a GEMM operand; dW/db accumulate in fp32. Under ``TRITON_INTERPRET=1`` (CPU tests) loaded
values are converted to fp32 before any arithmetic (the interpreter computes wrongly on bf16).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Literal

import torch
import triton
import triton.language as tl

from ._common import KLGrads, KLProblem, WeightGrad, interpreting, is_recording, launch

CHUNK_BUFFER_BYTES = 900 << 20
"""Bytes (to a tile row) of the Triton path's buffers: the [2C, V] fp32 logits of a chunk and the
[R, V] gradient of a group (:func:`triton_geometry`): under the 1 GB that a trainable head at
N 8192, V 128256 may use beyond its fp32 dW accumulator."""
LOGITS_SHARE = 0.25
"""Share of :data:`CHUNK_BUFFER_BYTES` for the logits chunk (the rest holds the gradient group)."""
GROUP_ROWS: int | None = None
"""Rows per gradient group, overriding :func:`triton_geometry`'s choice (benchmarks sweep it)."""
OVERLAP = False
"""Run the row kernel on a second CUDA stream beside the next chunk's logits GEMM (two logits
buffers: one more [2C, V] fp32). Off until a GPU run shows it pays (``bench/sweep_kernels.py``
sweeps it: a ``:o`` geometry)."""
INT32_LIMIT = 2**31


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    alpha,
    ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] (+)= alpha · (A[M, K] · B[K, N] + bias[N]) with an fp32 accumulator; any strides."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n  # grouped launch order: neighbouring programs share B tiles
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if INT64:
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
        rk = rk.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    acc = acc * alpha
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _tanh(u):
    """tanh from one exp (no libdevice: the same code in the CPU interpreter): sign(u)·(1 − e)/(1 + e)
    with e = exp(−2|u|), which cannot overflow; absolute error ~1e-7."""
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def _capped(u, cap, inv_T, SOFTCAP: tl.constexpr):
    """z = softcap(u)/T (u already holds z when there is no softcap)."""
    if SOFTCAP:
        return _tanh(u / cap) * (cap * inv_T)
    return u


@triton.jit
def _kl_rows_kernel(
    s_ptr, t_ptr, g_ptr, loss_ptr, w_ptr,
    V, stride_s, stride_t, stride_g,
    cap, inv_T, T_sq, grad_scale,
    SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One row: ℓ = T²·Σ p (log p − log q) of z = softcap(u)/T; g = grad_scale·w·(q − p)·(1 − th²)."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    offs = tl.arange(0, BLOCK_V)

    m_s = tl.full((), float("-inf"), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    l_s = tl.zeros((), tl.float32)
    l_t = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):  # pass 1: online log-sum-exp of z and z̃
        valid = v0 + offs < V
        s = _capped(tl.load(s_row + v0 + offs, mask=valid, other=0.0).to(tl.float32), cap, inv_T,
                    SOFTCAP)
        t = _capped(tl.load(t_row + v0 + offs, mask=valid, other=0.0).to(tl.float32), cap, inv_T,
                    SOFTCAP)
        s = tl.where(valid, s, float("-inf"))
        t = tl.where(valid, t, float("-inf"))
        new_s = tl.maximum(m_s, tl.max(s, 0))
        new_t = tl.maximum(m_t, tl.max(t, 0))
        l_s = l_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(s - new_s), 0)
        l_t = l_t * tl.exp(m_t - new_t) + tl.sum(tl.exp(t - new_t), 0)
        m_s = new_s
        m_t = new_t
    log_l_s = tl.log(l_s)  # log q = (z − m) − log l: subtracting the max first keeps the fp32
    log_l_t = tl.log(l_t)  # rounding relative to the logit spread, not to |max|

    w = tl.load(w_ptr + row).to(tl.float32)
    acc = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):  # pass 2: loss terms and gradient
        valid = v0 + offs < V
        s = _capped(tl.load(s_row + v0 + offs, mask=valid, other=0.0).to(tl.float32), cap, inv_T,
                    SOFTCAP)
        t = _capped(tl.load(t_row + v0 + offs, mask=valid, other=0.0).to(tl.float32), cap, inv_T,
                    SOFTCAP)
        log_p = (t - m_t) - log_l_t
        log_q = (s - m_s) - log_l_s
        p = tl.exp(log_p)
        acc += tl.where(valid, p * (log_p - log_q), 0.0)
        if WRITE_GRAD:
            g = (grad_scale * w) * (tl.exp(log_q) - p)
            if SOFTCAP:
                th = s / (cap * inv_T)
                g = g * (1.0 - th * th)
            tl.store(g_ptr + row * stride_g + v0 + offs, g.to(g_ptr.dtype.element_ty), mask=valid)
    tl.store(loss_ptr + row, tl.sum(acc, 0) * T_sq)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def matmul_config(dtype: torch.dtype, aligned: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMM for operands of ``dtype``.
    ``aligned``: every operand's leading stride and base address allow 16-byte vector loads (the
    asynchronous-copy pipeline) and the inner and column dimensions are multiples of 16;
    otherwise a smaller tile with fewer stages, which stays in registers (every configuration is
    compiled for sm_80/sm_90 by ``python -m rdcore.kernels.aot``, in the test suite)."""
    if interpreting():
        return 64, 64, 32, 4, 1
    if dtype == torch.float32:  # IEEE fp32 dots: FFMA, registers are the limit (8 warps)
        return (64, 64, 32, 8, 3) if aligned else (32, 64, 32, 4, 3)
    return (128, 128, 64, 8, 3) if aligned else (64, 64, 32, 4, 2)


def _aligned(*tensors: torch.Tensor) -> bool:
    """16-byte alignment of base addresses and of every non-unit stride (in bytes)."""
    for t in tensors:
        size = t.element_size()
        if (t.storage_offset() * size) % 16 or (t.device.type == "cuda" and t.data_ptr() % 16):
            return False
        if any(s != 1 and (s * size) % 16 for s in t.stride()):
            return False
    return True


def _span(t: torch.Tensor) -> int:
    """Largest element offset a kernel computes for ``t`` (its strided extent)."""
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)


def _matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float = 1.0,
            bias: torch.Tensor | None = None, accumulate: bool = False) -> None:
    """c (+)= alpha·(a @ b + bias) for 2-D views of any strides (a [M, K], b [K, N], c [M, N])."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    bm, bn, bk, warps, stages = matmul_config(a.dtype, _aligned(a, b, c) and K % 16 == 0
                                              and N % 16 == 0)
    int64 = max(_span(a), _span(b), _span(c)) >= INT32_LIMIT
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    launch(_matmul_kernel, grid,
           a, b, c, c if bias is None else bias, M, N, K,
           a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
           alpha,
           ACCUMULATE=accumulate, HAS_BIAS=bias is not None, UPCAST=interpreting(),
           IEEE=a.dtype == torch.float32, INT64=int64,
           BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)


LIBRARY_GEMM: Literal["auto", "always", "never"] = "auto"
"""Which GEMM :func:`_gemm` uses: "auto" — the library's for bf16/fp16 operands on CUDA where it
works (:func:`library_gemm_works`), ``_matmul_kernel`` otherwise; "always" / "never" force one
(tests: "always" runs the library calls on the CPU with fp32 operands)."""


def _library_addmm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float,
                   bias: torch.Tensor | None, accumulate: bool) -> None:
    """c (+)= alpha·(a @ b + bias) by ``torch.addmm`` into ``c`` (fp32 output from low-precision
    operands through ``out_dtype``); scale, bias and accumulation in the GEMM's epilogue."""
    kw = {} if a.dtype == c.dtype else {"out_dtype": c.dtype}
    if accumulate:  # c = c + alpha·(a@b)
        torch.addmm(c, a, b, beta=1.0, alpha=alpha, out=c, **kw)
    elif bias is not None:  # c = alpha·bias + alpha·(a@b)
        torch.addmm(bias.to(c.dtype), a, b, beta=alpha, alpha=alpha, out=c, **kw)
    else:  # beta 0: c's old contents are ignored
        torch.addmm(c, a, b, beta=0.0, alpha=alpha, out=c, **kw)


@functools.cache
def library_gemm_works(device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype,
                       form: Literal["plain", "bias", "accumulate"]) -> bool:
    """Whether :func:`_library_addmm`'s ``form`` (c = α·a@b; c = α·(a@b + bias); c += a@b) gives the
    right ``out_dtype`` result from ``dtype`` operands on ``device`` (an fp32 output from bf16/fp16
    needs a torch with ``out_dtype``, on CUDA): tried once on a small product, shaped as the pass
    uses it (Wᵀ and gᵀ are column-major views), against the fp32 product (to fp32 precision for
    an fp32 output, to the output's rounding otherwise); an error or a wrong result means no."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(48, 80, device=device, generator=g).to(dtype)
    if form == "accumulate":
        a = torch.randn(80, 48, device=device, generator=g).to(dtype).T  # as gᵀ in dW += gᵀ·x
    b = torch.randn(96, 80, device=device, generator=g).to(dtype).T  # as Wᵀ
    bias = torch.randn(96, device=device, generator=g).to(dtype)
    start = torch.randn(48, 96, device=device, generator=g).to(out_dtype)
    product = a.float() @ b.float()
    want = {"plain": 0.5 * product, "bias": 0.5 * (product + bias.float()),
            "accumulate": start.float() + product}[form]
    c = start.clone() if form == "accumulate" else torch.full_like(start, float("nan"))
    try:
        _library_addmm(a, b, c, 1.0 if form == "accumulate" else 0.5,
                       bias if form == "bias" else None, form == "accumulate")
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    tol = 1e-3 if out_dtype == torch.float32 else 2 * torch.finfo(out_dtype).eps
    return bool(torch.allclose(c.float(), want, rtol=tol, atol=tol))  # NaN must not survive


def _gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float = 1.0,
          bias: torch.Tensor | None = None, accumulate: bool = False) -> None:
    """c (+)= alpha·(a @ b + bias): the library's GEMM or ``_matmul_kernel`` (see
    :data:`LIBRARY_GEMM`)."""
    form = "accumulate" if accumulate else "plain" if bias is None else "bias"
    if LIBRARY_GEMM == "always" or (
            LIBRARY_GEMM == "auto" and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16)
            and library_gemm_works(a.device, a.dtype, c.dtype, form)):
        if a.shape[0] and b.shape[1]:
            _library_addmm(a, b, c, alpha, bias, accumulate)
    else:
        _matmul(a, b, c, alpha=alpha, bias=bias, accumulate=accumulate)


def rows_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the row kernel."""
    block_v = min(1024 if interpreting() else 4096, triton.next_power_of_2(V))
    return block_v, 8 if block_v >= 2048 else 4


def _even(N: int, most: int, multiple: int) -> int:
    """At most ``most`` rows (at least one) per piece, evened out over the pieces N needs, rounded
    up to ``multiple`` (when ``most`` allows it)."""
    most = max(1, most)
    if N <= most:
        return max(N, 1)
    even = -(-N // -(-N // most))  # ceil(N / number of pieces)
    return min(N, max(multiple, -(-even // multiple) * multiple)) if most >= multiple else most


def triton_geometry(N: int, V: int, dtype: torch.dtype, chunk_rows: int | None = None,
                    group_rows: int | None = None) -> tuple[int, int]:
    """``(C, R)``: rows per logits chunk and rows per gradient group, R a multiple of C.

    The [2C, V] fp32 logits get :data:`LOGITS_SHARE` of :data:`CHUNK_BUFFER_BYTES`, g's [R, V]
    buffer (the input dtype) the rest, so that dX = g·W and dW (+)= gᵀ·x run once per R rows:
    the dW GEMM reads and writes the fp32 [V, H] accumulator N/R times instead of N/C (at
    N 8192, H 4096, V 128256, bf16: R 2048, C 256 — 14 GB of dW traffic instead of 38 GB at
    C = R = 832; on an H200 the step's kernels took 55.4 ms instead of 63.1),
    and both GEMMs get R rows instead of C. C is a multiple of 64 (whole GEMM tiles; dW's inner
    dimension 16-aligned), each evened out over N. ``chunk_rows`` / ``group_rows`` (or
    :data:`GROUP_ROWS`) override; a group defaults to one chunk when C is given alone."""
    per_z = 8 * V  # two fp32 logit rows
    per_g = V * torch.finfo(dtype).bits // 8
    if chunk_rows is not None:
        C = min(chunk_rows, max(N, 1))
        R = group_rows or GROUP_ROWS or C
    else:
        if N * (per_z + per_g) <= CHUNK_BUFFER_BYTES:
            return max(N, 1), max(N, 1)
        C = _even(N, int(CHUNK_BUFFER_BYTES * LOGITS_SHARE) // per_z, 64)
        R = group_rows or GROUP_ROWS or _even(
            N, (CHUNK_BUFFER_BYTES - C * per_z) // per_g // C * C, C)
    R = max(C, min(-(-R // C) * C, -(-max(N, 1) // C) * C))  # a multiple of C, at most N's
    return C, R


class _Lanes:
    """Where the row kernel runs. Off: on the current stream, one logits buffer. On (CUDA,
    :data:`OVERLAP`, more than one chunk): on a side stream, so that chunk i's row kernel (memory
    bound) runs beside chunk i+1's logits GEMM (compute bound), with two logits buffers; events
    order each buffer's GEMM after the row kernel that last read it, each row kernel after its
    GEMM and after the previous group's dX/dW GEMMs (which read g), and the group's GEMMs after
    its row kernels. Without CUDA the two buffers alternate and nothing else changes (the CPU
    tests check the buffering)."""

    def __init__(self, on: bool, device: torch.device):
        self.buffers = 2 if on else 1
        self.cuda = on and device.type == "cuda" and not is_recording()
        self.main = torch.cuda.current_stream(device) if self.cuda else None
        self.side = _side_stream(device) if self.cuda else None
        self.read: list = [None, None]  # per buffer: the event after its last row kernel

    def before_gemm(self, k: int) -> None:
        if self.cuda and self.read[k] is not None:
            self.main.wait_event(self.read[k])

    @contextlib.contextmanager
    def rows(self, k: int) -> Iterator[None]:
        if not self.cuda:
            yield
            return
        # after this chunk's GEMM and everything before it (the last group's dX/dW, which read g)
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            yield
            self.read[k] = torch.cuda.Event()
            self.read[k].record(self.side)

    def join(self) -> None:
        if self.cuda:
            self.main.wait_stream(self.side)


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _triton_pass(prob: KLProblem, row_w_N: torch.Tensor, want_dx: bool, want_dw: bool,
                 want_db: bool) -> KLGrads:
    """Per-row losses [N] (fp32) and, as asked, dx [N, H], fp32 dW [V, H] and db [V]."""
    x_NH, xt_NHt, w_VH, wt_VHt, b_V, bt_V, spec, chunk = prob
    want_grad = want_dx or want_dw or want_db
    N, H = x_NH.shape
    V = w_VH.shape[0]
    C, R = triton_geometry(N, V, x_NH.dtype, chunk)
    dev = x_NH.device
    # the same head for both sides: one GEMM over [x̃; x] into one [2C, V] buffer per chunk
    shared = wt_VHt is w_VH and bt_V is b_V and xt_NHt.dtype == x_NH.dtype
    loss_N = torch.empty(N, device=dev, dtype=torch.float32)
    # two logits buffers when the row kernel overlaps the next chunk's GEMM, else one
    lanes = _Lanes(OVERLAP and N > C, dev)
    z_bufs = [torch.empty((2 * min(C, N), V), device=dev, dtype=torch.float32)
              for _ in range(lanes.buffers)]
    # g of a whole group, in the GEMM operands' dtype (over the student logits: fp32, R = C)
    own_g = want_grad and (R > C or x_NH.dtype != torch.float32)
    g_RV = torch.empty((min(R, N), V), device=dev, dtype=x_NH.dtype) if own_g else None
    dx_NH = torch.empty_like(x_NH) if want_dx else None
    dw = WeightGrad(V, H, device=dev, acc_dtype=torch.float32, out_dtype=w_VH.dtype) \
        if want_dw else None
    db_V = torch.zeros(V, device=dev, dtype=torch.float32) if want_db else None
    # no softcap: z = scale/T · (x·Wᵀ + b) straight from the GEMM; with one: u = scale · (…)
    alpha = spec.scale / spec.temperature if spec.plain else spec.scale
    block_v, warps = rows_config(V)
    chunk_index = 0
    for r0 in range(0, N, R):
        group = min(R, N - r0)
        for c0 in range(r0, r0 + group, C):
            rows = min(C, r0 + group - c0)
            k = chunk_index % lanes.buffers
            chunk_index += 1
            z_2CV = z_bufs[k]
            t_CV, s_CV = z_2CV[:rows], z_2CV[rows:2 * rows]
            lanes.before_gemm(k)  # the row kernel that last read this buffer is done
            if shared:
                _gemm(torch.cat([xt_NHt[c0:c0 + rows], x_NH[c0:c0 + rows]]), w_VH.T,
                      z_2CV[:2 * rows], alpha=alpha, bias=b_V)
            else:
                _gemm(xt_NHt[c0:c0 + rows], wt_VHt.T, t_CV, alpha=alpha, bias=bt_V)
                _gemm(x_NH[c0:c0 + rows], w_VH.T, s_CV, alpha=alpha, bias=b_V)
            g_rows = s_CV if g_RV is None else g_RV[c0 - r0:c0 - r0 + rows]
            with lanes.rows(k):
                launch(_kl_rows_kernel, (rows,),
                       s_CV, t_CV, g_rows, loss_N[c0:], row_w_N[c0:],
                       V, s_CV.stride(0), t_CV.stride(0), g_rows.stride(0),
                       spec.softcap or 1.0, 1.0 / spec.temperature, spec.temperature**2,
                       spec.temperature * spec.scale,
                       SOFTCAP=not spec.plain, WRITE_GRAD=want_grad, BLOCK_V=block_v,
                       num_warps=warps)
        if not want_grad:
            continue
        lanes.join()  # every row kernel of the group has written its g
        g = z_2CV[group:2 * group] if g_RV is None else g_RV[:group]  # R = C without g_RV
        if want_dx:  # g is in the weight's dtype (x and W share it: checked by the dispatcher)
            _gemm(g, w_VH, dx_NH[r0:r0 + group])
        if want_dw:  # the first group writes dW, the others add to it
            for v0, dw_piece in dw.pieces:
                _gemm(g[:, v0:v0 + dw_piece.shape[0]].T, x_NH[r0:r0 + group], dw_piece,
                      accumulate=r0 > 0)
        if want_db:
            db_V += g.float().sum(0)
    lanes.join()  # the losses are written
    if want_dw and N == 0:
        dw.zero_()
    return KLGrads(loss_N, dx_NH, dw, db_V)
