"""What a benchmark run measures: the grid of cells x shapes x modes x dtypes x threads, and the presets.

A `Case` is one configuration (timed for every backend of the run, interleaved with torch.nn). Presets:
    quick   the gate's grid: every cell, T=32, B in {1, 16}, H in {64, 256}, inference and training,
            float32, ONE thread; about a minute on a 2-core machine. One thread because on a shared 2-core
            machine a 2-thread run waits at every parallel region for a core a neighbour holds (measured here:
            a torch.nn LSTM call 0.1 ms alone, 150-300 ms under load), which no ratio survives.
    full    the CPU grid the kernel issues report against: T in {32, 128}, B in {1, 16, 64},
            H in {64, 256, 512, 1024}, input size = H, one layer, float32, inference and training, 2 threads.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
# The torch.nn *Cell classes, stepped over T in a Python loop as users drive them.
CELL_CLASSES = ("lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell")
ALL_CELLS = CELLS + CELL_CLASSES
MODES = ("inference", "forward", "training")
DTYPES = ("float32", "float64", "bfloat16", "float16")
# Peers that are not fastrnn backends: torch.nn itself (the denominator of every ratio) and torch.compile of a
# plain torch step loop.
PEERS = ("torch", "compile")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}

# The reference backend is a readable oracle, not a contender: time it only where it finishes quickly.
REFERENCE_MAX_H = 64
REFERENCE_MAX_T = 32


def base_cell(cell: str) -> str:
    """`lstm_cell` -> `lstm`: the recurrence a Cell class computes."""
    return cell[: -len("_cell")] if cell.endswith("_cell") else cell


def gates(cell: str) -> int:
    return GATES[base_cell(cell)]


@dataclass(frozen=True)
class Case:
    """One configuration: a one-layer recurrence over T steps of a [B, I] input with hidden size H."""

    cell: str
    mode: str
    T: int
    B: int
    H: int
    I: int
    dtype: str = "float32"
    threads: int = 2
    device: str = "cpu"

    def key(self) -> tuple:
        return (self.cell, self.mode, self.T, self.B, self.H, self.I, self.dtype, self.threads, self.device)

    def label(self) -> str:
        return f"{self.cell} {self.mode} T={self.T} B={self.B} H={self.H} I={self.I} {self.dtype} thr={self.threads}"

    def flops(self) -> int:
        """FLOPs of one call, counting only the matrix products (pointwise gate maths is O(T*B*G*H), noise):
        forward = 2*T*B*G*H*(I + H)  (input projection x W_ih^T plus the recurrence h W_hh^T, G gates);
        training = 3 x forward       (backward does two products of the same size per forward product:
                                      d_input and d_weight)."""
        fwd = 2 * self.T * self.B * gates(self.cell) * self.H * (self.I + self.H)
        return 3 * fwd if self.mode == "training" else fwd

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Settings:
    """How each case is timed."""

    warmup: int = 2  # untimed calls per implementation (JIT compilation, allocator warm-up)
    repeats: int = 15  # timed samples per implementation, interleaved with torch.nn
    min_repeats: int = 5  # never fewer samples than this, whatever max_seconds says
    max_seconds: float = 4.0  # stop repeating an implementation once it has spent this long on one case
    min_sample_ms: float = 2.0  # calls per sample are batched until one sample lasts at least this long
    clock: str = "auto"  # auto: process CPU time for one-thread CPU cases, else wall time (measure.clock_for)


@dataclass(frozen=True)
class Preset:
    cells: tuple[str, ...]
    modes: tuple[str, ...]
    T: tuple[int, ...]
    B: tuple[int, ...]
    H: tuple[int, ...]
    dtypes: tuple[str, ...] = ("float32",)
    threads: tuple[int, ...] = (2,)
    settings: Settings = field(default_factory=Settings)
    with_compile: bool = False


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        cells=CELLS,
        modes=("inference", "training"),
        T=(32,),
        B=(1, 16),
        H=(64, 256),
        threads=(1,),
        settings=Settings(warmup=2, repeats=21, min_repeats=7, max_seconds=3.0, min_sample_ms=5.0),
    ),
    "full": Preset(
        cells=CELLS,
        modes=("inference", "training"),
        T=(32, 128),
        B=(1, 16, 64),
        H=(64, 256, 512, 1024),
        settings=Settings(warmup=1, repeats=11, min_repeats=3, max_seconds=6.0, min_sample_ms=5.0),
        with_compile=True,
    ),
}


def grid(
    cells: Iterable[str],
    modes: Iterable[str],
    Ts: Iterable[int],
    Bs: Iterable[int],
    Hs: Iterable[int],
    dtypes: Iterable[str] = ("float32",),
    threads: Iterable[int] = (2,),
    input_size: int | None = None,
    device: str = "cpu",
) -> list[Case]:
    """Every combination, input size = H unless given; ordered so that one shape's modes run together."""
    return [
        Case(c, m, T, B, H, input_size or H, dt, th, device)
        for th, dt, c, T, B, H, m in itertools.product(threads, dtypes, cells, Ts, Bs, Hs, modes)
    ]


def backends_for(case: Case, backends: Sequence[str], explicit: bool) -> list[str]:
    """The backends that time `case`: the reference backend only on tiny shapes unless asked for by name."""
    if explicit:
        return list(backends)
    return [b for b in backends if b != "reference" or (case.H <= REFERENCE_MAX_H and case.T <= REFERENCE_MAX_T)]
