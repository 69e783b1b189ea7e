"""LSTM (gates i, f, g, o; optional projection h = (o * tanh(c)) W_hr^T): step kernels and their launchers.

Forward, per step, one kernel: h_{t-1} W_hh^T with tl.dot for a tile of hidden units of all four gates, then
the activations, c update (in place: each element belongs to one program) and the saved gates / c_t. With a
projection a second small GEMM (gemm.step_gemm) maps o * tanh(c) to h. Backward, per step, one kernel: the
gradient reaching h_t (d_gates of the step after times W_hh, with tl.dot), then d(pre-activation) of the step
and the d_c update. With a projection that gradient lives in P-space and needs W_hr first, so backward runs
GEMM (d_h W_hr), pointwise kernel, GEMM (d_gates W_hh) per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastrnn.backends import new_output
from fastrnn.backends.triton.common import (
    block_k,
    bwd_order,
    carry,
    d_w_hh,
    dot,
    dot_f32,
    ended,
    final_h,
    fresh_sum,
    load_prev,
    n_continue,
    precision,
    prev_step,
    tanh,
    tiles,
)
from fastrnn.backends.triton.gemm import step_gemm
from fastrnn.cells import steps


@triton.jit(do_not_specialize=["n", "k"])  # one compile for every row count
def _lstm_fwd_step(
    gx_ptr,  # [B, 4H] this step's input projection (incl. b_ih)
    hs_ptr,  # [B, P] fp32 state after the previous step (rows < k)
    h0_ptr,  # [B, P] initial state (rows k..n start from it)
    w_ptr,  # [4H, P]
    b_ptr,  # [4H] (unused without HAS_BIAS)
    c_ptr,  # [B, H] fp32 cell state, read and written in place
    hn_ptr,  # [B, H] fp32: the new state, or o * tanh(c) when projecting
    out_ptr,  # [B, H] this step's output (without projection)
    gates_ptr,  # [B, 4H] fp32 saved activations
    extra_ptr,  # [B, H] fp32 saved c_t
    n, k, H, P,
    HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, WRITE_OUT: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < n
    cmask = cols < H
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, P, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < P
        a = load_prev(hs_ptr, h0_ptr, rows, kk, n, k, P, kmask)  # [BB, BK]
        wp = w_ptr + cols[None, :] * P + kk[:, None]  # W^T tile [BK, BH] of gate i
        wm = kmask[:, None] & cmask[None, :]
        acc_i += dot(a, tl.load(wp, mask=wm, other=0.0), PRECISION, DOT_F32)
        acc_f += dot(a, tl.load(wp + H * P, mask=wm, other=0.0), PRECISION, DOT_F32)
        acc_g += dot(a, tl.load(wp + 2 * H * P, mask=wm, other=0.0), PRECISION, DOT_F32)
        acc_o += dot(a, tl.load(wp + 3 * H * P, mask=wm, other=0.0), PRECISION, DOT_F32)
    m2 = rmask[:, None] & cmask[None, :]
    G4 = 4 * H
    gxp = gx_ptr + rows[:, None] * G4 + cols[None, :]
    acc_i += tl.load(gxp, mask=m2, other=0.0).to(tl.float32)
    acc_f += tl.load(gxp + H, mask=m2, other=0.0).to(tl.float32)
    acc_g += tl.load(gxp + 2 * H, mask=m2, other=0.0).to(tl.float32)
    acc_o += tl.load(gxp + 3 * H, mask=m2, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc_i += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc_f += tl.load(b_ptr + H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(b_ptr + 2 * H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc_o += tl.load(b_ptr + 3 * H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    i = tl.sigmoid(acc_i)
    f = tl.sigmoid(acc_f)
    g = tanh(acc_g)
    o = tl.sigmoid(acc_o)
    hc = rows[:, None] * H + cols[None, :]
    c = f * tl.load(c_ptr + hc, mask=m2, other=0.0) + i * g
    h = o * tanh(c)
    tl.store(c_ptr + hc, c, mask=m2)
    tl.store(hn_ptr + hc, h, mask=m2)
    if WRITE_OUT:
        tl.store(out_ptr + hc, h.to(out_ptr.dtype.element_ty), mask=m2)
    if SAVE:
        sp = gates_ptr + rows[:, None] * G4 + cols[None, :]
        tl.store(sp, i, mask=m2)
        tl.store(sp + H, f, mask=m2)
        tl.store(sp + 2 * H, g, mask=m2)
        tl.store(sp + 3 * H, o, mask=m2)
        tl.store(extra_ptr + hc, c, mask=m2)


@triton.jit(do_not_specialize=["n", "k", "kc"])  # one compile for every row count
def _lstm_bwd_step(
    dgp_ptr,  # [B, 4H] fp32 d_gates of the step processed before (rows < kc continue into it)  (CARRY)
    w_ptr,  # [4H, H]  (CARRY)
    dhn_ptr,  # [B, H] d_h_n (rows kc..n end at this step)  (CARRY)
    dout_ptr,  # [B, H] this step's d_out  (CARRY)
    dh_ptr,  # [B, H] fp32 gradient w.r.t. o * tanh(c), computed beforehand  (projection: not CARRY)
    gates_ptr,  # [B, 4H] fp32 saved i, f, g, o
    c_ptr,  # [B, H] fp32 saved c_t
    cs_ptr,  # [B, H] fp32 saved c of the previous step (rows < k)
    c0_ptr,  # [B, H] initial cell state (rows k..n)
    dc_ptr,  # [B, H] fp32 running d_c, read and written in place
    dg_ptr,  # [B, 4H] fp32 d(pre-activation) of this step
    n, k, kc, H,
    CARRY: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    m2 = (rows < n)[:, None] & cmask[None, :]
    hc = rows[:, None] * H + cols[None, :]
    if CARRY:
        dht = carry(
            dgp_ptr, 4 * H, w_ptr, rows, cols, kc, 4 * H, H, cmask, PRECISION, DOT_F32, BLOCK_B, BLOCK_H, BLOCK_K
        )
        dht += ended(dhn_ptr, rows, cols, n, kc, H, cmask)
        dht += tl.load(dout_ptr + hc, mask=m2, other=0.0).to(tl.float32)
    else:
        dht = tl.load(dh_ptr + hc, mask=m2, other=0.0)
    G4 = 4 * H
    gp = gates_ptr + rows[:, None] * G4 + cols[None, :]
    i = tl.load(gp, mask=m2, other=0.0)
    f = tl.load(gp + H, mask=m2, other=0.0)
    g = tl.load(gp + 2 * H, mask=m2, other=0.0)
    o = tl.load(gp + 3 * H, mask=m2, other=0.0)
    tc = tanh(tl.load(c_ptr + hc, mask=m2, other=0.0))
    cp = load_prev(cs_ptr, c0_ptr, rows, cols, n, k, H, cmask)
    dct = tl.load(dc_ptr + hc, mask=m2, other=0.0) + dht * o * (1.0 - tc * tc)
    dp = dg_ptr + rows[:, None] * G4 + cols[None, :]
    tl.store(dp, dct * g * i * (1.0 - i), mask=m2)
    tl.store(dp + H, dct * cp * f * (1.0 - f), mask=m2)
    tl.store(dp + 2 * H, dct * i * (1.0 - g * g), mask=m2)
    tl.store(dp + 3 * H, dht * tc * o * (1.0 - o), mask=m2)
    tl.store(dc_ptr + hc, dct * f, mask=m2)


def lstm_fwd(
    gx: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Tensor | None, w_hr: Tensor | None,
    bs: list[int], packed: bool, reverse: bool, need_saved: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """gx [T,B,4H], h0 [B,P], c0 [B,H] -> out [T,B,P], h_n [B,P], c_n [B,H], gates [T,B,4H], extra [T,B,H]."""
    T, B, G4 = gx.shape
    H, P = G4 // 4, h0.shape[1]
    f32 = torch.float32
    out = gx.new_zeros(T, B, P) if packed else new_output((T, B, P), gx)
    hbuf = gx.new_empty(2, B, P, dtype=f32)  # ping-pong: programs of a step read all of h_{t-1}
    c = c0.to(f32, copy=True)
    hbar = gx.new_empty(B, H, dtype=f32) if w_hr is not None else None
    gates = new_output((T, B, G4), gx, f32) if need_saved else gx.new_empty(0, dtype=f32)
    extra = new_output((T, B, H), gx, f32) if need_saved else gx.new_empty(0, dtype=f32)
    prec = precision()
    for s, t in enumerate(steps(T, reverse)):
        n, k = bs[t], n_continue(t, bs, reverse)
        src, dst = hbuf[s % 2], hbuf[(s + 1) % 2]
        BB, BH = tiles(n, H)
        _lstm_fwd_step[(triton.cdiv(n, BB), triton.cdiv(H, BH))](
            gx[t], src, h0, w_hh, w_hh if b_hh is None else b_hh, c, dst if hbar is None else hbar, out[t],
            gates[t] if need_saved else c, extra[t] if need_saved else c,
            n, k, H, P,
            HAS_BIAS=b_hh is not None, SAVE=need_saved, WRITE_OUT=hbar is None,
            PRECISION=prec, DOT_F32=dot_f32(gx.dtype),
            BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=block_k(P),
        )
        if hbar is not None:
            step_gemm(hbar, w_hr, dst, n, prec, transpose_b=True, out=out[t])
    return out, final_h(out, bs, reverse, packed), c.to(gx.dtype), gates, extra


def lstm_bwd(
    d_out: Tensor, d_h_n: Tensor, d_c_n: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, has_bias: bool,
    w_hr: Tensor | None, bs: list[int], packed: bool, reverse: bool, out: Tensor, gates: Tensor, extra: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """-> d_gx [T,B,4H], d_h0 [B,P], d_c0 [B,H], d_w_hh [4H,P], d_b_hh [4H] | None, d_w_hr [P,H] | None."""
    T, B, P = out.shape
    H = w_hh.shape[0] // 4
    f32, dt = torch.float32, out.dtype
    prec = precision()
    dc = d_c_n.to(f32, copy=True)  # [B, H] running d_c
    d_g = out.new_zeros(T, B, 4 * H, dtype=f32)  # every step's d(pre-activation), for the weight GEMMs
    BK = block_k(4 * H)
    if w_hr is None:
        for t, tp, kc in bwd_order(T, bs, reverse):
            n, k = bs[t], n_continue(t, bs, reverse)
            BB, BH = tiles(n, H)
            _lstm_bwd_step[(triton.cdiv(n, BB), triton.cdiv(H, BH))](
                d_g[tp], w_hh, d_h_n, d_out[t], dc, gates[t], extra[t], extra[prev_step(t, T, reverse)], c0,
                dc, d_g[t], n, k, kc, H,
                CARRY=True, PRECISION=prec, DOT_F32=dot_f32(dt), BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=BK,
            )
        d_h0 = fresh_sum(d_g, bs, reverse) @ w_hh.to(f32)  # rows starting from h0: one GEMM at the end
        d_hfull = None
    else:  # h_t = hbar_t W_hr^T: the gradient goes P-space -> H-space -> P-space, three launches per step
        d_h0 = d_h_n.to(f32, copy=True)  # [B, P] running d_h
        d_hfull = out.new_zeros(T, B, P, dtype=f32)  # d_h_t of every step, for d_w_hr
        dhbar = out.new_empty(B, H, dtype=f32)
        for t in reversed(steps(T, reverse)):
            n, k = bs[t], n_continue(t, bs, reverse)
            torch.add(d_h0[:n], d_out[t, :n], out=d_hfull[t, :n])
            step_gemm(d_hfull[t], w_hr, dhbar, n, prec)  # [n, P] @ [P, H]
            BB, BH = tiles(n, H)
            _lstm_bwd_step[(triton.cdiv(n, BB), triton.cdiv(H, BH))](
                d_g[t], w_hh, d_h_n, d_out[t], dhbar, gates[t], extra[t], extra[prev_step(t, T, reverse)], c0,
                dc, d_g[t], n, k, 0, H,
                CARRY=False, PRECISION=prec, DOT_F32=dot_f32(dt), BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=BK,
            )
            step_gemm(d_g[t], w_hh, d_h0, n, prec)  # [n, 4H] @ [4H, P]
    flat = d_g.reshape(T * B, 4 * H)
    d_w = d_w_hh(d_g, out, h0, bs, reverse)
    d_b = flat.sum(0) if has_bias else None
    d_w_hr = None
    if d_hfull is not None:
        hbar_all = gates[:, :, 3 * H :] * torch.tanh(extra)  # o * tanh(c), [T, B, H]
        if packed:  # rows a step did not touch hold unspecified values
            active = torch.arange(B, device=out.device)[None, :] < torch.tensor(bs, device=out.device)[:, None]
            hbar_all = torch.where(active[:, :, None], hbar_all, 0.0)
        d_w_hr = d_hfull.reshape(T * B, P).t() @ hbar_all.reshape(T * B, H)
    return (
        d_g.to(dt), d_h0.to(dt), dc.to(dt), d_w.to(dt),
        None if d_b is None else d_b.to(dt), None if d_w_hr is None else d_w_hr.to(dt),
    )
