"""The backend registry: which backends exist, which can run here, and which one a call gets.

A backend is a module `fastrnn.backends.<name>` exposing
    NAME: str
    available() -> (ok, reason)             can it run on this machine at all (reason says how to get it)
    supports(cell: Cell, dtype, device) -> (ok, reason)
    forward(cell: Cell, gx, state0: State, weights: Weights, batch_sizes, reverse, need_saved)
        -> out, state_n: State, saved: Saved
    backward(cell: Cell, d_out, d_state_n: State, state0: State, weights: Weights, batch_sizes, reverse, out,
             saved: Saved) -> Grads                     (None where the input was None)
(the types, shapes and the saved layout: fastrnn/cells.py and DESIGN.md). Only ops.py calls forward/backward.
For cells with a cell state, state0.c and d_state_n.c are always tensors (ops.py fills zeros).

The `torch` backend is different: it runs torch.nn's own whole-layer kernels (cuDNN, oneDNN, native) and so
has no per-direction contract; functional.py hands it the whole call (`torch_nn.rnn`, `torch_nn.cell`).

How a call's backend is chosen, first match wins:
    1. the module's `backend=` argument          (explicit)
    2. the innermost `fastrnn.use_backend(name)`  (explicit)
    3. the environment variable FASTRNN_BACKEND   (explicit; read at every call)
    4. automatic: first the shape rules (`_AUTO_RULES`): a class of calls (device, layer or Cell step, cell,
       dtype, inference or training, batch and hidden size) where a measurement recorded in the repo shows
       torch.nn's own kernel beating the fused one gets `torch` (today, on CPU: some float32 LSTM layer shapes at
       batch >= 16 and bfloat16 LSTM inference at H <= 256 on Intel; most float32 LSTM shapes at B >= 16 on AMD,
       where MKL runs its AVX2 kernels, bfloat16 LSTM inference at B >= 16 (Zen 5) or H <= 512 (Zen 4), bfloat16
       LSTM and RNN training at B=64 and some bfloat16 Cell training steps there;
       each rule holds only on the CPU class it was measured on, fastrnn.cpuinfo.cpu_class); then the order
       (`_AUTO`): CUDA -> torch (torch.nn's cuDNN kernels, until a recorded gpu_check measurement shows triton
       faster); CPU -> cpp, numba, reference (first that is available and supports the call; on CPU without the
       C++ extension, warns once saying how to build it)
An explicit backend that cannot run the call raises with the reason; it is never silently replaced, except
while tracing or exporting (`deploying()`), where every call runs torch.nn's kernels (the `torch` backend).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import sys
import warnings
from types import ModuleType
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from fastrnn import cpuinfo
from fastrnn.cells import Cell, Grads, Saved, State, Weights, spec

BACKENDS = ("reference", "cpp", "numba", "triton", "torch")
KERNEL_BACKENDS = ("reference", "cpp", "numba", "triton")  # implement the per-direction contract (not torch)
# backend name -> module under fastrnn.backends (`torch` would shadow the torch package inside this one)
_MODULE_NAMES = {"torch": "torch_nn"}
# Auto's rules, the one place they live: the shape rules `_AUTO_RULES` below, then this order. CPU: the fused cpp
# kernels (benchmarks/results-grid-2threads.md, 2-thread grid against torch.nn in the same run; torch.nn's own
# where that grid has cpp losing: `_AUTO_RULES`), numba where the extension is not built. CUDA: triton only
# for configurations that benchmarks/gpu_check has measured faster than cuDNN on a named GPU and recorded in
# the repo; no such measurement exists yet, so CUDA runs torch.nn's own kernels (cuDNN).
_AUTO = {"cuda": ("torch",), "cpu": ("cpp", "numba", "reference")}


class AutoRule(NamedTuple):
    """A class of calls that auto gives `backend` instead of `_AUTO`'s order, because a measurement showed it
    faster there. A call is in the class when every field matches; ranges are inclusive, None: unbounded."""

    device: str  # torch.device.type
    step: bool  # False: a layer call (functional.rnn); True: one Cell step (functional.cell_step)
    cell: str
    dtypes: tuple[torch.dtype, ...]
    mode: str | None  # "inference": autograd records nothing; "training": it records; None: either
    batch: tuple[int, int | None]
    hidden: tuple[int, int | None]
    backend: str
    # the CPU class the measurement was made on (fastrnn.cpuinfo.cpu_class): "intel" holds for every Intel CPU,
    # "intel-amx" only for those with AMX; None: any (a rule for another device)
    cpu: str | None = None


# Auto's shape rules, before `_AUTO`'s order (first match wins). Each rests on measured rows, cited. Only calls
# that say their batch size, hidden size and whether autograd records (functional.rnn / cell_step, outside
# torch.compile, not under autocast, without packed input or proj_size: none of those was measured) are matched.
# benchmarks/results-grid-2threads.md (a 2-core Xeon with AMX; its rules hold on Intel CPUs, cpu="intel"): 2 threads,
# float32, one unidirectional layer, I = H, T in {32, 128},
# B in {1, 16, 64}, H in {64, 256, 512, 1024}; ratio = torch.nn time / cpp time, listed as (T=32, T=128).
# Between measured sizes a class reaches only as far as the measurements on both sides of the gap agree.
# Left to cpp: lstm inference B=1 (min 1.06x) and B=16 H=64 (1.13x, 1.04x) win now; rnn_relu inference T=128 B=1
# H=1024 read 0.95x in the grid run and 1.38x rerun alone (rnn_tanh, the same GEMMs: 1.73x; no rule for a row
# that does not repeat). GRU and RNN tanh lose nowhere (min 1.13x). Rows within about 5% of 1.0x move either way
# from run to run; a class keeps torch where a run had cpp losing at either T.
# No float32 Cell-step rule: benchmarks/results-cells-2threads.md (B {1, 16} x H {64, 256, 512}) has cpp's one-call
# step ahead of torch's cells at every shape but those within noise of 1.0x (its minimum is in that file's summary);
# on AMD, benchmarks/results-cells-2threads-amd-epyc-zen5.md and ...-zen4.md have it ahead everywhere (min 1.20x;
# 1.16x). bfloat16 Cells: below.
_AUTO_RULES: tuple[AutoRule, ...] = (
    # lstm inference B=64: H=256 (0.95x, 1.03x) loses at T=32; H=64 (1.05x, 1.02x) and H=512 (1.01x, 1.04x) are
    # within noise of 1.0x and lost at one T in the grid before (1.00x, 0.91x; 0.95x, 1.03x); at H=1024 cpp holds
    # (1.04x, 1.00x), and at B=16 it wins for H in {64, 512} (1.13x, 1.04x; 1.23x, 1.19x), so B starts at 64.
    AutoRule("cpu", False, "lstm", (torch.float32,), "inference", (64, None), (1, 512), "torch", cpu="intel"),
    # lstm training B=64: H=64 (1.02x, 0.99x); at H=256 (1.06x, 1.07x) and above cpp wins.
    AutoRule("cpu", False, "lstm", (torch.float32,), "training", (64, None), (1, 64), "torch", cpu="intel"),
    # lstm inference B=16 H=256 (1.01x, 1.00x; the grid before: 0.98x, 0.97x), and B=64 H=256 loses (above), so
    # B 16-63 at H=256 only: at B=16, H=64 and H=512 cpp wins (above); B=16 training H=256 (1.09x, 1.05x) stays.
    AutoRule("cpu", False, "lstm", (torch.float32,), "inference", (16, 63), (256, 256), "torch", cpu="intel"),
    # benchmarks/results-bf16-2threads.md (bfloat16 on AMX, H in {256, 512, 1024}): lstm inference at H=256 loses at
    # B=16 (0.89x, 0.91x) and B=64 (0.87x, 0.85x); H=512 wins (1.36x, 1.27x; 1.01x, 1.15x), as does B=1 (min 1.07x);
    # below H=256 nothing was measured, and the class reaches down: oneDNN's fused step gains most where GEMMs are
    # small. Training loses nowhere beyond noise (T=128 B=64 H=512: 0.99x, where T=32 reads 1.59x).
    AutoRule("cpu", False, "lstm", (torch.bfloat16,), "inference", (16, None), (1, 256), "torch", cpu="intel-amx"),
    # ---- AMD: the same float32 grid on 2-core EPYCs of two generations,
    # benchmarks/results-grid-2threads-amd-epyc-zen5.md (Zen 5) and ...-zen4.md (Zen 4), measured with the
    # extension's own packed GEMM (MKL runs only AVX2 kernels on AMD); rows listed as Zen 5 (T=32, T=128); Zen 4
    # (T=32, T=128). A class where both lose holds on "amd", one where only one generation loses on that generation.
    # GRU and RNN lose nowhere (min 1.69x on Zen 5, 1.06x on Zen 4); cpp's LSTM wins at B=1 and at H=64 of B=16, and
    # loses between H=64 and H=1024 at B >= 16.
    # lstm inference at H in {256, 512}: B=16 (0.89x, 0.90x; 0.92x, 0.95x | H=512: 0.89x, 0.88x; 0.88x, 0.95x), B=64
    # (0.89x, 1.05x; 0.88x, 1.02x | 0.89x, 0.91x; 0.96x, 0.98x); B=1 wins there (min 1.08x) and B 2-15 is not
    # measured: auto's order. H=64 wins at B=16 (1.18x, 1.37x; 1.19x, 1.06x) and B=64 (1.14x, 1.14x; 1.11x, 1.02x).
    AutoRule("cpu", False, "lstm", (torch.float32,), "inference", (16, None), (256, 512), "torch", cpu="amd"),
    # lstm inference H=1024: B=64 loses on Zen 4 (0.97x, 0.98x) and ties on Zen 5 (1.01x, 1.02x); B=16 wins on both
    # (1.20x, 1.25x; 1.17x, 1.13x).
    AutoRule("cpu", False, "lstm", (torch.float32,), "inference", (64, None), (1024, None), "torch", cpu="amd-zen4"),
    # lstm inference B=1 H=1024 loses at T=128 (1.10x, 0.90x; 1.20x, 0.92x, and 0.84x rerun alone).
    AutoRule("cpu", False, "lstm", (torch.float32,), "inference", (1, 1), (1024, None), "torch", cpu="amd"),
    # lstm training B=64 loses or ties at H >= 256 (0.95x, 1.02x; 0.90x, 0.90x | 1.15x, 0.99x; 1.01x, 0.84x | 1.02x,
    # 0.91x; 1.06x, 0.98x); H=64 wins on Zen 5 (1.08x, 1.06x) and ties on Zen 4 (1.00x, 0.92x); 65-255 is not
    # measured: auto's order.
    AutoRule("cpu", False, "lstm", (torch.float32,), "training", (64, None), (256, None), "torch", cpu="amd"),
    AutoRule("cpu", False, "lstm", (torch.float32,), "training", (64, None), (1, 64), "torch", cpu="amd-zen4"),
    # lstm training B=16: H=256 (0.96x, 0.94x; 0.97x, 0.86x) and H=512 (0.98x, 1.12x; 0.96x, 1.03x) lose at one T;
    # H=1024 ties within noise on Zen 5 (1.07x, 1.02x; 1.00x, 1.08x in the grid before) and wins on Zen 4 (1.22x,
    # 1.27x); H=64 (1.16x, 1.34x; 1.12x, 1.06x) and B=1 win. (Zen 4 B=1 H=1024 read 1.93x, 0.91x in the grid and
    # 2.05x, 1.10x rerun alone: no rule for a row that does not repeat.)
    AutoRule("cpu", False, "lstm", (torch.float32,), "training", (16, 63), (256, 512), "torch", cpu="amd"),
    AutoRule("cpu", False, "lstm", (torch.float32,), "training", (16, 63), (1024, None), "torch", cpu="amd-zen5"),
    # bfloat16 on AMD (benchmarks/results-bf16-2threads-amd-epyc-zen5.md and ...-zen4.md: AVX512-BF16, no AMX; H in
    # {256, 512, 1024}; measured after the weight gradients moved to the own kernel).
    # lstm inference: on Zen 5 it loses or ties at B >= 16 for every H (B=16: 1.01x, 1.00x; 0.99x, 0.95x; 0.95x,
    # 0.97x; B=64: 0.96x, 0.96x; 0.85x, 0.92x; 1.03x, 1.03x): both run the same bfloat16 GEMM rate there; B=1 wins
    # (min 1.11x).
    AutoRule("cpu", False, "lstm", (torch.bfloat16,), "inference", (16, None), (1, None), "torch", cpu="amd-zen5"),
    # On Zen 4 it loses or ties at H <= 512 for every B (B=1: 1.01x, 0.95x; 0.99x, 1.04x; B=16: 0.98x, 0.96x; 0.95x,
    # 0.94x; B=64: 0.92x, 0.90x; 0.92x, 0.94x) and wins or ties at H=1024 (1.28x, 1.24x; 1.06x, 1.06x; 1.00x, 1.07x).
    AutoRule("cpu", False, "lstm", (torch.bfloat16,), "inference", (1, None), (1, 512), "torch", cpu="amd-zen4"),
    # lstm training B=64 at H=256 (0.88x, 0.94x; 0.84x, 1.21x) and H=512 (1.48x, 0.96x; 1.29x, 0.90x); H=1024 wins
    # (1.45x, 1.32x; 1.26x, 1.02x), as does B=1 (min 1.91x).
    AutoRule("cpu", False, "lstm", (torch.bfloat16,), "training", (64, None), (1, 512), "torch", cpu="amd"),
    # lstm training B=16: Zen 4 loses at H=256 (0.98x, 0.94x) and wins from H=512 (1.09x, 1.21x); Zen 5 wins at every
    # H (min 1.03x, H=256 T=128).
    AutoRule("cpu", False, "lstm", (torch.bfloat16,), "training", (16, 63), (1, 256), "torch", cpu="amd-zen4"),
    # rnn training B=64 H=1024 (tanh: 1.05x, 0.99x; 1.07x, 1.00x); H=512 wins (1.27x, 1.36x; 1.17x, 1.16x). relu is
    # not in the bfloat16 grid: the same GEMMs, which are the step at these shapes, so the same class. GRU wins
    # everywhere (min 1.07x; 1.09x).
    AutoRule("cpu", False, "rnn_tanh", (torch.bfloat16,), "training", (64, None), (1024, None), "torch", cpu="amd"),
    AutoRule("cpu", False, "rnn_relu", (torch.bfloat16,), "training", (64, None), (1024, None), "torch", cpu="amd"),
    # bfloat16 Cell steps on AMD (benchmarks/results-cells-bf16-2threads-amd-epyc-zen5.md, B {1, 16} x H {64, 256,
    # 512}):
    # cpp is ahead everywhere (min 1.00x, RNNCell relu training B=16 H=512) but LSTMCell training at B=16 H=512
    # (0.92x); at B=1 (1.03x) and at H=256 (1.22x) it wins, so the class starts at B=16 and H=512.
    AutoRule("cpu", True, "lstm", (torch.bfloat16,), "training", (16, None), (512, None), "torch", cpu="amd-zen5"),
)


def rule_holds_on(rule: AutoRule, cpu: str) -> bool:
    """Whether a rule measured on CPU class rule.cpu applies on CPU class `cpu` (a CUDA rule: on every CPU)."""
    return rule.cpu is None or cpu == rule.cpu or cpu.startswith(rule.cpu + "-")


def _rule_index(
    rules: tuple[AutoRule, ...], cpu: str
) -> dict[tuple, tuple[tuple[bool | None, int, int, int, int, str], ...]]:
    """(device, step, cell, dtype) -> the rules that hold on CPU class `cpu`, as (grad, batch lo, hi, hidden lo,
    hi, backend), in table order: select() then costs one dict lookup and a few int comparisons."""
    index: dict[tuple, list] = {}
    grads = {"inference": False, "training": True, None: None}
    for r in rules:
        if not rule_holds_on(r, cpu):
            continue
        entry = (
            grads[r.mode], r.batch[0], sys.maxsize if r.batch[1] is None else r.batch[1],
            r.hidden[0], sys.maxsize if r.hidden[1] is None else r.hidden[1], r.backend,
        )  # fmt: skip
        for dt in r.dtypes:
            index.setdefault((r.device, r.step, r.cell, dt), []).append(entry)
    return {k: tuple(v) for k, v in index.items()}


_RULE_INDEX = _rule_index(_AUTO_RULES, cpuinfo.cpu_class())

ENV_VAR = "FASTRNN_BACKEND"

# os.environ's own dict, keyed by encoded names: `os.environ.get` encodes the name and decodes the value on every
# read (0.6 us, half of what a Cell call spends choosing its backend). Writes through os.environ (and so pytest's
# monkeypatch) update this dict; a platform whose os.environ lacks it reads through os.environ.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENCODED: dict[str, object] = {}


def getenv(name: str, default: str | None = None) -> str | None:
    """os.environ.get(name, default) at a dict lookup's cost: the environment variables fastrnn reads at every call
    (FASTRNN_BACKEND, FASTRNN_CPP_FP32_BF16_GEMM, FASTRNN_POISON_OUTPUTS)."""
    if _ENVIRON_DATA is None:
        return os.environ.get(name, default)
    key = _ENCODED.get(name)
    if key is None:
        key = _ENCODED[name] = os.environ.encodekey(name)
    value = _ENVIRON_DATA.get(key)
    return default if value is None else os.environ.decodevalue(value)


_modules: dict[str, ModuleType] = {}
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastrnn_backend", default=None)
_warned_slow_cpu = False


class KernelBackend(Protocol):
    """The typed contract of a kernel backend module (the module docstring above); the backends' own
    definitions leave the annotations to this one place."""

    def supports(self, cell: Cell, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]: ...

    def forward(
        self, cell: Cell, gx: Tensor, state0: State, weights: Weights, batch_sizes: Tensor | None, reverse: bool,
        need_saved: bool,
    ) -> tuple[Tensor, State, Saved]: ...  # fmt: skip

    def backward(
        self, cell: Cell, d_out: Tensor, d_state_n: State, state0: State, weights: Weights,
        batch_sizes: Tensor | None, reverse: bool, out: Tensor, saved: Saved,
    ) -> Grads: ...  # fmt: skip


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call; the message says why and how to get it."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fastrnn backend {name!r}; expected one of {', '.join(BACKENDS)} (or None for auto)")
    return name


def get(name: str) -> ModuleType:
    """The backend module `name` (imported on first use; import errors other than a missing optional
    dependency propagate, so a broken build is never mistaken for an absent one)."""
    _check_name(name)
    mod = _modules.get(name)
    if mod is None:
        mod = importlib.import_module(f"fastrnn.backends.{_MODULE_NAMES.get(name, name)}")
        _modules[name] = mod
    return mod


def is_available(name: str) -> tuple[bool, str]:
    return get(name).available()


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (for some device), in registry order."""
    return [n for n in BACKENDS if is_available(n)[0]]


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run the enclosed fastrnn calls on backend `name` (None restores automatic choice)."""
    if name is not None:
        _check_name(name)
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def requested(explicit: str | None = None) -> str | None:
    """The explicitly requested backend for a call, or None for automatic choice."""
    if explicit is not None:
        return _check_name(explicit)
    ctx = _override.get()
    if ctx is not None:
        return ctx
    env = getenv(ENV_VAR, "").strip()
    if env and env.lower() != "auto":
        if env not in BACKENDS:
            raise ValueError(
                f"{ENV_VAR}={env!r} names no fastrnn backend; expected one of {', '.join(BACKENDS)} or auto"
            )
        return env
    return None


def deploying() -> bool:
    """Tracing (torch.jit.trace, ONNX's TorchScript exporter) or exporting (torch.export, ONNX's dynamo
    exporter): fastrnn runs torch.nn's own kernels there, whatever was asked, so the recorded graph holds
    torch's recurrent ops (aten::lstm ...) that every consumer of those graphs knows, never a call it cannot
    see into."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


