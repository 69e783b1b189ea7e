"""See inside: every gate and state of every step, recorded while fastrnn modules run, and what reads them.

    with fastrnn.record() as rec:
        model(x)
    s = rec[model.rnn]      # the States of that module's last call in the block (rec.calls(m): all, in order)
    s.h        [L, D, T, B, P]  hidden state after each step (LSTM with proj_size: the projected h)
    s.c        [L, D, T, B, H]  cell state, for cells that have one (LSTM); else None
    s.gates    {name: [L, D, T, B, H]}  post-activation gates, torch's names and order; empty for RNN
    s.lengths  [B] int64        each row's number of steps

Always time-major and in the caller's batch order (packed input unsorted as the module's output is); index t is
the time position in the reverse direction too; steps past a row's length hold zeros. A Cell module's calls are
steps: rec[cell] stacks them along T (L = D = 1). h is a copy; gates and c may be views of what backward reads:
treat them as read-only. Recording changes no output or gradient: the kernels already compute the gates,
ops.recurrence(save=True) only keeps them (under no_grad too); a call of the `torch` backend, whose kernels expose
no gates, is rerun for the recording on a kernel backend (the automatic choice), its outputs staying torch's.
Outside a block the modules pay one read of RECORDING. Calls traced by torch.compile, torch.jit.trace or an
exporter are not recorded, nor are calls made in threads other than the one that opened the block.

Reading a recording: `heatmap` (chosen units over time, the input tokens as labels), `saturation` and
`plot_saturation` (how often each gate is left- or right-saturated, after Karpathy, Johnson and Fei-Fei,
"Visualizing and Understanding Recurrent Networks", 2015), `rank_units` (units by Pearson correlation with a
per-step signal) and `to_lstmvis` (the files LSTMVis's server reads). matplotlib and h5py are imported by the
functions that use them only (`pip install fastrnn[inspect]`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastrnn import backends
from fastrnn.cells import Cell, Saved, State, Weights, spec

# ------------------------------------------------------------------------------------------------ recording


@dataclass(frozen=True)
class States:
    """Every step of one module call (see the module docstring for shapes and rules)."""

    h: Tensor  # [L, D, T, B, P]
    c: Tensor | None  # [L, D, T, B, H] or None
    gates: dict[str, Tensor]  # name -> [L, D, T, B, H], in torch's gate order
    lengths: Tensor  # [B] int64 (CPU)
    cell: str  # the fastrnn cell that ran (cells.py), e.g. to tell sigmoid gates from tanh ones

    def mask(self) -> Tensor:
        """[T, B] bool: True where step t is within row b's length."""
        T = self.h.shape[2]
        return torch.arange(T)[:, None] < self.lengths[None, :]


class Recording:
    """What one `fastrnn.record()` block kept: the States of every fastrnn module call, by module."""

    def __init__(self) -> None:
        self._thread = threading.get_ident()
        self._calls: dict[nn.Module, list[States]] = {}
        self._steps: set[int] = set()  # id() of Cell modules, whose calls are steps of one sequence

    def _add(self, module: nn.Module, states: States, step: bool) -> None:
        self._calls.setdefault(module, []).append(states)
        if step:
            self._steps.add(id(module))

    def calls(self, module: nn.Module) -> list[States]:
        """All of `module`'s calls in this block, in order (for a Cell: one States of T = 1 per step)."""
        try:
            return list(self._calls[module])
        except KeyError:
            name = type(module).__name__
            raise KeyError(f"{name} module was not called inside this fastrnn.record() block") from None

    def __getitem__(self, module: nn.Module) -> States:
        """The States of `module`'s last call; for a Cell module, all its calls stacked along T."""
        calls = self.calls(module)
        if id(module) not in self._steps:
            return calls[-1]
        sizes = {s.h.shape[3] for s in calls}
        if len(sizes) > 1:
            raise ValueError(
                f"{type(module).__name__} was called with batch sizes {sorted(sizes)}: its steps cannot be stacked "
                "into one sequence; read them one by one with rec.calls(module)"
            )
        cat = lambda ts: torch.cat(ts, 2)  # noqa: E731 - along T
        first = calls[0]
        return States(
            cat([s.h for s in calls]),
            None if first.c is None else cat([s.c for s in calls]),
            {g: cat([s.gates[g] for s in calls]) for g in first.gates},
            torch.full_like(first.lengths, len(calls)),
            first.cell,
        )

    def __contains__(self, module: object) -> bool:
        return module in self._calls

    def __iter__(self) -> Iterator[nn.Module]:
        """The recorded modules, in the order of their first call."""
        return iter(list(self._calls))

    def __len__(self) -> int:
        return len(self._calls)


