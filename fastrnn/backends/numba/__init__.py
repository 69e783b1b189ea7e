"""The numba backend: the kernel contract as @njit kernels on numpy views of CPU tensors (float32, float64).

The whole time loop of a layer runs inside one compiled function, the same for every cell (kernels.py: the
walk once, each cell a pointwise step looked up by its kernel_id; launcher.py: allocate and call). Per step,
forward multiplies h_{t-1} by W_hh^T with BLAS (np.dot into preallocated buffers) and fuses the gate
activations, the state update and saving what backward needs (cells.py's layout); backward runs one fused
pass and one GEMM per step, keeps d_gates of every step and forms d_w_hh, d_b_hh, d_w_hr as single large
GEMMs at the end (torch.mm). With N threads (FASTRNN_NUMBA_THREADS, else torch.get_num_threads(); see
common.threads) a step whose GEMM is large enough is split into N blocks of hidden units run on numba's
threads (prange), each calling single-threaded BLAS on its block. The layer-normalised cells (ln_lstm, ln_gru)
normalise over all hidden units of a row: their fused passes run over whole rows after the blocks' GEMMs (the
rows on numba's threads), with cells.Norm's parameters and zoneout mask, and backward returns Grads.d_extra.

This package shares its name with the numba library: every import of the library here is absolute, and the
kernel modules are imported only once `numba` is known to be importable.

Compiled kernels are cached on disk (numba's cache=True): in __pycache__ next to these sources, or, where
that is not writable (a read-only install), in numba's user cache directory; NUMBA_CACHE_DIR overrides both.
Threads: FASTRNN_NUMBA_THREADS (default torch.get_num_threads(); at most NUMBA_NUM_THREADS); OMP_WAIT_POLICY
defaults to PASSIVE for numba's OpenMP pool (see common.threads).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fastrnn.backends import optional_import
from fastrnn.cells import Cell, Grads, Saved, State, Weights, batch_sizes_list

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
    ids = _kernel_ids()
    if ids is None:
        return False, available()[1]
    if cell.kernel_id not in ids:
        return False, f"numba backend has no step for {cell.name}"
    return True, ""


@functools.cache
def _kernel_ids() -> frozenset[int] | None:
    """The kernel_ids the kernels have a step for; None where numba cannot run. Once per process: supports is
    asked at every call."""
    if not available()[0]:
        return None
    from fastrnn.backends.numba.kernels import STEPS

    return frozenset(STEPS)


def forward(
    cell: Cell, gx: Tensor, state0: State, weights: Weights, batch_sizes: Tensor | None, reverse: bool, need_saved: bool
) -> tuple[Tensor, State, Saved]:
    """gx [T,B,G*H], state0 h0 [B,P] (c0 [B,H]), weights w_hh [G*H,P], b_hh [G*H]?, w_hr [P,H]?
    -> out [T,B,P], state_n, saved (cells.py's layout)."""
    from fastrnn.backends.numba import launcher
    from fastrnn.backends.numba.common import single_threaded_blas

    T, B, _ = gx.shape
    with single_threaded_blas():
        return launcher.forward(cell, gx, state0, weights, batch_sizes_list(batch_sizes, T, B), reverse, need_saved)


def backward(cell, d_out, d_state_n, state0, weights, batch_sizes, reverse, out, saved) -> Grads:
    """-> Grads(d_gx [T,B,G*H], State(d_h0 [B,P], d_c0 [B,H]), Weights(d_w_hh, d_b_hh, d_w_hr), d_extra [T,B,H]);
    None where the input was None, the cell has no cell state, or (d_extra) no normalisation."""
    from fastrnn.backends.numba import launcher
    from fastrnn.backends.numba.common import single_threaded_blas

    T, B, _ = out.shape
    bs = batch_sizes_list(batch_sizes, T, B)
    with single_threaded_blas():
        return launcher.backward(cell, d_out, d_state_n, state0, weights, bs, reverse, out, saved)
