"""Linear (lm_head) + KL divergence: the plain-PyTorch reference and the chunked-PyTorch path.

The Triton kernels live in ``kernels/linear_kl.py``, which also holds the public function.

Formula (per row n, temperature T, student weight W, teacher weight W̃)::

    s_n = x_n · Wᵀ / T          t_n = x̃_n · W̃ᵀ / T                        (logits, [V])
    ℓ_n = T² · KL(softmax(t_n) ‖ softmax(s_n))
        = T² · ( Σ_v p_nv (t_nv − s_nv) − lse(t_n) + lse(s_n) ),   p_n = softmax(t_n)
    ∂ℓ_n/∂(x_n·W_vᵀ) = T · (softmax(s_n)_v − p_nv)  =: g_nv
    ∂ℓ/∂x_n = Σ_v g_nv W_v        ∂ℓ/∂W_v = Σ_n g_nv x_n

The teacher side (x̃, W̃) is a constant: no gradient flows to it, even when W̃ *is* W.

Shape letters: N rows, H student hidden size, Ht teacher hidden size, V vocabulary, C rows per
chunk, K vocabulary entries per upcast block.

Dtype policy: inputs may be fp32, bf16 or fp16. Logits, softmax statistics and per-row losses are fp32
(low-precision operands are upcast block by block before the product, so nothing is rounded to bf16);
the weight gradient is accumulated in fp32 across chunks and cast to W's dtype once; dX is written in
x's dtype.

Chunked path (``impl="torch"``): rows are processed C at a time, C chosen from a memory budget
(``CHUNK_BUDGET_BYTES``) so the live fp32 buffers are [C, V], never [N, V]. Gradients are computed in
the forward pass (per chunk: teacher logits, student logits, dX, dW — four GEMMs) and backward only
scales them by ``grad_output`` (skipped when it is exactly 1). The mask is applied as per-row weights
(no host synchronisation, no data-dependent shapes). ``reduction="none"`` cannot fold ``grad_output``
into a precomputed dW, so its backward recomputes the chunks with ``grad_output`` as row weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_BUDGET_BYTES = 128 * 2**20
"""Budget for the per-chunk fp32 buffers of the chunked path (at most 4 live buffers of [C, V]:
a logits buffer, the two log-softmaxes, the KL terms)."""
REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------------
# Reference: plain PyTorch, full logits (what the paper's code does, in the inputs' dtype)
# --------------------------------------------------------------------------------------------------
def linear_kl_reference(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                        weight: torch.Tensor, teacher_weight: torch.Tensor | None = None, *,
                        mask: torch.Tensor | None = None, temperature: float = 1.0,
                        reduction: str = "mean") -> torch.Tensor:
    """Full [N, V] logits in the inputs' dtype, softmax and KL in fp32 (fp64 for fp64 inputs)."""
    tw = weight if teacher_weight is None else teacher_weight
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    s = (student_hidden @ weight.T).to(acc) / temperature
    with torch.no_grad():
        t = (teacher_hidden @ tw.T).to(acc) / temperature
        log_p = F.log_softmax(t, -1)
    rows = (log_p.exp() * (log_p - F.log_softmax(s, -1))).sum(-1) * temperature**2
    return _reduce(rows, mask, reduction)


