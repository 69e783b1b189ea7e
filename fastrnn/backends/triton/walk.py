"""The time walk, once for every cell: the forward and backward step kernels and their launchers.

Forward, per step, one kernel (`_fwd_step`): h_{t-1} W_hh^T with tl.dot for a tile of hidden units of all G
gates, then the cell's pointwise step (the state update and what backward needs, cells.py's saved layout). With
a projection (w_hr) a second small GEMM (gemm.step_gemm) maps the step's output to h. Backward, per step, one
kernel (`_bwd_step`): the gradient reaching h_t (the d gates of the step processed before times W_hh, with
tl.dot), then the cell's pointwise backward step. With a projection that gradient lives in P-space and needs
W_hr first, so each step runs GEMM (d_h W_hr), the kernel, GEMM (d gates W_hh). d_w_hh, d_b_hh, d_w_hr and
the rows' d_h0 are single large GEMMs at the end.

The cell's pointwise code is chosen at compile time by the constexpr CELL (cells.py's kernel_id) in
`cell_fwd` / `cell_bwd`; everything else a kernel needs to know about a cell comes from the table (G, saved
widths, has_cell_state) or from the cell file's `Wiring`. Rows a step skips (row >= batch_sizes[t]) are never
written: out, the saved tensors and every d gates start as zeros there when the input is packed.

The normalised cells (constexpr NORM; cells.py, "Normalised cells") take the same two kernels with one program
per row block holding every hidden unit (common.norm_tiles), so the layer norms over a row's G*H raw features
(the step GEMM, without bias) and its H cell-state features reduce inside the program; their steps
(`norm_fwd` / `norm_bwd`) also get Norm.params and the zoneout keep (a mask row or the constant), save
(c_t | raw) or (ah_n | raw) as extra, and backward hands d raw to the GEMMs (every gate's d gh differs from its
d gx: Wiring.gh_same = 0) and writes Grads.d_extra.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastrnn.backends import new_output
from fastrnn.backends.triton import gru, ln_gru, ln_lstm, lstm, rnn
from fastrnn.backends.triton.common import (
    Wiring,
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
    load_prev2,
    n_continue,
    norm_tiles,
    precision,
    prev_step,
    tiles,
)
from fastrnn.backends.triton.gemm import step_gemm
from fastrnn.cells import Cell, Grads, Saved, State, Weights, batch_sizes_list, steps

WIRING: dict[int, Wiring] = {**lstm.WIRING, **gru.WIRING, **rnn.WIRING, **ln_lstm.WIRING, **ln_gru.WIRING}


# ---- the cells' pointwise steps, selected by kernel_id ----
# forward(x0..x3, a0..a3, hp, cp) -> h, c, s0..s3, e
#   x_k = gx of gate k, a_k = h_{t-1} W_hh^T + b_hh of gate k, hp = h_{t-1} (where P = H), cp = c_{t-1};
#   h = the new h before any projection, c = c_t, s_k = saved gate k, e = saved extra (unused ones: anything)
# backward(dh, dc, hp, cp, h, s0..s3, e) -> dx0..dx3, dq0..dq3, direct, dcp
#   dh = d h_t (before any projection), dc = d c_t, h = h_t; dx_k = d gx of gate k, dq_k = d gh of gate k,
#   direct = d h_{t-1} besides W_hh (Wiring.direct), dcp = d c_{t-1}


@triton.jit
def cell_fwd(CELL: tl.constexpr, x0, x1, x2, x3, a0, a1, a2, a3, hp, cp):
    if CELL == lstm.ID:
        h, c, s0, s1, s2, s3, e = lstm.lstm_fwd(x0, x1, x2, x3, a0, a1, a2, a3, hp, cp)
    elif CELL == gru.ID:
        h, c, s0, s1, s2, s3, e = gru.gru_fwd(x0, x1, x2, x3, a0, a1, a2, a3, hp, cp)
    elif CELL == rnn.TANH_ID:
        h, c, s0, s1, s2, s3, e = rnn.rnn_tanh_fwd(x0, x1, x2, x3, a0, a1, a2, a3, hp, cp)
    else:
        tl.static_assert(CELL == rnn.RELU_ID, "no triton step for this kernel_id")
        h, c, s0, s1, s2, s3, e = rnn.rnn_relu_fwd(x0, x1, x2, x3, a0, a1, a2, a3, hp, cp)
    return h, c, s0, s1, s2, s3, e


@triton.jit
def cell_bwd(CELL: tl.constexpr, dh, dc, hp, cp, h, s0, s1, s2, s3, e):
    if CELL == lstm.ID:
        d0, d1, d2, d3, q0, q1, q2, q3, direct, dcp = lstm.lstm_bwd(dh, dc, hp, cp, h, s0, s1, s2, s3, e)
    elif CELL == gru.ID:
        d0, d1, d2, d3, q0, q1, q2, q3, direct, dcp = gru.gru_bwd(dh, dc, hp, cp, h, s0, s1, s2, s3, e)
    elif CELL == rnn.TANH_ID:
        d0, d1, d2, d3, q0, q1, q2, q3, direct, dcp = rnn.rnn_tanh_bwd(dh, dc, hp, cp, h, s0, s1, s2, s3, e)
    else:
        tl.static_assert(CELL == rnn.RELU_ID, "no triton step for this kernel_id")
        d0, d1, d2, d3, q0, q1, q2, q3, direct, dcp = rnn.rnn_relu_bwd(dh, dc, hp, cp, h, s0, s1, s2, s3, e)
    return d0, d1, d2, d3, q0, q1, q2, q3, direct, dcp


# The normalised cells' steps: the arguments above (a_k is the raw h_{t-1} W_hh^T) plus m (zoneout keep), the
# Norm.params pointer, cols, cmask and H (their tiles hold whole rows); backward also takes the saved raw w0..w3
# and returns d_extra's row last, its dq_k are d raw.


@triton.jit
def norm_fwd(CELL: tl.constexpr, x0, x1, x2, x3, a0, a1, a2, a3, hp, cp, m, p_ptr, cols, cmask, H):
    if CELL == ln_lstm.ID:
        h, c, s0, s1, s2, s3, e = ln_lstm.ln_lstm_fwd(x0, x1, x2, x3, a0, a1, a2, a3, hp, cp, m, p_ptr, cols, cmask, H)
    else:
        tl.static_assert(CELL == ln_gru.ID, "no triton step for this kernel_id")
        h, c, s0, s1, s2, s3, e = ln_gru.ln_gru_fwd(x0, x1, x2, x3, a0, a1, a2, a3, hp, cp, m, p_ptr, cols, cmask, H)
    return h, c, s0, s1, s2, s3, e


@triton.jit
def norm_bwd(CELL: tl.constexpr, dh, dc, hp, cp, m, s0, s1, s2, s3, e, w0, w1, w2, w3, p_ptr, cols, cmask, H):
    if CELL == ln_lstm.ID:
        d0, d1, d2, d3, q0, q1, q2, q3, direct, dcp, dex = ln_lstm.ln_lstm_bwd(
            dh, dc, hp, cp, m, s0, s1, s2, s3, e, w0, w1, w2, w3, p_ptr, cols, cmask, H
        )
    else:
        tl.static_assert(CELL == ln_gru.ID, "no triton step for this kernel_id")
        d0, d1, d2, d3, q0, q1, q2, q3, direct, dcp, dex = ln_gru.ln_gru_bwd(
            dh, dc, hp, cp, m, s0, s1, s2, s3, e, w0, w1, w2, w3, p_ptr, cols, cmask, H
        )
    return d0, d1, d2, d3, q0, q1, q2, q3, direct, dcp, dex


@triton.jit
def _keep(m_ptr, keep, hc, m2, zero, HAS_MASK: tl.constexpr):
    """The zoneout keep of this tile: the step's mask row, or the constant."""
    if HAS_MASK:
        m = tl.load(m_ptr + hc, mask=m2, other=0.0).to(tl.float32)
    else:
        m = zero + keep
    return m


