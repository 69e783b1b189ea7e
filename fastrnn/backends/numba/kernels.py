"""The numba kernels: the time walk of a layer written once (`_forward_walk`, `_backward_walk`), and each cell's
pointwise forward and backward step over a block of hidden units (`_lstm_*`, `_gru_*`, `_rnn_*`), found by the
cell's kernel_id (cells.py) in one dispatch table, `STEPS`.

The walk is compiled once per cell (`FORWARD`, `BACKWARD`; see `_per_cell`) with that cell's steps as
constants, as C++ instantiates a template per cell: each compiled walk holds its own cell's step alone and is
cached under its own name. The alternatives measured worse or are fragile: a cell id argument branching
between all steps inside the walk made every cell compile all of them and slowed rnn's backward step by a
quarter; jitted steps passed in as arguments make numba's on-disk cache key on those functions' types, which
a fresh process does not reliably reuse. All @njit code of the backend lives in this one file because numba
invalidates its on-disk cache per source file: a walk calling a step defined in another file would keep a
stale compiled copy of the step after an edit. The launcher (allocate, lay out W_hh in blocks, call) is
launcher.py.

Each forward step: for each block k of hidden units (one thread each when there are several), one BLAS GEMM
h_{t-1} @ W_k^T into a preallocated buffer, then the cell's fused pass over the block's units (activations,
state update, saving what backward needs); with a projection one more GEMM maps it to h_t. Each backward
step: the cell's fused pass forming d(pre-activations), then one GEMM d_gh @ W_hh split over blocks of
output columns. Each cell's walk is compiled twice: serially and with the blocks on numba's threads.

The layer-normalised cells (ln_lstm, ln_gru; `Step.rows`) normalise over all hidden units of a row, which a
block of units does not see: their forward runs the blocks' GEMMs (W_hh^T without bias, in blocks as above),
then their fused pass over whole rows (`_ln_*_rows`; the rows on numba's threads in the parallel walk), and
their backward pass runs over whole rows too, leaving d raw for the same GEMM d_gh @ W_hh. The other cells'
row pass, and these cells' block pass, are empty functions, so no walk changes for the cells it does not run.
"""

from __future__ import annotations

import math
import types as types_
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from numba import prange, types
from numba.extending import overload

from fastrnn.backends.numba.common import jit

# ---- activations ----

