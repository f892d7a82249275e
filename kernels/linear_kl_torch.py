"""Linear (lm_head) + KL divergence in PyTorch: the plain reference and the chunked path.

Formula (per row n; W, b the student head, W̃, b̃ the teacher's; the logit transform of
:class:`~._common.LogitSpec`: scale, softcap, temperature T)::

    s_n = softcap(scale·(x_n·Wᵀ + b)) / T      t_n = softcap(scale·(x̃_n·W̃ᵀ + b̃)) / T     ([V])
    ℓ_n = T² · KL(softmax(t_n) ‖ softmax(s_n)),    p_n = softmax(t_n),  q_n = softmax(s_n)
    g_nv := ∂(w_n ℓ_n)/∂(x_n·W_vᵀ) = T · w_n · (q_nv − p_nv) · scale · (1 − (T·s_nv / cap)²)
    ∂/∂x_n = Σ_v g_nv W_v      ∂/∂W_v = Σ_n g_nv x_n      ∂/∂b_v = Σ_n g_nv

(the last factor only with a softcap). The teacher side is a constant: no gradient reaches it, even
when W̃ *is* W.

Shape letters: N rows, H student hidden size, Ht teacher hidden size, V vocabulary, C rows of a
chunk, R rows of a block (the element-wise work).

Dtype policy: inputs fp32, bf16 or fp16. Logits, softmax statistics and per-row losses are fp32 (a
low-precision weight is upcast block by block before the product, so nothing is rounded to bf16);
dW and db are accumulated in fp32 and cast once; dX is written in x's dtype.

Chunked path (gradient in the forward pass: per chunk the teacher and student logits — one GEMM over
``[x̃; x]`` when the weight is shared — then dX and dW, four GEMMs' worth of work): the chunk size C
comes from the problem (:func:`torch_chunk_rows`): large enough that the GEMMs run at their best
(the ``dW += gᵀ·x`` update, a GEMM with inner dimension C, compute-bound), no larger, so that the
[2C, V] logit buffer stays small beside the fp32 dW the op returns; a small problem is cut into a
few chunks when its buffer would be a large part of the op's memory. The element-wise work
(log-softmax, KL, gradient) runs R rows at a time so that its buffers stay in the processor's
cache. The first chunk writes dW (no zero-fill). The mask is applied as row weights (no host
synchronisation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import KLGrads, KLProblem, LogitSpec, WeightGrad, reduce_rows

BLOCK_ELEMENTS = 1 << 19
"""Elements of one [R, V] block of the element-wise work (2 MiB in fp32: a few live buffers of
this size stay in a server processor's L2/L3 cache)."""
CHUNK_ROWS = 256
"""Rows per chunk: where the CPU GEMMs stop gaining (the logits GEMM over ``[x̃; x]`` then has
2C = 512 rows, the ``dW += gᵀ·x`` update an inner dimension of C; its read-modify-write of the
fp32 dW, 8·V·H bytes per chunk against 8·C·V·H FLOPs, is then far below the machine's balance).
Measured on the project's 2-core machine (one process per shape, the chunk sizes alternated 4
times, medians of the per-alternation ratios to 512 rows): 384 rows 0.91–1.04×, 256 rows
0.94–1.03×, 128 rows 1.04–1.16× (1024×2048×32000, 1024×512×128256, 4096×512×32000). The smallest
size at the GEMMs' best is taken: the [2C, V] fp32 logit buffer is the op's largest allocation
besides dW, half of what 512 rows held."""
SPLIT_ROWS = 80
"""A problem that fits one chunk (N ≤ :data:`CHUNK_ROWS`) is still cut into as many chunks as keep
this many rows each (256 → 3 chunks of 86), when that saves memory that matters
(:data:`SPLIT_SAVING`): one chunk holds every logit at once (the naive footprint); each further chunk
costs one more read-modify-write of dW and smaller GEMMs. Measured at 256×512×262144 (5
alternations): 86 rows 1.02× the time of 128, 64 rows 1.14×."""
SPLIT_SAVING = 0.2
"""...the split is made only when halving the logit buffer would save at least this fraction of the
op's own memory (the fp32 dW, unless the head is frozen, plus the [2N, V] buffer). Measured on the
project's 2-core machine, one process per shape, the two chunkings and naive alternated (5 or 3
times each, medians): one chunk of 256 rows against two of 128 — 1.66 vs 1.84 s at H 2048, V 32000;
7.69 vs 9.33 s at H 2048, V 128256. At H 2048 the split saves 10 % of the footprint and is not made;
at H 512 it saves 25 %."""
SPLIT_MIN_BYTES = 128 << 20
"""...and only when the whole [2N, V] fp32 buffer is at least this large: below it the saving is
small in absolute terms while the split's cost stays a share of the time (256×512×32000, whose
one-chunk buffer is 62.5 MiB, 8 alternations in one process: 3 chunks of 86 rows 1.12× the time
of one chunk, 2 of 128 1.11×; one chunk 0.85× the naive version's)."""
UPCAST_BLOCK_BYTES = 64 << 20
"""fp32 copy of a low-precision weight, made this many bytes at a time."""


# --------------------------------------------------------------------------------------------------
# Reference: plain PyTorch, full logits (what the paper's code does, in the inputs' dtype)
# --------------------------------------------------------------------------------------------------
def apply_spec(raw: torch.Tensor, spec: LogitSpec) -> torch.Tensor:
    """``softcap(scale·raw) / T`` (out of place)."""
    u = raw * spec.scale if spec.scale != 1.0 else raw
    if spec.softcap is not None:
        u = torch.tanh(u / spec.softcap) * spec.softcap
    return u / spec.temperature


def linear_kl_reference(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                        weight: torch.Tensor, teacher_weight: torch.Tensor | None = None, *,
                        bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
                        mask: torch.Tensor | None = None, temperature: float = 1.0,
                        logit_scale: float = 1.0, softcap: float | None = None,
                        reduction: str = "mean") -> torch.Tensor:
    """Full [N, V] logits in the inputs' dtype, then the transform, softmax and KL in fp32 (fp64
    for fp64 inputs). ``teacher_weight``/``teacher_bias`` ``None``: the student's."""
    spec = LogitSpec(temperature, logit_scale, softcap)
    tw = weight if teacher_weight is None else teacher_weight
    tb = bias if teacher_weight is None and teacher_bias is None else teacher_bias
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    raw_s = student_hidden @ weight.T + (0 if bias is None else bias)
    s = apply_spec(raw_s.to(acc), spec)
    with torch.no_grad():
        raw_t = teacher_hidden @ tw.T + (0 if tb is None else tb)
        log_p = F.log_softmax(apply_spec(raw_t.to(acc), spec), -1)
    rows = (log_p.exp() * (log_p - F.log_softmax(s, -1))).sum(-1) * temperature**2
    return reduce_rows(rows, mask, reduction)


# --------------------------------------------------------------------------------------------------
# Chunked PyTorch path
# --------------------------------------------------------------------------------------------------
def torch_chunk_rows(N: int, V: int, H: int, want_dw: bool = True) -> int:
    """Rows per chunk of the chunked path, from the problem: :data:`CHUNK_ROWS` (the GEMMs at their
    best), evened out over the chunks N needs (no small last chunk); N that fits one chunk is cut
    into chunks of at least :data:`SPLIT_ROWS` rows where halving the logit buffer would save
    :data:`SPLIT_SAVING` of the op's memory and the buffer is at least :data:`SPLIT_MIN_BYTES`,
    else taken whole (dW and the buffers are fp32 whatever the operands' dtype)."""
    if N > CHUNK_ROWS:
        return -(-N // -(-N // CHUNK_ROWS))
    footprint = 2 * N * V + (V * H if want_dw else 0)  # fp32 elements: [2N, V] buffer, dW
    worth = N * V >= SPLIT_SAVING * footprint and 2 * N * V * 4 >= SPLIT_MIN_BYTES
    pieces = N // SPLIT_ROWS if worth else 1
    return -(-N // max(pieces, 1)) if N else 1


def _upcast_blocks(w_VH: torch.Tensor):
    """(v0, fp32 block of W) over W's rows; W itself when it is fp32/fp64."""
    if w_VH.dtype in (torch.float32, torch.float64):
        yield 0, w_VH
        return
    V, H = w_VH.shape
    K = max(1, min(V, UPCAST_BLOCK_BYTES // (4 * max(H, 1))))
    for v0 in range(0, V, K):
        yield v0, w_VH[v0:v0 + K].float()


def _logits_into(out_MV: torch.Tensor, x_MH: torch.Tensor, w_VH: torch.Tensor,
                 b_V: torch.Tensor | None) -> None:
    """out = x·Wᵀ (+ b) in fp32 (or fp64), never rounded through a low-precision result."""
    x = x_MH.to(out_MV.dtype)
    for v0, w_block in _upcast_blocks(w_VH):
        torch.mm(x, w_block.T, out=out_MV[:, v0:v0 + w_block.shape[0]])
    if b_V is not None:
        out_MV += b_V.to(out_MV.dtype)


def _transform_(z: torch.Tensor, spec: LogitSpec) -> None:
    """In place: raw logits → ``softcap(scale·raw)/T``."""
    if spec.softcap is None:
        if spec.scale != 1.0 or spec.temperature != 1.0:
            z.mul_(spec.scale / spec.temperature)
        return
    z.mul_(spec.scale / spec.softcap).tanh_().mul_(spec.softcap / spec.temperature)


def _block_kl_grad_(zt_RV: torch.Tensor, zs_RV: torch.Tensor, w_R: torch.Tensor, spec: LogitSpec,
                    want_grad: bool) -> torch.Tensor:
    """Per-row ``T²·KL`` [R] of one block of transformed logits; with ``want_grad`` the gradient
    with respect to the *raw* student logits is written over ``zs`` (and ``zt`` is clobbered)."""
    T = spec.temperature
    log_p = F.log_softmax(zt_RV, -1)
    log_q = F.log_softmax(zs_RV, -1)
    p = log_p.exp()
    # Σ p (log p − log q) from the element-wise difference (no cancellation between two sums)
    rows = torch.linalg.vecdot(p, log_p.sub_(log_q)).mul_(T * T)
    if want_grad:
        factor = T * spec.scale
        if spec.softcap is not None:  # d softcap / du = 1 − tanh², tanh = T·z / cap
            torch.mul(zs_RV, T / spec.softcap, out=zt_RV).square_().neg_().add_(1)
            torch.sub(log_q.exp_(), p, out=zs_RV).mul_(zt_RV)
        else:
            torch.sub(log_q.exp_(), p, out=zs_RV)
        zs_RV.mul_(w_R[:, None] * factor)
    return rows


def _chunked_pass(prob: KLProblem, row_w_N: torch.Tensor, want_dx: bool, want_dw: bool,
                  want_db: bool) -> KLGrads:
    """Per-row losses [N] and, as asked, dX, fp32 dW and db of Σ_n w_n ℓ_n."""
    x_NH, xt_NHt, w_VH, wt_VHt, b_V, bt_V, spec, chunk = prob
    N, H = x_NH.shape
    V = w_VH.shape[0]
    acc = torch.float64 if x_NH.dtype == torch.float64 else torch.float32
    shared = wt_VHt is w_VH and bt_V is b_V and xt_NHt.dtype == x_NH.dtype
    C = min(chunk, max(N, 1)) if chunk else torch_chunk_rows(N, V, H, want_dw)
    R = max(1, min(C, BLOCK_ELEMENTS // max(V, 1)))
    want_grad = want_dx or want_dw or want_db
    loss_N = x_NH.new_empty(N, dtype=acc)
    dx_NH = torch.empty_like(x_NH) if want_dx else None
    dw = WeightGrad(V, H, device=x_NH.device, acc_dtype=acc, out_dtype=w_VH.dtype) \
        if want_dw else None
    db_V = x_NH.new_zeros(V, dtype=acc) if want_db else None
    z_2CV = x_NH.new_empty((2 * min(C, N), V), dtype=acc)
    for c0 in range(0, N, C):
        c1 = min(N, c0 + C)
        rows = c1 - c0
        zt_CV, zs_CV = z_2CV[:rows], z_2CV[rows: 2 * rows]
        x_CH = x_NH[c0:c1]
        with torch.no_grad():
            if shared:  # one GEMM over [x̃; x]
                _logits_into(z_2CV[: 2 * rows], torch.cat([xt_NHt[c0:c1], x_CH]), w_VH, b_V)
            else:
                _logits_into(zt_CV, xt_NHt[c0:c1], wt_VHt, bt_V)
                _logits_into(zs_CV, x_CH, w_VH, b_V)
            _transform_(z_2CV[: 2 * rows], spec)
            for r0 in range(0, rows, R):
                r1 = min(rows, r0 + R)
                loss_N[c0 + r0: c0 + r1] = _block_kl_grad_(
                    zt_CV[r0:r1], zs_CV[r0:r1], row_w_N[c0 + r0: c0 + r1], spec, want_grad)
            if not want_grad:
                continue
            g_CV = zs_CV  # ∂/∂ raw student logits
            if want_dx:
                if w_VH.dtype == acc:
                    torch.mm(g_CV, w_VH, out=dx_NH[c0:c1])
                else:  # W upcast block by block
                    dx_CH = torch.zeros((rows, H), dtype=acc, device=x_NH.device)
                    for v0, w_block in _upcast_blocks(w_VH):
                        dx_CH.addmm_(g_CV[:, v0:v0 + w_block.shape[0]], w_block)
                    dx_NH[c0:c1] = dx_CH.to(x_NH.dtype)
            if want_dw:  # the first chunk writes dW (no zero-fill), the others add to it
                x_acc = x_CH.to(acc)
                for v0, dw_piece in dw.pieces:
                    g_piece = g_CV[:, v0:v0 + dw_piece.shape[0]].T
                    if c0 == 0:
                        torch.mm(g_piece, x_acc, out=dw_piece)
                    else:
                        dw_piece.addmm_(g_piece, x_acc)
            if want_db:
                db_V += g_CV.sum(0)
    if want_dw and N == 0:  # no rows
        dw.zero_()
    return KLGrads(loss_N.float() if acc == torch.float32 else loss_N, dx_NH, dw, db_V)