@torch.compiler.assume_constant_result
def select(
    cell: str,
    dtype: torch.dtype,
    device: torch.device,
    explicit: str | None = None,
    batch: int | None = None,
    hidden: int | None = None,
    grad: bool | None = None,
    step: bool = False,
) -> str:
    """The backend that runs this call (see the module docstring for the rules). Under torch.compile it is
    evaluated once while tracing and its answer baked into the graph.
    batch, hidden, grad (will autograd record the call), step (one Cell step, not a layer): the call's class for
    `_AUTO_RULES`; a call that leaves any of the first three None gets no rule, only `_AUTO`'s order."""
    cell = spec(cell)
    if deploying():  # torch.nn has no normalised cells: the reference's plain torch ops are what gets traced
        return "reference" if cell.norm else "torch"
    name = requested(explicit)
    if name is not None:
        ok, why = is_available(name)
        if ok:
            ok, why = get(name).supports(cell, dtype, device)
        if not ok:
            raise BackendUnavailableError(
                f"fastrnn backend {name!r} cannot run {cell.name} ({dtype}, {device.type}): {why}"
            )
        return name
    if batch is not None and hidden is not None and grad is not None:
        for g, b_lo, b_hi, h_lo, h_hi, rule in _RULE_INDEX.get((device.type, step, cell.name, dtype), ()):
            if (g is None or g == grad) and b_lo <= batch <= b_hi and h_lo <= hidden <= h_hi:
                if not torch.is_autocast_enabled(device.type) and is_available(rule)[0]:  # autocast: not measured
                    if get(rule).supports(cell, dtype, device)[0]:
                        return rule
                break
    reasons = []
    for cand in _AUTO.get(device.type, ("reference",)):
        ok, why = is_available(cand)
        if not ok:
            reasons.append(f"{cand}: {why}")
            continue
        ok, why = get(cand).supports(cell, dtype, device)
        if ok:
            if device.type == "cpu" and cand != "cpp" and not is_available("cpp")[0]:
                _warn_slow_cpu(cand, reasons)
            return cand
        reasons.append(f"{cand}: {why}")
    raise BackendUnavailableError(
        f"no fastrnn backend can run {cell.name} ({dtype}, {device.type}): " + "; ".join(reasons)
    )


