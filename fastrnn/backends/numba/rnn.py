"""Elman RNN (rnn_tanh, rnn_relu) on numba: kernels, then launchers.

Forward, per step: each thread (block k of hidden units) multiplies h_{t-1} by its block of W_hh^T with BLAS
and applies the activation; out holds h_t, all backward needs. Backward, per step: one fused pass forms
d(pre-activation), one GEMM (split over H columns) forms d_h_{t-1}. All steps run inside one compiled function.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange
from torch import Tensor

from fastrnn.backends import new_output
from fastrnn.backends.numba.common import arr, block_bias, block_cols, block_rows, jit, n_blocks, weight_grads


@jit()
def _rnn_fwd_block(k, t, n, gx, h, wb, bb, out, ghb, relu):
    H = h.shape[1]
    hb = wb.shape[1]
    j0 = k * hb
    j1 = min(H, j0 + hb)
    gh = ghb[k, :n]
    np.dot(h[:n], wb[k].T, gh)
    bk = bb[k]
    for r in range(n):
        for j in range(j0, j1):
            x = gx[t, r, j] + gh[r, j - j0] + bk[j - j0]
            if relu:
                out[t, r, j] = x if x > 0.0 or x != x else 0.0  # NaN passes, as torch.relu
            else:
                out[t, r, j] = math.tanh(x)


@jit(parallel=True)
def rnn_fwd_kernel(gx, h, wb, bb, bs, reverse, out, ghb, relu):
    # gx [T,B,H]  h [B,H] in: h0, out: h_n   wb [nblk,hb,H]  bb [nblk,hb]  bs [T]  out [T,B,H]  ghb [nblk,B,hb]
    T, B, H = out.shape
    nblk = wb.shape[0]
    for s in range(T):
        t = T - 1 - s if reverse else s
        n = bs[t]
        if nblk == 1:
            _rnn_fwd_block(0, t, n, gx, h, wb, bb, out, ghb, relu)
        else:
            for k in prange(nblk):
                _rnn_fwd_block(k, t, n, gx, h, wb, bb, out, ghb, relu)
        for r in range(n):
            for p in range(H):
                h[r, p] = out[t, r, p]
        for r in range(n, B):
            for p in range(H):
                out[t, r, p] = 0.0


@jit(parallel=True)
def rnn_bwd_kernel(d_out, dh, wtb, bs, reverse, out, dg, dhblk, relu):
    # d_out [T,B,H]  dh [B,H] in: d_h_n, out: d_h0   wtb [nblkp,pb,H] W_hh^T in row blocks   bs [T]
    # out [T,B,H] forward's   dg [T,B,H] out: d_gx (zero on inactive rows)   dhblk [nblkp,B,pb] scratch
    T, B, H = d_out.shape
    nblkp = wtb.shape[0]
    pb = wtb.shape[1]
    for s in range(T):
        t = s if reverse else T - 1 - s
        n = bs[t]
        for r in range(n):
            for j in range(H):
                d = dh[r, j] + d_out[t, r, j]
                y = out[t, r, j]
                if relu:  # torch's threshold_backward: zero where the output is <= 0
                    dg[t, r, j] = 0.0 if y <= 0.0 else d
                else:
                    dg[t, r, j] = d * (1.0 - y * y)
        for r in range(n, B):
            for j in range(H):
                dg[t, r, j] = 0.0
        if nblkp == 1:
            np.dot(dg[t, :n], wtb[0].T, dh[:n])
        else:
            for k in prange(nblkp):
                np.dot(dg[t, :n], wtb[k].T, dhblk[k, :n])
            for r in range(n):
                for p in range(H):
                    dh[r, p] = dhblk[p // pb, r, p % pb]


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
    rnn_fwd_kernel(
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
    rnn_bwd_kernel(
        arr(d_out), arr(dh), arr(wtb), np.asarray(bs, dtype=np.int64), reverse, arr(out), arr(dg),
        arr(out.new_empty(nblkp, B, wtb.shape[1])), relu,
    )
    d_w_hh, d_b_hh = weight_grads(dg, out, h0, bs, reverse, b_hh is not None)
    return dg, dh, d_w_hh, d_b_hh
