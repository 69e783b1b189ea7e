"""The triton backend: per-step Triton kernels on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1).

The walk is written once (walk.py: one forward and one backward step kernel and their launchers); each cell
brings its pointwise step as @triton.jit functions (lstm.py, gru.py, rnn.py), chosen at compile time by its
kernel_id. Per step, forward runs one kernel that multiplies h_{t-1} by W_hh^T with tl.dot and fuses the gate
activations, the state update and saving what backward needs (cells.py's layout); backward runs one kernel
that fuses the GEMM d_h = d_gates W_hh (tl.dot) with the pointwise backward step, keeps d_gates of every step
and forms d_w_hh, d_b_hh, d_w_hr as single large GEMMs at the end. State and saved tensors are float32 whatever
the input dtype; float16 / bfloat16 multiply in their own dtype with float32 accumulation.

The layer-normalised cells (ln_lstm, ln_gru: ln_lstm.py, ln_gru.py) run the same two kernels with one program
holding every hidden unit of its rows, so the layer norms reduce inside it: hidden_size at most
common.NORM_MAX_H (1024), a ValueError beyond.

This package shares its name with the triton library: every import of the library here is absolute, and
the kernel modules are imported only once `triton` is known to be importable.

Environment: FASTRNN_TRITON_TF32=1 lets float32 products use TF32 tensor cores (default: exact float32).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from fastrnn.backends import optional_import
from fastrnn.cells import Cell, Grads, Saved, State, Weights

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


def forward(
    cell: Cell, gx: Tensor, state0: State, weights: Weights, batch_sizes: Tensor | None, reverse: bool, need_saved: bool
) -> tuple[Tensor, State, Saved]:
    """gx [T,B,G*H], state0 h [B,P] (c [B,H]), weights w_hh [G*H,P], b_hh [G*H]?, w_hr [P,H]?
    -> out [T,B,P], state_n, saved (cells.py's layout)."""
    from fastrnn.backends.triton import walk

    return walk.forward(cell, gx, state0, weights, batch_sizes, reverse, need_saved)


def backward(cell, d_out, d_state_n, state0, weights, batch_sizes, reverse, out, saved) -> Grads:
    """-> Grads(d_gx [T,B,G*H], State(d_h0 [B,P], d_c0 [B,H]?), Weights(d_w_hh, d_b_hh?, d_w_hr?), d_extra?)."""
    from fastrnn.backends.triton import walk

    return walk.backward(cell, d_out, d_state_n, state0, weights, batch_sizes, reverse, out, saved)
