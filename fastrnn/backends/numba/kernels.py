"""The numba kernels of every cell: forward and backward of lstm (with proj_size), gru, rnn_tanh / rnn_relu.

All @njit code of the backend lives in this one file because numba invalidates its on-disk cache per
source file: a kernel calling a helper defined in another file would keep a stale compiled copy of the
helper after an edit. The launchers (allocate, lay out W_hh in blocks, call) are in lstm.py, gru.py, rnn.py.

Each step of a forward kernel: for each block k of hidden units (one thread each when there are several),
one BLAS GEMM h_{t-1} @ W_k^T into a preallocated buffer, then one fused pass over the block's units
(activations, state update, saving what backward needs). Each step of a backward kernel: one fused pass
forming d(pre-activations), then one GEMM d_gates @ W_hh split over blocks of output columns.
"""

from __future__ import annotations

import math
import types as types_
from collections.abc import Callable

import numpy as np
from numba import prange, types
from numba.extending import overload

from fastrnn.backends.numba.common import jit

# tanh for float32 as a [13/6] rational function on [-7.9053, 7.9053] (beyond it tanh rounds to +-1): within
# 3e-7 of tanh, and plain arithmetic that LLVM vectorizes, where libm's tanhf is a scalar call many times
# slower. float64 keeps libm (1e-9 accuracy is part of the contract tests).
_CLAMP = np.float32(7.90531110763549805)
_A = tuple(np.float32(a) for a in (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05,
                                  5.12229709037114e-08, -8.60467152213735e-11, 2.00018790482477e-13,
                                  -2.76076847742355e-16))
_B = tuple(np.float32(b) for b in (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04,
                                  1.19825839466702e-06))
_HALF = np.float32(0.5)


def _tanh(x):
    return math.tanh(x)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _serial_and_parallel(fn: Callable) -> tuple[Callable, Callable]:
    """fn compiled twice: serially (prange runs as range) and with prange on numba's threads. The parallel one
    is compiled, and numba's thread pool started, only when a call asks for threads (common.threads). A copy
    under its own name keeps the two apart in numba's cache, which is indexed by qualified name."""
    par = types_.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_par", fn.__defaults__, fn.__closure__)
    par.__qualname__ = fn.__qualname__ + "_par"
    return jit()(fn), jit(parallel=True)(par)


@overload(_tanh)
def _tanh_impl(x):
    if x != types.float32:
        return lambda x: math.tanh(x)
    a1, a3, a5, a7, a9, a11, a13 = _A
    b0, b2, b4, b6 = _B
    hi, lo = _CLAMP, -_CLAMP

    def f32(x):
        if x > hi:  # comparisons keep NaN as NaN
            x = hi
        elif x < lo:
            x = lo
        x2 = x * x
        p = x * (a1 + x2 * (a3 + x2 * (a5 + x2 * (a7 + x2 * (a9 + x2 * (a11 + x2 * a13))))))
        return p / (b0 + x2 * (b2 + x2 * (b4 + x2 * b6)))

    return f32


@overload(_sigmoid)
def _sigmoid_impl(x):
    if x != types.float32:
        return lambda x: 1.0 / (1.0 + math.exp(-x))
    half = _HALF
    return lambda x: half + half * _tanh(half * x)


@jit()
def _matmul_t(a, b, out):
    # out [n, N] = a [n, K] @ b [N, K]^T through BLAS; one row is a matrix-vector product (gemv beats a 1-row gemm)
    if a.shape[0] == 1:
        np.dot(b, a[0], out[0])
    else:
        np.dot(a, b.T, out)


