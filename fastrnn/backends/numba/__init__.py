"""The numba backend: the kernel contract as @njit kernels on numpy views of CPU tensors (float32, float64).

The whole time loop of a layer runs inside one compiled function. Per step, forward multiplies h_{t-1} by
W_hh^T with BLAS (np.dot into preallocated buffers) and fuses the gate activations, the state update and
saving what backward needs (cells.py's layout); backward runs one fused pass and one GEMM per step, keeps
d_gates of every step and forms d_w_hh, d_b_hh, d_w_hr as single large GEMMs at the end (torch.mm). With
N threads (FASTRNN_NUMBA_THREADS, else torch.get_num_threads(); see common.threads) a step whose GEMM is
large enough is split into N blocks of hidden units run on numba's threads (prange), each calling
single-threaded BLAS on its block.

This package shares its name with the numba library: every import of the library here is absolute, and the
kernel modules are imported only once `numba` is known to be importable.

Compiled kernels are cached on disk (numba's cache=True): in __pycache__ next to these sources, or, where
that is not writable (a read-only install), in numba's user cache directory; NUMBA_CACHE_DIR overrides both.
Threads: FASTRNN_NUMBA_THREADS (default torch.get_num_threads(); at most NUMBA_NUM_THREADS); OMP_WAIT_POLICY
defaults to PASSIVE for numba's OpenMP pool (see common.threads).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrnn.backends import optional_import
from fastrnn.cells import Cell, Grads, Saved, State, Weights, batch_sizes_list, check_cell

NAME = "numba"
DTYPES = (torch.float32, torch.float64)


def available() -> tuple[bool, str]:
    mod, why = optional_import("numba")
    if mod is None:
        return False, f"{why}: pip install numba"
    # numba's np.dot calls the BLAS that scipy exposes; without scipy every kernel fails to compile
    mod, why = optional_import("scipy")
    if mod is None:
        return False, f"the numba backend needs scipy for BLAS, and {why}: pip install scipy"
    return True, ""


def supports(cell: Cell, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"numba backend runs on CPU tensors, not {device.type}"
    if dtype not in DTYPES:
        return False, f"numba backend supports float32 and float64, not {dtype} (use the reference backend)"
    return True, ""


def _forward(
    cell: str, gx: Tensor, h0: Tensor, c0: Tensor | None, w_hh: Tensor, b_hh: Tensor | None, w_hr: Tensor | None,
    batch_sizes: Tensor | None, reverse: bool, need_saved: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """gx [T,B,G*H], h0 [B,P], c0 [B,H]|None, w_hh [G*H,P], b_hh [G*H]|None, w_hr [P,H]|None
    -> out [T,B,P], h_n [B,P], c_n [B,H] (empty unless lstm), gates, extra (cells.py's saved layout)."""
    check_cell(cell)
    from fastrnn.backends.numba.common import single_threaded_blas

    T, B, _ = gx.shape
    bs = batch_sizes_list(batch_sizes, T, B)
    with single_threaded_blas():
        if cell == "lstm":
            from fastrnn.backends.numba.lstm import lstm_fwd

            return lstm_fwd(gx, h0, c0, w_hh, b_hh, w_hr, bs, reverse, need_saved)
        if cell == "gru":
            from fastrnn.backends.numba.gru import gru_fwd

            out, h_n, gates, extra = gru_fwd(gx, h0, w_hh, b_hh, bs, reverse, need_saved)
        else:
            from fastrnn.backends.numba.rnn import rnn_fwd

            out, h_n = rnn_fwd(gx, h0, w_hh, b_hh, bs, reverse, relu=cell == "rnn_relu")
            gates, extra = gx.new_empty(0), gx.new_empty(0)
    return out, h_n, gx.new_empty(0), gates, extra


def _backward(
    cell: str, d_out: Tensor, d_h_n: Tensor, d_c_n: Tensor | None, h0: Tensor, c0: Tensor | None, w_hh: Tensor,
    b_hh: Tensor | None, w_hr: Tensor | None, batch_sizes: Tensor | None, reverse: bool, out: Tensor, gates: Tensor,
    extra: Tensor,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]:
    """-> d_gx [T,B,G*H], d_h0 [B,P], d_c0 [B,H]|None, d_w_hh [G*H,P], d_b_hh|None, d_w_hr|None."""
    check_cell(cell)
    from fastrnn.backends.numba.common import single_threaded_blas

    T, B, _ = out.shape
    bs = batch_sizes_list(batch_sizes, T, B)
    with single_threaded_blas():
        if cell == "lstm":
            from fastrnn.backends.numba.lstm import lstm_bwd

            return lstm_bwd(d_out, d_h_n, d_c_n, h0, c0, w_hh, b_hh, w_hr, bs, reverse, out, gates, extra)
        if cell == "gru":
            from fastrnn.backends.numba.gru import gru_bwd

            d_gx, d_h0, d_w_hh, d_b_hh = gru_bwd(d_out, d_h_n, h0, w_hh, b_hh, bs, reverse, out, gates, extra)
        else:
            from fastrnn.backends.numba.rnn import rnn_bwd

            d_gx, d_h0, d_w_hh, d_b_hh = rnn_bwd(d_out, d_h_n, h0, w_hh, b_hh, bs, reverse, out, cell == "rnn_relu")
    return d_gx, d_h0, None, d_w_hh, d_b_hh, None


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