def _reduce(rows_N: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if mask is not None:
        rows_N = torch.where(mask, rows_N, rows_N.new_zeros(()))
    if reduction == "none":
        return rows_N
    if reduction == "sum":
        return rows_N.sum()
    count = rows_N.new_tensor(rows_N.shape[0]) if mask is None else mask.sum()
    return rows_N.sum() / count.clamp_min(1)


# --------------------------------------------------------------------------------------------------
# Chunked PyTorch path
# --------------------------------------------------------------------------------------------------
def _logits_fp32(x_CH: torch.Tensor, w_VH: torch.Tensor) -> torch.Tensor:
    """x · Wᵀ in fp32 without rounding through a low-precision output."""
    if w_VH.dtype in (torch.float32, torch.float64):
        return (x_CH.to(w_VH.dtype) @ w_VH.T).float()
    V, H = w_VH.shape
    K = max(1, min(V, CHUNK_BUDGET_BYTES // (8 * max(H, 1))))
    x32 = x_CH.float()
    out_CV = x_CH.new_empty((x_CH.shape[0], V), dtype=torch.float32)
    for v0 in range(0, V, K):
        out_CV[:, v0:v0 + K] = x32 @ w_VH[v0:v0 + K].float().T
    return out_CV


def _grad_times_w(g_CV: torch.Tensor, w_VH: torch.Tensor) -> torch.Tensor:
    """g · W in fp32 (W upcast block by block when it is low precision)."""
    if w_VH.dtype in (torch.float32, torch.float64):
        return g_CV.to(w_VH.dtype) @ w_VH
    V, H = w_VH.shape
    K = max(1, min(V, CHUNK_BUDGET_BYTES // (8 * max(H, 1))))
    out = g_CV.new_zeros((g_CV.shape[0], H))
    for v0 in range(0, V, K):
        out += g_CV[:, v0:v0 + K] @ w_VH[v0:v0 + K].float()
    return out


def chunk_rows(N: int, V: int) -> int:
    """Rows per chunk so that 4 fp32 [C, V] buffers fit ``CHUNK_BUDGET_BYTES``."""
    return max(1, min(N, CHUNK_BUDGET_BYTES // (16 * max(V, 1))))


def _chunked_pass(x_NH, xt_NHt, w_VH, wt_VHt, row_w_N, T: float, want_dx: bool, want_dw: bool):
    """Per-row losses [N] (fp32) and, as asked, dX [N, H] and fp32 dW [V, H] of Σ w_n ℓ_n."""
    N, H = x_NH.shape
    V = w_VH.shape[0]
    C = chunk_rows(N, V)
    want_grad = want_dx or want_dw
    loss_N = x_NH.new_zeros(N, dtype=torch.float32)
    dx_NH = torch.zeros_like(x_NH) if want_dx else None
    dw_VH = w_VH.new_zeros((V, H), dtype=torch.float32) if want_dw else None
    for c0 in range(0, N, C):
        c1 = min(N, c0 + C)
        x_CH = x_NH[c0:c1]
        with torch.no_grad():
            log_p_CV = F.log_softmax(_logits_fp32(xt_NHt[c0:c1], wt_VHt).div_(T), -1)
            log_q_CV = F.log_softmax(_logits_fp32(x_CH, w_VH).div_(T), -1)
            # Σ p (log p − log q) in one fused pass (no cancellation between log-sum-exps)
            kl_CV = F.kl_div(log_q_CV, log_p_CV, reduction="none", log_target=True)
            loss_N[c0:c1] = kl_CV.sum(-1) * T**2
            del kl_CV
            if want_grad:
                # g = T (softmax(s) − p), weighted per row, in the buffers of log q and log p.
                g_CV = log_q_CV.exp_().sub_(log_p_CV.exp_()).mul_(T * row_w_N[c0:c1, None])
                if want_dx:
                    dx_NH[c0:c1] = _grad_times_w(g_CV, w_VH).to(x_NH.dtype)
                if want_dw:
                    dw_VH += g_CV.T @ x_CH.float()
    return loss_N, dx_NH, dw_VH


def _row_weights(mask: torch.Tensor | None, N: int, reduction: str, device) -> torch.Tensor:
    w = torch.ones(N, device=device) if mask is None else mask.float()
    if reduction == "mean":
        w = w / w.sum().clamp_min(1)
    return w


class LinearKLFunction(torch.autograd.Function):
    """The autograd Function of both paths: ``run_pass`` is the chunked-PyTorch pass
    (:func:`_chunked_pass`) or the Triton one (``kernels.linear_kl._triton_pass``); both take
    ``(x, x̃, W, W̃, row_w, T, want_dx, want_dw)`` and return ``(loss_N, dx | None, dW_fp32 | None)``.

    "mean"/"sum": the gradients are computed in forward and saved; backward scales them by
    ``grad_output``, skipped when it is exactly 1 (checked on CPU only: on an accelerator the
    comparison would be a host sync, which costs more than the scale). "none": forward computes only
    the losses; backward re-runs the pass with ``grad_output`` as row weights (a per-row
    ``grad_output`` cannot be folded into a saved dW)."""

    @staticmethod
    def forward(ctx, run_pass, x_NH, xt_NHt, w_VH, wt_VHt, mask, T: float, reduction: str):
        want_dx, want_dw = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        N = x_NH.shape[0]
        ctx.run_pass, ctx.reduction, ctx.T, ctx.wants = run_pass, reduction, T, (want_dx, want_dw)
        if reduction == "none":
            row_w = _row_weights(mask, N, "sum", x_NH.device)
            loss_N, _, _ = run_pass(x_NH, xt_NHt, w_VH, wt_VHt, row_w, T, False, False)
            ctx.save_for_backward(x_NH, xt_NHt, w_VH, wt_VHt, row_w)
            return loss_N * row_w
        row_w = _row_weights(mask, N, reduction, x_NH.device)
        loss_N, dx, dw = run_pass(x_NH, xt_NHt, w_VH, wt_VHt, row_w, T, want_dx, want_dw)
        ctx.save_for_backward(dx, None if dw is None else dw.to(w_VH.dtype))
        return (loss_N * row_w).sum()

    @staticmethod
    def backward(ctx, grad_out):
        want_dx, want_dw = ctx.wants
        if ctx.reduction == "none":
            x_NH, xt_NHt, w_VH, wt_VHt, row_w = ctx.saved_tensors
            _, dx, dw = ctx.run_pass(x_NH, xt_NHt, w_VH, wt_VHt, row_w * grad_out.float(), ctx.T,
                                     want_dx, want_dw)
            return None, dx, None, None if dw is None else dw.to(w_VH.dtype), None, None, None, None
        dx, dw = ctx.saved_tensors
        if not (grad_out.device.type == "cpu" and bool(grad_out == 1)):
            dx = None if dx is None else dx * grad_out.to(dx.dtype)
            dw = None if dw is None else dw * grad_out.to(dw.dtype)
        return None, dx, None, dw, None, None, None, None


def linear_kl_chunked(x_NH: torch.Tensor, xt_NHt: torch.Tensor, w_VH: torch.Tensor,
                    wt_VHt: torch.Tensor, mask: torch.Tensor | None, temperature: float,
                    reduction: str) -> torch.Tensor:
    """The chunked-PyTorch path (arguments already checked; teacher tensors detached)."""
    return LinearKLFunction.apply(_chunked_pass, x_NH, xt_NHt, w_VH, wt_VHt, mask,
                                  float(temperature), reduction)