RECORDING: list[Recording] = []  # the open record() blocks, innermost last; modules.py reads it on every call


@contextlib.contextmanager
def record() -> Iterator[Recording]:
    """Keep the states and gates of every fastrnn module call made inside the block (this thread's calls).
    Blocks nest: a call is kept by every open block."""
    rec = Recording()
    RECORDING.append(rec)
    try:
        yield rec
    finally:
        RECORDING.remove(rec)


def recorder(
    module: nn.Module, cell: str, directions: int = 1, unsorted_indices: Tensor | None = None, step: bool = False
) -> Callable[[list[tuple[Tensor, Saved]], Tensor | None], None] | None:
    """The hook functional.rnn / cell_step hand one call's layers to (modules.py asks only while RECORDING is not
    empty), or None where nothing records: no block of this thread, or torch.compile / tracing / export at work."""
    if torch.compiler.is_compiling() or backends.deploying():
        return None
    me = threading.get_ident()
    recs = [r for r in RECORDING if r._thread == me]
    if not recs:
        return None
    c = spec(cell)

    def hook(layers: list[tuple[Tensor, Saved]], batch_sizes: Tensor | None) -> None:
        states = _states(c, directions, layers, batch_sizes, unsorted_indices)
        for r in recs:
            r._add(module, states, step)

    return hook


