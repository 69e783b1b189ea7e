"""Elman RNN (h' = tanh or relu of gx + W_hh h + b_hh): step kernels and their launchers.

Forward, per step, one kernel: h_{t-1} W_hh^T with tl.dot plus the activation. Backward, per step: one
kernel: the gradient reaching h_t (d_pre of the step after, times W_hh, with tl.dot) and d_pre from the saved
output, which is all backward needs.
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
    tanh,
    tiles,
)
from fastrnn.cells import steps


@triton.jit(do_not_specialize=["n", "k"])  # one compile for every row count
def _rnn_fwd_step(
    gx_ptr,  # [B, H] this step's input projection (incl. b_ih)
    hs_ptr,  # [B, H] fp32 state after the previous step (rows < k)
    h0_ptr,  # [B, H] initial state (rows k..n start from it)
    w_ptr,  # [H, H]
    b_ptr,  # [H] (unused without HAS_BIAS)
    hn_ptr,  # [B, H] fp32 new state
    out_ptr,  # [B, H] this step's output
    n, k, H,
    RELU: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    m2 = (rows < n)[:, None] & cmask[None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < H
        a = load_prev(hs_ptr, h0_ptr, rows, kk, n, k, H, kmask)  # [BB, BK]
        w = tl.load(w_ptr + cols[None, :] * H + kk[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += dot(a, w, PRECISION, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    hc = rows[:, None] * H + cols[None, :]
    acc += tl.load(gx_ptr + hc, mask=m2, other=0.0).to(tl.float32)
    if RELU:
        h = tl.where(acc < 0.0, 0.0, acc)  # NaN passes, as torch.relu
    else:
        h = tanh(acc)
    tl.store(hn_ptr + hc, h, mask=m2)
    tl.store(out_ptr + hc, h.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["n", "kc"])  # one compile for every row count
def _rnn_bwd_step(
    dgp_ptr,  # [B, H] fp32 d_pre of the step processed before (rows < kc continue into it)
    w_ptr,  # [H, H]
    dhn_ptr,  # [B, H] d_h_n (rows kc..n end at this step)
    dout_ptr,  # [B, H] this step's d_out
    h_ptr,  # [B, H] this step's output h_t
    dg_ptr,  # [B, H] fp32 d_pre of this step
    n, kc, H,
    RELU: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    m2 = (rows < n)[:, None] & cmask[None, :]
    hc = rows[:, None] * H + cols[None, :]
    dht = carry(dgp_ptr, H, w_ptr, rows, cols, kc, H, H, cmask, PRECISION, DOT_F32, BLOCK_B, BLOCK_H, BLOCK_K)
    dht += ended(dhn_ptr, rows, cols, n, kc, H, cmask)
    dht += tl.load(dout_ptr + hc, mask=m2, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + hc, mask=m2, other=0.0).to(tl.float32)
    if RELU:  # as torch's threshold_backward: zero where the output is <= 0
        dpre = tl.where(h <= 0.0, 0.0, dht)
    else:
        dpre = dht * (1.0 - h * h)
    tl.store(dg_ptr + hc, dpre, mask=m2)


def rnn_fwd(
    gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None, bs: list[int], packed: bool, reverse: bool,
    relu: bool,
) -> tuple[Tensor, Tensor]:
    """gx [T,B,H], h0 [B,H] -> out [T,B,H], h_n [B,H]."""
    T, B, H = gx.shape
    out = gx.new_zeros(T, B, H) if packed else new_output((T, B, H), gx)
    hbuf = gx.new_empty(2, B, H, dtype=torch.float32)  # ping-pong: programs of a step read all of h_{t-1}
    prec = precision()
    for s, t in enumerate(steps(T, reverse)):
        n, k = bs[t], n_continue(t, bs, reverse)
        BB, BH = tiles(n, H)
        _rnn_fwd_step[(triton.cdiv(n, BB), triton.cdiv(H, BH))](
            gx[t], hbuf[s % 2], h0, w_hh, w_hh if b_hh is None else b_hh, hbuf[(s + 1) % 2], out[t],
            n, k, H,
            RELU=relu, HAS_BIAS=b_hh is not None, PRECISION=prec, DOT_F32=dot_f32(gx.dtype),
            BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=block_k(H),
        )
    return out, final_h(out, bs, reverse, packed)


def rnn_bwd(
    d_out: Tensor, d_h_n: Tensor, h0: Tensor, w_hh: Tensor, has_bias: bool, bs: list[int], reverse: bool,
    out: Tensor, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """-> d_gx [T,B,H], d_h0 [B,H], d_w_hh [H,H], d_b_hh [H] | None."""
    T, B, H = out.shape
    f32, dt = torch.float32, out.dtype
    prec = precision()
    d_g = out.new_zeros(T, B, H, dtype=f32)  # kept for every step: d_w_hh and d_b_hh at the end
    for t, tp, kc in bwd_order(T, bs, reverse):
        n = bs[t]
        BB, BH = tiles(n, H)
        _rnn_bwd_step[(triton.cdiv(n, BB), triton.cdiv(H, BH))](
            d_g[tp], w_hh, d_h_n, d_out[t], out[t], d_g[t], n, kc, H,
            RELU=relu, PRECISION=prec, DOT_F32=dot_f32(dt), BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=block_k(H),
        )
    d_h0 = fresh_sum(d_g, bs, reverse) @ w_hh.to(f32)  # rows starting from h0: one GEMM at the end
    d_w = d_w_hh(d_g, out, h0, bs, reverse)
    d_b = d_g.reshape(T * B, H).sum(0) if has_bias else None
    return d_g.to(dt), d_h0.to(dt), d_w.to(dt), None if d_b is None else d_b.to(dt)
