"""GRU (gates r, z, n; n = tanh(gx_n + r * (W_hn h + b_hn))): step kernels and their launchers.

Forward, per step, one kernel: h_{t-1} W_hh^T with tl.dot for a tile of hidden units of all three gates, then
the activations, h update and the saved gates / W_hn h + b_hn. Backward, per step, one kernel: the gradient
reaching h_t (d_gates_h of the step after times W_hh with tl.dot, plus z * d_h of that step), then
d(pre-activation) for gx and, for the W_hh product, the only part that differs: r * d_n.
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
from fastrnn.cells import steps


@triton.jit(do_not_specialize=["n", "k"])  # one compile for every row count
def _gru_fwd_step(
    gx_ptr,  # [B, 3H] this step's input projection (incl. b_ih)
    hs_ptr,  # [B, H] fp32 state after the previous step (rows < k)
    h0_ptr,  # [B, H] initial state (rows k..n start from it)
    w_ptr,  # [3H, H]
    b_ptr,  # [3H] (unused without HAS_BIAS)
    hn_ptr,  # [B, H] fp32 new state
    out_ptr,  # [B, H] this step's output
    gates_ptr,  # [B, 3H] fp32 saved r, z, n
    extra_ptr,  # [B, H] fp32 saved W_hn h + b_hn
    n, k, H,
    HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    m2 = (rows < n)[:, None] & cmask[None, :]
    acc_r = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_n = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < H
        a = load_prev(hs_ptr, h0_ptr, rows, kk, n, k, H, kmask)  # [BB, BK]
        wp = w_ptr + cols[None, :] * H + kk[:, None]  # W^T tile [BK, BH] of gate r
        wm = kmask[:, None] & cmask[None, :]
        acc_r += dot(a, tl.load(wp, mask=wm, other=0.0), PRECISION, DOT_F32)
        acc_z += dot(a, tl.load(wp + H * H, mask=wm, other=0.0), PRECISION, DOT_F32)
        acc_n += dot(a, tl.load(wp + 2 * H * H, mask=wm, other=0.0), PRECISION, DOT_F32)
    if HAS_BIAS:
        acc_r += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc_z += tl.load(b_ptr + H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc_n += tl.load(b_ptr + 2 * H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    G3 = 3 * H
    gxp = gx_ptr + rows[:, None] * G3 + cols[None, :]
    r = tl.sigmoid(tl.load(gxp, mask=m2, other=0.0).to(tl.float32) + acc_r)
    z = tl.sigmoid(tl.load(gxp + H, mask=m2, other=0.0).to(tl.float32) + acc_z)
    nn = tanh(tl.load(gxp + 2 * H, mask=m2, other=0.0).to(tl.float32) + r * acc_n)
    hp = load_prev(hs_ptr, h0_ptr, rows, cols, n, k, H, cmask)
    h = (1.0 - z) * nn + z * hp
    hc = rows[:, None] * H + cols[None, :]
    tl.store(hn_ptr + hc, h, mask=m2)
    tl.store(out_ptr + hc, h.to(out_ptr.dtype.element_ty), mask=m2)
    if SAVE:
        sp = gates_ptr + rows[:, None] * G3 + cols[None, :]
        tl.store(sp, r, mask=m2)
        tl.store(sp + H, z, mask=m2)
        tl.store(sp + 2 * H, nn, mask=m2)
        tl.store(extra_ptr + hc, acc_n, mask=m2)


@triton.jit(do_not_specialize=["n", "k", "kc"])  # one compile for every row count
def _gru_bwd_step(
    dgxp_ptr,  # [B, 3H] fp32 d_gx of the step processed before (rows < kc continue into it): its r, z part
    dnp_ptr,  # [B, H] fp32 r * d_n of that step: the n part of its d_gates_h
    w_ptr,  # [3H, H]
    dhn_ptr,  # [B, H] d_h_n (rows kc..n end at this step)
    zd_ptr,  # [B, H] fp32 z * d_h_t: read (the step processed before), then overwritten with this step's
    dout_ptr,  # [B, H] this step's d_out
    gates_ptr,  # [B, 3H] fp32 saved r, z, n
    hh_ptr,  # [B, H] fp32 saved W_hn h + b_hn
    hs_ptr,  # [B, H] output of the previous step (rows < k)
    h0_ptr,  # [B, H] initial state (rows k..n)
    dgx_ptr,  # [B, 3H] fp32 d(pre-activation) w.r.t. gx
    dn_ptr,  # [B, H] fp32 r * d_n (d_gates_h equals d_gx but in the n gate)
    n, k, kc, H,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    m2 = (rows < n)[:, None] & cmask[None, :]
    hc = rows[:, None] * H + cols[None, :]
    G3 = 3 * H
    dht = carry(dgxp_ptr, G3, w_ptr, rows, cols, kc, 2 * H, H, cmask, PRECISION, DOT_F32, BLOCK_B, BLOCK_H, BLOCK_K)
    dht += carry(
        dnp_ptr, H, w_ptr + 2 * H * H, rows, cols, kc, H, H, cmask, PRECISION, DOT_F32, BLOCK_B, BLOCK_H, BLOCK_K
    )
    dht += ended(dhn_ptr, rows, cols, n, kc, H, cmask)
    dht += tl.load(zd_ptr + hc, mask=(rows < kc)[:, None] & cmask[None, :], other=0.0)
    dht += tl.load(dout_ptr + hc, mask=m2, other=0.0).to(tl.float32)
    g3 = rows[:, None] * G3 + cols[None, :]
    r = tl.load(gates_ptr + g3, mask=m2, other=0.0)
    z = tl.load(gates_ptr + g3 + H, mask=m2, other=0.0)
    nn = tl.load(gates_ptr + g3 + 2 * H, mask=m2, other=0.0)
    hh = tl.load(hh_ptr + hc, mask=m2, other=0.0)
    hp = load_prev(hs_ptr, h0_ptr, rows, cols, n, k, H, cmask)
    dn = dht * (1.0 - z) * (1.0 - nn * nn)
    dr = dn * hh * r * (1.0 - r)
    dz = dht * (hp - nn) * z * (1.0 - z)
    tl.store(dgx_ptr + g3, dr, mask=m2)
    tl.store(dgx_ptr + g3 + H, dz, mask=m2)
    tl.store(dgx_ptr + g3 + 2 * H, dn, mask=m2)
    tl.store(dn_ptr + hc, dn * r, mask=m2)
    tl.store(zd_ptr + hc, dht * z, mask=m2)


def gru_fwd(
    gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None, bs: list[int], packed: bool, reverse: bool,
    need_saved: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """gx [T,B,3H], h0 [B,H] -> out [T,B,H], h_n [B,H], gates [T,B,3H], extra [T,B,H]."""
    T, B, G3 = gx.shape
    H = G3 // 3
    f32 = torch.float32
    out = gx.new_zeros(T, B, H) if packed else new_output((T, B, H), gx)
    hbuf = gx.new_empty(2, B, H, dtype=f32)  # ping-pong: programs of a step read all of h_{t-1}
    gates = new_output((T, B, G3), gx, f32) if need_saved else gx.new_empty(0, dtype=f32)
    extra = new_output((T, B, H), gx, f32) if need_saved else gx.new_empty(0, dtype=f32)
    prec = precision()
    for s, t in enumerate(steps(T, reverse)):
        n, k = bs[t], n_continue(t, bs, reverse)
        BB, BH = tiles(n, H)
        _gru_fwd_step[(triton.cdiv(n, BB), triton.cdiv(H, BH))](
            gx[t], hbuf[s % 2], h0, w_hh, w_hh if b_hh is None else b_hh, hbuf[(s + 1) % 2], out[t],
            gates[t] if need_saved else out[t], extra[t] if need_saved else out[t],
            n, k, H,
            HAS_BIAS=b_hh is not None, SAVE=need_saved, PRECISION=prec, DOT_F32=dot_f32(gx.dtype),
            BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=block_k(H),
        )
    return out, final_h(out, bs, reverse, packed), gates, extra


def gru_bwd(
    d_out: Tensor, d_h_n: Tensor, h0: Tensor, w_hh: Tensor, has_bias: bool, bs: list[int], reverse: bool,
    out: Tensor, gates: Tensor, extra: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """-> d_gx [T,B,3H], d_h0 [B,H], d_w_hh [3H,H], d_b_hh [3H] | None."""
    T, B, H = out.shape
    f32, dt = torch.float32, out.dtype
    prec = precision()
    d_gx = out.new_zeros(T, B, 3 * H, dtype=f32)  # kept for every step, as is d_n below: d_w_hh and d_b_hh
    d_n = out.new_zeros(T, B, H, dtype=f32)  # r * d_n: with d_gx's r, z part, the gradient of h W_hh^T + b_hh
    zd = out.new_empty(B, H, dtype=f32)  # z * d_h_t: the direct path from h_t to h_{t-1}
    for t, tp, kc in bwd_order(T, bs, reverse):
        n, k = bs[t], n_continue(t, bs, reverse)
        BB, BH = tiles(n, H)
        _gru_bwd_step[(triton.cdiv(n, BB), triton.cdiv(H, BH))](
            d_gx[tp], d_n[tp], w_hh, d_h_n, zd, d_out[t], gates[t], extra[t], out[prev_step(t, T, reverse)], h0,
            d_gx[t], d_n[t],
            n, k, kc, H,
            PRECISION=prec, DOT_F32=dot_f32(dt), BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=block_k(2 * H),
        )
    # rows starting from h0: GEMMs at the end (zd holds each row's z * d_h at that step)
    w = w_hh.to(f32)
    d_rz = d_gx[:, :, : 2 * H]
    d_h0 = zd + fresh_sum(d_rz, bs, reverse) @ w[: 2 * H] + fresh_sum(d_n, bs, reverse) @ w[2 * H :]
    d_w = torch.cat([d_w_hh(d_rz, out, h0, bs, reverse), d_w_hh(d_n, out, h0, bs, reverse)])
    d_b = torch.cat([d_rz.sum((0, 1)), d_n.sum((0, 1))]) if has_bias else None
    return d_gx.to(dt), d_h0.to(dt), d_w.to(dt), None if d_b is None else d_b.to(dt)
