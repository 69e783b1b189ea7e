"""The layer-normalised GRU's pointwise step with zoneout (gates r, z, n; cells.py, "Normalised cells"), forward and
backward, for the one walk in walk.py:
    ah = ln_hh ⊙ N(raw) + b_hh, raw = h_{t-1} W_hh^T ;  r, z = σ(gx_rz + ah_rz) ;  n = tanh(gx_n + r ah_n)
    hbar = (1 - z) n + z h_{t-1} ;  h_t = h_{t-1} + m (hbar - h_{t-1})

Every tile is [BLOCK_B, BLOCK_H] fp32 and holds all H hidden units of its rows (columns >= H masked), so the layer
norm reduces within the program. Norm.params blocks (of H): ln_hh 0..2, b_hh 3..5.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastrnn.backends.triton.common import Wiring, param, row_norm, row_norm_bwd, tanh
from fastrnn.cells import spec

ID = tl.constexpr(spec("ln_gru").kernel_id)


@triton.jit
def ln_gru_fwd(x0, x1, x2, x3, w0, w1, w2, w3, hp, cp, m, p_ptr, cols, cmask, H):
    """x_k: gx of gate k, w_k: raw (h_{t-1} W_hh^T) of gate k, hp: h_{t-1}, m: zoneout keep
    -> h_t, (no cell state), the saved gates (r, z, n) and the saved extra's first block (ah_n; raw follows it)."""
    n0, n1, n2, _, _ = row_norm(w0, w1, w2, w3, cmask, 3, H)
    ah_r = param(p_ptr, 0, cols, cmask, H) * n0 + param(p_ptr, 3, cols, cmask, H)
    ah_z = param(p_ptr, 1, cols, cmask, H) * n1 + param(p_ptr, 4, cols, cmask, H)
    ah_n = param(p_ptr, 2, cols, cmask, H) * n2 + param(p_ptr, 5, cols, cmask, H)
    r = tl.sigmoid(x0 + ah_r)
    z = tl.sigmoid(x1 + ah_z)
    n = tanh(x2 + r * ah_n)
    hbar = (1.0 - z) * n + z * hp
    zero = tl.zeros_like(hp)
    return hp + m * (hbar - hp), zero, r, z, n, zero, ah_n


@triton.jit
def ln_gru_bwd(dh, dc, hp, cp, m, r, z, n, s3, ah_n, w0, w1, w2, w3, p_ptr, cols, cmask, H):
    """dh: d h_t, hp: h_{t-1}, m: zoneout keep, (r, z, n): the saved gates, ah_n: saved, w_k: saved raw
    -> d gx of each gate, d raw of each gate, d h_{t-1} besides W_hh (m z dh + (1 - m) dh), (none), d_extra
    (d ah_n)."""
    zero = tl.zeros_like(dh)
    dhbar = m * dh
    dn = dhbar * (1.0 - z) * (1.0 - n * n)
    dr = dn * ah_n * r * (1.0 - r)
    dz = dhbar * (hp - n) * z * (1.0 - z)
    d_ahn = dn * r
    n0, n1, n2, _, rstd = row_norm(w0, w1, w2, w3, cmask, 3, H)
    q0, q1, q2, _ = row_norm_bwd(
        dr * param(p_ptr, 0, cols, cmask, H), dz * param(p_ptr, 1, cols, cmask, H),
        d_ahn * param(p_ptr, 2, cols, cmask, H), zero, n0, n1, n2, zero, rstd, cmask, 3, H,
    )  # fmt: skip
    return dr, dz, dn, zero, q0, q1, q2, zero, dhbar * z + (1.0 - m) * dh, zero, d_ahn


WIRING = {ID.value: Wiring(gh_same=0, direct=True)}
