"""What a benchmark run measures: the grid of cells x shapes x modes x dtypes x threads, and the presets.

A `Case` is one configuration (timed for every implementation of the run, interleaved with torch.nn). Its
`cell` is a cell of fastrnn's table (`lstm` ...: the torch.nn layer, one layer over T steps) or that name with
`_cell` (`lstm_cell` ...: the torch.nn Cell class, stepped over T in a Python loop as users drive it).
Modes: inference = forward under no_grad; forward = forward with grad enabled; training = forward + backward;
streaming = no_grad, the layer called once per step on x[t:t+1] ([1, B, I]) with the state it returned carried
into the next call, T calls in all (how an online model meets its input: a frame or token at a time, B=1 in the
presets). The Cell classes and compile step anyway, so for them streaming is the inference loop.
Presets:
    quick   the gate's grid: every cell, T=32, B in {1, 16}, H in {64, 256}, inference and training,
            float32, ONE thread; about a minute on a 2-core machine. One thread because on a shared 2-core
            machine a 2-thread run waits at every parallel region for a core a neighbour holds (measured here:
            a torch.nn LSTM call 0.1 ms alone, 150-300 ms under load), which no ratio survives.
    full    the CPU grid the kernel issues report against: T in {32, 128}, B in {1, 16, 64},
            H in {64, 256, 512, 1024}, input size = H, one layer, float32, inference and training, 2 threads.
    ort     the ONNX Runtime comparison of the issue "CPU speed where users run": lstm and gru, float32,
            inference over T in {32, 128} x B in {1, 16, 64} x H in {256, 512, 1024}, plus streaming over the same
            T and H at B = 1; 2 threads; the onnxruntime peer required.
    layernorm the layer-normalised cells (torch.nn has none: their yardstick is a plain-PyTorch eager loop of the
            same maths, bench/lnloop.py, and `compile` is torch.compile of its step) and fastrnn's own LSTM and GRU
            at the same shapes: T=32, B in {1, 16, 64}, H in {64, 256, 512}, inference and training, 2 threads,
            torch.compile timed.
quick and full time the onnxruntime peer on their inference rows when onnx and onnxruntime are installed
(peers.py); the gate times no peers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from fastrnn.bench.results import ORT
from fastrnn.bench.timing import Settings
from fastrnn.cells import CELLS, NORM_CELLS, Cell, spec

CELL_CLASS_SUFFIX = "_cell"
CELL_CLASSES = tuple(c + CELL_CLASS_SUFFIX for c in CELLS)
ALL_CELLS = CELLS + CELL_CLASSES + NORM_CELLS  # the normalised cells: layers only (no Cell class)
STREAMING = "streaming"
MODES = ("inference", "forward", "training", STREAMING)
NO_GRAD_MODES = ("inference", STREAMING)  # the modes run under torch.no_grad (and the ones peers can time)
DTYPES = ("float32", "float64", "bfloat16", "float16")

__all__ = ["ALL_CELLS", "CELLS", "CELL_CLASSES", "DTYPES", "MODES", "PRESETS", "Case", "Settings", "grid"]


def is_cell_class(cell: str) -> bool:
    """`lstm_cell` names the Cell class stepped in a Python loop, `lstm` the layer."""
    return cell.endswith(CELL_CLASS_SUFFIX)


def base_cell(cell: str) -> str:
    """`lstm_cell` -> `lstm`: the recurrence a Cell class computes."""
    return cell[: -len(CELL_CLASS_SUFFIX)] if is_cell_class(cell) else cell


def cell_spec(cell: str) -> Cell:
    """The cell table's entry for a case's cell (layer or Cell class)."""
    return spec(base_cell(cell))


def layer_cells(layer: str) -> tuple[str, ...]:
    """The table's cells a torch.nn layer class runs (`RNN` -> rnn_tanh, rnn_relu)."""
    return tuple(c for c in CELLS if spec(c).layer == layer)


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
        forward = 2*T*B*G*H*(I + H)  (input projection x W_ih^T plus the recurrence h W_hh^T, G gates; the
                                      same for inference and streaming);
        training = 3 x forward       (backward does two products of the same size per forward product:
                                      d_input and d_weight)."""
        fwd = 2 * self.T * self.B * cell_spec(self.cell).G * self.H * (self.I + self.H)
        return 3 * fwd if self.mode == "training" else fwd

    def gemms(self) -> list[tuple[int, int, int, int]]:
        """The matrix products of one call as (M, K, N, count), [M, K] x [K, N] `count` times; their flops sum to
        flops(). Forward: the input projection of all T*B rows at once (per step for a Cell class or streaming,
        which see one step a call) and T step products h W_hh^T. Training adds T step products d_gates W_hh and
        the three whole-sequence products d W_hh, d W_ih and d x."""
        T, B, H, I = self.T, self.B, self.H, self.I
        GH = cell_spec(self.cell).G * H
        per_step = is_cell_class(self.cell) or self.mode == STREAMING
        prods = [(B, I, GH, T) if per_step else (T * B, I, GH, 1), (B, H, GH, T)]
        if self.mode == "training":
            prods += [(B, GH, H, T), (GH, T * B, H, 1), (GH, T * B, I, 1), (T * B, GH, I, 1)]
        return prods

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of_row(cls, row: dict) -> Case:
        return cls(row["cell"], row["mode"], row["T"], row["B"], row["H"], row["I"], row["dtype"], row["threads"],
                   row["device"])  # fmt: skip


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
    stream_B: tuple[int, ...] | None = None  # batch sizes of the streaming cases (None: B, as for every mode)
    peers: tuple[str, ...] = ()  # peers timed when installed (peers.py)
    peers_required: bool = False  # a missing peer is an error rather than left out


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        cells=CELLS,
        modes=("inference", "training"),
        T=(32,),
        B=(1, 16),
        H=(64, 256),
        threads=(1,),
        settings=Settings(warmup=2, repeats=21, min_repeats=7, max_seconds=3.0, min_sample_ms=5.0),
        peers=(ORT,),
    ),
    "full": Preset(
        cells=CELLS,
        modes=("inference", "training"),
        T=(32, 128),
        B=(1, 16, 64),
        H=(64, 256, 512, 1024),
        settings=Settings(warmup=1, repeats=11, min_repeats=3, max_seconds=6.0, min_sample_ms=5.0),
        with_compile=True,
        peers=(ORT,),
    ),
    "ort": Preset(
        cells=layer_cells("LSTM") + layer_cells("GRU"),
        modes=("inference", STREAMING),
        T=(32, 128),
        B=(1, 16, 64),
        H=(256, 512, 1024),
        stream_B=(1,),
        settings=Settings(warmup=1, repeats=15, min_repeats=5, max_seconds=4.0, min_sample_ms=5.0),
        peers=(ORT,),
        peers_required=True,
    ),
    "layernorm": Preset(
        cells=NORM_CELLS + tuple(spec(c).torch_base.lower() for c in NORM_CELLS),
        modes=("inference", "training"),
        T=(32,),
        B=(1, 16, 64),
        H=(64, 256, 512),
        settings=Settings(warmup=2, repeats=11, min_repeats=5, max_seconds=4.0, min_sample_ms=5.0),
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
    stream_Bs: Iterable[int] | None = None,
) -> list[Case]:
    """Every combination, input size = H unless given; ordered so that one shape's modes run together. The
    streaming mode's batch sizes are `stream_Bs` when given, `Bs` otherwise."""
    Bs = tuple(Bs)
    sBs = Bs if stream_Bs is None else tuple(stream_Bs)
    return [
        Case(c, m, T, B, H, input_size or H, dt, th, device)
        for th, dt, c, T, B, H, m in itertools.product(threads, dtypes, cells, Ts, dict.fromkeys(Bs + sBs), Hs, modes)
        if B in (sBs if m == STREAMING else Bs)
    ]


def cases_of_rows(rows: Iterable[dict]) -> list[Case]:
    """The distinct configurations of results rows, in order."""
    seen: dict[tuple, Case] = {}
    for r in rows:
        c = Case.of_row(r)
        seen.setdefault(c.key(), c)
    return list(seen.values())
