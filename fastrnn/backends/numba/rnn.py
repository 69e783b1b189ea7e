"""Elman RNN (rnn_tanh, rnn_relu) on numba: the launchers (allocate, lay out W_hh in blocks, call the kernels of
kernels.py).

Forward, per step: each thread (block k of hidden units) multiplies h_{t-1} by its block of W_hh^T with BLAS
and applies the activation; out holds h_t, all backward needs. Backward, per step: one fused pass forms
d(pre-activation), one GEMM (split over H columns) forms d_h_{t-1}. All steps run inside one compiled function.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from fastrnn.backends import new_output
from fastrnn.backends.numba import kernels
from fastrnn.backends.numba.common import arr, block_bias, block_cols, block_rows, n_blocks, weight_grads


def rnn_fwd(
    gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None, bs: list[int], reverse: bool, relu: bool
) -> tuple[Tensor, Tensor]:
    """-> out [T,B,H], h_n [B,H]."""
    T, B, H = gx.shape
    nblk = n_blocks(B * H * H, H)
    wb = block_rows(w_hh, 1, nblk)
    bb = block_bias(b_hh, 1, H, nblk, gx)
    out = new_output((T, B, H), gx)
    h = h0.clone()
    kernel = kernels.rnn_fwd_kernel_par if nblk > 1 else kernels.rnn_fwd_kernel
    kernel(
        arr(gx), arr(h), arr(wb), arr(bb), np.asarray(bs, dtype=np.int64), reverse, arr(out),
        arr(gx.new_empty(nblk, B, wb.shape[1])), relu,
    )
    return out, h


def rnn_bwd(
    d_out: Tensor, d_h_n: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None, bs: list[int], reverse: bool,
    out: Tensor, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """-> d_gx [T,B,H], d_h0 [B,H], d_w_hh [H,H], d_b_hh [H] | None."""
    T, B, H = out.shape
    nblkp = n_blocks(B * H * H, H)
    wtb = block_cols(w_hh, nblkp)
    dg = new_output((T, B, H), out)
    dh = d_h_n.clone()
    kernel = kernels.rnn_bwd_kernel_par if nblkp > 1 else kernels.rnn_bwd_kernel
    kernel(
        arr(d_out), arr(dh), arr(wtb), np.asarray(bs, dtype=np.int64), reverse, arr(out), arr(dg),
        arr(out.new_empty(nblkp, B, wtb.shape[1])), relu,
    )
    d_w_hh, d_b_hh = weight_grads(dg, out, h0, bs, reverse, b_hh is not None)
    return dg, dh, d_w_hh, d_b_hh
