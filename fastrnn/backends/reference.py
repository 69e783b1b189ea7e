"""The reference backend: the kernel contract in plain torch ops with backpropagation through time written out.

It is the oracle the fast backends are read against (besides torch.nn itself): short and obviously right,
not fast. Every tensor argument is contiguous and of one dtype and device (ops.py sees to that).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrnn.cells import batch_sizes_list, check_cell, prev_rows, saved_dtype, saved_shapes, steps

NAME = "reference"


def available() -> tuple[bool, str]:
    return True, ""


def supports(cell: str, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    if not dtype.is_floating_point:
        return False, f"reference backend needs a floating-point dtype, got {dtype}"
    return True, ""


def _prev(out: Tensor, h0: Tensor, t: int, n: int, T: int, bs: list[int], reverse: bool) -> Tensor:
    """h_{t-1} for the n rows active at step t: rows that continue read out[t -+ 1], the rest h0."""
    k = prev_rows(t, n, T, bs, reverse)
    src = t + 1 if reverse else t - 1
    if k == n:
        return out[src, :n]
    if k == 0:
        return h0[:n]
    return torch.cat([out[src, :k], h0[k:n]])


def forward(cell, gx, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse, need_saved):
    """gx [T,B,G*H], h0 [B,P], c0 [B,H]|None, w_hh [G*H,P], b_hh [G*H]|None, w_hr [P,H]|None
    -> out [T,B,P], h_n [B,P], c_n [B,H] (empty unless lstm), gates, extra (see cells.py)."""
    G = check_cell(cell)
    T, B, _ = gx.shape
    H = gx.shape[2] // G
    P = h0.shape[1]
    bs = batch_sizes_list(batch_sizes, T, B)
    acc = saved_dtype(gx.dtype)
    out = gx.new_zeros(T, B, P)
    h = h0.to(acc).clone()  # [B, P]
    c = c0.to(acc).clone() if cell == "lstm" else None  # [B, H]
    gshape, eshape = saved_shapes(cell, T, B, H) if need_saved else ((0,), (0,))
    gates = gx.new_zeros(gshape, dtype=acc)
    extra = gx.new_zeros(eshape, dtype=acc)
    w = w_hh.to(acc)
    b = None if b_hh is None else b_hh.to(acc)
    for t in steps(T, reverse):
        n = bs[t]
        hp = h[:n]
        gh = hp @ w.t()  # [n, G*H]
        if b is not None:
            gh = gh + b
        x = gx[t, :n].to(acc)
        if cell == "lstm":
            i, f, g, o = (x + gh).chunk(4, 1)
            i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
            cn = f * c[:n] + i * g
            hn = o * cn.tanh()
            if w_hr is not None:
                hn = hn @ w_hr.to(acc).t()
            c[:n] = cn
            if need_saved:
                gates[t, :n] = torch.cat([i, f, g, o], 1)
                extra[t, :n] = cn
        elif cell == "gru":
            xr, xz, xn = x.chunk(3, 1)
            hr, hz, hh = gh.chunk(3, 1)
            r = (xr + hr).sigmoid()
            z = (xz + hz).sigmoid()
            nn_ = (xn + r * hh).tanh()
            hn = (1 - z) * nn_ + z * hp
            if need_saved:
                gates[t, :n] = torch.cat([r, z, nn_], 1)
                extra[t, :n] = hh
        elif cell == "rnn_tanh":
            hn = (x + gh).tanh()
        else:
            hn = (x + gh).relu()
        h[:n] = hn
        out[t, :n] = hn.to(out.dtype)
    c_n = c.to(gx.dtype) if c is not None else gx.new_empty(0)
    return out, h.to(gx.dtype), c_n, gates, extra


def backward(cell, d_out, d_h_n, d_c_n, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse, out, gates, extra):
    """Walks the steps in the opposite order of forward. Keeps d(pre-activation) of every step and forms
    the weight gradients as single GEMMs at the end.
    -> d_gx [T,B,G*H], d_h0 [B,P], d_c0 [B,H]|None, d_w_hh, d_b_hh|None, d_w_hr|None."""
    G = check_cell(cell)
    T, B, P = out.shape
    H = w_hh.shape[0] // G
    bs = batch_sizes_list(batch_sizes, T, B)
    acc = saved_dtype(out.dtype)
    w = w_hh.to(acc)
    wr = None if w_hr is None else w_hr.to(acc)
    outa, h0a = out.to(acc), h0.to(acc)
    d_gx = out.new_zeros(T, B, G * H, dtype=acc)
    d_gh = d_gx if cell != "gru" else torch.zeros_like(d_gx)  # only GRU's n gate differs (r * ...)
    h_prev = torch.zeros(T, B, P, dtype=acc, device=out.device)  # for d_w_hh as one GEMM
    dh = d_h_n.to(acc).clone()  # [B, P] running gradient of the state
    if cell == "lstm":
        dc = d_c_n.to(acc).clone()
        c0a = c0.to(acc)
        d_hfull = torch.zeros(T, B, P, dtype=acc, device=out.device) if wr is not None else None
        hbar = torch.zeros(T, B, H, dtype=acc, device=out.device) if wr is not None else None
    for t in reversed(steps(T, reverse)):
        n = bs[t]
        hp = _prev(outa, h0a, t, n, T, bs, reverse)
        h_prev[t, :n] = hp
        dht = dh[:n] + d_out[t, :n].to(acc)
        if cell == "lstm":
            i, f, g, o = gates[t, :n].chunk(4, 1)
            ct = extra[t, :n]
            cp = _prev(extra, c0a, t, n, T, bs, reverse)
            tc = ct.tanh()
            if wr is not None:
                d_hfull[t, :n] = dht
                hbar[t, :n] = o * tc
                dht = dht @ wr  # gradient w.r.t. o*tanh(c), [n, H]
            dct = dc[:n] + dht * o * (1 - tc * tc)
            dg_pre = torch.cat(
                [dct * g * i * (1 - i), dct * cp * f * (1 - f), dct * i * (1 - g * g), dht * tc * o * (1 - o)], 1
            )
            d_gx[t, :n] = dg_pre
            dc[:n] = dct * f
            dh[:n] = dg_pre @ w
        elif cell == "gru":
            r, z, nn_ = gates[t, :n].chunk(3, 1)
            hh = extra[t, :n]
            dn = dht * (1 - z) * (1 - nn_ * nn_)
            dr = dn * hh * r * (1 - r)
            dz = dht * (hp - nn_) * z * (1 - z)
            d_gx[t, :n] = torch.cat([dr, dz, dn], 1)
            d_gh[t, :n] = torch.cat([dr, dz, dn * r], 1)
            dh[:n] = d_gh[t, :n] @ w + dht * z
        else:
            ht = outa[t, :n]
            if cell == "rnn_tanh":
                dpre = dht * (1 - ht * ht)
            else:  # relu'(x) as torch's threshold_backward: zero where the output is <= 0 (NaN passes)
                dpre = torch.where(ht <= 0, torch.zeros_like(dht), dht)
            d_gx[t, :n] = dpre
            dh[:n] = dpre @ w
    flat = d_gh.reshape(T * B, G * H)
    d_w_hh = flat.t() @ h_prev.reshape(T * B, P)
    d_b_hh = flat.sum(0) if b_hh is not None else None
    d_w_hr = None
    if cell == "lstm" and wr is not None:
        d_w_hr = d_hfull.reshape(T * B, P).t() @ hbar.reshape(T * B, H)
    dt = out.dtype
    return (
        d_gx.to(dt),
        dh.to(dt),
        dc.to(dt) if cell == "lstm" else None,
        d_w_hh.to(dt),
        None if d_b_hh is None else d_b_hh.to(dt),
        None if d_w_hr is None else d_w_hr.to(dt),
    )
