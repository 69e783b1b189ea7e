"""The cpp backend: the kernel contract on the compiled extension fastrnn._C (csrc/), whole time loop in C++.

Every tensor argument is contiguous and of one dtype and device (ops.py sees to that); the C++ entry points check
shapes, dtypes, devices and contiguity again before touching memory. Outputs are allocated in C++.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrnn.backends import optional_import
from fastrnn.cells import check_cell

NAME = "cpp"
DTYPES = (torch.float32, torch.float64)

_NOT_BUILT = "the C++ extension fastrnn._C is not built: run `pip install --no-build-isolation -e .` in the source tree"


def _ext():
    mod, _ = optional_import("fastrnn._C")
    return mod


def available() -> tuple[bool, str]:
    if _ext() is None:
        return False, _NOT_BUILT
    return True, ""


def supports(cell: str, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    check_cell(cell)
    if torch.device(device).type != "cpu":
        return False, f"the cpp backend runs on CPU tensors only, got device {device}"
    if dtype not in DTYPES:
        return False, f"the cpp backend supports float32 and float64, got {dtype}"
    return True, ""


def forward(
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


def backward(
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