# ---- tiles of one gate ----


@triton.jit
def _gate_in(gx_ptr, b_ptr, acc, j: tl.constexpr, rows, cols, m2, cmask, H, G: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Gate j: its gx tile and acc (its h_{t-1} W_hh^T tile) plus b_hh, both fp32."""
    x = tl.load(gx_ptr + rows[:, None] * (G * H) + j * H + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + j * H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return x, acc


@triton.jit
def _load_gate(ptr, j: tl.constexpr, W: tl.constexpr, rows, cols, m2, H):
    """Tile of gate j of a [B, W*H] fp32 row block."""
    return tl.load(ptr + rows[:, None] * (W * H) + j * H + cols[None, :], mask=m2, other=0.0)


@triton.jit
def _store_gate(ptr, j: tl.constexpr, W: tl.constexpr, val, rows, cols, m2, H):
    tl.store(ptr + rows[:, None] * (W * H) + j * H + cols[None, :], val, mask=m2)


# ---- the kernels ----


@triton.jit(do_not_specialize=["n", "k"])  # one compile for every row count
def _fwd_step(
    gx_ptr,  # [B, G*H] this step's input projection (incl. b_ih)
    hs_ptr,  # [B, P] fp32 state after the previous step (rows < k)
    h0_ptr,  # [B, P] initial state (rows k..n start from it)
    w_ptr,  # [G*H, P]
    b_ptr,  # [G*H] (unused without HAS_BIAS)
    c_ptr,  # [B, H] fp32 cell state, read and written in place (HAS_C)
    hn_ptr,  # [B, H] fp32: the new state, or the output before the projection when projecting
    out_ptr,  # [B, H] this step's output (WRITE_OUT: no projection)
    gates_ptr,  # [B, SG*H] fp32 saved gates
    extra_ptr,  # [B, SE*H] fp32 saved extra
    p_ptr,  # [norm_width*H] Norm.params  (NORM)
    m_ptr,  # [B, H] this step's zoneout keep mask  (NORM and HAS_MASK)
    keep,  # the constant zoneout keep  (NORM, not HAS_MASK)
    n, k, H, P,
    CELL: tl.constexpr, G: tl.constexpr, SG: tl.constexpr, SE: tl.constexpr, HAS_C: tl.constexpr,
    HAS_BIAS: tl.constexpr, WRITE_OUT: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    NORM: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    m2 = (rows < n)[:, None] & cmask[None, :]
    zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    a0, a1, a2, a3 = zero, zero, zero, zero
    for k0 in range(0, P, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < P
        hk = load_prev(hs_ptr, h0_ptr, rows, kk, n, k, P, kmask)  # [BB, BK]
        wp = w_ptr + cols[None, :] * P + kk[:, None]  # W^T tile [BK, BH] of gate 0
        wm = kmask[:, None] & cmask[None, :]
        a0 += dot(hk, tl.load(wp, mask=wm, other=0.0), PRECISION, DOT_F32)
        if G > 1:
            a1 += dot(hk, tl.load(wp + H * P, mask=wm, other=0.0), PRECISION, DOT_F32)
        if G > 2:
            a2 += dot(hk, tl.load(wp + 2 * H * P, mask=wm, other=0.0), PRECISION, DOT_F32)
        if G > 3:
            a3 += dot(hk, tl.load(wp + 3 * H * P, mask=wm, other=0.0), PRECISION, DOT_F32)
    x0, a0 = _gate_in(gx_ptr, b_ptr, a0, 0, rows, cols, m2, cmask, H, G, HAS_BIAS)
    x1, x2, x3 = zero, zero, zero
    if G > 1:
        x1, a1 = _gate_in(gx_ptr, b_ptr, a1, 1, rows, cols, m2, cmask, H, G, HAS_BIAS)
    if G > 2:
        x2, a2 = _gate_in(gx_ptr, b_ptr, a2, 2, rows, cols, m2, cmask, H, G, HAS_BIAS)
    if G > 3:
        x3, a3 = _gate_in(gx_ptr, b_ptr, a3, 3, rows, cols, m2, cmask, H, G, HAS_BIAS)
    # h_{t-1} at these columns, for cells that read it pointwise (P = H; the compiler drops it elsewhere)
    hp = load_prev(hs_ptr, h0_ptr, rows, cols, n, k, P, cmask & (cols < P))
    hc = rows[:, None] * H + cols[None, :]
    cp = zero
    if HAS_C:
        cp = tl.load(c_ptr + hc, mask=m2, other=0.0)
    if NORM:  # one program holds whole rows (norm_tiles): a0..a3 are all G*H raw features of its rows
        m = _keep(m_ptr, keep, hc, m2, zero, HAS_MASK)
        h, c, s0, s1, s2, s3, e = norm_fwd(CELL, x0, x1, x2, x3, a0, a1, a2, a3, hp, cp, m, p_ptr, cols, cmask, H)
    else:
        h, c, s0, s1, s2, s3, e = cell_fwd(CELL, x0, x1, x2, x3, a0, a1, a2, a3, hp, cp)
    if HAS_C:
        tl.store(c_ptr + hc, c, mask=m2)
    tl.store(hn_ptr + hc, h, mask=m2)
    if WRITE_OUT:
        tl.store(out_ptr + hc, h.to(out_ptr.dtype.element_ty), mask=m2)
    if SG > 0:
        _store_gate(gates_ptr, 0, SG, s0, rows, cols, m2, H)
    if SG > 1:
        _store_gate(gates_ptr, 1, SG, s1, rows, cols, m2, H)
    if SG > 2:
        _store_gate(gates_ptr, 2, SG, s2, rows, cols, m2, H)
    if SG > 3:
        _store_gate(gates_ptr, 3, SG, s3, rows, cols, m2, H)
    if NORM:
        if SE > 0:  # (e | raw)
            _store_gate(extra_ptr, 0, SE, e, rows, cols, m2, H)
            _store_gate(extra_ptr, 1, SE, a0, rows, cols, m2, H)
            _store_gate(extra_ptr, 2, SE, a1, rows, cols, m2, H)
            _store_gate(extra_ptr, 3, SE, a2, rows, cols, m2, H)
            if G > 3:
                _store_gate(extra_ptr, 4, SE, a3, rows, cols, m2, H)
    elif SE > 0:
        tl.store(extra_ptr + hc, e, mask=m2)


@triton.jit(do_not_specialize=["n", "k", "kc"])  # one compile for every row count
def _bwd_step(
    dgp_ptr,  # [B, G*H] fp32 d gx of the step processed before (rows < kc continue into it)  (CARRY)
    dqp_ptr,  # [B, (G-S)*H] fp32 d gh of that step's gates >= S, where it differs from d gx  (CARRY)
    w_ptr,  # [G*H, H]  (CARRY)
    dhn_ptr,  # [B, H] d h_n (rows kc..n end at this step)  (CARRY)
    dout_ptr,  # [B, H] this step's d_out  (CARRY)
    zd_ptr,  # [B, H] fp32 direct part of d h_t: read (from the step processed before), then this step's  (DIRECT)
    dh_ptr,  # [B, H] fp32 d h_t before the projection, computed beforehand  (not CARRY)
    gates_ptr,  # [B, SG*H] fp32 saved gates
    extra_ptr,  # [B, SE*H] fp32 saved extra
    cs_ptr,  # [B, H] fp32 saved extra of the previous step: c_{t-1} (rows < k)  (HAS_C)
    c0_ptr,  # [B, H] initial cell state (rows k..n)  (HAS_C)
    dc_ptr,  # [B, H] fp32 running d c, read and written in place  (HAS_C)
    hs_ptr,  # [B, P] output of the previous step (rows < k)
    h0_ptr,  # [B, P] initial state (rows k..n)
    h_ptr,  # [B, P] this step's output
    dg_ptr,  # [B, G*H] fp32 d gx of this step
    dq_ptr,  # [B, (G-S)*H] fp32 d gh of this step's gates >= S
    p_ptr,  # [norm_width*H] Norm.params  (NORM)
    m_ptr,  # [B, H] this step's zoneout keep mask  (NORM and HAS_MASK)
    keep,  # the constant zoneout keep  (NORM, not HAS_MASK)
    dex_ptr,  # [B, H] fp32 this step's d_extra  (NORM)
    n, k, kc, H, P,
    CELL: tl.constexpr, G: tl.constexpr, S: tl.constexpr, SG: tl.constexpr, SE: tl.constexpr,
    HAS_C: tl.constexpr, DIRECT: tl.constexpr, CARRY: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    NORM: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    m2 = (rows < n)[:, None] & cmask[None, :]
    hc = rows[:, None] * H + cols[None, :]
    zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if CARRY:
        if S > 0:
            dht = carry(
                dgp_ptr, G * H, w_ptr, rows, cols, kc, S * H, H, cmask, PRECISION, DOT_F32, BLOCK_B, BLOCK_H, BLOCK_K
            )
            if S < G:
                dht += carry(
                    dqp_ptr, (G - S) * H, w_ptr + S * H * H, rows, cols, kc, (G - S) * H, H, cmask, PRECISION,
                    DOT_F32, BLOCK_B, BLOCK_H, BLOCK_K,
                )  # fmt: skip
        else:  # every gate's d gh is kept apart (the normalised cells' d raw)
            dht = carry(
                dqp_ptr, G * H, w_ptr, rows, cols, kc, G * H, H, cmask, PRECISION, DOT_F32, BLOCK_B, BLOCK_H, BLOCK_K
            )
        if DIRECT:
            dht += tl.load(zd_ptr + hc, mask=(rows < kc)[:, None] & cmask[None, :], other=0.0)
        dht += ended(dhn_ptr, rows, cols, n, kc, H, cmask)
        dht += tl.load(dout_ptr + hc, mask=m2, other=0.0).to(tl.float32)
    else:
        dht = tl.load(dh_ptr + hc, mask=m2, other=0.0)
    s0, s1, s2, s3 = zero, zero, zero, zero
    if SG > 0:
        s0 = _load_gate(gates_ptr, 0, SG, rows, cols, m2, H)
    if SG > 1:
        s1 = _load_gate(gates_ptr, 1, SG, rows, cols, m2, H)
    if SG > 2:
        s2 = _load_gate(gates_ptr, 2, SG, rows, cols, m2, H)
    if SG > 3:
        s3 = _load_gate(gates_ptr, 3, SG, rows, cols, m2, H)
    e = zero
    w0, w1, w2, w3 = zero, zero, zero, zero
    if NORM:  # saved (e | raw); c_{t-1} is the first block of the previous step's extra row
        e = _load_gate(extra_ptr, 0, SE, rows, cols, m2, H)
        w0 = _load_gate(extra_ptr, 1, SE, rows, cols, m2, H)
        w1 = _load_gate(extra_ptr, 2, SE, rows, cols, m2, H)
        w2 = _load_gate(extra_ptr, 3, SE, rows, cols, m2, H)
        if G > 3:
            w3 = _load_gate(extra_ptr, 4, SE, rows, cols, m2, H)
    elif SE > 0:
        e = tl.load(extra_ptr + hc, mask=m2, other=0.0)
    cp, dc = zero, zero
    if HAS_C:
        if NORM:
            cp = load_prev2(cs_ptr, SE * H, c0_ptr, H, rows, cols, n, k, cmask)
        else:
            cp = load_prev(cs_ptr, c0_ptr, rows, cols, n, k, H, cmask)
        dc = tl.load(dc_ptr + hc, mask=m2, other=0.0)
    # h_{t-1} and h_t at these columns, for cells that read them (P = H; the compiler drops them elsewhere)
    pmask = cmask & (cols < P)
    hp = load_prev(hs_ptr, h0_ptr, rows, cols, n, k, P, pmask)
    hm = (rows < n)[:, None] & pmask[None, :]
    h = tl.load(h_ptr + rows[:, None] * P + cols[None, :], mask=hm, other=0.0).to(tl.float32)
    if NORM:
        m = _keep(m_ptr, keep, hc, m2, zero, HAS_MASK)
        d0, d1, d2, d3, q0, q1, q2, q3, direct, dcp, dex = norm_bwd(
            CELL, dht, dc, hp, cp, m, s0, s1, s2, s3, e, w0, w1, w2, w3, p_ptr, cols, cmask, H
        )
        tl.store(dex_ptr + hc, dex, mask=m2)
    else:
        d0, d1, d2, d3, q0, q1, q2, q3, direct, dcp = cell_bwd(CELL, dht, dc, hp, cp, h, s0, s1, s2, s3, e)
    _store_gate(dg_ptr, 0, G, d0, rows, cols, m2, H)
    if G > 1:
        _store_gate(dg_ptr, 1, G, d1, rows, cols, m2, H)
    if G > 2:
        _store_gate(dg_ptr, 2, G, d2, rows, cols, m2, H)
    if G > 3:
        _store_gate(dg_ptr, 3, G, d3, rows, cols, m2, H)
    if S < 1:
        _store_gate(dq_ptr, 0 - S, G - S, q0, rows, cols, m2, H)
    if S < 2 and G > 1:
        _store_gate(dq_ptr, 1 - S, G - S, q1, rows, cols, m2, H)
    if S < 3 and G > 2:
        _store_gate(dq_ptr, 2 - S, G - S, q2, rows, cols, m2, H)
    if S < 4 and G > 3:
        _store_gate(dq_ptr, 3 - S, G - S, q3, rows, cols, m2, H)
    if DIRECT:
        tl.store(zd_ptr + hc, direct, mask=m2)
    if HAS_C:
        tl.store(dc_ptr + hc, dcp, mask=m2)


# ---- the launchers ----


def _shape(cell: Cell, n: int, H: int, K: int) -> tuple[tuple[int, int], dict]:
    """Grid and tile constexprs of one step over n rows (K: the reduction length of its GEMM)."""
    if cell.norm:  # one column program: whole rows
        nt = norm_tiles(n, H)
        bk = min(block_k(K), nt.block_k)
        meta = dict(
            BLOCK_B=nt.block_b, BLOCK_H=nt.block_h, BLOCK_K=bk, num_warps=nt.num_warps, num_stages=nt.num_stages
        )
        return (triton.cdiv(n, nt.block_b), 1), meta
    BB, BH = tiles(n, H)
    return (triton.cdiv(n, BB), triton.cdiv(H, BH)), dict(BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=block_k(K))


def _norm_args(cell: Cell, weights: Weights, H: int) -> tuple[Tensor, Tensor | None, float]:
    """(Norm.params, mask [T, B, H] | None, keep) of a normalised cell; (w_hh, None, 1.0) stand-ins otherwise."""
    if not cell.norm:
        return weights.w_hh, None, 1.0
    nm = weights.norm
    if nm is None or weights.b_hh is not None or weights.w_hr is not None:
        raise ValueError(f"triton: {cell.name} takes Weights.norm, and no b_hh or w_hr (cells.py, 'Normalised cells')")
    if nm.params.shape != (cell.norm_width * H,):
        raise ValueError(
            f"triton: {cell.name} Norm.params of shape {tuple(nm.params.shape)}, not ({cell.norm_width * H},)"
        )
    return nm.params, nm.mask, float(nm.keep)


def forward(
    cell: Cell, gx: Tensor, state0: State, weights: Weights, batch_sizes: Tensor | None, reverse: bool, need_saved: bool
) -> tuple[Tensor, State, Saved]:
    """gx [T,B,G*H], state0 h [B,P] (c [B,H]), weights w_hh [G*H,P], b_hh [G*H]?, w_hr [P,H]?
    -> out [T,B,P], state_n, saved (cells.py's layout, fp32)."""
    T, B, GH = gx.shape
    G, P = cell.G, state0.h.shape[1]
    H = GH // G
    bs = batch_sizes_list(batch_sizes, T, B)
    packed = batch_sizes is not None
    f32 = torch.float32

    def alloc(shape, dtype=None):  # rows a step skips are never written: zero them when there are such rows
        return gx.new_zeros(shape, dtype=dtype) if packed else new_output(shape, gx, dtype)

    out = alloc((T, B, P))
    SG, SE = cell.saved_widths if need_saved else (0, 0)
    gshape, eshape = cell.saved_shapes(T, B, H) if need_saved else ((0,), (0,))
    gates, extra = alloc(gshape, f32), alloc(eshape, f32)
    hbuf = gx.new_empty(2, B, P, dtype=f32)  # ping-pong: programs of a step read all of h_{t-1}
    c = state0.c.to(f32, copy=True) if cell.has_cell_state else None  # [B, H], updated in place
    w_hr = weights.w_hr
    hbar = gx.new_empty(B, H, dtype=f32) if w_hr is not None else None  # output before the projection
    prec = precision()
    params, mask, keep = _norm_args(cell, weights, H)
    for s, t in enumerate(steps(T, reverse)):
        n, k = bs[t], n_continue(t, bs, reverse)
        src, dst = hbuf[s % 2], hbuf[(s + 1) % 2]
        grid, meta = _shape(cell, n, H, P)
        _fwd_step[grid](
            gx[t], src, state0.h, weights.w_hh, weights.w_hh if weights.b_hh is None else weights.b_hh,
            dst if c is None else c, dst if hbar is None else hbar, out[t],
            gates[t] if SG else dst, extra[t] if SE else dst, params, params if mask is None else mask[t], keep,
            n, k, H, P,
            CELL=cell.kernel_id, G=G, SG=SG, SE=SE, HAS_C=c is not None, HAS_BIAS=weights.b_hh is not None,
            WRITE_OUT=hbar is None, PRECISION=prec, DOT_F32=dot_f32(gx.dtype), NORM=cell.norm,
            HAS_MASK=mask is not None, **meta,
        )  # fmt: skip
        if hbar is not None:
            step_gemm(hbar, w_hr, dst, n, prec, transpose_b=True, out=out[t])
    c_n = None if c is None else c.to(gx.dtype)
    return out, State(final_h(out, bs, reverse, packed), c_n), Saved(gates, extra)


def backward(cell, d_out, d_state_n, state0, weights, batch_sizes, reverse, out, saved) -> Grads:
    """Walks the steps in the opposite order of forward, keeps every step's d gates and forms d_w_hh, d_b_hh,
    d_w_hr and d_h0 as GEMMs at the end. -> Grads (None where the input was None; d_extra [T, B, H] for the
    normalised cells)."""
    T, B, P = out.shape
    G, w_hh, w_hr = cell.G, weights.w_hh, weights.w_hr
    H = w_hh.shape[0] // G
    wiring = WIRING[cell.kernel_id]
    S = wiring.gh_same
    bs = batch_sizes_list(batch_sizes, T, B)
    f32, dt = torch.float32, out.dtype
    prec = precision()
    # every step's d gx, and d gh of gates >= S where it differs: zero on rows a step skips, as the GEMMs need
    d_gx = out.new_zeros(T, B, G * H, dtype=f32)
    d_q = out.new_zeros(T, B, (G - S) * H, dtype=f32) if S < G else None
    zd = out.new_zeros(B, H, dtype=f32) if wiring.direct else None  # direct part of d h_{t-1}
    dc = d_state_n.c.to(f32, copy=True) if cell.has_cell_state else None  # [B, H] running d c
    SG, SE = cell.saved_widths
    # (d gh of a group of gates [T, B, K], the rows of W_hh it multiplies [K, P])
    parts = ([(d_gx[:, :, : S * H], w_hh[: S * H])] if S else []) + ([] if d_q is None else [(d_q, w_hh[S * H :])])
    params, mask, keep = _norm_args(cell, weights, H)
    d_extra = out.new_zeros(T, B, H, dtype=f32) if cell.norm else None  # zero on rows a step skips

    def step(t: int, tp: int, kc: int, dh: Tensor | None) -> None:
        n, k, tq = bs[t], n_continue(t, bs, reverse), prev_step(t, T, reverse)
        grid, meta = _shape(cell, n, H, (G if cell.norm else S) * H)
        x = d_gx  # stands in for pointers a call does not use
        _bwd_step[grid](
            d_gx[tp], x if d_q is None else d_q[tp], w_hh, d_state_n.h, d_out[t], x if zd is None else zd,
            x if dh is None else dh, saved.gates[t] if SG else x, saved.extra[t] if SE else x,
            saved.extra[tq] if dc is not None else x, x if dc is None else state0.c, x if dc is None else dc,
            out[tq], state0.h, out[t], d_gx[t], x if d_q is None else d_q[t],
            params, params if mask is None else mask[t], keep, x if d_extra is None else d_extra[t],
            n, k, kc, H, P,
            CELL=cell.kernel_id, G=G, S=S, SG=SG, SE=SE, HAS_C=dc is not None, DIRECT=zd is not None,
            CARRY=dh is None, PRECISION=prec, DOT_F32=dot_f32(dt), NORM=cell.norm, HAS_MASK=mask is not None,
            **meta,
        )  # fmt: skip

    if w_hr is None:
        for t, tp, kc in bwd_order(T, bs, reverse):
            step(t, tp, kc, None)
        # rows starting from h0: GEMMs at the end (zd holds each row's direct part at that step)
        d_h0 = sum(fresh_sum(g, bs, reverse) @ w.to(f32) for g, w in parts)
        if zd is not None:
            d_h0 = d_h0 + zd
        d_w_hr = None
    else:  # h_t = hbar_t W_hr^T: the gradient goes P-space -> H-space -> P-space, three launches per step
        if zd is not None or wiring.hbar is None:
            raise ValueError(f"triton: no projection for {cell.name}: its step needs a direct path or has no hbar")
        d_h0 = d_state_n.h.to(f32, copy=True)  # [B, P] running d h
        d_hfull = out.new_zeros(T, B, P, dtype=f32)  # d h_t of every step, for d_w_hr
        dhbar = out.new_empty(B, H, dtype=f32)
        for t in reversed(steps(T, reverse)):
            n = bs[t]
            torch.add(d_h0[:n], d_out[t, :n], out=d_hfull[t, :n])
            step_gemm(d_hfull[t], w_hr, dhbar, n, prec)  # [n, P] @ [P, H]
            step(t, t, 0, dhbar)
            for i, (g, w) in enumerate(parts):
                step_gemm(g[t], w, d_h0, n, prec, accumulate=i > 0)  # [n, K] @ [K, P]
        # the saved rows are zero where a step skips a row, so hbar is too
        hbar = wiring.hbar(saved.gates, saved.extra)  # [T, B, H]
        d_w_hr = d_hfull.reshape(T * B, P).t() @ hbar.reshape(T * B, H)
    d_w = torch.cat([d_w_hh(g, out, state0.h, bs, reverse) for g, _ in parts])
    d_b = torch.cat([g.sum((0, 1)) for g, _ in parts]) if weights.b_hh is not None else None

    def cast(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(dt)

    grads = Weights(cast(d_w), cast(d_b), cast(d_w_hr))
    return Grads(cast(d_gx), State(cast(d_h0), cast(dc)), grads, cast(d_extra))
