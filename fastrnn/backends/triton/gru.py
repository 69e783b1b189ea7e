"""GRU's pointwise step (gates r, z, n): n = tanh(gx_n + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h, forward
and backward, for the one walk in walk.py.

Arguments and results have the one signature every cell's step has (walk.py's `cell_fwd` / `cell_bwd`); all
tiles are [BLOCK_B, BLOCK_H] fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastrnn.backends.triton.common import Wiring, tanh
from fastrnn.cells import spec

ID = tl.constexpr(spec("gru").kernel_id)


@triton.jit
def gru_fwd(x0, x1, x2, x3, a0, a1, a2, a3, hp, cp):
    """x_k: gx of gate k, a_k: (h_{t-1} W_hh^T + b_hh) of gate k, hp: h_{t-1}
    -> h_t, (no cell state), the saved gates (r, z, n) and the saved extra (W_hn h_{t-1} + b_hn)."""
    r = tl.sigmoid(x0 + a0)
    z = tl.sigmoid(x1 + a1)
    n = tanh(x2 + r * a2)
    zero = tl.zeros_like(hp)
    return (1.0 - z) * n + z * hp, zero, r, z, n, zero, a2


@triton.jit
def gru_bwd(dh, dc, hp, cp, h, r, z, n, s3, e):
    """dh: d h_t, hp: h_{t-1}, (r, z, n): the saved gates, e: W_hn h_{t-1} + b_hn
    -> d gx and d gh of each gate (they differ in n: d gh_n = r * d n), d h_{t-1} besides W_hh (z * dh), none."""
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dr = dn * e * r * (1.0 - r)
    dz = dh * (hp - n) * z * (1.0 - z)
    zero = tl.zeros_like(dh)
    return dr, dz, dn, zero, dr, dz, dn * r, zero, dh * z, zero


WIRING = {ID.value: Wiring(gh_same=2, direct=True)}
