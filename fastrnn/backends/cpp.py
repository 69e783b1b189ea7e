"""The cpp backend: the kernel contract on the compiled extension fastrnn._C (csrc/), whole time loop in C++.

Every tensor argument is contiguous and of one dtype and device (ops.py sees to that); the C++ entry points check
shapes, dtypes, devices and contiguity again before touching memory. Outputs are allocated in C++.

The kernels are float32 and float64. bfloat16 and float16 run the float32 kernels on inputs widened once per call
and round the results back: the reference's own recipe (state and saved activations in float32, cells.saved_dtype),
so the numbers match it; the cost is one conversion pass over gx, out and the gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrnn.backends import optional_import
from fastrnn.cells import Cell, Grads, Saved, State, Weights, check_cell

NAME = "cpp"
KERNEL_DTYPES = (torch.float32, torch.float64)
WIDENED_DTYPES = (torch.bfloat16, torch.float16)  # computed by the float32 kernels

_NOT_BUILT = "the C++ extension fastrnn._C is not built: run `pip install --no-build-isolation -e .` in the source tree"


_module = None


def _ext():
    global _module
    if _module is None:
        _module, _ = optional_import("fastrnn._C")
    return _module


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


def _to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def available() -> tuple[bool, str]:
    if _ext() is None:
        return False, _NOT_BUILT
    return True, ""


def supports(cell: Cell, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    if torch.device(device).type != "cpu":
        return False, f"the cpp backend runs on CPU tensors only, got device {device}"
    if dtype not in KERNEL_DTYPES + WIDENED_DTYPES:
        return False, f"the cpp backend supports float32, float64, bfloat16 and float16, got {dtype}"
    return True, ""


def _forward(
    cell: str,
    gx: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    reverse: bool,
    need_saved: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """gx [T,B,G*H], h0 [B,P], c0 [B,H]|None -> out [T,B,P], h_n [B,P], c_n, gates, extra (cells.py layout)."""
    if gx.dtype in WIDENED_DTYPES:
        args = (_f32(gx), _f32(h0), _f32(c0), _f32(w_hh), _f32(b_hh), _f32(w_hr), batch_sizes, reverse, need_saved)
        out, h_n, c_n, gates, extra = _forward(cell, *args)
        return out.to(gx.dtype), h_n.to(gx.dtype), c_n.to(gx.dtype), gates, extra
    C = _ext()
    check_cell(cell)
    if cell == "lstm":
        H = w_hh.shape[0] // 4
        c0 = gx.new_zeros(gx.shape[1], H) if c0 is None else c0
        out, h_n, c_n, gates, extra = C.lstm_forward(gx, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse, need_saved)
        return out, h_n, c_n, gates, extra
    if cell == "gru":
        out, h_n, gates, extra = C.gru_forward(gx, h0, w_hh, b_hh, batch_sizes, reverse, need_saved)
        return out, h_n, gx.new_empty(0), gates, extra
    out, h_n = C.rnn_forward(gx, h0, w_hh, b_hh, batch_sizes, reverse, cell == "rnn_relu")
    return out, h_n, gx.new_empty(0), gx.new_empty(0), gx.new_empty(0)


def _backward(
    cell: str,
    d_out: Tensor,
    d_h_n: Tensor,
    d_c_n: Tensor | None,
    h0: Tensor,
    c0: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    reverse: bool,
    out: Tensor,
    gates: Tensor,
    extra: Tensor,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]:
    """-> d_gx [T,B,G*H], d_h0 [B,P], d_c0 [B,H]|None, d_w_hh, d_b_hh|None, d_w_hr|None."""
    dt = out.dtype
    if dt in WIDENED_DTYPES:
        wide = (_f32(d_out), _f32(d_h_n), _f32(d_c_n), _f32(h0), _f32(c0), _f32(w_hh), _f32(b_hh), _f32(w_hr))
        grads = _backward(cell, *wide, batch_sizes, reverse, _f32(out), gates, extra)
        return tuple(_to(g, dt) for g in grads)  # type: ignore[return-value]
    C = _ext()
    check_cell(cell)
    if cell == "lstm":
        B, H = out.shape[1], w_hh.shape[0] // 4
        c0_ = out.new_zeros(B, H) if c0 is None else c0
        d_c_n = out.new_zeros(B, H) if d_c_n is None else d_c_n
        d_gx, d_h0, d_c0, d_w_hh, d_b_hh, d_w_hr = C.lstm_backward(
            d_out, d_h_n, d_c_n, h0, c0_, w_hh, b_hh, w_hr, batch_sizes, reverse, out, gates, extra
        )
        return d_gx, d_h0, (None if c0 is None else d_c0), d_w_hh, d_b_hh, d_w_hr
    if cell == "gru":
        d_gx, d_h0, d_w_hh, d_b_hh = C.gru_backward(
            d_out, d_h_n, h0, w_hh, b_hh, batch_sizes, reverse, out, gates, extra
        )
    else:
        d_gx, d_h0, d_w_hh, d_b_hh = C.rnn_backward(
            d_out, d_h_n, h0, w_hh, b_hh, batch_sizes, reverse, out, cell == "rnn_relu"
        )
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
