"""The triton backend: per-step Triton kernels on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1).

Per step, forward runs one kernel that multiplies h_{t-1} by W_hh^T with tl.dot and fuses the gate
activations, the state update and saving what backward needs (cells.py's layout); backward runs one fused
pointwise kernel and one tl.dot GEMM (d_h = d_gates W_hh) per step, keeps d_gates of every step and forms
d_w_hh, d_b_hh, d_w_hr as single large GEMMs at the end. State and saved tensors are float32 whatever the
input dtype; float16 / bfloat16 multiply in their own dtype with float32 accumulation.

This package shares its name with the triton library: every import of the library here is absolute, and
the kernel modules are imported only once `triton` is known to be importable.

Environment: FASTRNN_TRITON_TF32=1 lets float32 products use TF32 tensor cores (default: exact float32).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from fastrnn.backends import optional_import
from fastrnn.cells import Cell, Grads, Saved, State, Weights, batch_sizes_list, check_cell

NAME = "triton"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRET_VAR = "TRITON_INTERPRET"


def available() -> tuple[bool, str]:
    mod, why = optional_import("triton")
    if mod is None:
        return False, f"{why}: pip install triton (ships with CUDA builds of torch)"
    return True, ""


def supports(cell: Cell, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    if not (device.type == "cuda" or (device.type == "cpu" and os.environ.get(INTERPRET_VAR) == "1")):
        return False, "triton runs on CUDA tensors; CPU only under TRITON_INTERPRET=1"
    if dtype not in DTYPES:
        return False, f"triton backend supports float32, float16 and bfloat16, not {dtype} (use the reference backend)"
    return True, ""


def _forward(
    cell: str, gx: Tensor, h0: Tensor, c0: Tensor | None, w_hh: Tensor, b_hh: Tensor | None, w_hr: Tensor | None,
    batch_sizes: Tensor | None, reverse: bool, need_saved: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """gx [T,B,G*H], h0 [B,P], c0 [B,H]|None, w_hh [G*H,P], b_hh [G*H]|None, w_hr [P,H]|None
    -> out [T,B,P], h_n [B,P], c_n [B,H] (empty unless lstm), gates, extra (cells.py's saved layout)."""
    check_cell(cell)
    T, B, _ = gx.shape
    bs = batch_sizes_list(batch_sizes, T, B)
    packed = batch_sizes is not None
    if cell == "lstm":
        from fastrnn.backends.triton.lstm import lstm_fwd

        return lstm_fwd(gx, h0, c0, w_hh, b_hh, w_hr, bs, packed, reverse, need_saved)
    if cell == "gru":
        from fastrnn.backends.triton.gru import gru_fwd

        out, h_n, gates, extra = gru_fwd(gx, h0, w_hh, b_hh, bs, packed, reverse, need_saved)
    else:
        from fastrnn.backends.triton.rnn import rnn_fwd

        out, h_n = rnn_fwd(gx, h0, w_hh, b_hh, bs, packed, reverse, relu=cell == "rnn_relu")
        gates, extra = gx.new_empty(0, dtype=torch.float32), gx.new_empty(0, dtype=torch.float32)
    return out, h_n, gx.new_empty(0), gates, extra


def _backward(
    cell: str, d_out: Tensor, d_h_n: Tensor, d_c_n: Tensor | None, h0: Tensor, c0: Tensor | None, w_hh: Tensor,
    b_hh: Tensor | None, w_hr: Tensor | None, batch_sizes: Tensor | None, reverse: bool, out: Tensor, gates: Tensor,
    extra: Tensor,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]:
    """-> d_gx [T,B,G*H], d_h0 [B,P], d_c0 [B,H]|None, d_w_hh [G*H,P], d_b_hh|None, d_w_hr|None."""
    check_cell(cell)
    T, B, _ = out.shape
    bs = batch_sizes_list(batch_sizes, T, B)
    packed = batch_sizes is not None
    has_bias = b_hh is not None
    if cell == "lstm":
        from fastrnn.backends.triton.lstm import lstm_bwd

        return lstm_bwd(d_out, d_h_n, d_c_n, h0, c0, w_hh, has_bias, w_hr, bs, packed, reverse, out, gates, extra)
    if cell == "gru":
        from fastrnn.backends.triton.gru import gru_bwd

        d_gx, d_h0, d_w, d_b = gru_bwd(d_out, d_h_n, h0, w_hh, has_bias, bs, reverse, out, gates, extra)
    else:
        from fastrnn.backends.triton.rnn import rnn_bwd

        d_gx, d_h0, d_w, d_b = rnn_bwd(d_out, d_h_n, h0, w_hh, has_bias, bs, reverse, out, relu=cell == "rnn_relu")
    return d_gx, d_h0, None, d_w, d_b, None


def forward(cell, gx, state0, weights, batch_sizes, reverse, need_saved):
    out, h_n, c_n, gates, extra = _forward(
        cell.name, gx, state0.h, state0.c, *weights, batch_sizes, reverse, need_saved
    )
    return out, State(h_n, c_n if cell.has_cell_state else None), Saved(gates, extra)


def backward(cell, d_out, d_state_n, state0, weights, batch_sizes, reverse, out, saved):
    g = _backward(
        cell.name, d_out, d_state_n.h, d_state_n.c, state0.h, state0.c, *weights, batch_sizes, reverse, out, *saved
    )
    return Grads(g[0], State(g[1], g[2]), Weights(*g[3:]))
