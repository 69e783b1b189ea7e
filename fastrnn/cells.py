"""The cell table and the kernel contract's types: every property of a cell that other code needs.

Nothing outside this file (and the per-cell step files of each backend) tests a cell's name: code asks the
table (`spec(cell).has_cell_state`, `.gates`, `.saved_shapes(...)`, ...) instead.

Cells and their gates, in torch.nn's order (rows of weight_ih / weight_hh):
    lstm      G=4  (i, f, g, o)   c' = f*c + i*g ;  h' = o*tanh(c')  [ ; h' = h' @ w_hr^T  with proj_size ]
    gru       G=3  (r, z, n)      n = tanh(gx_n + r*(W_hn h + b_hn)) ;  h' = (1-z)*n + z*h
    rnn_tanh  G=1                 h' = tanh(gx + W_hh h + b_hh)
    rnn_relu  G=1                 h' = relu(gx + W_hh h + b_hh)
    ln_lstm   G=4  (i, f, g, o)   layer-normalised LSTM (Ba et al. 2016) with zoneout on h, see "Normalised cells"
    ln_gru    G=3  (r, z, n)      layer-normalised GRU with zoneout on h

Saved layout (what forward hands to backward; identical for every backend so the fake implementation of the
custom op knows its shapes):
    lstm      gates [T, B, 4H] activated (i, f, g, o);  extra [T, B, H] c_t, the cell state after step t
    gru       gates [T, B, 3H] activated (r, z, n);     extra [T, B, H] W_hn h_{t-1} + b_hn
    rnn_*     both empty: out holds h_t, which is all backward needs
    ln_lstm   gates [T, B, 4H] activated (i, f, g, o);  extra [T, B, 5H] (c_t | raw_t), raw_t = h_{t-1} W_hh^T
    ln_gru    gates [T, B, 3H] activated (r, z, n);     extra [T, B, 4H] (ah_n | raw_t), ah = ln_hh ⊙ N(raw_t) + b_hh
Rows a step does not touch (row >= batch_sizes[t], packed input only) are zero in out, gates and extra, so
every output of the op is deterministic (torch.library.opcheck compares them all); backward never reads
them. The state before step t (h_{t-1}) is read back from `out` and h0 (see `prev_rows`).

Normalised cells (`Cell.norm`; N(v) = (v - mean v) / sqrt(var v + 1e-5) over a row's features, biased variance):
    gx = ln_ih_weight ⊙ N(x W_ih^T) + b_ih is formed before the walk (functional.py, plain torch under autograd), so
    the kernel is called with b_hh = None and gets `Weights.norm` instead: `Norm.params`, one vector per layer and
    direction [ln_hh_weight (G*H) | b_hh (G*H, zeros without bias) | ln_c_weight (H) | ln_c_bias (H), lstm only],
    and zoneout's keep mask `Norm.mask` [T, B, H] (training; m ~ Bernoulli(1 - p)) or, where it is None, the
    constant `Norm.keep` (1 - p in eval, 1 without zoneout). Each step:
        raw = h_{t-1} W_hh^T ; ah = ln_hh_weight ⊙ N(raw) + b_hh          (the walk's GEMM, without bias)
        ln_lstm  (i, f, g, o) = split(gx_t + ah) ; c_t = σf c + σi tanh g
                 hbar = σo tanh(ln_c_weight ⊙ N(c_t) + ln_c_bias)
        ln_gru   r, z = σ(gx_rz + ah_rz) ; n = tanh(gx_n + r ah_n) ; hbar = (1 - z) n + z h_{t-1}
        h_t = h_{t-1} + m_t ⊙ (hbar - h_{t-1})                            (zoneout acts on h only)
    Backward also returns `Grads.d_extra` [T, B, H]: d(ln_c_weight ⊙ N(c_t) + ln_c_bias) for ln_lstm, d ah_n for
    ln_gru (zero on skipped rows), and the kernel's d_w_hh comes from d raw. d params is `Grads.d_norm` where the
    backend reduces it inside its backward (cpp: per-task partial sums, added in a fixed order, so the same bits run
    to run for a given thread count); where d_norm is None, ops.py reduces d_extra with d_gx and the saved rows into
    d params (`reference.norm_grads`). Every statistic is recomputed in backward from the saved rows.

The contract's arguments travel as the named tuples below (State, Weights, Saved, Grads); ops.py flattens
them for the custom op, and nothing else spells out positional lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class Cell:
    """One recurrent cell: everything about it that the op layer, the modules, the bench and the tests need."""

    name: str
    gates: tuple[str, ...]  # gate names in torch's row order of weight_ih / weight_hh
    torch_mode: str | None  # torch.nn.RNNBase.mode (None: torch.nn has no such cell)
    layer: str  # the layer class that runs this cell ("LSTM", "GRU", "RNN": torch.nn's; "LayerNormLSTM": ours)
    cell_class: str | None  # the torch.nn Cell class ("LSTMCell", ...); None where there is none
    nonlinearity: str | None = None  # RNN's `nonlinearity` argument
    has_cell_state: bool = False  # an LSTM-style second state c [B, H]
    projection: bool = False  # proj_size (w_hr [P, H]) is supported
    # saved for backward, in multiples of H per row: (gates, extra); 0 means an empty tensor
    saved_widths: tuple[int, int] = (0, 0)
    # Under CPU autocast torch.nn returns float32 for these (only its GEMMs are lowered): fastrnn computes
    # them wholly in float32, the same dtype, closer to exact.
    autocast_cpu_fp32_layer: bool = False
    autocast_cpu_fp32_cell: bool = False
    kernel_id: int = 0  # the cell's number in the compiled kernels (csrc, triton constexpr)
    norm: bool = False  # layer-normalised with zoneout (see "Normalised cells" above)
    torch_base: str | None = None  # the torch.nn layer whose arguments, checks and hx layout this layer shares

    @property
    def norm_width(self) -> int:
        """Length of Norm.params in multiples of H (0 for cells without normalisation)."""
        return (2 * self.G + 2 * self.has_cell_state) if self.norm else 0

    @property
    def G(self) -> int:
        return len(self.gates)

    @property
    def states(self) -> tuple[str, ...]:
        return ("h", "c") if self.has_cell_state else ("h",)

    def saved_shapes(self, T: int, B: int, H: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (gates, extra) saved for backward; (0,) means empty."""
        return tuple((T, B, w * H) if w else (0,) for w in self.saved_widths)  # type: ignore[return-value]

    def param_names(self, bias: bool = True, proj: bool = False) -> tuple[str, ...]:
        """Parameters of one layer and direction, in torch.nn's registration order (suffix `_l{k}[_reverse]`)."""
        names = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if bias else ())
        names += ("weight_hr",) if proj and self.projection else ()
        return names + self.norm_param_names()

    def norm_param_names(self) -> tuple[str, ...]:
        """The layer-norm parameters of one layer and direction (empty unless `norm`), gains 1 and biases 0."""
        if not self.norm:
            return ()
        return ("ln_ih_weight", "ln_hh_weight") + (("ln_c_weight", "ln_c_bias") if self.has_cell_state else ())

    def autocast_fp32(self, layer: bool) -> bool:
        return self.autocast_cpu_fp32_layer if layer else self.autocast_cpu_fp32_cell