@jit()
def _lstm_fwd_block(k, t, n, gx, h, c, wb, bb, out, hbar, ghb, gates, extra, proj, need_saved):
    # hidden units j0..j1 of step t: gh = h_{t-1} @ W_k^T into ghb[k] [n, 4*hb], then per row short loops over
    # one or two arrays each (bias, activations, cell update, saving) that LLVM vectorizes; the row stays in L1
    H = c.shape[1]
    hb = wb.shape[1] // 4
    j0 = k * hb
    w = min(H, j0 + hb) - j0
    gh = ghb[k, :n]
    _matmul_t(h[:n], wb[k], gh)
    bk = bb[k]
    for r in range(n):
        a = gh[r]  # [4hb] pre-activations, then activations (i, f, g, o)
        x = gx[t, r]
        for g in range(4):
            for q in range(w):
                a[g * hb + q] += x[g * H + j0 + q] + bk[g * hb + q]
        # one in-place loop per activation: a single stream per loop is what LLVM vectorizes
        sif = a[:2 * hb]
        for q in range(2 * hb):
            sif[q] = _sigmoid(sif[q])
        sg_ = a[2 * hb:3 * hb]
        for q in range(hb):
            sg_[q] = _tanh(sg_[q])
        so = a[3 * hb:]
        for q in range(hb):
            so[q] = _sigmoid(so[q])
        cr = c[r, j0:j0 + w]
        hr = hbar[r, j0:j0 + w] if proj else out[t, r, j0:j0 + w]
        for q in range(w):
            cn = a[hb + q] * cr[q] + a[q] * a[2 * hb + q]
            cr[q] = cn
            hr[q] = a[3 * hb + q] * _tanh(cn)
        if need_saved:
            sg = gates[t, r]
            for g in range(4):
                for q in range(w):
                    sg[g * H + j0 + q] = a[g * hb + q]
            se = extra[t, r]
            for q in range(w):
                se[j0 + q] = cr[q]


def _lstm_fwd(gx, h, c, wb, bb, w_hr, bs, reverse, out, hbar, ghb, gates, extra, proj, need_saved):
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
            _matmul_t(hbar[:n], w_hr, out[t, :n])
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


lstm_fwd_kernel, lstm_fwd_kernel_par = _serial_and_parallel(_lstm_fwd)


