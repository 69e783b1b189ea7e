"""The cell table: gate counts, torch's gate order, and the saved-for-backward layout every backend shares.

Cells and their gates, in torch.nn's order (rows of weight_ih / weight_hh):
    lstm      G=4  (i, f, g, o)   c' = f*c + i*g ;  h' = o*tanh(c')  [ ; h' = h' @ w_hr^T  with proj_size ]
    gru       G=3  (r, z, n)      n = tanh(gx_n + r*(W_hn h + b_hn)) ;  h' = (1-z)*n + z*h
    rnn_tanh  G=1                 h' = tanh(gx + W_hh h + b_hh)
    rnn_relu  G=1                 h' = relu(gx + W_hh h + b_hh)

Saved layout (what forward hands to backward; identical for every backend so the fake implementation of the
custom op knows its shapes):
    lstm      gates [T, B, 4H] activated (i, f, g, o);  extra [T, B, H] c_t, the cell state after step t
    gru       gates [T, B, 3H] activated (r, z, n);     extra [T, B, H] W_hn h_{t-1} + b_hn
    rnn_*     both empty: out holds h_t, which is all backward needs
Rows a step does not touch (row >= batch_sizes[t], packed input only) are zero in out, gates and extra, so
every output of the op is deterministic (torch.library.opcheck compares them all); backward never reads
them. The state before step t (h_{t-1}) is read back from `out` and h0 (see `prev_rows`).
"""

from __future__ import annotations

import torch

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
CELLS = tuple(GATES)

# torch.nn's `mode` strings (RNNBase.mode) to our cell names.
MODE_TO_CELL = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


def check_cell(cell: str) -> int:
    """Number of gates of `cell`; ValueError naming the known cells otherwise."""
    try:
        return GATES[cell]
    except KeyError:
        raise ValueError(f"unknown cell {cell!r}; expected one of {', '.join(CELLS)}") from None


def saved_dtype(dtype: torch.dtype) -> torch.dtype:
    """Saved activations are kept in at least float32 so half-precision training keeps fp32 state."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def saved_shapes(cell: str, T: int, B: int, H: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (gates, extra) saved for backward; (0,) means empty."""
    G = check_cell(cell)
    if cell in ("lstm", "gru"):
        return (T, B, G * H), (T, B, H)
    return (0,), (0,)


def steps(T: int, reverse: bool) -> range:
    """The order forward visits time steps."""
    return range(T - 1, -1, -1) if reverse else range(T)


def prev_rows(t: int, n: int, T: int, bs: list[int], reverse: bool) -> int:
    """How many of the n rows active at step t continue from the previous step's output (the rest start
    from h0). Forward direction: all of them unless t == 0. Reverse: the rows still active at t+1."""
    if reverse:
        return min(n, bs[t + 1]) if t + 1 < T else 0
    return n if t > 0 else 0


def batch_sizes_list(batch_sizes: torch.Tensor | None, T: int, B: int) -> list[int]:
    """batch_sizes as a Python list (all B when the input is padded)."""
    return [B] * T if batch_sizes is None else [int(b) for b in batch_sizes.tolist()]
