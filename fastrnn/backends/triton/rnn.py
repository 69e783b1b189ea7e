"""The Elman RNN's pointwise steps (one gate): h' = tanh or relu of (gx + W_hh h + b_hh), forward and backward, for
the one walk in walk.py. Backward needs only the step's output h_t, which the walk hands in; nothing is saved.

Arguments and results have the one signature every cell's step has (walk.py's `cell_fwd` / `cell_bwd`); all
tiles are [BLOCK_B, BLOCK_H] fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastrnn.backends.triton.common import Wiring, tanh
from fastrnn.cells import spec

TANH_ID = tl.constexpr(spec("rnn_tanh").kernel_id)
RELU_ID = tl.constexpr(spec("rnn_relu").kernel_id)


@triton.jit
def rnn_tanh_fwd(x0, x1, x2, x3, a0, a1, a2, a3, hp, cp):
    """-> h_t = tanh(x + a), nothing else."""
    zero = tl.zeros_like(a0)
    return tanh(x0 + a0), zero, zero, zero, zero, zero, zero


@triton.jit
def rnn_relu_fwd(x0, x1, x2, x3, a0, a1, a2, a3, hp, cp):
    """-> h_t = relu(x + a), nothing else."""
    pre = x0 + a0
    zero = tl.zeros_like(pre)
    return tl.where(pre < 0.0, 0.0, pre), zero, zero, zero, zero, zero, zero  # NaN passes, as torch.relu


@triton.jit
def rnn_tanh_bwd(dh, dc, hp, cp, h, s0, s1, s2, s3, e):
    """dh: d h_t, h: h_t -> d gx = d gh = dh * (1 - h^2)."""
    d = dh * (1.0 - h * h)
    zero = tl.zeros_like(dh)
    return d, zero, zero, zero, d, zero, zero, zero, zero, zero


@triton.jit
def rnn_relu_bwd(dh, dc, hp, cp, h, s0, s1, s2, s3, e):
    """dh: d h_t, h: h_t -> d gx = d gh: as torch's threshold_backward, zero where h <= 0."""
    d = tl.where(h <= 0.0, 0.0, dh)
    zero = tl.zeros_like(dh)
    return d, zero, zero, zero, d, zero, zero, zero, zero, zero


WIRING = {TANH_ID.value: Wiring(gh_same=1, direct=False), RELU_ID.value: Wiring(gh_same=1, direct=False)}