# tanh for float32 as a [13/6] rational function on [-7.9053, 7.9053] (beyond it tanh rounds to +-1): within
# 3e-7 of tanh, and plain arithmetic that LLVM vectorizes, where libm's tanhf is a scalar call many times
# slower. float64 keeps libm (1e-9 accuracy is part of the contract tests).
_CLAMP = np.float32(7.90531110763549805)
_A = tuple(
    np.float32(a)
    for a in (
        4.89352455891786e-03,
        6.37261928875436e-04,
        1.48572235717979e-05,
        5.12229709037114e-08,
        -8.60467152213735e-11,
        2.00018790482477e-13,
        -2.76076847742355e-16,
    )
)
_B = tuple(
    np.float32(b) for b in (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
)
_HALF = np.float32(0.5)


def _tanh(x):
    return math.tanh(x)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


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


def _like(x, a):
    return x


@overload(_like)
def _like_impl(x, a):
    # the scalar x in the dtype of array a: float32 arithmetic stays float32 (and takes the float32 activations)
    if a.dtype == types.float32:
        return lambda x, a: np.float32(x)
    return lambda x, a: np.float64(x)


@jit()
def _matmul_t(a, b, out):
    # out [n, N] = a [n, K] @ b [N, K]^T through BLAS; one row is a matrix-vector product (gemv beats a 1-row gemm)
    if a.shape[0] == 1:
        np.dot(b, a[0], out[0])
    else:
        np.dot(a, b.T, out)


# ---- per-cell forward steps ----
# (t, n, j0, w, hb, H, gx, h, c, gh, bk, hout, gates, extra, need_saved): hidden units j0 .. j0+w of the n rows
# active at step t. gx [T,B,G*H] (incl. b_ih)  h [B,P] h_{t-1}  c [B,H] in: c_{t-1}, out: c_t (cells with a cell
# state)  gh [n,G*hb] h_{t-1} W_k^T (bias not added), scratch  bk [G*hb] b_hh of block k  hout [B,H] out: h_t
# before any projection  gates, extra [T,B,*] out: the saved layout of cells.py (when need_saved).
# Per row, short loops over one or two arrays each, which LLVM vectorizes; the row stays in L1.


@jit(inline="always")
def _lstm_fwd_rows(t, n, j0, w, hb, H, gx, h, c, gh, bk, hout, gates, extra, need_saved):
    for r in range(n):
        a = gh[r]  # [4hb] pre-activations, then activations (i, f, g, o)
        x = gx[t, r]
        for g in range(4):
            for q in range(w):
                a[g * hb + q] += x[g * H + j0 + q] + bk[g * hb + q]
        # one in-place loop per activation: a single stream per loop is what LLVM vectorizes
        sif = a[: 2 * hb]
        for q in range(2 * hb):
            sif[q] = _sigmoid(sif[q])
        sg_ = a[2 * hb : 3 * hb]
        for q in range(hb):
            sg_[q] = _tanh(sg_[q])
        so = a[3 * hb :]
        for q in range(hb):
            so[q] = _sigmoid(so[q])
        cr = c[r, j0 : j0 + w]
        hr = hout[r, j0 : j0 + w]
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


@jit(inline="always")
def _gru_fwd_rows(t, n, j0, w, hb, H, gx, h, c, gh, bk, hout, gates, extra, need_saved):
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
            ag = a[g * hb : g * hb + w]
            xg = x[g * H + j0 : g * H + j0 + w]
            for q in range(w):
                ag[q] = _sigmoid(ag[q] + xg[q])
        ar = a[:w]
        an = a[2 * hb : 2 * hb + w]
        xn = x[2 * H + j0 : 2 * H + j0 + w]
        for q in range(w):
            an[q] = _tanh(xn[q] + ar[q] * an[q])
        hp = h[r, j0 : j0 + w]
        hr = hout[r, j0 : j0 + w]
        for q in range(w):
            z = a[hb + q]
            hr[q] = (1.0 - z) * a[2 * hb + q] + z * hp[q]
        if need_saved:
            sg = gates[t, r]
            for g in range(3):
                for q in range(w):
                    sg[g * H + j0 + q] = a[g * hb + q]


@jit(inline="always")
def _rnn_fwd_rows(t, n, j0, w, gx, gh, bk, hout, relu):
    for r in range(n):
        for q in range(w):
            v = gx[t, r, j0 + q] + gh[r, q] + bk[q]
            if relu:
                hout[r, j0 + q] = v if v > 0.0 or v != v else 0.0  # NaN passes, as torch.relu
            else:
                hout[r, j0 + q] = _tanh(v)


@jit(inline="always")
def _rnn_tanh_fwd_rows(t, n, j0, w, hb, H, gx, h, c, gh, bk, hout, gates, extra, need_saved):
    _rnn_fwd_rows(t, n, j0, w, gx, gh, bk, hout, False)


@jit(inline="always")
def _rnn_relu_fwd_rows(t, n, j0, w, hb, H, gx, h, c, gh, bk, hout, gates, extra, need_saved):
    _rnn_fwd_rows(t, n, j0, w, gx, gh, bk, hout, True)


# ---- per-cell backward steps ----
# (t, n, kp, src, j0, j1, H, dh, dc, h0, c0, out, gates, extra, dg, dgh, hbar, proj): hidden units j0 .. j1 of
# the n rows active at step t. dh [B,H] in: d h_t (before any projection), out (cells whose Step.bypass): the part
# of d h_{t-1} that does not go through W_hh  dc [B,H] in: d c_t, out: d c_{t-1}  the state before step t is
# out[src] / extra[src] for the kp rows that continue and h0 / c0 for the rows that start here
# dg [T,B,G*H] out: d_gx  dgh [T,B,G*H] out: d(h W_hh^T + b_hh) (dg itself unless STEPS says otherwise)
# hbar [T,B,H] out (proj): h_t before the projection, for d_w_hr.


@jit(inline="always")
def _lstm_bwd_rows(t, n, kp, src, j0, j1, H, dh, dc, h0, c0, out, gates, extra, dg, dgh, hbar, proj):
    for r in range(n):
        sg = gates[t, r]
        ct = extra[t, r]
        cp = extra[src, r] if r < kp else c0[r]
        d = dg[t, r]
        dht = dh[r]
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
            hr = hbar[t, r]
            for j in range(j0, j1):
                hr[j] = sg[3 * H + j] * _tanh(ct[j])


@jit(inline="always")
def _gru_bwd_rows(t, n, kp, src, j0, j1, H, dh, dc, h0, c0, out, gates, extra, dg, dgh, hbar, proj):
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
            dht[j] = dht[j] * z  # h' = (1-z) n + z h reaches h_{t-1} directly too
        e = dgh[t, r]
        for j in range(j0, j1):
            e[j] = d[j]
            e[H + j] = d[H + j]
            e[2 * H + j] = d[2 * H + j] * sg[j]


@jit(inline="always")
def _rnn_bwd_rows(t, n, j0, j1, dh, out, dg, relu):
    for r in range(n):
        for j in range(j0, j1):
            y = out[t, r, j]
            if relu:  # torch's threshold_backward: zero where the output is <= 0
                dg[t, r, j] = 0.0 if y <= 0.0 else dh[r, j]
            else:
                dg[t, r, j] = dh[r, j] * (1.0 - y * y)


@jit(inline="always")
def _rnn_tanh_bwd_rows(t, n, kp, src, j0, j1, H, dh, dc, h0, c0, out, gates, extra, dg, dgh, hbar, proj):
    _rnn_bwd_rows(t, n, j0, j1, dh, out, dg, False)


@jit(inline="always")
def _rnn_relu_bwd_rows(t, n, kp, src, j0, j1, H, dh, dc, h0, c0, out, gates, extra, dg, dgh, hbar, proj):
    _rnn_bwd_rows(t, n, j0, j1, dh, out, dg, True)


# ---- the normalised cells' steps (cells.py, "Normalised cells"): over whole rows ----
# A layer norm needs every hidden unit of a row at once, which a block of units does not have: the walk runs
# these after the GEMMs of all blocks, each over the n active rows (split over numba's threads in the parallel
# walk; prange runs as range in the serial one).
# forward (t, n, nblk, hb, H, gx, h, c, ghb, rowbuf, hout, gates, extra, need_saved, nparams, zmask, keep):
#   ghb [nblk,B,G*hb] raw = h_{t-1} W_hh^T in common.block_rows' layout  rowbuf [B,G*H] scratch where nblk > 1
#   (the raw rows gathered into torch's order)  nparams [norm_width*H] Norm.params  zmask [T,B,H] zoneout's keep
#   mask | empty: the constant keep  the rest as the forward steps above.
# backward (t, n, kp, src, H, dh, dc, h0, c0, out, gates, extra, dg, dgh, dex, nparams, zmask, keep): as the
#   backward steps above over all units, and dex [T,B,H] out: Grads.d_extra; dgh gets d raw, dh the part of
#   d h_{t-1} that does not go through W_hh (Step.bypass).

_EPS = 1e-5  # layer norm's epsilon (reference._norm)


@jit(inline="always")
def _stats(v, m):
    # mean and 1 / sqrt(var + eps) of v[:m] (biased variance, two passes accumulated in float64), in v's dtype
    s = 0.0
    for q in range(m):
        s += v[q]
    mu = s / m
    s = 0.0
    for q in range(m):
        e = v[q] - mu
        s += e * e
    return _like(mu, v), _like(1.0 / math.sqrt(s / m + _EPS), v)


@jit(inline="always")
def _norm_bwd_inplace(d, raw, gain, m):
    # d[:m] in: d(gain ⊙ N(raw)), out: d raw (reference._norm_bwd with dy = d ⊙ gain; N(raw) recomputed)
    mu, rs = _stats(raw, m)
    s1 = 0.0
    s2 = 0.0
    for q in range(m):
        y = d[q] * gain[q]
        s1 += y
        s2 += y * ((raw[q] - mu) * rs)
    a1, a2 = _like(s1 / m, d), _like(s2 / m, d)
    for q in range(m):
        d[q] = rs * (d[q] * gain[q] - a1 - ((raw[q] - mu) * rs) * a2)


@jit(inline="always")
def _raw_row(ghb, rowbuf, r, nblk, hb, H, G):
    # row r of raw [G*H] in torch's order: ghb's own row with one block, else gathered from the blocks
    if nblk == 1:
        return ghb[0, r]
    row = rowbuf[r]
    for k in range(nblk):
        j0 = k * hb
        w = max(0, min(H, j0 + hb) - j0)
        sr = ghb[k, r]
        for g in range(G):
            for q in range(w):
                row[g * H + j0 + q] = sr[g * hb + q]
    return row


@jit(inline="always")
def _ln_lstm_fwd_rows(t, n, nblk, hb, H, gx, h, c, ghb, rowbuf, hout, gates, extra, need_saved, nparams, zmask, keep):
    GH = 4 * H
    ln_hh, b_hh = nparams[:GH], nparams[GH : 2 * GH]
    ln_c, b_c = nparams[2 * GH : 2 * GH + H], nparams[2 * GH + H : 2 * GH + 2 * H]
    km = _like(keep, gx)
    masked = zmask.shape[0] > 0
    for r in prange(n):
        a = _raw_row(ghb, rowbuf, r, nblk, hb, H, 4)  # raw, then pre-activations, then activations (i, f, g, o)
        if need_saved:
            se = extra[t, r, H:]
            for q in range(GH):
                se[q] = a[q]
        mu, rs = _stats(a, GH)
        x = gx[t, r]
        for q in range(GH):
            a[q] = x[q] + ln_hh[q] * ((a[q] - mu) * rs) + b_hh[q]
        sif = a[: 2 * H]
        for q in range(2 * H):
            sif[q] = _sigmoid(sif[q])
        sg_ = a[2 * H : 3 * H]
        for q in range(H):
            sg_[q] = _tanh(sg_[q])
        so = a[3 * H :]
        for q in range(H):
            so[q] = _sigmoid(so[q])
        cr = c[r]
        for q in range(H):
            cr[q] = a[H + q] * cr[q] + a[q] * a[2 * H + q]
        muc, rsc = _stats(cr, H)
        hp = h[r]
        hr = hout[r]
        for q in range(H):  # hbar, then zoneout: h_t = h_{t-1} + m (hbar - h_{t-1})
            hr[q] = so[q] * _tanh(ln_c[q] * ((cr[q] - muc) * rsc) + b_c[q]) - hp[q]
        if masked:
            zm = zmask[t, r]
            for q in range(H):
                hr[q] = hp[q] + zm[q] * hr[q]
        else:
            for q in range(H):
                hr[q] = hp[q] + km * hr[q]
        if need_saved:
            sg = gates[t, r]
            for q in range(GH):
                sg[q] = a[q]
            se = extra[t, r]
            for q in range(H):
                se[q] = cr[q]


@jit(inline="always")
def _ln_gru_fwd_rows(t, n, nblk, hb, H, gx, h, c, ghb, rowbuf, hout, gates, extra, need_saved, nparams, zmask, keep):
    GH = 3 * H
    ln_hh, b_hh = nparams[:GH], nparams[GH : 2 * GH]
    km = _like(keep, gx)
    masked = zmask.shape[0] > 0
    for r in prange(n):
        a = _raw_row(ghb, rowbuf, r, nblk, hb, H, 3)  # raw, then ah, then r, z, n
        if need_saved:
            se = extra[t, r, H:]
            for q in range(GH):
                se[q] = a[q]
        mu, rs = _stats(a, GH)
        for q in range(GH):
            a[q] = ln_hh[q] * ((a[q] - mu) * rs) + b_hh[q]
        an = a[2 * H :]
        if need_saved:
            se = extra[t, r]
            for q in range(H):
                se[q] = an[q]
        x = gx[t, r]
        for q in range(2 * H):
            a[q] = _sigmoid(x[q] + a[q])
        xn = x[2 * H :]
        for q in range(H):
            an[q] = _tanh(xn[q] + a[q] * an[q])
        hp = h[r]
        hr = hout[r]
        for q in range(H):  # hbar - h_{t-1} = (1 - z) (n - h_{t-1})
            hr[q] = (1.0 - a[H + q]) * (an[q] - hp[q])
        if masked:
            zm = zmask[t, r]
            for q in range(H):
                hr[q] = hp[q] + zm[q] * hr[q]
        else:
            for q in range(H):
                hr[q] = hp[q] + km * hr[q]
        if need_saved:
            sg = gates[t, r]
            for q in range(GH):
                sg[q] = a[q]


@jit(inline="always")
def _ln_lstm_bwd_rows(t, n, kp, src, H, dh, dc, h0, c0, out, gates, extra, dg, dgh, dex, nparams, zmask, keep):
    GH = 4 * H
    ln_hh = nparams[:GH]
    ln_c, b_c = nparams[2 * GH : 2 * GH + H], nparams[2 * GH + H : 2 * GH + 2 * H]
    km = _like(keep, dg)
    masked = zmask.shape[0] > 0
    for r in prange(n):
        sg = gates[t, r]
        ct = extra[t, r, :H]
        cp = extra[src, r, :H] if r < kp else c0[r]
        d = dg[t, r]
        e = dgh[t, r]
        dx = dex[t, r]
        dht = dh[r]
        dcr = dc[r]
        muc, rsc = _stats(ct, H)
        s1 = 0.0
        s2 = 0.0
        for j in range(H):
            o = sg[3 * H + j]
            chat = (ct[j] - muc) * rsc
            tc = _tanh(ln_c[j] * chat + b_c[j])
            m = zmask[t, r, j] if masked else km
            dhb = m * dht[j]  # d hbar
            dcp = dhb * o * (1.0 - tc * tc)  # d(ln_c ⊙ N(c_t) + ln_c_bias)
            dx[j] = dcp
            d[3 * H + j] = dhb * tc * o * (1.0 - o)
            dht[j] = dht[j] - dhb  # (1 - m) d h_t reaches h_{t-1} directly
            y = dcp * ln_c[j]
            s1 += y
            s2 += y * chat
        a1, a2 = _like(s1 / H, d), _like(s2 / H, d)
        for j in range(H):
            i = sg[j]
            f = sg[H + j]
            g = sg[2 * H + j]
            dct = dcr[j] + rsc * (dx[j] * ln_c[j] - a1 - ((ct[j] - muc) * rsc) * a2)
            d[j] = dct * g * i * (1.0 - i)
            d[H + j] = dct * cp[j] * f * (1.0 - f)
            d[2 * H + j] = dct * i * (1.0 - g * g)
            dcr[j] = dct * f
        for q in range(GH):
            e[q] = d[q]
        _norm_bwd_inplace(e, extra[t, r, H:], ln_hh, GH)


@jit(inline="always")
def _ln_gru_bwd_rows(t, n, kp, src, H, dh, dc, h0, c0, out, gates, extra, dg, dgh, dex, nparams, zmask, keep):
    GH = 3 * H
    ln_hh = nparams[:GH]
    km = _like(keep, dg)
    masked = zmask.shape[0] > 0
    for r in prange(n):
        sg = gates[t, r]
        hn = extra[t, r, :H]
        hp = out[src, r] if r < kp else h0[r]
        d = dg[t, r]
        e = dgh[t, r]  # d ah = (dr, dz, dn r), then d raw
        dx = dex[t, r]
        dht = dh[r]
        for j in range(H):
            rg = sg[j]
            z = sg[H + j]
            nn = sg[2 * H + j]
            m = zmask[t, r, j] if masked else km
            dhb = m * dht[j]  # d hbar
            dn = dhb * (1.0 - z) * (1.0 - nn * nn)
            dr = dn * hn[j] * rg * (1.0 - rg)
            dz = dhb * (hp[j] - nn) * z * (1.0 - z)
            d[j] = dr
            d[H + j] = dz
            d[2 * H + j] = dn
            e[j] = dr
            e[H + j] = dz
            e[2 * H + j] = dn * rg
            dx[j] = dn * rg
            dht[j] = dhb * z + (dht[j] - dhb)  # reaches h_{t-1} directly: through z, and zoneout's (1 - m)
        _norm_bwd_inplace(e, extra[t, r, H:], ln_hh, GH)


@jit(inline="always")
def _no_fwd_block(t, n, j0, w, hb, H, gx, h, c, gh, bk, hout, gates, extra, need_saved):
    pass  # the block pass of a cell whose step runs over whole rows


@jit(inline="always")
def _no_bwd_block(t, n, kp, src, j0, j1, H, dh, dc, h0, c0, out, gates, extra, dg, dgh, hbar, proj):
    pass


@jit(inline="always")
def _no_fwd_rows(t, n, nblk, hb, H, gx, h, c, ghb, rowbuf, hout, gates, extra, need_saved, nparams, zmask, keep):
    pass  # the row pass of a cell whose step runs over blocks of hidden units


@jit(inline="always")
def _no_bwd_rows(t, n, kp, src, H, dh, dc, h0, c0, out, gates, extra, dg, dgh, dex, nparams, zmask, keep):
    pass


# ---- the dispatch table: cells.py's kernel_id -> the cell's steps ----


class Step(NamedTuple):
    name: str  # the cell (tests check this table against cells.TABLE)
    forward: Callable  # its forward pass over a block of hidden units (signature above _lstm_fwd_rows), or rows
    backward: Callable  # its backward pass (signature above _lstm_bwd_rows), or rows
    d_gh_is_d_gx: bool  # d(h W_hh^T + b_hh) equals d_gx, so backward keeps one array (not GRU: r scales n's)
    bypass: bool  # part of d h_{t-1} does not go through W_hh (GRU: h' = (1-z) n + z h); the step leaves it in dh
    rows: bool = False  # the passes run over whole rows (signatures above _ln_lstm_fwd_rows): the normalised cells


STEPS: dict[int, Step] = {
    0: Step("lstm", _lstm_fwd_rows, _lstm_bwd_rows, d_gh_is_d_gx=True, bypass=False),
    1: Step("gru", _gru_fwd_rows, _gru_bwd_rows, d_gh_is_d_gx=False, bypass=True),
    2: Step("rnn_tanh", _rnn_tanh_fwd_rows, _rnn_tanh_bwd_rows, d_gh_is_d_gx=True, bypass=False),
    3: Step("rnn_relu", _rnn_relu_fwd_rows, _rnn_relu_bwd_rows, d_gh_is_d_gx=True, bypass=False),
    4: Step("ln_lstm", _ln_lstm_fwd_rows, _ln_lstm_bwd_rows, d_gh_is_d_gx=False, bypass=True, rows=True),
    5: Step("ln_gru", _ln_gru_fwd_rows, _ln_gru_bwd_rows, d_gh_is_d_gx=False, bypass=True, rows=True),
}


# ---- the walk, once ----


def _forward_walk(
    G, gx, h, c, wb, bb, w_hr, bs, reverse, out, hbar, ghb, gates, extra, proj, need_saved, nparams, zmask, keep,
    rowbuf,
):  # fmt: skip
    # G: the cell's gate count   gx [T,B,G*H]   h [B,P] in: h0, out: h_n
    # c [B,H] in: c0, out: c_n | empty   wb [nblk,G*hb,P], bb [nblk,G*hb]: W_hh, b_hh in common.block_rows'
    # layout   w_hr [P,H] | empty   bs [T]   out [T,B,P]   hbar [B,H] scratch (proj) | empty
    # ghb [nblk,B,G*hb] scratch   gates, extra [T,B,*] cells.py's saved layout (empty unless need_saved and the
    # cell saves them)   nparams [norm_width*H], zmask [T,B,H] | empty, keep: cells.Norm (normalised cells; else
    # empty)   rowbuf [B,G*H] scratch (normalised cells with several blocks) | empty
    T, B, P = out.shape
    H = gx.shape[2] // G
    nblk = wb.shape[0]
    hb = wb.shape[1] // G
    for s in range(T):
        t = T - 1 - s if reverse else s
        n = bs[t]
        hout = hbar if proj else out[t]
        # each block k of hidden units: its GEMM, then the cell's pass over its units (one block: the whole row,
        # with constant bounds, which LLVM optimizes better than a loop of one)
        if nblk == 1:
            _matmul_t(h[:n], wb[0], ghb[0, :n])
            _STEP_FORWARD(t, n, 0, H, hb, H, gx, h, c, ghb[0, :n], bb[0], hout, gates, extra, need_saved)
        else:
            for k in prange(nblk):
                j0 = k * hb
                gh = ghb[k, :n]
                _matmul_t(h[:n], wb[k], gh)
                w = max(0, min(H, j0 + hb) - j0)
                _STEP_FORWARD(t, n, j0, w, hb, H, gx, h, c, gh, bb[k], hout, gates, extra, need_saved)
        # the cells whose step needs whole rows (Step.rows) run it now, over the rows; for the others it is empty
        _ROWS_FORWARD(t, n, nblk, hb, H, gx, h, c, ghb, rowbuf, hout, gates, extra, need_saved, nparams, zmask, keep)
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


def _backward_walk(
    G, d_out, dh, dc, h0, c0, wtb, w_hr, bs, reverse, out, gates, extra, dg, dgh, dhfull, hbar, dhbar, dhblk,
    proj, bypass, nblk, dex, nparams, zmask, keep,
):  # fmt: skip
    # G: the cell's gate count   d_out [T,B,P]   dh [B,P] in: d_h_n, out: d_h0
    # dc [B,H] in: d_c_n, out: d_c0 | empty   h0 [B,P], c0 [B,H] | empty   wtb [nblkp,pb,G*H]: W_hh^T in row
    # blocks (common.block_cols)   w_hr [P,H] | empty   bs [T]
    # out, gates, extra: forward's   dg [T,B,G*H] out: d_gx   dgh [T,B,G*H] out: d(h W_hh^T + b_hh), dg itself
    # for most cells (both zero on inactive rows)   dhfull [T,B,P], hbar [T,B,H] out (proj, zero-filled): for
    # d_w_hr   dhbar [B,H] scratch (proj)   dhblk [nblkp,B,pb] scratch   bypass: Step.bypass
    # nblk: blocks of hidden units of the cell's pass (1 for Step.rows)   dex [T,B,H] out: Grads.d_extra (zero on
    # inactive rows) | empty   nparams, zmask, keep: as forward's
    T, B, P = d_out.shape
    GH = dg.shape[2]
    H = GH // G
    nblkp = wtb.shape[0]
    pb = wtb.shape[1]
    hb = -(-H // nblk)
    for s in range(T):
        t = s if reverse else T - 1 - s
        n = bs[t]
        # cells.prev_rows: how many of the n rows continue from the previous step (the rest start from h0)
        if reverse:
            kp = min(n, bs[t + 1]) if t + 1 < T else 0
        else:
            kp = n if t > 0 else 0
        src = t + 1 if reverse else t - 1
        for r in range(n):
            for p in range(P):
                dh[r, p] += d_out[t, r, p]
        dhb = dh
        if proj:  # d h_t -> d hbar_t (the cells with a projection pass nothing to h_{t-1} but through W_hh)
            for r in range(n):
                for p in range(P):
                    dhfull[t, r, p] = dh[r, p]
            _matmul_t(dh[:n], w_hr.T, dhbar[:n])
            dhb = dhbar
        if nblk == 1:
            _STEP_BACKWARD(t, n, kp, src, 0, H, H, dhb, dc, h0, c0, out, gates, extra, dg, dgh, hbar, proj)
        else:
            for k in prange(nblk):
                j0 = k * hb
                _STEP_BACKWARD(
                    t, n, kp, src, j0, min(H, j0 + hb), H, dhb, dc, h0, c0, out, gates, extra, dg, dgh, hbar, proj
                )
        _ROWS_BACKWARD(t, n, kp, src, H, dhb, dc, h0, c0, out, gates, extra, dg, dgh, dex, nparams, zmask, keep)
        for r in range(n, B):
            for m in range(GH):
                dg[t, r, m] = 0.0
                dgh[t, r, m] = 0.0
            for m in range(dex.shape[2]):
                dex[t, r, m] = 0.0
        # d h_{t-1} = d_gh @ W_hh (+ what the cell's pass left in dh where part of it bypasses W_hh)
        if nblkp == 1 and not bypass:
            _matmul_t(dgh[t, :n], wtb[0], dh[:n])
            continue
        if nblkp == 1:
            _matmul_t(dgh[t, :n], wtb[0], dhblk[0, :n])
        else:
            for k in prange(nblkp):
                _matmul_t(dgh[t, :n], wtb[k], dhblk[k, :n])
        for k in range(nblkp):
            p0 = k * pb
            w = min(pb, P - p0)
            for r in range(n):
                dr = dh[r, p0 : p0 + w]
                br = dhblk[k, r]
                if bypass:
                    for q in range(w):
                        dr[q] += br[q]
                else:
                    for q in range(w):
                        dr[q] = br[q]


def _per_cell(fn: Callable) -> dict[tuple[int, bool], Callable]:
    """The walk fn compiled for each cell of STEPS, serially (prange runs as range) and with prange on numba's
    threads: {(kernel_id, parallel): kernel}, each compiled on its first call. In each copy the cell's steps are
    the globals _STEP_FORWARD and _STEP_BACKWARD (over blocks of hidden units) and _ROWS_FORWARD and
    _ROWS_BACKWARD (over rows, Step.rows), which numba compiles in as constants, the pair a cell does not use
    empty; so a walk holds its cell's step alone (with the cell as a runtime argument branching between all
    steps, the other steps in the same loop slowed rnn's backward step by a quarter and every cell compiled them
    all). The parallel ones start
    numba's thread pool only when a call asks for threads (common.threads). A copy under its own name keeps
    them apart in numba's cache, which is indexed by qualified name."""
    kernels = {}
    for kid, step in STEPS.items():
        blocks = (_no_fwd_block, _no_bwd_block) if step.rows else (step.forward, step.backward)
        rows = (step.forward, step.backward) if step.rows else (_no_fwd_rows, _no_bwd_rows)
        cell_globals = dict(fn.__globals__, _STEP_FORWARD=blocks[0], _STEP_BACKWARD=blocks[1])
        cell_globals.update(_ROWS_FORWARD=rows[0], _ROWS_BACKWARD=rows[1])
        for parallel in (False, True):
            name = f"{fn.__name__}_{step.name}" + ("_par" if parallel else "")
            copy = types_.FunctionType(fn.__code__, cell_globals, name, fn.__defaults__)
            copy.__qualname__ = name
            kernels[kid, parallel] = jit(parallel=parallel)(copy)
    return kernels


# the steps of a compiled walk (over blocks of hidden units, over rows): each copy made by _per_cell has its own
_STEP_FORWARD = _STEP_BACKWARD = _ROWS_FORWARD = _ROWS_BACKWARD = None
FORWARD = _per_cell(_forward_walk)
BACKWARD = _per_cell(_backward_walk)