def _states(
    cell: Cell, D: int, layers: list[tuple[Tensor, Saved]], batch_sizes: Tensor | None, unsorted: Tensor | None
) -> States:
    """One call's States from each layer and direction's out [T,B,P] and saved tensors (cells.py layout), with
    rows in the kernel's order, then unsorted. h is copied, as `out` is (or becomes) the caller's output, which
    the caller may change in place; the saved tensors are nobody else's (autograd's at most, which checks
    for in-place changes), so with one layer and direction the gates and c are views of them, not copies."""
    T, B = layers[0][0].shape[:2]
    L = len(layers) // D

    def stack(ts: list[Tensor], copy: bool = False) -> Tensor:  # L*D x [T, B, W] -> [L, D, T, B, W]
        if len(ts) == 1 and not copy:
            return ts[0].detach()[None, None]
        return torch.stack([t.detach() for t in ts]).unflatten(0, (L, D))

    with torch.no_grad():
        h = stack([out for out, _ in layers], copy=True)
        gates = {}
        if cell.saved_widths[0]:  # saved gates [T, B, G*H], activated, in torch's order
            H = layers[0][1].gates.shape[-1] // cell.G
            gates = {g: stack([s.gates[..., i * H : (i + 1) * H] for _, s in layers]) for i, g in enumerate(cell.gates)}
        # a cell state is saved as (the first H columns of) extra
        c = stack([s.extra[..., : s.gates.shape[-1] // cell.G] for _, s in layers]) if cell.has_cell_state else None
        if batch_sizes is None:
            lengths = torch.full((B,), T, dtype=torch.int64)
        else:  # rows sorted by length: row b runs while b < batch_sizes[t]
            lengths = (batch_sizes.cpu()[None, :] > torch.arange(B)[:, None]).sum(1)
        if unsorted is not None:  # back to the caller's rows, as the module's output is
            idx = unsorted.to(h.device)
            h = h.index_select(3, idx)
            c = None if c is None else c.index_select(3, idx)
            gates = {g: v.index_select(3, idx) for g, v in gates.items()}
            lengths = lengths.index_select(0, unsorted.cpu())
    return States(h, c, gates, lengths, cell.name)


# ------------------------------------------------------------------------------------------------ numbers


def _pick(states: States, state: str, layer: int, direction: int) -> Tensor:
    """[T, B, U] of one recorded quantity ("h", "c" or a gate name) for one layer and direction."""
    if state == "h":
        x = states.h
    elif state == "c" and states.c is not None:
        x = states.c
    elif state in states.gates:
        x = states.gates[state]
    else:
        have = ["h"] + (["c"] if states.c is not None else []) + list(states.gates)
        raise KeyError(f"{states.cell} recorded no {state!r}; it has {', '.join(have)}")
    return x[layer, direction]


def _per_step(states: States, values, what: str) -> Tensor:
    """float64 [T, B] from a [T, B] tensor/array, from [T] when B = 1, or from one sequence per row whose
    lengths are the rows' lengths."""
    T, B = states.h.shape[2], states.h.shape[3]
    if isinstance(values, Sequence) and len(values) == B and all(isinstance(v, Sequence) for v in values):
        out = torch.zeros(T, B, dtype=torch.float64)
        for b, v in enumerate(values):
            if len(v) != int(states.lengths[b]):
                raise ValueError(f"{what}: row {b} has {len(v)} values for its {int(states.lengths[b])} steps")
            out[: len(v), b] = torch.as_tensor(v, dtype=torch.float64)
        return out
    out = torch.as_tensor(values, dtype=torch.float64).cpu()
    if out.dim() == 1 and B == 1:
        out = out[:, None]
    if out.shape != (T, B):
        raise ValueError(f"{what}: expected [T, B] = [{T}, {B}] (time-major, as the states), got {list(out.shape)}")
    return out


class Ranking(NamedTuple):
    units: Tensor  # [U] int64, strongest correlation (by |r|) first; units that never change last
    r: Tensor  # [U] float64 Pearson r of each listed unit (NaN for a unit that never changes)


def rank_units(states: States, signal, *, state: str = "h", layer: int = -1, direction: int = 0) -> Ranking:
    """Units ranked by Pearson correlation with `signal`, a number per step ([T, B] time-major, [T] for one row,
    or one sequence per row), over the valid steps of every row. `state`: "h", "c" or a gate name."""
    x = _pick(states, state, layer, direction).cpu().double()  # [T, B, U]
    y = _per_step(states, signal, "signal")
    mask = states.mask()
    xs, ys = x[mask], y[mask]  # [N, U], [N]
    xc, yc = xs - xs.mean(0), ys - ys.mean()
    r = (xc * yc[:, None]).sum(0) / (xc.norm(dim=0) * yc.norm())
    r = torch.where(torch.isfinite(r), r, torch.full_like(r, float("nan")))
    key = torch.where(r.isnan(), torch.full_like(r, -1.0), r.abs())
    order = torch.sort(key, descending=True, stable=True).indices
    return Ranking(order, r[order])


class Saturation(NamedTuple):
    left: Tensor  # [L, D, H] fraction of valid steps the gate is left-saturated
    right: Tensor  # [L, D, H] fraction of valid steps the gate is right-saturated


@functools.cache
def _gate_floor(cell: str) -> dict[str, float]:
    """Each gate's lower bound, 0 (sigmoid) or -1 (tanh), read off one step of the reference backend driven far
    into saturation rather than restated here."""
    c = spec(cell)
    z = torch.zeros(1, 1, dtype=torch.float64)
    gx = torch.full((1, 1, c.G), -50.0, dtype=torch.float64)
    state0 = State(z, z if c.has_cell_state else None)
    _, _, saved = backends.get("reference").forward(c, gx, state0, Weights(torch.zeros(c.G, 1, dtype=torch.float64)),
                                                    None, False, True)  # fmt: skip
    if not c.saved_widths[0]:
        return {}
    return {g: float(round(v)) for g, v in zip(c.gates, saved.gates[0, 0].tolist())}


def saturation(states: States, low: float = 0.1, high: float = 0.9) -> dict[str, Saturation]:
    """For every gate, the fraction of valid steps (all rows) each unit spends left-saturated (< low) and
    right-saturated (> high), as Karpathy, Johnson and Fei-Fei (2015) count them. Thresholds are on the gate's
    range scaled to [0, 1]: a tanh gate (LSTM g, GRU n) is left-saturated below -0.8 for low = 0.1."""
    mask = states.mask()
    n = mask.sum()
    out = {}
    for g, v in states.gates.items():
        lo = _gate_floor(states.cell)[g]
        x = v.cpu().double()[:, :, mask]  # [L, D, N, H]
        left = (x < lo + low * (1 - lo)).sum(2, dtype=torch.float64) / n
        right = (x > lo + high * (1 - lo)).sum(2, dtype=torch.float64) / n
        out[g] = Saturation(left, right)
    return out


# ------------------------------------------------------------------------------------------------ plots


def _visible(token: str) -> str:
    """A token as a label: whitespace shown, never an empty string."""
    if not token:
        return "∅"
    return token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "⏎")


def _figure(ax, size: tuple[float, float]):
    """(figure, axes): a new pyplot-free figure (no GUI backend involved) unless `ax` is given."""
    from matplotlib.figure import Figure

    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def heatmap(
    states: States,
    path: str | Path | None = None,
    *,
    units: Sequence[int] | None = None,
    state: str = "h",
    layer: int = -1,
    direction: int = 0,
    row: int = 0,
    tokens: Sequence[str] | None = None,
    steps: tuple[int, int] | None = None,
    per_unit: bool = False,
    title: str | None = None,
    ax=None,
):
    """Chosen units of one row over time, one line of cells per unit, the row's input tokens along the time axis.
    units: default the 16 that vary most over the row; steps: (start, stop) within the row's length (default:
    all of it); state: "h", "c" or a gate name; per_unit: scale each unit by its largest |value| shown (for
    unbounded states such as c, whose largest units would wash out the rest). Returns the matplotlib Figure
    (saved to `path` if given)."""
    x = _pick(states, state, layer, direction)[:, row].cpu().float()  # [T, U]
    n = int(states.lengths[row])
    start, stop = steps if steps is not None else (0, n)
    start, stop = max(0, start), min(stop, n)
    x = x[start:stop]
    if units is None:
        units = x.var(0, correction=0).argsort(descending=True)[:16].sort().values.tolist()
    data = x[:, list(units)].t()  # [U, steps]
    if per_unit:
        data = data / data.abs().amax(1, keepdim=True).clamp_min(torch.finfo(data.dtype).tiny)
    data = data.numpy()
    signed = bool((data < 0).any())
    vmax = float(abs(data).max()) if data.size else 1.0
    fig, ax = _figure(ax, (max(6.0, 0.16 * data.shape[1] + 2), max(2.5, 0.28 * len(units) + 1.4)))
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="RdBu_r" if signed else "viridis",
                   vmin=-vmax if signed else 0.0, vmax=vmax or 1.0)  # fmt: skip
    ax.set_yticks(range(len(units)), [str(u) for u in units], fontsize=7)
    ax.set_ylabel(f"unit ({state}, layer {layer % states.h.shape[0]}{', reverse' if direction else ''})")
    if tokens is not None:
        labels = [_visible(t) for t in list(tokens)[start:stop]]
        ax.set_xticks(range(len(labels)), labels, fontsize=7, fontfamily="monospace")
        ax.tick_params(axis="x", length=0)
    else:
        ax.set_xlabel("step")
    ax.set_title(title or f"{states.cell}: {state} of row {row}, steps {start}..{stop - 1}", fontsize=9)
    bar = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    if per_unit:
        bar.set_label("value / unit's max |value|", fontsize=7)
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig


def plot_saturation(states: States, path: str | Path | None = None, *, low: float = 0.1, high: float = 0.9):
    """Karpathy et al.'s scatter: one panel per gate, one point per unit at (fraction of steps left-saturated,
    fraction right-saturated); colour: layer, marker: direction. Points near the anti-diagonal are gates that are
    almost always saturated (switches); near the origin, gates that stay in their responsive range."""
    sat = saturation(states, low, high)
    if not sat:
        raise ValueError(f"{states.cell} has no gates to plot")
    from matplotlib.figure import Figure

    L, D = states.h.shape[:2]
    fig = Figure(figsize=(3.2 * len(sat), 3.4), layout="constrained")
    axes = fig.subplots(1, len(sat), squeeze=False)[0]
    colors = [f"C{i}" for i in range(10)]
    for ax, (g, s) in zip(axes, sat.items()):
        for layer in range(L):
            for d in range(D):
                label = f"layer {layer}" + (" reverse" if d else "")
                ax.scatter(s.left[layer, d].numpy(), s.right[layer, d].numpy(), s=9, alpha=0.6,
                           color=colors[layer % 10], marker="^" if d else "o", label=label)  # fmt: skip
        ax.plot([0, 1], [1, 0], color="0.7", lw=0.8, ls="--")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        lo = _gate_floor(states.cell)[g]
        a, b = lo + low * (1 - lo), lo + high * (1 - lo)
        ax.set_title(f"gate {g}", fontsize=9)
        ax.set_xlabel(f"fraction left-saturated (< {a:g})", fontsize=8)
        ax.set_ylabel(f"fraction right-saturated (> {b:g})", fontsize=8)
    if L * D > 1:
        axes[0].legend(fontsize=7)
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig


# ------------------------------------------------------------------------------------------------ LSTMVis


def _h5py():
    mod, why = backends.optional_import("h5py")
    if mod is None:
        raise ImportError(f"fastrnn.inspect.to_lstmvis writes HDF5 files and needs h5py ({why}): pip install h5py")
    return mod


def _dict_token(token: str) -> str:
    """LSTMVis reads its .dict files as `word id` split on whitespace, so a token holds none."""
    shown = "".join(_visible(ch) for ch in token)
    return "".join(f"\\u{ord(ch):04x}" if ch.isspace() else ch for ch in shown) or "∅"


def to_lstmvis(
    states: States,
    directory: str | Path,
    words: Sequence[Sequence[str]],
    *,
    name: str = "fastrnn",
    description: str = "states recorded with fastrnn.record()",
) -> Path:
    """Write `states` as an LSTMVis project (github.com/HendrikStrobelt/LSTMVis, README "Adding Your Own Data")
    into `directory`: states.hdf5 (per layer k: `output{k}` the hidden states h [N, P] (type output) and, for
    cells with one, `states{k}` the cell states c [N, H] (type state), as LSTMVis's own get_states.lua names them;
    reverse directions add `_reverse`), train.hdf5 (`word_ids` [N]), train.dict (`word id` per line) and
    lstm.yml. `words`: each row's tokens, one per valid step; the rows follow one another along time, N being
    the sum of the lengths. Returns the directory (give its parent to LSTMVis's server as -dir)."""
    h5py = _h5py()
    lengths = states.lengths.tolist()
    B = len(lengths)
    if isinstance(words, str) or len(words) != B:
        raise ValueError(f"words: expected one list of tokens for each of the {B} rows")
    for b, (row, n) in enumerate(zip(words, lengths)):
        if len(row) != n:
            raise ValueError(f"words: row {b} has {len(row)} tokens for its {n} steps")
    vocab: dict[str, int] = {}
    ids = [vocab.setdefault(t, len(vocab)) for row in words for t in row]
    mask = states.mask()
    L, D = states.h.shape[:2]

    def flat(x: Tensor) -> Tensor:  # [T, B, U] -> [N, U], rows one after the other, valid steps only
        return x.transpose(0, 1)[mask.t()].float().cpu()

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    types = []
    with h5py.File(out / "states.hdf5", "w") as f:
        for layer in range(L):
            for d in range(D):
                sfx = "_reverse" if d else ""
                k = layer + 1
                for kind, path, x in (("state", f"states{k}{sfx}", states.c), ("output", f"output{k}{sfx}", states.h)):
                    if x is None:
                        continue
                    v = flat(x[layer, d])
                    f.create_dataset(path, data=v.numpy())
                    # LSTMVis applies tanh unless told the values already lie in [-1, 1]
                    bounded = not v.numel() or float(v.abs().max()) <= 1
                    types.append(f"{{type: {kind}, layer: {layer + 1}, path: {path}"
                                 + (", transform: none}" if bounded else "}"))  # fmt: skip
    with h5py.File(out / "train.hdf5", "w") as f:
        f.create_dataset("word_ids", data=torch.tensor(ids, dtype=torch.int64).numpy())
    with open(out / "train.dict", "w", encoding="utf-8") as f:
        f.writelines(f"{_dict_token(t)} {i}\n" for t, i in vocab.items())
    yml = [
        f"name: {json.dumps(name)}",
        f"description: {json.dumps(description)}",
        "",
        "files:",
        "  states: states.hdf5",
        "  train: train.hdf5",
        "  words: train.dict",
        "",
        "word_sequence:",
        "  file: train",
        "  path: word_ids",
        "  dict_file: words",
        "",
        "states:",
        "  file: states",
        "  types: [",
        ",\n".join(f"    {t}" for t in types),
        "  ]",
    ]
    (out / "lstm.yml").write_text("\n".join(yml) + "\n", encoding="utf-8")
    return out
