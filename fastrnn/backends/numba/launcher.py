"""The launcher of the numba walk, for every cell: allocate the outputs and scratch buffers, lay out W_hh in
blocks of hidden units, pick the serial or the parallel walk, call it, and form the weight gradients as large
GEMMs at the end. What differs between cells comes from the cell table (cells.py) and kernels.STEPS.

Forward, per step: each thread (block k of hidden units) multiplies h_{t-1} by its block of W_hh^T with BLAS
and fuses the cell's pointwise step; with proj_size one more GEMM projects h to P columns. Backward, per
step: the cell's fused pass forms d_gates, one GEMM (split over P columns) forms d_h_{t-1}. All steps run
inside one compiled function.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from fastrnn.backends import new_output
from fastrnn.backends.numba import kernels
from fastrnn.backends.numba.common import (
    arr,
    block_bias,
    block_cols,
    block_rows,
    dummy,
    n_blocks,
    weight_grads,
)
from fastrnn.cells import Cell, Grads, Saved, State, Weights


def _saved(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A saved tensor: written by the walk where the cell saves something, else empty (no poison to fill)."""
    return new_output(shape, like) if len(shape) > 1 else like.new_empty(0)


# Absent arguments (c for cells without a cell state, w_hr without a projection, saved tensors a cell does not
# use, scratch a call does not need) are passed as empty arrays of the same rank (d2, d3), so every call of a
# walk has one signature.


def forward(
    cell: Cell, gx: Tensor, state0: State, weights: Weights, bs: list[int], reverse: bool, need_saved: bool
) -> tuple[Tensor, State, Saved]:
    """gx [T,B,G*H], state0 h0 [B,P] (c0 [B,H]), weights w_hh [G*H,P], b_hh [G*H]?, w_hr [P,H]?, bs [T]
    -> out [T,B,P], state_n, saved (cells.py's layout; empty unless need_saved)."""
    T, B, GH = gx.shape
    G = cell.G
    H, P = GH // G, state0.h.shape[1]
    nblk = n_blocks(B * GH * P, H)
    wb = block_rows(weights.w_hh, G, nblk)
    bb = block_bias(weights.b_hh, G, H, nblk, gx)
    out = new_output((T, B, P), gx)
    h = state0.h.clone()
    c = state0.c.clone() if cell.has_cell_state else None
    gshape, eshape = cell.saved_shapes(T, B, H) if need_saved else ((0,), (0,))
    gates, extra = _saved(gshape, gx), _saved(eshape, gx)
    w_hr = weights.w_hr
    proj = w_hr is not None
    x = arr(gx)
    d2, d3 = dummy(2, gx), dummy(3, gx)
    scratch = np.empty((nblk, B, wb.shape[1]), x.dtype)  # [nblk, B, G*hb] each block's h_{t-1} W_k^T
    hbar = np.empty((B, H), x.dtype) if proj else d2  # [B, H] h_t before the projection
    kernels.FORWARD[cell.kernel_id, nblk > 1](
        G, x, arr(h), d2 if c is None else arr(c), arr(wb), arr(bb), arr(w_hr) if proj else d2,
        np.asarray(bs, dtype=np.int64), reverse, arr(out), hbar, scratch, arr(gates) if gates.dim() == 3 else d3,
        arr(extra) if extra.dim() == 3 else d3, proj, need_saved,
    )  # fmt: skip
    return out, State(h, c), Saved(gates, extra)


def backward(
    cell: Cell, d_out: Tensor, d_state_n: State, state0: State, weights: Weights, bs: list[int], reverse: bool,
    out: Tensor, saved: Saved,
) -> Grads:  # fmt: skip
    """-> d_gx [T,B,G*H], d_state0 (d_h0 [B,P], d_c0 [B,H]), d_weights (d_w_hh, d_b_hh, d_w_hr; None where the
    weight is None)."""
    T, B, P = out.shape
    G = cell.G
    GH = weights.w_hh.shape[0]
    H = GH // G
    nblk = n_blocks(B * GH * P, H)
    nblkp = n_blocks(B * GH * P, P)
    wtb = block_cols(weights.w_hh, nblkp)
    step = kernels.STEPS[cell.kernel_id]
    dg = new_output((T, B, GH), out)
    dgh = dg if step.d_gh_is_d_gx else out.new_empty(T, B, GH)
    dh = d_state_n.h.clone()
    dc = d_state_n.c.clone() if cell.has_cell_state else None
    w_hr = weights.w_hr
    proj = w_hr is not None
    y = arr(out)
    d2, d3 = dummy(2, out), dummy(3, out)
    gates, extra = saved
    dhfull = out.new_zeros(T, B, P) if proj else None  # [T, B, P] d h_t, for d_w_hr
    hbar = out.new_zeros(T, B, H) if proj else None  # [T, B, H] h_t before the projection, for d_w_hr
    scratch = np.empty((nblkp, B, wtb.shape[1]), y.dtype)  # [nblkp, B, pb] each block's d_gh @ W_hh columns
    dhbar = np.empty((B, H), y.dtype) if proj else d2  # [B, H] d h_t before the projection
    kernels.BACKWARD[cell.kernel_id, max(nblk, nblkp) > 1](
        G, arr(d_out), arr(dh), d2 if dc is None else arr(dc), arr(state0.h),
        arr(state0.c) if cell.has_cell_state else d2, arr(wtb), arr(w_hr) if proj else d2,
        np.asarray(bs, dtype=np.int64), reverse, y, arr(gates) if gates.dim() == 3 else d3,
        arr(extra) if extra.dim() == 3 else d3, arr(dg), arr(dgh), arr(dhfull) if proj else d3,
        arr(hbar) if proj else d3, dhbar, scratch, proj, step.bypass, nblk,
    )  # fmt: skip
    d_w_hh, d_b_hh = weight_grads(dgh, out, state0.h, bs, reverse, weights.b_hh is not None)
    d_w_hr = dhfull.reshape(T * B, P).t() @ hbar.reshape(T * B, H) if proj else None
    return Grads(dg, State(dh, dc), Weights(d_w_hh, d_b_hh, d_w_hr))
