"""LSTM (with optional proj_size) on numba: the launchers (allocate, lay out W_hh in blocks, call the kernels of
kernels.py).

Forward, per step: each thread (block k of hidden units) multiplies h_{t-1} by its block of W_hh^T with BLAS
and fuses the gate activations, the cell update and saving (i, f, g, o) and c_t; with proj_size one more
GEMM projects o*tanh(c_t) to h_t. Backward, per step: one fused pass forms d_gates, one GEMM (split over
P columns) forms d_h_{t-1}. All steps run inside one compiled function.
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
    prev_counts,
    weight_grads,
)


def lstm_fwd(
    gx: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Tensor | None, w_hr: Tensor | None, bs: list[int],
    reverse: bool, need_saved: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> out [T,B,P], h_n [B,P], c_n [B,H], gates [T,B,4H], extra [T,B,H] (both empty unless need_saved)."""
    T, B, G4 = gx.shape
    H, P = G4 // 4, h0.shape[1]
    nblk = n_blocks(B * G4 * P, H)
    wb = block_rows(w_hh, 4, nblk)
    bb = block_bias(b_hh, 4, H, nblk, gx)
    out = new_output((T, B, P), gx)
    h, c = h0.clone(), c0.clone()
    gates = new_output((T, B, G4), gx) if need_saved else gx.new_empty(0)
    extra = new_output((T, B, H), gx) if need_saved else gx.new_empty(0)
    proj = w_hr is not None
    kernel = kernels.lstm_fwd_kernel_par if nblk > 1 else kernels.lstm_fwd_kernel
    kernel(
        arr(gx), arr(h), arr(c), arr(wb), arr(bb), arr(w_hr) if proj else dummy(2, gx),
        np.asarray(bs, dtype=np.int64), reverse, arr(out), arr(gx.new_empty(B, H)) if proj else dummy(2, gx),
        arr(gx.new_empty(nblk, B, wb.shape[1])), arr(gates) if need_saved else dummy(3, gx),
        arr(extra) if need_saved else dummy(3, gx), proj, need_saved,
    )
    return out, h, c, gates, extra


def lstm_bwd(
    d_out: Tensor, d_h_n: Tensor, d_c_n: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Tensor | None,
    w_hr: Tensor | None, bs: list[int], reverse: bool, out: Tensor, gates: Tensor, extra: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """-> d_gx [T,B,4H], d_h0 [B,P], d_c0 [B,H], d_w_hh [4H,P], d_b_hh [4H] | None, d_w_hr [P,H] | None."""
    T, B, P = out.shape
    G4 = w_hh.shape[0]
    H = G4 // 4
    nblk = n_blocks(B * G4 * P, H)
    nblkp = n_blocks(B * G4 * P, P)
    wtb = block_cols(w_hh, nblkp)
    dg = new_output((T, B, G4), out)
    dh, dc = d_h_n.clone(), d_c_n.clone()
    proj = w_hr is not None
    dhfull = out.new_zeros(T, B, P) if proj else out.new_empty(0, 0, 0)
    hbar_all = out.new_zeros(T, B, H) if proj else out.new_empty(0, 0, 0)
    kernel = kernels.lstm_bwd_kernel_par if max(nblk, nblkp) > 1 else kernels.lstm_bwd_kernel
    kernel(
        arr(d_out), arr(dh), arr(dc), arr(c0), arr(wtb), arr(w_hr) if proj else dummy(2, out),
        np.asarray(bs, dtype=np.int64), prev_counts(bs, T, reverse), reverse, arr(gates), arr(extra), arr(dg),
        arr(dhfull), arr(hbar_all), arr(out.new_empty(B, H)) if proj else dummy(2, out),
        arr(out.new_empty(nblkp, B, wtb.shape[1])), proj, nblk,
    )
    d_w_hh, d_b_hh = weight_grads(dg, out, h0, bs, reverse, b_hh is not None)
    d_w_hr = dhfull.reshape(-1, P).t() @ hbar_all.reshape(-1, H) if proj else None
    return dg, dh, dc, d_w_hh, d_b_hh, d_w_hr
