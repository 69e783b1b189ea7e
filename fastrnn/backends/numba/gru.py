"""GRU on numba: the launchers (allocate, lay out W_hh in blocks, call the kernels of
kernels.py).

Forward, per step: each thread (block k of hidden units) multiplies h_{t-1} by its block of W_hh^T with BLAS
and fuses the gates (r, z, n = tanh(gx_n + r * (W_hn h + b_hn))), the state update and saving (r, z, n) and
W_hn h + b_hn. Backward, per step: one fused pass forms d_gx and d_gh (they differ in the n gate only), one
GEMM (split over H columns) forms d_h_{t-1}. All steps run inside one compiled function.
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


def gru_fwd(
    gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None, bs: list[int], reverse: bool, need_saved: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> out [T,B,H], h_n [B,H], gates [T,B,3H], extra [T,B,H] (both empty unless need_saved)."""
    T, B, G3 = gx.shape
    H = G3 // 3
    nblk = n_blocks(B * G3 * H, H)
    wb = block_rows(w_hh, 3, nblk)
    bb = block_bias(b_hh, 3, H, nblk, gx)
    out = new_output((T, B, H), gx)
    h = h0.clone()
    gates = new_output((T, B, G3), gx) if need_saved else gx.new_empty(0)
    extra = new_output((T, B, H), gx) if need_saved else gx.new_empty(0)
    kernel = kernels.gru_fwd_kernel_par if nblk > 1 else kernels.gru_fwd_kernel
    kernel(
        arr(gx), arr(h), arr(wb), arr(bb), np.asarray(bs, dtype=np.int64), reverse, arr(out),
        arr(gx.new_empty(nblk, B, wb.shape[1])), arr(gates) if need_saved else dummy(3, gx),
        arr(extra) if need_saved else dummy(3, gx), need_saved,
    )
    return out, h, gates, extra


def gru_bwd(
    d_out: Tensor, d_h_n: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None, bs: list[int], reverse: bool,
    out: Tensor, gates: Tensor, extra: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """-> d_gx [T,B,3H], d_h0 [B,H], d_w_hh [3H,H], d_b_hh [3H] | None."""
    T, B, H = out.shape
    G3 = w_hh.shape[0]
    nblk = n_blocks(B * G3 * H, H)
    nblkp = n_blocks(B * G3 * H, H)
    wtb = block_cols(w_hh, nblkp)
    dg = new_output((T, B, G3), out)
    dgh = out.new_empty(T, B, G3)
    dh = d_h_n.clone()
    kernel = kernels.gru_bwd_kernel_par if max(nblk, nblkp) > 1 else kernels.gru_bwd_kernel
    kernel(
        arr(d_out), arr(dh), arr(h0), arr(wtb), np.asarray(bs, dtype=np.int64), prev_counts(bs, T, reverse),
        reverse, arr(out), arr(gates), arr(extra), arr(dg), arr(dgh), arr(out.new_empty(nblkp, B, wtb.shape[1])),
        nblk,
    )
    d_w_hh, d_b_hh = weight_grads(dgh, out, h0, bs, reverse, b_hh is not None)
    return dg, dh, d_w_hh, d_b_hh
