"""The reference backend: the kernel contract in plain torch ops with backpropagation through time written out.

It is the oracle the fast backends are read against (besides torch.nn itself): short and obviously right,
not fast. The time walk is written once (`forward`, `backward`); each cell contributes a pointwise forward and
backward step (`_STEPS`). Every tensor argument is contiguous and of one dtype and device (ops.py sees to that).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrnn.cells import Cell, Grads, Saved, State, Weights, batch_sizes_list, prev_rows, saved_dtype, steps

NAME = "reference"


def available() -> tuple[bool, str]:
    return True, ""


def supports(cell: Cell, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    if not dtype.is_floating_point:
        return False, f"a floating-point dtype is needed, got {dtype}"
    return True, ""


# ---- per-cell pointwise steps ----
# forward(x, gh, hp, cp, nz) -> h, c_t | None, saved gates row | None, saved extra row | None
#   x = gx[t] [n, G*H] (incl. b_ih), gh = h_{t-1} W_hh^T + b_hh [n, G*H], hp = h_{t-1} [n, P], cp = c_{t-1};
#   h [n, H] is the new h before any projection; nz: (Norm.params, zoneout keep [n, H] or a float), normalised
#   cells only (their gh is the raw h_{t-1} W_hh^T).
# backward(dh, dc, hp, cp, h, gates, extra, nz) -> d_x, d_gh, dh_direct | None, dc_prev | None, d_extra | None
#   dh = d h [n, H], dc = d c_t; h of this step; d_x, d_gh: gradients of x and gh (they differ for GRU's n gate
#   and the normalised cells); dh_direct: the part of d h_{t-1} not through W_hh; d_extra: Grads.d_extra's row.


def _lstm_fwd(x, gh, hp, cp, nz=None):
    i, f, g, o = (x + gh).chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c = f * cp + i * g
    return o * c.tanh(), c, torch.cat([i, f, g, o], 1), c


def _lstm_bwd(dh, dc, hp, cp, h, gates, extra, nz=None):
    i, f, g, o = gates.chunk(4, 1)
    tc = extra.tanh()
    dct = dc + dh * o * (1 - tc * tc)
    d = torch.cat([dct * g * i * (1 - i), dct * cp * f * (1 - f), dct * i * (1 - g * g), dh * tc * o * (1 - o)], 1)
    return d, d, None, dct * f, None


def _gru_fwd(x, gh, hp, cp, nz=None):
    xr, xz, xn = x.chunk(3, 1)
    hr, hz, hn = gh.chunk(3, 1)
    r = (xr + hr).sigmoid()
    z = (xz + hz).sigmoid()
    n = (xn + r * hn).tanh()
    return (1 - z) * n + z * hp, None, torch.cat([r, z, n], 1), hn


def _gru_bwd(dh, dc, hp, cp, h, gates, extra, nz=None):
    r, z, n = gates.chunk(3, 1)
    dn = dh * (1 - z) * (1 - n * n)
    dr = dn * extra * r * (1 - r)
    dz = dh * (hp - n) * z * (1 - z)
    return torch.cat([dr, dz, dn], 1), torch.cat([dr, dz, dn * r], 1), dh * z, None, None


def _tanh_fwd(x, gh, hp, cp, nz=None):
    return (x + gh).tanh(), None, None, None


def _tanh_bwd(dh, dc, hp, cp, h, gates, extra, nz=None):
    d = dh * (1 - h * h)
    return d, d, None, None, None


def _relu_fwd(x, gh, hp, cp, nz=None):
    return (x + gh).relu(), None, None, None


def _relu_bwd(dh, dc, hp, cp, h, gates, extra, nz=None):
    d = torch.where(h <= 0, torch.zeros_like(dh), dh)  # torch's threshold_backward: zero where h <= 0, NaN passes
    return d, d, None, None, None


EPS = 1e-5  # layer norm's epsilon (the normalised cells)


def _norm(v: Tensor) -> tuple[Tensor, Tensor]:
    """N(v) over the last dimension (biased variance) and 1 / sqrt(var + eps)."""
    mu = v.mean(-1, keepdim=True)
    rstd = ((v - mu) ** 2).mean(-1, keepdim=True).add(EPS).rsqrt()
    return (v - mu) * rstd, rstd


def _norm_bwd(dy: Tensor, vhat: Tensor, rstd: Tensor) -> Tensor:
    """d v from d N(v) = dy."""
    return rstd * (dy - dy.mean(-1, keepdim=True) - vhat * (dy * vhat).mean(-1, keepdim=True))


def _norm_parts(params: Tensor, GH: int, H: int | None) -> tuple[Tensor, ...]:
    """Norm.params split: ln_hh_weight, b_hh, then ln_c_weight, ln_c_bias (H given: cells with a cell state)."""
    return params.split([GH, GH] + ([H, H] if H is not None else []))


def _zoneout(hbar: Tensor, hp: Tensor, m) -> Tensor:
    return hp + m * (hbar - hp)


def _ln_lstm_fwd(x, raw, hp, cp, nz):
    params, m = nz
    H = cp.shape[1]
    ln_hh, b_hh, ln_c, b_c = _norm_parts(params, raw.shape[1], H)
    i, f, g, o = (x + ln_hh * _norm(raw)[0] + b_hh).chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c = f * cp + i * g
    hbar = o * (ln_c * _norm(c)[0] + b_c).tanh()
    return _zoneout(hbar, hp, m), c, torch.cat([i, f, g, o], 1), torch.cat([c, raw], 1)


def _ln_lstm_bwd(dh, dc, hp, cp, h, gates, extra, nz):
    params, m = nz
    H = cp.shape[1]
    ln_hh, _, ln_c, b_c = _norm_parts(params, 4 * H, H)
    i, f, g, o = gates.chunk(4, 1)
    c, raw = extra.split([H, 4 * H], 1)
    chat, rstd_c = _norm(c)
    tc = (ln_c * chat + b_c).tanh()
    dhbar = m * dh
    d_cpre = dhbar * o * (1 - tc * tc)
    dct = dc + _norm_bwd(d_cpre * ln_c, chat, rstd_c)
    d = torch.cat([dct * g * i * (1 - i), dct * cp * f * (1 - f), dct * i * (1 - g * g), dhbar * tc * o * (1 - o)], 1)
    rhat, rstd = _norm(raw)
    return d, _norm_bwd(d * ln_hh, rhat, rstd), (1 - m) * dh, dct * f, d_cpre


def _ln_gru_fwd(x, raw, hp, cp, nz):
    params, m = nz
    ln_hh, b_hh = _norm_parts(params, raw.shape[1], None)
    xr, xz, xn = x.chunk(3, 1)
    hr, hz, hn = (ln_hh * _norm(raw)[0] + b_hh).chunk(3, 1)
    r = (xr + hr).sigmoid()
    z = (xz + hz).sigmoid()
    n = (xn + r * hn).tanh()
    return _zoneout((1 - z) * n + z * hp, hp, m), None, torch.cat([r, z, n], 1), torch.cat([hn, raw], 1)


def _ln_gru_bwd(dh, dc, hp, cp, h, gates, extra, nz):
    params, m = nz
    H = hp.shape[1]
    ln_hh = params[: 3 * H]
    r, z, n = gates.chunk(3, 1)
    hn, raw = extra.split([H, 3 * H], 1)
    dhbar = m * dh
    dn = dhbar * (1 - z) * (1 - n * n)
    dr = dn * hn * r * (1 - r)
    dz = dhbar * (hp - n) * z * (1 - z)
    rhat, rstd = _norm(raw)
    d_raw = _norm_bwd(torch.cat([dr, dz, dn * r], 1) * ln_hh, rhat, rstd)
    return torch.cat([dr, dz, dn], 1), d_raw, dhbar * z + (1 - m) * dh, None, dn * r


def norm_grads(cell: Cell, d_gx: Tensor, d_extra: Tensor, extra: Tensor) -> Tensor:
    """d Norm.params from the kernel's d_gx [T,B,G*H], d_extra [T,B,H] and the saved extra rows (see cells.py,
    "Normalised cells"); rows a step skipped are zero in d_gx and d_extra, so they add nothing."""
    H = d_extra.shape[-1]
    GH = cell.G * H
    acc = extra.dtype
    d_gx, d_extra, extra = d_gx.to(acc).flatten(0, 1), d_extra.to(acc).flatten(0, 1), extra.flatten(0, 1)
    d_ah = d_gx if cell.has_cell_state else torch.cat([d_gx[:, : GH - H], d_extra], 1)
    # N(raw) and N(c_t) by torch's fused layer norm (the same statistics as _norm, in one pass over the rows)
    rhat = F.layer_norm(extra[:, H:], (GH,), eps=EPS)
    parts = [(d_ah * rhat).sum(0), d_ah.sum(0)]
    if cell.has_cell_state:
        parts += [(d_extra * F.layer_norm(extra[:, :H], (H,), eps=EPS)).sum(0), d_extra.sum(0)]
    return torch.cat(parts)


def _lstm_hbar(gates, extra):
    """o * tanh(c_t), the LSTM's output before the projection, from its saved row."""
    return gates.chunk(4, 1)[3] * extra.tanh()


