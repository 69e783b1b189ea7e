"""LSTM's pointwise step (gates i, f, g, o): c' = f*c + i*g, h' = o*tanh(c'), forward and backward, for the one
walk in walk.py. The projection of proj_size (h = h' W_hr^T) is a GEMM, so it belongs to the walk.

Arguments and results have the one signature every cell's step has (walk.py's `cell_fwd` / `cell_bwd`); all
tiles are [BLOCK_B, BLOCK_H] fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fastrnn.backends.triton.common import Wiring, tanh
from fastrnn.cells import spec

ID = tl.constexpr(spec("lstm").kernel_id)


@triton.jit
def lstm_fwd(x0, x1, x2, x3, a0, a1, a2, a3, hp, cp):
    """x_k: gx of gate k, a_k: (h_{t-1} W_hh^T + b_hh) of gate k, cp: c_{t-1}
    -> h'_t, c_t, the saved gates (i, f, g, o) and the saved extra (c_t)."""
    i = tl.sigmoid(x0 + a0)
    f = tl.sigmoid(x1 + a1)
    g = tanh(x2 + a2)
    o = tl.sigmoid(x3 + a3)
    c = f * cp + i * g
    return o * tanh(c), c, i, f, g, o, c


@triton.jit
def lstm_bwd(dh, dc, hp, cp, h, i, f, g, o, e):
    """dh: d h'_t, dc: d c_t, cp: c_{t-1}, (i, f, g, o): the saved gates, e: c_t
    -> d gx and d gh of each gate (equal), d h_{t-1} besides W_hh (none), d c_{t-1}."""
    tc = tanh(e)
    dct = dc + dh * o * (1.0 - tc * tc)
    di = dct * g * i * (1.0 - i)
    df = dct * cp * f * (1.0 - f)
    dg = dct * i * (1.0 - g * g)
    do = dh * tc * o * (1.0 - o)
    zero = tl.zeros_like(dh)
    return di, df, dg, do, di, df, dg, do, zero, dct * f


def lstm_hbar(gates: Tensor, extra: Tensor) -> Tensor:
    """o * tanh(c_t), the output before the projection, [T, B, H] from the saved rows (zero where they are)."""
    H = extra.shape[-1]
    return gates[..., 3 * H :] * extra.tanh()


WIRING = {ID.value: Wiring(gh_same=4, direct=False, hbar=lstm_hbar)}
