"""The layer-normalised LSTM's pointwise step with zoneout (gates i, f, g, o; cells.py, "Normalised cells"), forward
and backward, for the one walk in walk.py:
    ah = ln_hh ⊙ N(raw) + b_hh, raw = h_{t-1} W_hh^T ;  (i, f, g, o) = act(gx + ah) ;  c_t = f c + i g
    hbar = o tanh(ln_c ⊙ N(c_t) + b_c) ;  h_t = h_{t-1} + m (hbar - h_{t-1})

Every tile is [BLOCK_B, BLOCK_H] fp32 and holds all H hidden units of its rows (columns >= H masked), so the layer
norms reduce within the program. Norm.params blocks (of H): ln_hh 0..3, b_hh 4..7, ln_c 8, b_c 9.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastrnn.backends.triton.common import Wiring, param, row_norm, row_norm_bwd, tanh
from fastrnn.cells import spec

ID = tl.constexpr(spec("ln_lstm").kernel_id)


@triton.jit
def ln_lstm_fwd(x0, x1, x2, x3, w0, w1, w2, w3, hp, cp, m, p_ptr, cols, cmask, H):
    """x_k: gx of gate k, w_k: raw (h_{t-1} W_hh^T) of gate k, hp: h_{t-1}, cp: c_{t-1}, m: zoneout keep
    -> h_t, c_t, the saved gates (i, f, g, o) and the saved extra's first block (c_t; raw follows it)."""
    n0, n1, n2, n3, _ = row_norm(w0, w1, w2, w3, cmask, 4, H)
    i = tl.sigmoid(x0 + param(p_ptr, 0, cols, cmask, H) * n0 + param(p_ptr, 4, cols, cmask, H))
    f = tl.sigmoid(x1 + param(p_ptr, 1, cols, cmask, H) * n1 + param(p_ptr, 5, cols, cmask, H))
    g = tanh(x2 + param(p_ptr, 2, cols, cmask, H) * n2 + param(p_ptr, 6, cols, cmask, H))
    o = tl.sigmoid(x3 + param(p_ptr, 3, cols, cmask, H) * n3 + param(p_ptr, 7, cols, cmask, H))
    c = f * cp + i * g
    zero = tl.zeros_like(c)
    ch, _, _, _, _ = row_norm(c, zero, zero, zero, cmask, 1, H)
    hbar = o * tanh(param(p_ptr, 8, cols, cmask, H) * ch + param(p_ptr, 9, cols, cmask, H))
    return hp + m * (hbar - hp), c, i, f, g, o, c


@triton.jit
def ln_lstm_bwd(dh, dc, hp, cp, m, i, f, g, o, c, w0, w1, w2, w3, p_ptr, cols, cmask, H):
    """dh: d h_t, dc: d c_t, cp: c_{t-1}, m: zoneout keep, (i, f, g, o): the saved gates, c: c_t, w_k: saved raw
    -> d gx of each gate, d raw of each gate, d h_{t-1} besides W_hh ((1 - m) dh), d c_{t-1}, d_extra
    (d of ln_c ⊙ N(c_t) + b_c)."""
    zero = tl.zeros_like(dh)
    ch, _, _, _, rstd_c = row_norm(c, zero, zero, zero, cmask, 1, H)
    ln_c = param(p_ptr, 8, cols, cmask, H)
    tc = tanh(ln_c * ch + param(p_ptr, 9, cols, cmask, H))
    dhbar = m * dh
    d_cpre = dhbar * o * (1.0 - tc * tc)
    d_cn, _, _, _ = row_norm_bwd(d_cpre * ln_c, zero, zero, zero, ch, zero, zero, zero, rstd_c, cmask, 1, H)
    dct = dc + d_cn
    di = dct * g * i * (1.0 - i)
    df = dct * cp * f * (1.0 - f)
    dg = dct * i * (1.0 - g * g)
    do = dhbar * tc * o * (1.0 - o)
    n0, n1, n2, n3, rstd = row_norm(w0, w1, w2, w3, cmask, 4, H)
    q0, q1, q2, q3 = row_norm_bwd(
        di * param(p_ptr, 0, cols, cmask, H), df * param(p_ptr, 1, cols, cmask, H),
        dg * param(p_ptr, 2, cols, cmask, H), do * param(p_ptr, 3, cols, cmask, H),
        n0, n1, n2, n3, rstd, cmask, 4, H,
    )  # fmt: skip
    return di, df, dg, do, q0, q1, q2, q3, (1.0 - m) * dh, dct * f, d_cpre


WIRING = {ID.value: Wiring(gh_same=0, direct=True)}