class _Step(NamedTuple):
    forward: Callable
    backward: Callable
    hbar: Callable | None = None  # the pre-projection output from the saved rows (cells with a projection)


_STEPS: dict[str, _Step] = {
    "lstm": _Step(_lstm_fwd, _lstm_bwd, _lstm_hbar),
    "gru": _Step(_gru_fwd, _gru_bwd),
    "rnn_tanh": _Step(_tanh_fwd, _tanh_bwd),
    "rnn_relu": _Step(_relu_fwd, _relu_bwd),
    "ln_lstm": _Step(_ln_lstm_fwd, _ln_lstm_bwd),
    "ln_gru": _Step(_ln_gru_fwd, _ln_gru_bwd),
}


def _nz(nm, t: int, n: int, acc: torch.dtype):
    """The step's (Norm.params, zoneout keep) for the n rows active at step t of a normalised cell (nm: its Norm)."""
    return nm.params.to(acc), nm.keep if nm.mask is None else nm.mask[t, :n].to(acc)


# ---- the walk, once ----


def _prev(out: Tensor, h0: Tensor, t: int, n: int, T: int, bs: list[int], reverse: bool) -> Tensor:
    """h_{t-1} for the n rows active at step t: rows that continue read out[t -+ 1], the rest h0."""
    k = prev_rows(t, n, T, bs, reverse)
    src = t + 1 if reverse else t - 1
    if k == 0:  # also when no row is active (n == 0): src may then lie past the sequence
        return h0[:n]
    if k == n:
        return out[src, :n]
    return torch.cat([out[src, :k], h0[k:n]])


