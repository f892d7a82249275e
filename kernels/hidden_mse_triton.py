"""Normalised hidden-state MSE over layers in Triton, forward and backward in one pass per layer.

Formula: see ``hidden_mse_torch.py`` (ŝ = s/max(‖s‖, eps), ℓ_n = Σ_l Σ_h (ŝ − t̂)² / (L·H),
loss = Σ_n w_n ℓ_n; ∂/∂s = (g − ŝ (ŝ·g)) / ‖s‖ with g = 2·w_n·(ŝ − t̂)/(L·H)).

Shape letters: L layers (a *sequence* of [N, H] tensors, never stacked), N rows, H hidden size.

Algorithm: one launch per layer, one program per row; per-row sums accumulate over layers in an
fp32 [N] buffer (launches run in order, no atomics); gradients are computed in the forward pass.
Rows up to :data:`MAX_BLOCK_H` units sit in registers (``_row_kernel``): each state read once, the
gradient written once — bound by memory bandwidth (3·N·H elements per layer). Longer rows go in
tiles of :data:`TILE_H` (``_tiled_kernel``: three sweeps over the row — norms, then Σd² and ŝ·d,
then the gradient — the second and third reading what the first brought into the cache), so no
size spills registers.

Dtype policy: inputs fp32/bf16/fp16; norms, differences and sums in fp32 (loaded values converted
before any arithmetic, which the Triton CPU interpreter also needs for bf16); gradients stored in the
states' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, launch
from .hidden_mse_torch import EPS

MAX_BLOCK_H = 8192
"""Longest row held in registers by one program (32 fp32 values per thread per operand at 8
warps)."""
TILE_H = 2048
"""Tile of the long-row kernel."""
ROW_WARPS: int | None = None
"""``num_warps`` of the in-register row kernel, overriding :func:`hidden_config`'s (benchmarks
sweep it). The default, one warp per 512 units up to 8: at H 4096 (bf16, 32 × 8192 rows, H200)
the forward ran in 2.33 ms with 8 warps, 2.42 with 4, 2.87 with 16, 4.10 with 32 (medians of 5,
one run: ``bench/sweep_kernels.py``)."""


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _row_kernel(
    s_ptr, t_ptr, g_ptr, rows_ptr, w_ptr,
    H, stride_s, stride_t, stride_g,
    grad_scale, eps,
    WRITE_GRAD: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One row of one layer, held in registers: rows[n] += Σ_h (ŝ − t̂)²; g = ∂(w_n·…)/∂s."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    valid = offs < H
    s = tl.load(s_ptr + row * stride_s + offs, mask=valid, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + row * stride_t + offs, mask=valid, other=0.0).to(tl.float32)
    norm_s = tl.sqrt(tl.sum(s * s, 0))
    norm_t = tl.sqrt(tl.sum(t * t, 0))
    inv_s = 1.0 / tl.maximum(norm_s, eps)
    s_hat = s * inv_s
    d = s_hat - t / tl.maximum(norm_t, eps)
    tl.store(rows_ptr + row, tl.load(rows_ptr + row) + tl.sum(d * d, 0))
    if WRITE_GRAD:
        g = d * (grad_scale * tl.load(w_ptr + row))
        proj = tl.sum(s_hat * g, 0)
        grad = tl.where(norm_s > eps, (g - s_hat * proj) * inv_s, g * inv_s)
        tl.store(g_ptr + row * stride_g + offs, grad.to(g_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _tiled_kernel(
    s_ptr, t_ptr, g_ptr, rows_ptr, w_ptr,
    H, stride_s, stride_t, stride_g,
    grad_scale, eps,
    WRITE_GRAD: tl.constexpr, TILE: tl.constexpr,
):
    """The same for a row longer than a register block, in tiles of ``TILE`` units."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, TILE)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    ss = tl.zeros((TILE,), tl.float32)
    tt = tl.zeros((TILE,), tl.float32)
    for h0 in range(0, H, TILE):  # sweep 1: the norms
        valid = h0 + offs < H
        s = tl.load(s_row + h0 + offs, mask=valid, other=0.0).to(tl.float32)
        t = tl.load(t_row + h0 + offs, mask=valid, other=0.0).to(tl.float32)
        ss += s * s
        tt += t * t
    norm_s = tl.sqrt(tl.sum(ss, 0))
    inv_s = 1.0 / tl.maximum(norm_s, eps)
    inv_t = 1.0 / tl.maximum(tl.sqrt(tl.sum(tt, 0)), eps)
    dd = tl.zeros((TILE,), tl.float32)
    sd = tl.zeros((TILE,), tl.float32)
    for h0 in range(0, H, TILE):  # sweep 2: Σ d² and ŝ·d from the explicit differences
        valid = h0 + offs < H
        s_hat = tl.load(s_row + h0 + offs, mask=valid, other=0.0).to(tl.float32) * inv_s
        d = s_hat - tl.load(t_row + h0 + offs, mask=valid, other=0.0).to(tl.float32) * inv_t
        dd += d * d
        sd += s_hat * d
    tl.store(rows_ptr + row, tl.load(rows_ptr + row) + tl.sum(dd, 0))
    if WRITE_GRAD:
        c = grad_scale * tl.load(w_ptr + row)
        proj = c * tl.sum(sd, 0)
        for h0 in range(0, H, TILE):  # sweep 3: the gradient
            valid = h0 + offs < H
            s_hat = tl.load(s_row + h0 + offs, mask=valid, other=0.0).to(tl.float32) * inv_s
            g = (s_hat - tl.load(t_row + h0 + offs, mask=valid, other=0.0).to(tl.float32)
                 * inv_t) * c
            grad = tl.where(norm_s > eps, (g - s_hat * proj) * inv_s, g * inv_s)
            tl.store(g_ptr + row * stride_g + h0 + offs, grad.to(g_ptr.dtype.element_ty),
                     mask=valid)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------
def hidden_config(H: int) -> tuple[bool, int, int]:
    """(tiled, BLOCK_H or TILE, num_warps) for rows of H units."""
    if H <= MAX_BLOCK_H:
        block = triton.next_power_of_2(H)
        return False, block, ROW_WARPS or max(1, min(8, block // 512))
    return True, TILE_H if not interpreting() else 1024, 8


def _triton_hidden_mse(students: list[torch.Tensor], teachers: list[torch.Tensor],
                       w_N: torch.Tensor, want_grad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    L = len(students)
    N, H = students[0].shape
    rows_N = torch.zeros(N, device=students[0].device, dtype=torch.float32)
    grads = []
    tiled, block, warps = hidden_config(H)
    kernel = _tiled_kernel if tiled else _row_kernel
    meta = {"TILE": block} if tiled else {"BLOCK_H": block}
    for s, t in zip(students, teachers):
        if s.stride(1) != 1:
            s = s.contiguous()  # rows must be unit-stride; row strides may be anything
        if t.stride(1) != 1:
            t = t.contiguous()
        g = torch.empty_like(s, memory_format=torch.contiguous_format) if want_grad else s
        launch(kernel, (N,),
               s, t, g, rows_N, w_N,
               H, s.stride(0), t.stride(0), g.stride(0),
               2.0 / (L * H), EPS,
               WRITE_GRAD=want_grad, num_warps=warps, **meta)
        if want_grad:
            grads.append(g)
    return (rows_N * w_N).sum() / (L * H), grads
