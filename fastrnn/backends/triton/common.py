"""What the walk and the cells' steps share: jit helpers (accurate tanh, the tl.dot wrapper, the two-source load of
the previous state, backward's carried gradient, the normalised cells' row statistics and norm parameters), how a
cell's backward step is wired into the walk (`Wiring`), and the host-side bookkeeping (tile sizes, which rows
continue, final states, d_h0 and the weight gradients as large GEMMs at the end).

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

from fastrnn.backends.reference import EPS
from fastrnn.cells import prev_rows, steps

TF32_VAR = "FASTRNN_TRITON_TF32"
MIN_PROGRAMS = 128  # about one program per SM of an H100 (132)
# The normalised cells reduce over all G*H features of a row, so one program holds every hidden unit of its rows:
# one tile of the next power of two >= H columns, at most this many.
NORM_MAX_H = 1024
LN_EPS = tl.constexpr(EPS)


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
def load_prev2(src_ptr, lds, h0_ptr, ld0, rows, cols, n, k, cmask):
    """load_prev with row stride lds in src and ld0 in h0 (c_{t-1} read from a wider saved extra row)."""
    cont = (rows < k)[:, None] & cmask[None, :]
    fresh = ((rows >= k) & (rows < n))[:, None] & cmask[None, :]
    a = tl.load(src_ptr + rows[:, None] * lds + cols[None, :], mask=cont, other=0.0).to(tl.float32)
    b = tl.load(h0_ptr + rows[:, None] * ld0 + cols[None, :], mask=fresh, other=0.0).to(tl.float32)
    return a + b


@triton.jit
def param(p_ptr, j: tl.constexpr, cols, cmask, H):
    """Block j (H values) of Norm.params as a [1, BLOCK_H] fp32 row, 0 past H."""
    return tl.load(p_ptr + j * H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def row_norm(v0, v1, v2, v3, cmask, G: tl.constexpr, H):
    """Layer norm over the G*H features of each row, the first G of the [BLOCK_B, BLOCK_H] tiles v0..v3 (one tile
    holds every hidden unit; columns >= H are left out) -> N(v) per tile (0 past H and for tiles >= G) and
    rstd = 1 / sqrt(var + eps) [BLOCK_B, 1]. Two passes (mean, then the biased variance), in fp32."""
    cm = cmask[None, :]
    zero = tl.zeros_like(v0)
    nf = G * H
    s = tl.sum(tl.where(cm, v0, 0.0), axis=1)
    if G > 1:
        s += tl.sum(tl.where(cm, v1, 0.0), axis=1)
    if G > 2:
        s += tl.sum(tl.where(cm, v2, 0.0), axis=1)
    if G > 3:
        s += tl.sum(tl.where(cm, v3, 0.0), axis=1)
    mu = (s / nf)[:, None]
    d0 = tl.where(cm, v0 - mu, 0.0)
    q = tl.sum(d0 * d0, axis=1)
    d1, d2, d3 = zero, zero, zero
    if G > 1:
        d1 = tl.where(cm, v1 - mu, 0.0)
        q += tl.sum(d1 * d1, axis=1)
    if G > 2:
        d2 = tl.where(cm, v2 - mu, 0.0)
        q += tl.sum(d2 * d2, axis=1)
    if G > 3:
        d3 = tl.where(cm, v3 - mu, 0.0)
        q += tl.sum(d3 * d3, axis=1)
    rstd = (1.0 / tl.sqrt_rn(q / nf + LN_EPS))[:, None]
    return d0 * rstd, d1 * rstd, d2 * rstd, d3 * rstd, rstd


@triton.jit
def row_norm_bwd(dy0, dy1, dy2, dy3, vh0, vh1, vh2, vh3, rstd, cmask, G: tl.constexpr, H):
    """d v from dy = d N(v) (row_norm's layout; vh = N(v)): rstd * (dy - mean(dy) - vh * mean(dy * vh)), the
    means over the G*H features of each row. Tiles >= G come back 0; columns >= H hold anything."""
    cm = cmask[None, :]
    zero = tl.zeros_like(dy0)
    nf = G * H
    a = tl.sum(tl.where(cm, dy0, 0.0), axis=1)
    b = tl.sum(tl.where(cm, dy0 * vh0, 0.0), axis=1)
    if G > 1:
        a += tl.sum(tl.where(cm, dy1, 0.0), axis=1)
        b += tl.sum(tl.where(cm, dy1 * vh1, 0.0), axis=1)
    if G > 2:
        a += tl.sum(tl.where(cm, dy2, 0.0), axis=1)
        b += tl.sum(tl.where(cm, dy2 * vh2, 0.0), axis=1)
    if G > 3:
        a += tl.sum(tl.where(cm, dy3, 0.0), axis=1)
        b += tl.sum(tl.where(cm, dy3 * vh3, 0.0), axis=1)
    ma = (a / nf)[:, None]
    mb = (b / nf)[:, None]
    d0 = rstd * (dy0 - ma - vh0 * mb)
    d1, d2, d3 = zero, zero, zero
    if G > 1:
        d1 = rstd * (dy1 - ma - vh1 * mb)
    if G > 2:
        d2 = rstd * (dy2 - ma - vh2 * mb)
    if G > 3:
        d3 = rstd * (dy3 - ma - vh3 * mb)
    return d0, d1, d2, d3


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


class NormTiles(NamedTuple):
    """Launch shape of the normalised cells' steps: one column program holds all H units of its rows."""

    block_b: int
    block_h: int
    block_k: int  # cap on the K block (the W tiles are [BLOCK_K, BLOCK_H], one per gate)
    num_warps: int
    num_stages: int


def norm_tiles(n: int, H: int) -> NormTiles:
    """Rows per program (>= 16 for tl.dot, at most 2048 tile elements), every hidden unit in one tile (the layer
    norm reduces over a whole row); ValueError past NORM_MAX_H. Warps grow with the tile (about 4 elements of
    each [BLOCK_B, BLOCK_H] tile per thread up to 32 warps, against register spills), and the K block and the
    software pipeline shrink with BLOCK_H so the staged W tiles stay under ~100 KB of shared memory (sm_86's 99 KB;
    sizes read off sm_90 compiles with cuobjdump -res-usage)."""
    if H > NORM_MAX_H:
        raise ValueError(
            f"triton: the normalised cells hold a row's {H} hidden units in one program, at most {NORM_MAX_H}; "
            "use another backend (cpp, numba, reference) for larger hidden_size"
        )
    bh = max(16, triton.next_power_of_2(H))
    bb = max(16, min(64, triton.next_power_of_2(n), 2048 // bh))
    while bb > 16 and triton.cdiv(n, bb) < MIN_PROGRAMS:
        bb //= 2
    nw = min(32, max(4, bb * bh // 128))
    if bh <= 256:  # one stage ahead: G W tiles in flight
        return NormTiles(bb, bh, max(16, min(64, 4096 // bh)), nw, 2)
    return NormTiles(bb, bh, 16, nw, 1)


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