def forward(
    cell: Cell, gx: Tensor, state0: State, weights: Weights, batch_sizes: Tensor | None, reverse: bool, need_saved: bool
) -> tuple[Tensor, State, Saved]:
    """gx [T,B,G*H], state0 h [B,P] (c [B,H]), weights w_hh [G*H,P], b_hh [G*H]?, w_hr [P,H]?
    -> out [T,B,P], state_n, saved (cells.py layout).

    Written without in-place updates, so that autograd can differentiate it too: ops.py runs it under autograd
    for double backward. Rows are sorted by length, so the n rows active at a step are the first n; the rows
    past n keep their state (a finished row its last state, a row yet to join in reverse its h0)."""
    step = _STEPS[cell.name]
    T, B, _ = gx.shape
    H = gx.shape[2] // cell.G
    P = state0.h.shape[1]
    bs = batch_sizes_list(batch_sizes, T, B)
    acc = saved_dtype(gx.dtype)
    h = state0.h.to(acc)  # [B, P]
    c = state0.c.to(acc) if cell.has_cell_state else None  # [B, H]
    w = weights.w_hh.to(acc)
    b = None if weights.b_hh is None else weights.b_hh.to(acc)
    wr = None if weights.w_hr is None else weights.w_hr.to(acc)
    outs: list[Tensor] = [gx.new_zeros(B, P)] * T
    saved_rows: list[tuple[Tensor, Tensor]] = []
    save = need_saved and cell.saved_widths[0] > 0

    def pad(rows: Tensor, n: int) -> Tensor:  # [n, W] -> [B, W], zero on the rows a step skips
        return rows if n == B else torch.cat([rows, rows.new_zeros(B - n, rows.shape[1])])

    order = list(steps(T, reverse))
    nm = weights.norm
    for t in order:
        n = bs[t]
        hp = h[:n]
        gh = hp @ w.t()  # [n, G*H]
        if b is not None:
            gh = gh + b
        nz = None if nm is None else _nz(nm, t, n, acc)
        hn, cn, g_row, e_row = step.forward(gx[t, :n].to(acc), gh, hp, None if c is None else c[:n], nz)
        if wr is not None:
            hn = hn @ wr.t()
        if cn is not None:
            c = cn if n == B else torch.cat([cn, c[n:]])
        if save:
            saved_rows.append((pad(g_row, n), pad(e_row, n)))
        h = hn if n == B else torch.cat([hn, h[n:]])
        outs[t] = pad(hn, n).to(gx.dtype)
    out = torch.stack(outs) if T else gx.new_zeros(0, B, P)
    if save:
        by_t = dict(zip(order, saved_rows))
        gates = torch.stack([by_t[t][0] for t in range(T)]) if T else gx.new_zeros(cell.saved_shapes(T, B, H)[0])
        extra = torch.stack([by_t[t][1] for t in range(T)]) if T else gx.new_zeros(cell.saved_shapes(T, B, H)[1])
    else:
        gshape, eshape = cell.saved_shapes(T, B, H) if need_saved else ((0,), (0,))
        gates, extra = gx.new_zeros(gshape, dtype=acc), gx.new_zeros(eshape, dtype=acc)
    c_n = c.to(gx.dtype) if c is not None else None
    return out, State(h.to(gx.dtype), c_n), Saved(gates.to(acc), extra.to(acc))


