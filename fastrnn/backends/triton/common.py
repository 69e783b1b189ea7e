"""What the walk and the cells' steps share: jit helpers (accurate tanh, the tl.dot wrapper, the two-source load of
the previous state, backward's carried gradient), how a cell's backward step is wired into the walk (`Wiring`),
and the host-side bookkeeping (tile sizes, which rows continue, final states, d_h0 and the weight gradients as
large GEMMs at the end).

Imported only once triton is known to be importable (fastrnn/backends/triton/__init__.py sees to that).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastrnn.cells import prev_rows, steps

TF32_VAR = "FASTRNN_TRITON_TF32"
MIN_PROGRAMS = 128  # about one program per SM of an H100 (132)


class Wiring(NamedTuple):
    """How a cell's backward step joins the walk, beyond what the cell table says (each cell's file gives its own)."""

    gh_same: int  # leading gates whose d(h W_hh^T + b_hh) equals their d(gx); the others' is kept apart
    direct: bool  # h_{t-1} reaches h_t besides W_hh: the step returns that part of d h_{t-1}
    hbar: Callable | None = None  # (gates, extra) -> the output before the projection (cells with a projection)


@triton.jit
def tanh(x):
    # tl has no tanh in every supported version; below |x| = 1/8 a series keeps relative accuracy near 0
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.125, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """a @ b with fp32 accumulation, a cast to b's dtype first. DOT_F32: multiply in float32 instead (the
    interpreter's tl.dot misreads bfloat16 inputs; values are the same, already rounded to b's dtype)."""
    a = a.to(b.dtype)
    if DOT_F32:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def load_prev(src_ptr, h0_ptr, rows, cols, n, k, ld, cmask):
    """[len(rows), len(cols)] fp32 state before this step: rows < k from src (row stride ld), rows k..n
    from h0 (same stride), zero elsewhere."""
    offs = rows[:, None] * ld + cols[None, :]
    cont = (rows < k)[:, None] & cmask[None, :]
    fresh = ((rows >= k) & (rows < n))[:, None] & cmask[None, :]
    a = tl.load(src_ptr + offs, mask=cont, other=0.0).to(tl.float32)
    b = tl.load(h0_ptr + offs, mask=fresh, other=0.0).to(tl.float32)
    return a + b


@triton.jit
def carry(
    dg_ptr, ldg, w_ptr, rows, cols, kc, K, H, cmask,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """[BLOCK_B, BLOCK_H] fp32 gradient a step passes back to the state before it (backward, read by the step
    processed next): d_gates [B, K] (row stride ldg) @ W_hh [K, H] with tl.dot, for rows < kc, else 0."""
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    cont = rows < kc
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        a = tl.load(dg_ptr + rows[:, None] * ldg + kk[None, :], mask=cont[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + kk[:, None] * H + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += dot(a, w, PRECISION, DOT_F32)
    return acc


@triton.jit
def ended(dhn_ptr, rows, cols, n, kc, H, cmask):
    """[len(rows), len(cols)] fp32 d_h_n for the rows kc..n whose sequence ends at this step, else 0."""
    m = ((rows >= kc) & (rows < n))[:, None] & cmask[None, :]
    return tl.load(dhn_ptr + rows[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)


def precision() -> str:
    """tl.dot input precision: exact fp32 unless FASTRNN_TRITON_TF32=1 (ignored for fp16/bf16 inputs)."""
    return "tf32" if os.environ.get(TF32_VAR) == "1" else "ieee"


def dot_f32(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast tl.dot inputs: bfloat16 under TRITON_INTERPRET=1 (see `dot`)."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def tiles(n: int, H: int) -> tuple[int, int]:
    """(rows, hidden units) per program for n active rows: tl.dot needs >= 16 of each; more rows share each
    weight tile read, but a step must also spread over enough programs to keep a GPU's SMs busy."""
    bh = 32 if n > 64 and H > 256 else 16
    bb = min(64, max(16, triton.next_power_of_2(n)))
    while bb > 16 and triton.cdiv(n, bb) * triton.cdiv(H, bh) < MIN_PROGRAMS:
        bb //= 2
    return bb, bh


def block_k(K: int) -> int:
    return min(64, max(16, triton.next_power_of_2(K)))


def prev_step(t: int, T: int, reverse: bool) -> int:
    """The step whose output is h_{t-1} for continuing rows (clamped: unused when prev_rows is 0)."""
    s = t + 1 if reverse else t - 1
    return min(max(s, 0), T - 1)


def n_continue(t: int, bs: list[int], reverse: bool) -> int:
    return prev_rows(t, bs[t], len(bs), bs, reverse)


def last_steps(bs: list[int], B: int, device: torch.device) -> Tensor:
    """[B] int64: each row's last step in time order (its length - 1)."""
    return ((torch.tensor(bs)[None, :] > torch.arange(B)[:, None]).sum(1) - 1).to(device)


def final_h(out: Tensor, bs: list[int], reverse: bool, packed: bool) -> Tensor:
    """h_n [B, P]: each row's output at its last step (exactly the state rounded to out's dtype)."""
    T, B, _ = out.shape
    if reverse or not packed:
        return out[0 if reverse else T - 1].clone()
    return out[last_steps(bs, B, out.device), torch.arange(B, device=out.device)]


def bwd_order(T: int, bs: list[int], reverse: bool) -> list[tuple[int, int, int]]:
    """Backward's steps as (t, t_prev, kc): t_prev is the step processed just before (the one after t in
    forward order) and kc how many of t's rows continue into it (0 for the first step processed)."""
    order = list(reversed(steps(T, reverse)))
    prev = [order[0], *order[:-1]]
    return [(t, tp, n_continue(tp, bs, reverse) if i else 0) for i, (t, tp) in enumerate(zip(order, prev, strict=True))]


def fresh_sum(d_gh: Tensor, bs: list[int], reverse: bool) -> Tensor:
    """[B, GH]: each row's d_gates at the step where it started from h0: step 0 forward, its own last step
    reverse (a gather, no [T, B, GH] temporary). d_gh [T, B, GH] may be a column slice."""
    if not reverse:
        return d_gh[0]
    B = d_gh.shape[1]
    return d_gh[last_steps(bs, B, d_gh.device), torch.arange(B, device=d_gh.device)]


def d_w_hh(d_gh: Tensor, out: Tensor, h0: Tensor, bs: list[int], reverse: bool) -> Tensor:
    """sum_t d_gh[t]^T h_{t-1} as two GEMMs, without materialising h_{t-1} for every step.
    d_gh [T, B, GH] fp32 (zero on rows a step does not touch), out [T, B, P], h0 [B, P] -> [GH, P] fp32."""
    T, _, GH = d_gh.shape
    P = out.shape[2]
    acc = d_gh.dtype
    cont, src = (d_gh[:-1], out[1:]) if reverse else (d_gh[1:], out[:-1])
    g = fresh_sum(d_gh, bs, reverse).t() @ h0.to(acc)
    if T > 1:
        g += cont.reshape(-1, GH).t() @ src.reshape(-1, P).to(acc)
    return g