def _warn_slow_cpu(chosen: str, reasons: list[str]) -> None:
    """Once per process: the fast CPU backend is not built, say what runs instead and how to build it."""
    global _warned_slow_cpu
    if not _warned_slow_cpu:
        _warned_slow_cpu = True
        warnings.warn(
            f"fastrnn is running on its {chosen} backend because the C++ extension is not available ("
            + "; ".join(reasons)
            + "). Build it with `pip install --no-build-isolation -e .` from the source tree"
            + ("" if chosen == "numba" else ", or `pip install numba` for the numba fallback")
            + ".",
            RuntimeWarning,
            stacklevel=4,
        )


def optional_import(module: str) -> tuple[ModuleType | None, str]:
    """Import an optional dependency: (module, "") or (None, reason) when it is not installed.
    Any other import error (broken install, ABI mismatch) is raised."""
    try:
        return importlib.import_module(module), ""
    except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise
        return None, f"{module} is not installed"


POISON_VAR = "FASTRNN_POISON_OUTPUTS"


def new_output(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Allocate a backend output: uninitialised, or NaN-filled when FASTRNN_POISON_OUTPUTS=1 (the test suite
    sets it) so that an element a kernel forgets to write shows up as NaN instead of passing as a stale 0."""
    t = like.new_empty(shape, dtype=dtype or like.dtype)
    if getenv(POISON_VAR) == "1" and t.is_floating_point():
        t.fill_(float("nan"))
    return t