TABLE: dict[str, Cell] = {
    c.name: c
    for c in (
        Cell(
            "lstm", ("i", "f", "g", "o"), "LSTM", "LSTM", "LSTMCell", has_cell_state=True, projection=True,
            saved_widths=(4, 1), autocast_cpu_fp32_cell=True, kernel_id=0,
        ),
        Cell(
            "gru", ("r", "z", "n"), "GRU", "GRU", "GRUCell", saved_widths=(3, 1), autocast_cpu_fp32_layer=True,
            autocast_cpu_fp32_cell=True, kernel_id=1,
        ),
        Cell("rnn_tanh", ("h",), "RNN_TANH", "RNN", "RNNCell", nonlinearity="tanh", kernel_id=2),
        Cell("rnn_relu", ("h",), "RNN_RELU", "RNN", "RNNCell", nonlinearity="relu", kernel_id=3),
        Cell(
            "ln_lstm", ("i", "f", "g", "o"), None, "LayerNormLSTM", None, has_cell_state=True, saved_widths=(4, 5),
            kernel_id=4, norm=True, torch_base="LSTM",
        ),
        Cell(
            "ln_gru", ("r", "z", "n"), None, "LayerNormGRU", None, saved_widths=(3, 4), kernel_id=5, norm=True,
            torch_base="GRU",
        ),
    )
}  # fmt: skip
ALL_CELLS = tuple(TABLE)
CELLS = tuple(c.name for c in TABLE.values() if c.torch_mode is not None)  # the cells torch.nn has (its oracle)
NORM_CELLS = tuple(c.name for c in TABLE.values() if c.norm)
GATES = {name: c.G for name, c in TABLE.items()}