def backward(cell, d_out, d_state_n, state0, weights, batch_sizes, reverse, out, saved) -> Grads:
    """Walks the steps in the opposite order of forward. Keeps d(pre-activation) of every step and forms
    the weight gradients as single GEMMs at the end."""
    step = _STEPS[cell.name]
    T, B, P = out.shape
    H = weights.w_hh.shape[0] // cell.G
    G = cell.G
    bs = batch_sizes_list(batch_sizes, T, B)
    acc = saved_dtype(out.dtype)
    w = weights.w_hh.to(acc)
    wr = None if weights.w_hr is None else weights.w_hr.to(acc)
    outa, h0a = out.to(acc), state0.h.to(acc)
    d_gx = out.new_zeros(T, B, G * H, dtype=acc)
    d_gh = torch.zeros_like(d_gx)
    d_extra = out.new_zeros(T, B, H, dtype=acc) if cell.norm else None
    h_prev = torch.zeros(T, B, P, dtype=acc, device=out.device)  # for d_w_hh as one GEMM
    dh = d_state_n.h.to(acc).clone()  # [B, P] running gradient of the state
    dc = d_state_n.c.to(acc).clone() if cell.has_cell_state else None
    c0a = state0.c.to(acc) if cell.has_cell_state else None
    if wr is not None:
        d_hfull = torch.zeros(T, B, P, dtype=acc, device=out.device)
        hbar = torch.zeros(T, B, H, dtype=acc, device=out.device)
    nm = weights.norm
    for t in reversed(steps(T, reverse)):
        n = bs[t]
        hp = _prev(outa, h0a, t, n, T, bs, reverse)
        cp = None if c0a is None else _prev(saved.extra[..., :H], c0a, t, n, T, bs, reverse)
        h_prev[t, :n] = hp
        dht = dh[:n] + d_out[t, :n].to(acc)
        gates = saved.gates[t, :n] if cell.saved_widths[0] else None
        extra = saved.extra[t, :n] if cell.saved_widths[1] else None
        ht = outa[t, :n]
        if wr is not None:
            d_hfull[t, :n] = dht
            ht = hbar[t, :n] = step.hbar(gates, extra)
            dht = dht @ wr  # gradient w.r.t. the pre-projection output, [n, H]
        nz = None if nm is None else _nz(nm, t, n, acc)
        dx, dg, direct, dcp, dex = step.backward(dht, None if dc is None else dc[:n], hp, cp, ht, gates, extra, nz)
        d_gx[t, :n] = dx
        if dex is not None:
            d_extra[t, :n] = dex
        d_gh[t, :n] = dg
        dh[:n] = dg @ w if direct is None else dg @ w + direct
        if dcp is not None:
            dc[:n] = dcp
    flat = d_gh.reshape(T * B, G * H)
    d_w_hh = flat.t() @ h_prev.reshape(T * B, P)
    d_b_hh = flat.sum(0) if weights.b_hh is not None else None
    d_w_hr = d_hfull.reshape(T * B, P).t() @ hbar.reshape(T * B, H) if wr is not None else None
    dt = out.dtype

    def cast(x):
        return None if x is None else x.to(dt)

    grads = Weights(cast(d_w_hh), cast(d_b_hh), cast(d_w_hr))
    return Grads(cast(d_gx), State(cast(dh), cast(dc)), grads, cast(d_extra))
