"""The `torch` backend: torch.nn's own kernels (cuDNN on CUDA, oneDNN or ATen's native loop on CPU) behind
fastrnn's modules, called exactly as torch.nn.LSTM/GRU/RNN and the Cell classes call them, so results equal
torch.nn's bit for bit.

torch's kernels run whole layers (all layers and directions, the input projection included), so this backend
has no per-direction contract: functional.py hands it the whole call. It is what auto picks where a fused
backend is not measured faster, and what deployment paths (scripting, tracing, export) run.
"""

from __future__ import annotations

import torch
from torch import _VF, Tensor

from fastrnn.backends import reference
from fastrnn.backends.reference import available  # noqa: F401 - as reference: always
from fastrnn.cells import Cell

NAME = "torch"
WHOLE_CALL = True  # functional.py calls rnn()/cell() below instead of the per-direction contract


def supports(cell: Cell, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    if cell.torch_mode is None:
        return False, f"torch.nn has no {cell.layer} to run"
    return reference.supports(cell, dtype, device)


def flat_weights(weights) -> list[Tensor]:
    """Per layer and direction (w_ih, w_hh, b_ih?, b_hh?, w_hr?) as torch's _flat_weights order."""
    return [w for ws in weights for w in ws if w is not None]


def rnn(
    cell: Cell,
    input: Tensor,
    hx: Tensor,
    cx: Tensor | None,
    weights,
    num_layers: int,
    bidirectional: bool,
    dropout: float,
    training: bool,
    batch_first: bool,
    batch_sizes: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """torch.nn.RNNBase.forward's kernel call: _VF.lstm / gru / rnn_tanh / rnn_relu."""
    fn = getattr(_VF, cell.name)
    flat = flat_weights(weights)
    bias = weights[0][2] is not None
    h = (hx, cx) if cell.has_cell_state else hx
    if batch_sizes is None:
        res = fn(input, h, flat, bias, num_layers, dropout, training, bidirectional, batch_first)
    else:
        res = fn(input, batch_sizes, h, flat, bias, num_layers, dropout, training, bidirectional)
    if cell.has_cell_state:
        return res[0], res[1], res[2]
    return res[0], res[1], None


def cell(
    cell: Cell, input: Tensor, hx: Tensor, cx: Tensor | None, *weights: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """torch.nn.*Cell.forward's kernel call: _VF.lstm_cell / gru_cell / rnn_tanh_cell / rnn_relu_cell.
    weights: w_ih, w_hh, b_ih, b_hh (the biases None without bias)."""
    fn = getattr(_VF, f"{cell.name}_cell")
    if cell.has_cell_state:
        h, c = fn(input, (hx, cx), *weights)
        return h, c
    return fn(input, hx, *weights), None