# torch.nn's `mode` strings (RNNBase.mode) and (layer class, nonlinearity) to our cell names.
MODE_TO_CELL = {c.torch_mode: c.name for c in TABLE.values() if c.torch_mode is not None}


def spec(cell: str) -> Cell:
    """The table entry of `cell`; ValueError naming the known cells otherwise."""
    try:
        return TABLE[cell]
    except KeyError:
        raise ValueError(f"unknown cell {cell!r}; expected one of {', '.join(ALL_CELLS)}") from None


def check_cell(cell: str) -> int:
    """Number of gates of `cell`; ValueError naming the known cells otherwise."""
    return spec(cell).G


def cell_for(layer: str, nonlinearity: str | None = "tanh") -> Cell:
    """The cell a torch.nn layer or Cell class name runs ("LSTM", "GRUCell", "RNN" + nonlinearity)."""
    nonlinearity = nonlinearity or "tanh"
    for c in TABLE.values():
        if layer in (c.layer, c.cell_class) and (c.nonlinearity is None or c.nonlinearity == nonlinearity):
            return c
    raise ValueError(f"no fastrnn cell for {layer}" + (f" with nonlinearity {nonlinearity!r}" if nonlinearity else ""))


# ---- the kernel contract's types (shapes: T steps, B rows, H hidden, P = proj_size or H, G gates) ----


class State(NamedTuple):
    h: Tensor  # [B, P]
    c: Tensor | None = None  # [B, H] for cells with a cell state, else None


class Norm(NamedTuple):
    params: Tensor  # [norm_width * H]: ln_hh_weight | b_hh | (ln_c_weight | ln_c_bias)
    mask: Tensor | None = None  # [T, B, H] zoneout keep mask (training); None: the constant `keep`
    keep: float = 1.0


class Weights(NamedTuple):
    w_hh: Tensor  # [G*H, P]
    b_hh: Tensor | None = None  # [G*H] (None for normalised cells: their b_hh is in norm.params)
    w_hr: Tensor | None = None  # [P, H], projection (lstm with proj_size)
    norm: Norm | None = None  # normalised cells only


class Saved(NamedTuple):
    gates: Tensor  # layout: Cell.saved_shapes
    extra: Tensor


class Grads(NamedTuple):
    d_gx: Tensor  # [T, B, G*H]
    d_state0: State  # d_h0 [B, P], d_c0 [B, H] | None (None where c0 was None)
    d_weights: Weights  # None where the weight was None (d_weights.norm is None: d params is d_norm)
    d_extra: Tensor | None = None  # [T, B, H], normalised cells (see "Normalised cells")
    # [norm_width * H] d Norm.params, normalised cells on a backend that reduces it itself (cpp); None: ops.py forms it
    # from d_gx, d_extra and the saved extra (reference.norm_grads)
    d_norm: Tensor | None = None


def saved_dtype(dtype: torch.dtype) -> torch.dtype:
    """Saved activations are kept in at least float32 so half-precision training keeps fp32 state."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def saved_shapes(cell: str, T: int, B: int, H: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (gates, extra) saved for backward; (0,) means empty."""
    return spec(cell).saved_shapes(T, B, H)


# ---- the time walk every backend follows ----


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