@jit()
def _lstm_bwd_block(k, nblk, t, n, kp, src, dhb, dc, c0, gates, extra, dg, hbar_all, proj):
    # hidden units of block k at step t: d(pre-activations) of the 4 gates, the running d_c, and o*tanh(c_t)
    # for d_w_hr. c_{t-1} is extra[src] for the kp rows that continue, c0 for the rows that start here.
    H = dc.shape[1]
    hb = -(-H // nblk)
    j0 = k * hb
    j1 = min(H, j0 + hb)
    for r in range(n):
        sg = gates[t, r]
        ct = extra[t, r]
        cp = extra[src, r] if r < kp else c0[r]
        d = dg[t, r]
        dht = dhb[r]
        dcr = dc[r]
        for j in range(j0, j1):
            i = sg[j]
            f = sg[H + j]
            g = sg[2 * H + j]
            o = sg[3 * H + j]
            tc = _tanh(ct[j])
            dct = dcr[j] + dht[j] * o * (1.0 - tc * tc)
            d[j] = dct * g * i * (1.0 - i)
            d[H + j] = dct * cp[j] * f * (1.0 - f)
            d[2 * H + j] = dct * i * (1.0 - g * g)
            d[3 * H + j] = dht[j] * tc * o * (1.0 - o)
            dcr[j] = dct * f
        if proj:
            hr = hbar_all[t, r]
            for j in range(j0, j1):
                hr[j] = sg[3 * H + j] * _tanh(ct[j])


def _lstm_bwd(
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
            _matmul_t(dh[:n], w_hr.T, dhbar[:n])
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
            _matmul_t(dg[t, :n], wtb[0], dh[:n])
        else:
            for k in prange(nblkp):
                _matmul_t(dg[t, :n], wtb[k], dhblk[k, :n])
            for r in range(n):
                for p in range(P):
                    dh[r, p] = dhblk[p // pb, r, p % pb]


lstm_bwd_kernel, lstm_bwd_kernel_par = _serial_and_parallel(_lstm_bwd)


@jit()
def _gru_fwd_block(k, t, n, gx, h, wb, bb, out, ghb, gates, extra, need_saved):
    # hidden units j0..j1 of step t: gh = h_{t-1} @ W_k^T into ghb[k] [n, 3*hb], then per row short loops that
    # LLVM vectorizes (bias, gates, state update, saving)
    H = h.shape[1]
    hb = wb.shape[1] // 3
    j0 = k * hb
    w = min(H, j0 + hb) - j0
    gh = ghb[k, :n]
    _matmul_t(h[:n], wb[k], gh)
    bk = bb[k]
    for r in range(n):
        a = gh[r]  # [3hb]: r, z pre-activations then activations; W_hn h + b_hn; then n
        x = gx[t, r]
        for g in range(3):
            for q in range(w):
                a[g * hb + q] += bk[g * hb + q]
        if need_saved:
            se = extra[t, r]
            for q in range(w):
                se[j0 + q] = a[2 * hb + q]
        # one loop per gate: few streams per loop is what LLVM vectorizes
        for g in range(2):
            ag = a[g * hb:g * hb + w]
            xg = x[g * H + j0:g * H + j0 + w]
            for q in range(w):
                ag[q] = _sigmoid(ag[q] + xg[q])
        ar = a[:w]
        an = a[2 * hb:2 * hb + w]
        xn = x[2 * H + j0:2 * H + j0 + w]
        for q in range(w):
            an[q] = _tanh(xn[q] + ar[q] * an[q])
        hp = h[r, j0:j0 + w]
        hr = out[t, r, j0:j0 + w]
        for q in range(w):
            z = a[hb + q]
            hr[q] = (1.0 - z) * a[2 * hb + q] + z * hp[q]
        if need_saved:
            sg = gates[t, r]
            for g in range(3):
                for q in range(w):
                    sg[g * H + j0 + q] = a[g * hb + q]


def _gru_fwd(gx, h, wb, bb, bs, reverse, out, ghb, gates, extra, need_saved):
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


gru_fwd_kernel, gru_fwd_kernel_par = _serial_and_parallel(_gru_fwd)


@jit()
def _gru_bwd_block(k, nblk, t, n, kp, src, dh, h0, out, gates, extra, dg, dgh):
    # hidden units of block k at step t; h_{t-1} is out[src] for the kp rows that continue, h0 for the rest
    H = dh.shape[1]
    hb = -(-H // nblk)
    j0 = k * hb
    j1 = min(H, j0 + hb)
    for r in range(n):
        sg = gates[t, r]
        hn = extra[t, r]
        hp = out[src, r] if r < kp else h0[r]
        dht = dh[r]
        d = dg[t, r]
        for j in range(j0, j1):
            rg = sg[j]
            z = sg[H + j]
            nn = sg[2 * H + j]
            dn = dht[j] * (1.0 - z) * (1.0 - nn * nn)
            d[j] = dn * hn[j] * rg * (1.0 - rg)
            d[H + j] = dht[j] * (hp[j] - nn) * z * (1.0 - z)
            d[2 * H + j] = dn
        e = dgh[t, r]
        for j in range(j0, j1):
            e[j] = d[j]
            e[H + j] = d[H + j]
            e[2 * H + j] = d[2 * H + j] * sg[j]


def _gru_bwd(d_out, dh, h0, wtb, bs, kprev, reverse, out, gates, extra, dg, dgh, dhblk, nblk):
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
            _matmul_t(dgh[t, :n], wtb[0], dhblk[0, :n])
        else:
            for k in prange(nblkp):
                _matmul_t(dgh[t, :n], wtb[k], dhblk[k, :n])
        for r in range(n):
            for p in range(H):
                dh[r, p] = dhblk[p // pb, r, p % pb] + dh[r, p] * gates[t, r, H + p]


gru_bwd_kernel, gru_bwd_kernel_par = _serial_and_parallel(_gru_bwd)


@jit()
def _rnn_fwd_block(k, t, n, gx, h, wb, bb, out, ghb, relu):
    H = h.shape[1]
    hb = wb.shape[1]
    j0 = k * hb
    j1 = min(H, j0 + hb)
    gh = ghb[k, :n]
    _matmul_t(h[:n], wb[k], gh)
    bk = bb[k]
    for r in range(n):
        for j in range(j0, j1):
            x = gx[t, r, j] + gh[r, j - j0] + bk[j - j0]
            if relu:
                out[t, r, j] = x if x > 0.0 or x != x else 0.0  # NaN passes, as torch.relu
            else:
                out[t, r, j] = _tanh(x)


def _rnn_fwd(gx, h, wb, bb, bs, reverse, out, ghb, relu):
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


rnn_fwd_kernel, rnn_fwd_kernel_par = _serial_and_parallel(_rnn_fwd)


def _rnn_bwd(d_out, dh, wtb, bs, reverse, out, dg, dhblk, relu):
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
            _matmul_t(dg[t, :n], wtb[0], dh[:n])
        else:
            for k in prange(nblkp):
                _matmul_t(dg[t, :n], wtb[k], dhblk[k, :n])
            for r in range(n):
                for p in range(H):
                    dh[r, p] = dhblk[p // pb, r, p % pb]


rnn_bwd_kernel, rnn_bwd_kernel_par = _serial_and_parallel(_rnn_bwd)
