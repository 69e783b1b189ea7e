"""GRU on numba: kernels, then launchers.

Forward, per step: each thread (block k of hidden units) multiplies h_{t-1} by its block of W_hh^T with BLAS
and fuses the gates (r, z, n = tanh(gx_n + r * (W_hn h + b_hn))), the state update and saving (r, z, n) and
W_hn h + b_hn. Backward, per step: one fused pass forms d_gx and d_gh (they differ in the n gate only), one
GEMM (split over H columns) forms d_h_{t-1}. All steps run inside one compiled function.
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
def _gru_fwd_block(k, t, n, gx, h, wb, bb, out, ghb, gates, extra, need_saved):
    # hidden units j0..j1 of step t: gh = h_{t-1} @ W_k^T into ghb[k] [n, 3*hb], then the fused pass
    H = h.shape[1]
    hb = wb.shape[1] // 3
    j0 = k * hb
    j1 = min(H, j0 + hb)
    gh = ghb[k, :n]
    np.dot(h[:n], wb[k].T, gh)
    bk = bb[k]
    for r in range(n):
        for j in range(j0, j1):
            q = j - j0
            rg = _sigmoid(gx[t, r, j] + gh[r, q] + bk[q])
            z = _sigmoid(gx[t, r, H + j] + gh[r, hb + q] + bk[hb + q])
            hn = gh[r, 2 * hb + q] + bk[2 * hb + q]
            nn = math.tanh(gx[t, r, 2 * H + j] + rg * hn)
            out[t, r, j] = (1.0 - z) * nn + z * h[r, j]
            if need_saved:
                gates[t, r, j] = rg
                gates[t, r, H + j] = z
                gates[t, r, 2 * H + j] = nn
                extra[t, r, j] = hn


@jit(parallel=True)
def gru_fwd_kernel(gx, h, wb, bb, bs, reverse, out, ghb, gates, extra, need_saved):
    # gx [T,B,3H]  h [B,H] in: h0, out: h_n   wb [nblk,3hb,H]  bb [nblk,3hb]  bs [T]  out [T,B,H]
    # ghb [nblk,B,3hb]   gates [T,B,3H], extra [T,B,H] (empty unless need_saved)
    T, B, H = out.shape
    nblk = wb.shape[0]
    for s in range(T):
        t = T - 1 - s if reverse else s
        n = bs[t]
        if nblk == 1:
            _gru_fwd_block(0, t, n, gx, h, wb, bb, out, ghb, gates, extra, need_saved)
        else:
            for k in prange(nblk):
                _gru_fwd_block(k, t, n, gx, h, wb, bb, out, ghb, gates, extra, need_saved)
        for r in range(n):
            for p in range(H):
                h[r, p] = out[t, r, p]
        for r in range(n, B):
            for p in range(H):
                out[t, r, p] = 0.0
            if need_saved:  # saved rows past n are never read, but zeros keep the op deterministic (opcheck)
                for m in range(gates.shape[2]):
                    gates[t, r, m] = 0.0
                for m in range(extra.shape[2]):
                    extra[t, r, m] = 0.0


@jit()
def _gru_bwd_block(k, nblk, t, n, kp, src, dh, h0, out, gates, extra, dg, dgh):
    # hidden units of block k at step t; h_{t-1} is out[src] for the kp rows that continue, h0 for the rest
    H = dh.shape[1]
    hb = -(-H // nblk)
    j0 = k * hb
    j1 = min(H, j0 + hb)
    for r in range(n):
        for j in range(j0, j1):
            rg = gates[t, r, j]
            z = gates[t, r, H + j]
            nn = gates[t, r, 2 * H + j]
            hp = out[src, r, j] if r < kp else h0[r, j]
            dht = dh[r, j]
            dn = dht * (1.0 - z) * (1.0 - nn * nn)
            dr = dn * extra[t, r, j] * rg * (1.0 - rg)
            dz = dht * (hp - nn) * z * (1.0 - z)
            dg[t, r, j] = dr
            dg[t, r, H + j] = dz
            dg[t, r, 2 * H + j] = dn
            dgh[t, r, j] = dr
            dgh[t, r, H + j] = dz
            dgh[t, r, 2 * H + j] = dn * rg


@jit(parallel=True)
def gru_bwd_kernel(d_out, dh, h0, wtb, bs, kprev, reverse, out, gates, extra, dg, dgh, dhblk, nblk):
    # d_out [T,B,H]  dh [B,H] in: d_h_n, out: d_h0   h0 [B,H]   wtb [nblkp,pb,3H] W_hh^T in row blocks
    # bs, kprev [T]   out, gates, extra: forward's   dg [T,B,3H] out: d_gx   dgh [T,B,3H] out: d(W_hh h + b_hh)
    # (both zero on inactive rows)   dhblk [nblkp,B,pb] scratch
    T, B, H = d_out.shape
    G3 = dg.shape[2]
    nblkp = wtb.shape[0]
    pb = wtb.shape[1]
    for s in range(T):
        t = s if reverse else T - 1 - s
        n = bs[t]
        kp = kprev[t]
        src = t + 1 if reverse else t - 1
        for r in range(n):
            for p in range(H):
                dh[r, p] += d_out[t, r, p]
        if nblk == 1:
            _gru_bwd_block(0, nblk, t, n, kp, src, dh, h0, out, gates, extra, dg, dgh)
        else:
            for k in prange(nblk):
                _gru_bwd_block(k, nblk, t, n, kp, src, dh, h0, out, gates, extra, dg, dgh)
        for r in range(n, B):
            for m in range(G3):
                dg[t, r, m] = 0.0
                dgh[t, r, m] = 0.0
        # d_h_{t-1} = d_gh @ W_hh + d_h_t * z
        if nblkp == 1:
            np.dot(dgh[t, :n], wtb[0].T, dhblk[0, :n])
        else:
            for k in prange(nblkp):
                np.dot(dgh[t, :n], wtb[k].T, dhblk[k, :n])
        for r in range(n):
            for p in range(H):
                dh[r, p] = dhblk[p // pb, r, p % pb] + dh[r, p] * gates[t, r, H + p]


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
    gru_fwd_kernel(
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
    gru_bwd_kernel(
        arr(d_out), arr(dh), arr(h0), arr(wtb), np.asarray(bs, dtype=np.int64), prev_counts(bs, T, reverse),
        reverse, arr(out), arr(gates), arr(extra), arr(dg), arr(dgh), arr(out.new_empty(nblkp, B, wtb.shape[1])),
        nblk,
    )
    d_w_hh, d_b_hh = weight_grads(dgh, out, h0, bs, reverse, b_hh is not None)
    return dg, dh, d_w_hh, d_b_hh
