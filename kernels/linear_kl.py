"""Fused linear (lm_head) + KL divergence, forward and backward, without the N×V logits (Triton).

Formula (per row n, temperature T, student weight W, teacher weight W̃)::

    s_n = x_n · Wᵀ / T          t_n = x̃_n · W̃ᵀ / T                        (logits, [V])
    ℓ_n = T² · KL(softmax(t_n) ‖ softmax(s_n)) = T² · Σ_v p_nv (log p_nv − log q_nv)
          with p_n = softmax(t_n), q_n = softmax(s_n)
    g_nv := ∂(w_n ℓ_n)/∂(x_n·W_vᵀ) = T · w_n · (q_nv − p_nv)      (w_n: row weight of the reduction)
    ∂/∂x_n = Σ_v g_nv W_v          ∂/∂W_v = Σ_n g_nv x_n

The teacher side (x̃, W̃) is a constant: no gradient flows to it, even when W̃ *is* W.

Shape letters: N rows, H student hidden size, Ht teacher hidden size, V vocabulary, C rows of a chunk.

Algorithm (gradient in the forward pass, four GEMMs per chunk): rows are processed C at a time, C
chosen from a memory budget (``CHUNK_BUDGET_BYTES``): only [C, V] buffers ever exist, never [N, V].
For each chunk

1. ``_matmul_kernel``: t = x̃·W̃ᵀ/T and s = x·Wᵀ/T into fp32 [C, V] buffers, straight from the
   fp32 dot accumulator (GEMMs 1 and 2);
2. ``_kl_rows_kernel``: per row, online log-sum-exp over V for s and t, then ℓ_n and g written in
   place of s (or into a [C, V] buffer of the input dtype for low-precision GEMMs);
3. ``_matmul_kernel``: dx = g·W (GEMM 3) and dW += gᵀ·x into an fp32 accumulator (GEMM 4).

Backward only scales the saved gradients by ``grad_output``. Masked rows get weight 0 (no host
synchronisation, no data-dependent shapes). ``reduction="none"`` needs a per-row ``grad_output`` inside
dW, so its backward re-runs the chunks with ``grad_output`` as row weights.

Dtype policy: inputs fp32, bf16 or fp16 (student and teacher operands each of one dtype). Logits,
softmax statistics and losses are fp32; g is rounded to the input dtype only as a GEMM operand
(fp32 inputs keep fp32 and use IEEE fp32 dots, not TF32); dW is accumulated in fp32 across chunks and
cast once; dx is written in x's dtype. Under ``TRITON_INTERPRET=1`` (CPU tests) loaded values are
converted to fp32 before any arithmetic (the interpreter computes wrongly on bf16).

The plain-PyTorch reference and the chunked-PyTorch path live in ``kernels/linear_kl_torch.py``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.linear_kl_torch import REDUCTIONS, LinearKLFunction, linear_kl_chunked

CHUNK_BUDGET_BYTES = 1 << 30
"""Budget for the per-chunk [C, V] buffers of the Triton path (s, t and, for bf16/fp16, g)."""


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    scale,
    ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] (+)= scale · A[M, K] · B[K, N] with an fp32 accumulator; any strides."""
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
    acc = acc * scale
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _kl_rows_kernel(
    s_ptr, t_ptr, g_ptr, loss_ptr, w_ptr,
    V, stride_s, stride_t, stride_g,
    T,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One row: ℓ = T²·Σ p (log p − log q) from fp32 logits s, t (already / T); g = T·w·(q − p)."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    offs = tl.arange(0, BLOCK_V)

    m_s = tl.full((), float("-inf"), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    l_s = tl.zeros((), tl.float32)
    l_t = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):  # pass 1: online log-sum-exp of s and t
        valid = v0 + offs < V
        s = tl.load(s_row + v0 + offs, mask=valid, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + v0 + offs, mask=valid, other=float("-inf")).to(tl.float32)
        new_s = tl.maximum(m_s, tl.max(s, 0))
        new_t = tl.maximum(m_t, tl.max(t, 0))
        l_s = l_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(s - new_s), 0)
        l_t = l_t * tl.exp(m_t - new_t) + tl.sum(tl.exp(t - new_t), 0)
        m_s = new_s
        m_t = new_t
    log_l_s = tl.log(l_s)  # log q = (s − m_s) − log l_s: subtracting the max first keeps
    log_l_t = tl.log(l_t)  # the fp32 rounding relative to the logit spread, not to |max|

    w = tl.load(w_ptr + row).to(tl.float32)
    acc = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):  # pass 2: loss terms and gradient
        valid = v0 + offs < V
        s = tl.load(s_row + v0 + offs, mask=valid, other=0.0).to(tl.float32)
        t = tl.load(t_row + v0 + offs, mask=valid, other=0.0).to(tl.float32)
        log_p = (t - m_t) - log_l_t
        log_q = (s - m_s) - log_l_s
        p = tl.exp(log_p)
        acc += tl.where(valid, p * (log_p - log_q), 0.0)
        if WRITE_GRAD:
            g = T * w * (tl.exp(log_q) - p)
            tl.store(g_ptr + row * stride_g + v0 + offs, g.to(g_ptr.dtype.element_ty), mask=valid)
    tl.store(loss_ptr + row, tl.sum(acc, 0) * T * T)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, scale: float = 1.0,
            accumulate: bool = False) -> None:
    """c (+)= scale · a @ b for 2-D views of any strides (a [M, K], b [K, N], c [M, N])."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    interp = _interpreting()
    ieee = a.dtype == torch.float32
    if interp:
        bm, bn, bk, warps, stages = 64, 64, 32, 4, 1
    elif ieee:
        bm, bn, bk, warps, stages = 64, 64, 32, 4, 3
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _matmul_kernel[grid](
        a, b, c, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        scale,
        ACCUMULATE=accumulate, UPCAST=interp, IEEE=ieee,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)


def chunk_rows(N: int, V: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that the [C, V] buffers (s, t, and g unless fp32) fit the budget."""
    per_row = V * (8 + (0 if dtype == torch.float32 else torch.finfo(dtype).bits // 8))
    return max(1, min(N, CHUNK_BUDGET_BYTES // max(per_row, 1)))


def _triton_pass(x_NH, xt_NHt, w_VH, wt_VHt, row_w_N, T: float, want_dx: bool, want_dw: bool):
    """Per-row losses [N] (fp32) and, as asked, dx [N, H] and fp32 dW [V, H] of Σ w_n ℓ_n."""
    want_grad = want_dx or want_dw
    N, H = x_NH.shape
    V = w_VH.shape[0]
    C = chunk_rows(N, V, x_NH.dtype)
    dev = x_NH.device
    loss_N = torch.empty(N, device=dev, dtype=torch.float32)
    s_CV = torch.empty((C, V), device=dev, dtype=torch.float32)
    t_CV = torch.empty((C, V), device=dev, dtype=torch.float32)
    g_CV = s_CV if x_NH.dtype == torch.float32 else torch.empty((C, V), device=dev, dtype=x_NH.dtype)
    dx_NH = torch.empty_like(x_NH) if want_dx else None
    dw_VH = torch.zeros((V, H), device=dev, dtype=torch.float32) if want_dw else None
    block_v = min(4096 if not _interpreting() else 1024, triton.next_power_of_2(V))
    for c0 in range(0, N, C):
        rows = min(C, N - c0)
        x_CH = x_NH[c0:c0 + rows]
        _matmul(xt_NHt[c0:c0 + rows], wt_VHt.T, t_CV[:rows], scale=1.0 / T)
        _matmul(x_CH, w_VH.T, s_CV[:rows], scale=1.0 / T)
        _kl_rows_kernel[(rows,)](
            s_CV, t_CV, g_CV, loss_N[c0:], row_w_N[c0:],
            V, s_CV.stride(0), t_CV.stride(0), g_CV.stride(0),
            T,
            WRITE_GRAD=want_grad, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)
        if want_grad:
            g = g_CV[:rows] if g_CV.dtype == w_VH.dtype else g_CV[:rows].to(w_VH.dtype)
            if want_dx:
                _matmul(g, w_VH, dx_NH[c0:c0 + rows])
            if want_dw:
                _matmul(g.T, x_CH, dw_VH, accumulate=True)
    return loss_N, dx_NH, dw_VH


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def _check(x, xt, w, wt, mask, temperature, reduction, impl) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if x.dim() != 2 or xt.dim() != 2 or w.dim() != 2 or wt.dim() != 2:
        raise ValueError("student_hidden [N, H], teacher_hidden [N, Ht], weight [V, H] and "
                         "teacher_weight [V, Ht] must be 2-D")
    if x.shape[0] != xt.shape[0]:
        raise ValueError(f"student and teacher rows differ: {x.shape[0]} vs {xt.shape[0]}")
    if w.shape[1] != x.shape[1] or wt.shape[1] != xt.shape[1] or w.shape[0] != wt.shape[0]:
        raise ValueError(f"shape mismatch: student_hidden {tuple(x.shape)}, weight {tuple(w.shape)}, "
                         f"teacher_hidden {tuple(xt.shape)}, teacher_weight {tuple(wt.shape)}")
    if x.dtype != w.dtype or xt.dtype != wt.dtype:
        raise ValueError(f"dtype mismatch: student_hidden {x.dtype} vs weight {w.dtype}, "
                         f"teacher_hidden {xt.dtype} vs teacher_weight {wt.dtype}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (x.shape[0],)):
        raise ValueError(f"mask must be a bool tensor of shape [{x.shape[0]}]")
    devices = {t.device for t in (x, xt, w, wt) + (() if mask is None else (mask,))}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def fused_linear_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                    weight: torch.Tensor, teacher_weight: torch.Tensor | None = None, *,
                    mask: torch.Tensor | None = None, temperature: float = 1.0,
                    reduction: str = "mean", impl: str = "auto") -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` per row, reduced, without materialising [N, V].

    ``student_hidden`` [N, H], ``teacher_hidden`` [N, Ht], ``weight`` [V, H] (student lm_head),
    ``teacher_weight`` [V, Ht] or ``None`` (the same weight). ``mask`` [N] bool selects rows;
    ``reduction``: "mean" over selected rows (0 when none), "sum", or "none" ([N], zeros on
    unselected rows). Gradients reach ``student_hidden`` and ``weight`` only.
    ``impl``: "triton" (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``), "torch" (chunked
    PyTorch, any device) or "auto" (Triton on CUDA, torch elsewhere).
    """
    wt = weight if teacher_weight is None else teacher_weight
    _check(student_hidden, teacher_hidden, weight, wt, mask, temperature, reduction, impl)
    use_triton = impl == "triton" or (impl == "auto" and student_hidden.is_cuda)
    if use_triton and not student_hidden.is_cuda and not _interpreting():
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         "importing triton, for CPU tests); use impl='torch' on CPU")
    if use_triton:  # the autograd Function is shared with the chunked-PyTorch path
        return LinearKLFunction.apply(_triton_pass, student_hidden, teacher_hidden.detach(), weight,
                                      wt.detach(), mask, float(temperature), reduction)
    return linear_kl_chunked(student_hidden, teacher_hidden.detach(), weight, wt.detach(), mask,
                             float(temperature), reduction)
