"""The launcher of the numba walk, for every cell: allocate the outputs and scratch buffers, lay out W_hh in
blocks of hidden units, pick the serial or the parallel walk, call it, and form the weight gradients as large
GEMMs at the end. What differs between cells comes from the cell table (cells.py) and kernels.STEPS.

Forward, per step: each thread (block k of hidden units) multiplies h_{t-1} by its block of W_hh^T with BLAS
and fuses the cell's pointwise step; with proj_size one more GEMM projects h to P columns. Backward, per
step: the cell's fused pass forms d_gates, one GEMM (split over P columns) forms d_h_{t-1}. All steps run
inside one compiled function. The layer-normalised cells (cells.py, "Normalised cells") run their fused passes
over whole rows after the blocks' GEMMs (kernels.Step.rows) and get cells.Norm and Grads.d_extra besides.
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
# use, scratch a call does not need, the normalised cells' arguments for the others) are passed as empty arrays
# of the same rank (common.dummy), so every call of a walk has one signature.


def _norm_args(cell: Cell, weights: Weights, like: Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    """cells.Norm as the walks take it: params [norm_width*H], the zoneout mask [T,B,H] or an empty array (then
    the constant keep is used), keep; empty arrays for cells without normalisation."""
    nm = weights.norm
    if not cell.norm:
        return dummy(1, like), dummy(3, like), 1.0
    if nm is None or weights.b_hh is not None:
        raise ValueError(f"{cell.name} takes weights.norm (cells.Norm) and no b_hh (it is in Norm.params)")
    mask = dummy(3, like) if nm.mask is None else arr(nm.mask.to(like.dtype).contiguous())
    return arr(nm.params.to(like.dtype).contiguous()), mask, float(nm.keep)


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
    nparams, zmask, keep = _norm_args(cell, weights, gx)
    rowbuf = np.empty((B, GH), x.dtype) if cell.norm and nblk > 1 else d2  # [B, G*H] raw rows in torch's order
    kernels.FORWARD[cell.kernel_id, nblk > 1](
        G, x, arr(h), d2 if c is None else arr(c), arr(wb), arr(bb), arr(w_hr) if proj else d2,
        np.asarray(bs, dtype=np.int64), reverse, arr(out), hbar, scratch, arr(gates) if gates.dim() == 3 else d3,
        arr(extra) if extra.dim() == 3 else d3, proj, need_saved, nparams, zmask, keep, rowbuf,
    )  # fmt: skip
    return out, State(h, c), Saved(gates, extra)


def backward(
    cell: Cell, d_out: Tensor, d_state_n: State, state0: State, weights: Weights, bs: list[int], reverse: bool,
    out: Tensor, saved: Saved,
) -> Grads:  # fmt: skip
    """-> d_gx [T,B,G*H], d_state0 (d_h0 [B,P], d_c0 [B,H]), d_weights (d_w_hh, d_b_hh, d_w_hr; None where the
    weight is None), d_extra [T,B,H] (normalised cells; else None)."""
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
    nparams, zmask, keep = _norm_args(cell, weights, out)
    d_extra = new_output((T, B, H), out) if cell.norm else None
    parallel = max(nblk, nblkp) > 1
    if step.rows:  # the cell's pass runs over rows (on the threads where parallel), not in blocks of units
        nblk = 1
    kernels.BACKWARD[cell.kernel_id, parallel](
        G, arr(d_out), arr(dh), d2 if dc is None else arr(dc), arr(state0.h),
        arr(state0.c) if cell.has_cell_state else d2, arr(wtb), arr(w_hr) if proj else d2,
        np.asarray(bs, dtype=np.int64), reverse, y, arr(gates) if gates.dim() == 3 else d3,
        arr(extra) if extra.dim() == 3 else d3, arr(dg), arr(dgh), arr(dhfull) if proj else d3,
        arr(hbar) if proj else d3, dhbar, scratch, proj, step.bypass, nblk,
        d3 if d_extra is None else arr(d_extra), nparams, zmask, keep,
    )  # fmt: skip
    d_w_hh, d_b_hh = weight_grads(dgh, out, state0.h, bs, reverse, weights.b_hh is not None)
    d_w_hr = dhfull.reshape(T * B, P).t() @ hbar.reshape(T * B, H) if proj else None
    return Grads(dg, State(dh, dc), Weights(d_w_hh, d_b_hh, d_w_hr), d_extra)
