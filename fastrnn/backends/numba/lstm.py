"""LSTM (with optional proj_size) on numba: kernels, then launchers.

Forward, per step: each thread (block k of hidden units) multiplies h_{t-1} by its block of W_hh^T with BLAS
and fuses the gate activations, the cell update and saving (i, f, g, o) and c_t; with proj_size one more
GEMM projects o*tanh(c_t) to h_t. Backward, per step: one fused pass forms d_gates, one GEMM (split over
P columns) forms d_h_{t-1}. All steps run inside one compiled function.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange
from torch import Tensor

from fastrnn.backends import new_output
from fastrnn.backends.numba.common import (
    arr,
    block_bias,
    block_cols,
    block_rows,
    dummy,
    jit,
    n_blocks,
    prev_counts,
    weight_grads,
)


@jit()
def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@jit()
def _lstm_fwd_block(k, t, n, gx, h, c, wb, bb, out, hbar, ghb, gates, extra, proj, need_saved):
    # hidden units j0..j1 of step t: gh = h_{t-1} @ W_k^T into ghb[k] [n, 4*hb], then the fused pass
    H = c.shape[1]
    hb = wb.shape[1] // 4
    j0 = k * hb
    j1 = min(H, j0 + hb)
    gh = ghb[k, :n]
    np.dot(h[:n], wb[k].T, gh)
    bk = bb[k]
    for r in range(n):
        for j in range(j0, j1):
            q = j - j0
            i = _sigmoid(gx[t, r, j] + gh[r, q] + bk[q])
            f = _sigmoid(gx[t, r, H + j] + gh[r, hb + q] + bk[hb + q])
            g = math.tanh(gx[t, r, 2 * H + j] + gh[r, 2 * hb + q] + bk[2 * hb + q])
            o = _sigmoid(gx[t, r, 3 * H + j] + gh[r, 3 * hb + q] + bk[3 * hb + q])
            cn = f * c[r, j] + i * g
            c[r, j] = cn
            hn = o * math.tanh(cn)
            if proj:
                hbar[r, j] = hn
            else:
                out[t, r, j] = hn
            if need_saved:
                gates[t, r, j] = i
                gates[t, r, H + j] = f
                gates[t, r, 2 * H + j] = g
                gates[t, r, 3 * H + j] = o
                extra[t, r, j] = cn


@jit(parallel=True)
def lstm_fwd_kernel(gx, h, c, wb, bb, w_hr, bs, reverse, out, hbar, ghb, gates, extra, proj, need_saved):
    # gx [T,B,4H]  h [B,P] in: h0, out: h_n   c [B,H] in: c0, out: c_n   wb [nblk,4hb,P]  bb [nblk,4hb]
    # w_hr [P,H] | empty   bs [T]   out [T,B,P]   hbar [B,H] | empty   ghb [nblk,B,4hb]
    # gates [T,B,4H], extra [T,B,H] (empty unless need_saved)
    T, B, P = out.shape
    nblk = wb.shape[0]
    for s in range(T):
        t = T - 1 - s if reverse else s
        n = bs[t]
        if nblk == 1:
            _lstm_fwd_block(0, t, n, gx, h, c, wb, bb, out, hbar, ghb, gates, extra, proj, need_saved)
        else:
            for k in prange(nblk):
                _lstm_fwd_block(k, t, n, gx, h, c, wb, bb, out, hbar, ghb, gates, extra, proj, need_saved)
        if proj:
            np.dot(hbar[:n], w_hr.T, out[t, :n])
        for r in range(n):
            for p in range(P):
                h[r, p] = out[t, r, p]
        for r in range(n, B):
            for p in range(P):
                out[t, r, p] = 0.0
            if need_saved:  # saved rows past n are never read, but zeros keep the op deterministic (opcheck)
                for m in range(gates.shape[2]):
                    gates[t, r, m] = 0.0
                for m in range(extra.shape[2]):
                    extra[t, r, m] = 0.0


@jit()
def _lstm_bwd_block(k, nblk, t, n, kp, src, dhb, dc, c0, gates, extra, dg, hbar_all, proj):
    # hidden units of block k at step t: d(pre-activations) of the 4 gates, the running d_c, and o*tanh(c_t)
    # for d_w_hr. c_{t-1} is extra[src] for the kp rows that continue, c0 for the rows that start here.
    H = dc.shape[1]
    hb = -(-H // nblk)
    j0 = k * hb
    j1 = min(H, j0 + hb)
    for r in range(n):
        for j in range(j0, j1):
            i = gates[t, r, j]
            f = gates[t, r, H + j]
            g = gates[t, r, 2 * H + j]
            o = gates[t, r, 3 * H + j]
            cp = extra[src, r, j] if r < kp else c0[r, j]
            tc = math.tanh(extra[t, r, j])
            dht = dhb[r, j]
            if proj:
                hbar_all[t, r, j] = o * tc
            dct = dc[r, j] + dht * o * (1.0 - tc * tc)
            dg[t, r, j] = dct * g * i * (1.0 - i)
            dg[t, r, H + j] = dct * cp * f * (1.0 - f)
            dg[t, r, 2 * H + j] = dct * i * (1.0 - g * g)
            dg[t, r, 3 * H + j] = dht * tc * o * (1.0 - o)
            dc[r, j] = dct * f


@jit(parallel=True)
def lstm_bwd_kernel(
    d_out, dh, dc, c0, wtb, w_hr, bs, kprev, reverse, gates, extra, dg, dhfull, hbar_all, dhbar, dhblk, proj, nblk
):
    # d_out [T,B,P]  dh [B,P] in: d_h_n, out: d_h0   dc [B,H] in: d_c_n, out: d_c0   c0 [B,H]
    # wtb [nblkp,pb,4H] W_hh^T in row blocks   w_hr [P,H] | empty   bs, kprev [T]   gates, extra: saved
    # dg [T,B,4H] out: d_gx (zero on inactive rows)   dhfull [T,B,P], hbar_all [T,B,H] (proj, zero-filled)
    # dhbar [B,H] (proj)   dhblk [nblkp,B,pb] scratch
    T, B, P = d_out.shape
    G4 = dg.shape[2]
    nblkp = wtb.shape[0]
    pb = wtb.shape[1]
    for s in range(T):
        t = s if reverse else T - 1 - s
        n = bs[t]
        kp = kprev[t]
        src = t + 1 if reverse else t - 1
        for r in range(n):
            for p in range(P):
                dh[r, p] += d_out[t, r, p]
        dhb = dh
        if proj:
            for r in range(n):
                for p in range(P):
                    dhfull[t, r, p] = dh[r, p]
            np.dot(dh[:n], w_hr, dhbar[:n])
            dhb = dhbar
        if nblk == 1:
            _lstm_bwd_block(0, nblk, t, n, kp, src, dhb, dc, c0, gates, extra, dg, hbar_all, proj)
        else:
            for k in prange(nblk):
                _lstm_bwd_block(k, nblk, t, n, kp, src, dhb, dc, c0, gates, extra, dg, hbar_all, proj)
        for r in range(n, B):
            for m in range(G4):
                dg[t, r, m] = 0.0
        if nblkp == 1:
            np.dot(dg[t, :n], wtb[0].T, dh[:n])
        else:
            for k in prange(nblkp):
                np.dot(dg[t, :n], wtb[k].T, dhblk[k, :n])
            for r in range(n):
                for p in range(P):
                    dh[r, p] = dhblk[p // pb, r, p % pb]


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
    lstm_fwd_kernel(
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
    lstm_bwd_kernel(
        arr(d_out), arr(dh), arr(dc), arr(c0), arr(wtb), arr(w_hr) if proj else dummy(2, out),
        np.asarray(bs, dtype=np.int64), prev_counts(bs, T, reverse), reverse, arr(gates), arr(extra), arr(dg),
        arr(dhfull), arr(hbar_all), arr(out.new_empty(B, H)) if proj else dummy(2, out),
        arr(out.new_empty(nblkp, B, wtb.shape[1])), proj, nblk,
    )
    d_w_hh, d_b_hh = weight_grads(dg, out, h0, bs, reverse, b_hh is not None)
    d_w_hr = dhfull.reshape(-1, P).t() @ hbar_all.reshape(-1, H) if proj else None
    return dg, dh, dc, d_w_hh, d_b_hh, d_w_hr
