"""The timing library: build torch.nn and its peers for a case, check them against torch.nn, time them
interleaved, and turn the samples into long-format rows.

Definitions (they are what the JSON fields mean):
    median_ms, q25_ms, q75_ms, min_ms, max_ms   quantiles of per-call time over the timed samples (samples_ms);
                                                a sample is `number` back-to-back calls divided by `number`
    clock             what was timed: 'cpu' = the process's CPU time (single-threaded CPU cases: immune to
                      neighbours holding the core), 'wall' = wall time (several threads, CUDA; synchronised)
    ratio_vs_torch    median over rounds of torch_i / backend_i, where round i times torch.nn and this backend
                      back to back (samples interleaved round by round, so drift and neighbours' load hit both);
                      > 1: faster than torch.nn. (torch_median_ms / median_ms is the plain ratio of medians.)
    ratio_q25/q75     quartiles of those per-round ratios: the ratio's own noise, what compare reads
    gflops            Case.flops() / median time; gemm_gflops: the machine's measured GEMM rate (see gemm_rate)
    peak_mem_bytes    CUDA: torch.cuda.max_memory_allocated during one call, minus what was allocated before.
                      CPU: bytes of the tensors autograd saves for backward during one forward (distinct
                      storages), i.e. the activation memory training holds; 0 for inference by construction
    max_err           largest error of outputs, final states and (training) gradients against torch.nn, each
                      normalised by that tensor's largest magnitude
    status            ok | FAILING (correctness gate failed: not timed) | SKIPPED (cannot run here) | ERROR
"""

from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastrnn
from fastrnn import backends as fr_backends
from fastrnn.bench.configs import PEERS, Case, Settings, base_cell

SCHEMA = "fastrnn-bench/1"

_TORCH_CLASSES = {
    "lstm": nn.LSTM,
    "gru": nn.GRU,
    "rnn_tanh": nn.RNN,
    "rnn_relu": nn.RNN,
    "lstm_cell": nn.LSTMCell,
    "gru_cell": nn.GRUCell,
    "rnn_tanh_cell": nn.RNNCell,
    "rnn_relu_cell": nn.RNNCell,
}
_FAST_CLASSES = {
    nn.LSTM: fastrnn.LSTM,
    nn.GRU: fastrnn.GRU,
    nn.RNN: fastrnn.RNN,
    nn.LSTMCell: fastrnn.LSTMCell,
    nn.GRUCell: fastrnn.GRUCell,
    nn.RNNCell: fastrnn.RNNCell,
}


class BenchError(Exception):
    """Bad input to the benchmark tool; the CLI prints the message as one line and exits non-zero."""


# ----------------------------------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    info = {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "arch": platform.machine(),
        "system": platform.system(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_name(device: str = "cpu") -> str:
    """The baseline file stem for this machine type, e.g. cpu-2core-x86_64 or cuda-nvidia-h100."""
    if device == "cuda" and torch.cuda.is_available():
        return "cuda-" + "-".join(torch.cuda.get_device_name().lower().replace("_", " ").split()[:3])
    return f"cpu-{os.cpu_count() or 1}core-{platform.machine()}"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": _version("numba"),
        "triton": _version("triton"),
        "fastrnn": fastrnn.__version__,
    }


def git_info() -> dict:
    root = Path(fastrnn.__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def set_threads(n: int) -> None:
    """One thread count for torch and, when it is loaded, numba (cpp runs on torch's pool)."""
    torch.set_num_threads(n)
    numba = sys.modules.get("numba")
    if numba is not None:
        try:
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        except (ValueError, AttributeError):
            pass


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gemm_rate(
    n: int, dtype: torch.dtype = torch.float32, device: str = "cpu", seconds: float = 0.5, clock: str = "wall"
) -> float:
    """GFLOP/s of an n x n x n GEMM (best of the samples taken in `seconds`): the machine's attainable matmul
    rate, the roof the recurrences' GFLOP/s are read against; timed on the same clock as the cases."""
    now = _CLOCKS[clock]
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    torch.mm(a, b, out=c)
    _sync(device)
    best = math.inf
    t_end = time.perf_counter() + seconds
    k = 0
    while k < 3 or time.perf_counter() < t_end:
        t0 = now()
        torch.mm(a, b, out=c)
        _sync(device)
        best = min(best, now() - t0)
        k += 1
    return 2 * n**3 / max(best, 1e-9) / 1e9


# ------------------------------------------------------------------------------------------ implementations

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def _step_fn(cell: str) -> Callable:
    """One step of `cell` in plain torch ops (gate order and formulas of torch.nn): what torch.compile fuses."""

    def lstm(gx_t: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Tensor) -> tuple[Tensor, Tensor]:
        i, f, g, o = (gx_t + F.linear(h, w_hh, b_hh)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def gru(gx_t: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Tensor) -> tuple[Tensor, Tensor]:
        xr, xz, xn = gx_t.chunk(3, 1)
        hr, hz, hn = F.linear(h, w_hh, b_hh).chunk(3, 1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, c

    def rnn_tanh(gx_t: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Tensor) -> tuple[Tensor, Tensor]:
        return torch.tanh(gx_t + F.linear(h, w_hh, b_hh)), c

    def rnn_relu(gx_t: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Tensor) -> tuple[Tensor, Tensor]:
        return torch.relu(gx_t + F.linear(h, w_hh, b_hh)), c

    return {"lstm": lstm, "gru": gru, "rnn_tanh": rnn_tanh, "rnn_relu": rnn_relu}[base_cell(cell)]


_compiled: dict[str, Callable] = {}


def _compiled_step(cell: str) -> Callable:
    cell = base_cell(cell)
    if cell not in _compiled:
        import torch._dynamo

        for name in ("cache_size_limit", "recompile_limit"):  # one graph per shape, and the full grid has many
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 512)
        _compiled[cell] = torch.compile(_step_fn(cell), dynamic=False)
    return _compiled[cell]


class Workload:
    """A case's torch.nn module, inputs and the callables that run it on each implementation."""

    def __init__(self, case: Case, seed: int = 0):
        self.case = case
        self.dtype = torch_dtype(case.dtype)
        self.lstm = base_cell(case.cell) == "lstm"
        self.is_cell_class = case.cell.endswith("_cell")
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        cls = _TORCH_CLASSES[case.cell]
        kw = {"nonlinearity": "relu"} if base_cell(case.cell) == "rnn_relu" else {}
        self.module = cls(case.I, case.H, **kw).to(device=case.device, dtype=self.dtype)
        z = {"dtype": self.dtype, "device": case.device}
        self.x = torch.randn(case.T, case.B, case.I, generator=gen).to(**z)
        self.h0 = torch.randn(case.B, case.H, generator=gen).to(**z)
        self.c0 = torch.randn(case.B, case.H, generator=gen).to(**z) if self.lstm else None

    # One forward of a module (layer or Cell class) -> out [T,B,H], h_n [B,H], c_n [B,H] | None.
    def _forward_module(self, m: nn.Module, x: Tensor, h0: Tensor, c0: Tensor | None):
        if not self.is_cell_class:
            hx = (h0.unsqueeze(0), c0.unsqueeze(0)) if self.lstm else h0.unsqueeze(0)
            out, hn = m(x, hx)
            return (out, hn[0][0], hn[1][0]) if self.lstm else (out, hn[0], None)
        h, c, outs = h0, c0, []
        for t in range(x.shape[0]):
            if self.lstm:
                h, c = m(x[t], (h, c))
            else:
                h = m(x[t], h)
            outs.append(h)
        return torch.stack(outs), h, c

    def _forward_compiled(self, m: nn.Module, x: Tensor, h0: Tensor, c0: Tensor | None):
        step = _compiled_step(self.case.cell)
        sfx = "" if self.is_cell_class else "_l0"
        w_ih, w_hh = getattr(m, "weight_ih" + sfx), getattr(m, "weight_hh" + sfx)
        b_ih, b_hh = getattr(m, "bias_ih" + sfx), getattr(m, "bias_hh" + sfx)
        gx = F.linear(x, w_ih, b_ih)  # [T, B, G*H] in one GEMM, as torch.nn and fastrnn do
        h, c, outs = h0, (c0 if c0 is not None else h0), []
        for t in range(x.shape[0]):
            h, c = step(gx[t], h, c, w_hh, b_hh)
            outs.append(h)
        return torch.stack(outs), h, (c if self.lstm else None)

    def module_for(self, backend: str) -> nn.Module:
        """A deep copy of the torch.nn module (same weights), converted to fastrnn for fastrnn backends."""
        m = copy.deepcopy(self.module)
        if backend in PEERS:
            return m
        return _FAST_CLASSES[type(m)].from_torch(m, backend=backend)

    def forward_fn(self, backend: str) -> Callable:
        return self._forward_compiled if backend == "compile" else self._forward_module

    def outputs(self, backend: str, m: nn.Module) -> dict[str, Tensor]:
        """Everything the correctness gate compares: outputs, final states, and in training mode the gradients
        of a loss touching out, h_n and c_n with random weights (so every incoming gradient is exercised)."""
        fwd = self.forward_fn(backend)
        training = self.case.mode == "training"
        x = self.x.clone().requires_grad_(training)
        h0 = self.h0.clone().requires_grad_(training)
        c0 = None if self.c0 is None else self.c0.clone().requires_grad_(training)
        with torch.set_grad_enabled(self.case.mode != "inference"):
            out, h_n, c_n = fwd(m, x, h0, c0)
        res = {"out": out.detach(), "h_n": h_n.detach()}
        if c_n is not None:
            res["c_n"] = c_n.detach()
        if training:
            gen = torch.Generator().manual_seed(1)
            loss = (out * torch.randn(out.shape, generator=gen).to(out)).sum()
            loss = loss + (h_n * torch.randn(h_n.shape, generator=gen).to(h_n)).sum()
            if c_n is not None:
                loss = loss + (c_n * torch.randn(c_n.shape, generator=gen).to(c_n)).sum()
            loss.backward()
            res["grad_x"], res["grad_h0"] = x.grad, h0.grad
            if c0 is not None:
                res["grad_c0"] = c0.grad
            for name, p in m.named_parameters():
                res[f"grad_{name}"] = p.grad
            m.zero_grad(set_to_none=True)
        return res

    def call_fn(self, backend: str, m: nn.Module) -> Callable[[], None]:
        """One timed call of the case's mode: inference = no_grad forward; forward = forward with grad enabled;
        training = forward + backward of out.sum() (input and h0 require grad, as inside a deeper model)."""
        fwd = self.forward_fn(backend)
        x, h0, c0 = self.x, self.h0, self.c0
        params = list(m.parameters())
        if self.case.mode == "inference":

            def call() -> None:
                with torch.no_grad():
                    fwd(m, x, h0, c0)

        elif self.case.mode == "forward":

            def call() -> None:
                fwd(m, x, h0, c0)

        else:
            xg = x.clone().requires_grad_(True)
            h0g = h0.clone().requires_grad_(True)

            def call() -> None:
                for p in params:
                    p.grad = None
                xg.grad = None
                h0g.grad = None
                out = fwd(m, xg, h0g, c0)[0]
                out.sum().backward()

        return call

    def peak_memory(self, call: Callable[[], None], backend: str, m: nn.Module) -> tuple[int, str]:
        if self.case.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            call()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before, "cuda_max_allocated"
        if self.case.mode == "inference":
            return 0, "saved_for_backward"
        seen: dict[tuple[int, int], int] = {}

        def pack(t: Tensor) -> Tensor:
            s = t.untyped_storage()
            seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
            return t

        fwd = self.forward_fn(backend)
        x = self.x.clone().requires_grad_(True)
        h0 = self.h0.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fwd(m, x, h0, self.c0)
        return sum(seen.values()), "saved_for_backward"


# ----------------------------------------------------------------------------------------- correctness gate


def tolerance(dtype: str, T: int) -> float:
    """Largest accepted error relative to a tensor's largest magnitude: rounding grows like sqrt(T) over the
    steps (the bound a wrong kernel misses by orders of magnitude)."""
    base = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2, "float16": 4e-3}[dtype]
    return base * 10 * math.sqrt(T)


def compare_outputs(ref: dict[str, Tensor], got: dict[str, Tensor], tol: float) -> tuple[bool, float, str]:
    """(ok, worst normalised error, what failed first)."""
    worst, why = 0.0, ""
    for name, r in ref.items():
        g = got.get(name)
        if r is None and g is None:
            continue
        if g is None or r is None:
            return False, math.inf, f"{name}: missing"
        if g.shape != r.shape:
            return False, math.inf, f"{name}: shape {tuple(g.shape)} != torch.nn's {tuple(r.shape)}"
        r64, g64 = r.double(), g.double()
        if bool(torch.isnan(g64).any() != torch.isnan(r64).any()):
            return False, math.inf, f"{name}: NaN where torch.nn has none"
        scale = max(float(r64.abs().max()) if r64.numel() else 0.0, 1e-30)
        err = float((g64 - r64).abs().max()) / scale if r64.numel() else 0.0
        if err > worst:
            worst = err
        if err > tol and not why:
            why = f"{name}: normalised error {err:.2e} > {tol:.1e}"
    return not why, worst, why


# --------------------------------------------------------------------------------------------------- timing


@dataclass
class _Timer:
    backend: str
    call: Callable[[], None]
    number: int = 1
    spent: float = 0.0
    samples: list[float] | None = None
    error: str = ""

    def sample(self, device: str, clock: Callable[[], float]) -> float:
        _sync(device)
        w0, t0 = time.perf_counter(), clock()
        for _ in range(self.number):
            self.call()
        _sync(device)
        dt = clock() - t0
        self.spent += time.perf_counter() - w0
        return dt / self.number


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:300]


def clock_name(device: str, threads: int, setting: str = "auto") -> str:
    """'cpu' (the process's CPU time) for single-threaded CPU work, else 'wall'. One thread's CPU time excludes
    the time a neighbour holds the core, which on a shared machine is most of the noise; with more threads it
    would count spin-waiting workers, and on CUDA it would miss the device, so those use wall time."""
    if setting != "auto":
        return setting
    return "cpu" if device == "cpu" and threads == 1 else "wall"


def clock_for(case: Case, settings: Settings) -> str:
    return clock_name(case.device, case.threads, settings.clock)


_CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def time_interleaved(timers: list[_Timer], settings: Settings, device: str, clock: str = "wall") -> None:
    """Round-robin over the implementations, one sample each per round (rotating who goes first) so that
    machine drift and neighbours' load hit every implementation alike. torch.nn (timers[0]) is sampled for as
    long as any other implementation is, so every sample of a backend has a torch.nn partner from its round."""
    now = _CLOCKS[clock]
    for tm in timers:
        tm.samples = []
        try:
            tm.call()  # first call apart: one-time costs (JIT, allocator) would skew the calibration
            _sync(device)
            t0 = now()
            for _ in range(max(1, settings.warmup)):
                tm.call()
                _sync(device)
            per_call = (now() - t0) / max(1, settings.warmup)
            tm.number = max(1, math.ceil(settings.min_sample_ms / 1e3 / max(per_call, 1e-9)))
        except Exception as e:  # a backend's crash is a result (ERROR row), not the end of the run
            tm.error = _one_line(e)

    def done(tm: _Timer) -> bool:
        n = len(tm.samples or [])
        enough = n >= settings.min_repeats and tm.spent > settings.max_seconds
        return bool(tm.error) or n >= settings.repeats or enough

    r = 0
    while True:
        live = [tm for tm in timers[1:] if not done(tm)]
        if not live and (done(timers[0]) or len(timers) > 1):
            break
        group = [timers[0], *live]
        k = r % len(group)
        for tm in group[k:] + group[:k]:
            try:
                assert tm.samples is not None
                tm.samples.append(tm.sample(device, now))
            except Exception as e:
                tm.error = _one_line(e)
        r += 1
        if timers[0].error:
            break


# -------------------------------------------------------------------------------------------------- the run


def backend_status(backend: str, case: Case) -> tuple[bool, str]:
    """Can `backend` run `case` here? (ok, reason)."""
    if backend == "torch":
        return True, ""
    if backend == "compile":
        return True, ""
    ok, why = fr_backends.is_available(backend)
    if ok:
        dev = torch.device(case.device)
        ok, why = fr_backends.get(backend).supports(base_cell(case.cell), torch_dtype(case.dtype), dev)
    return ok, why


def _row(case: Case, backend: str, status: str, note: str = "", **fields) -> dict:
    row = case.as_dict()
    row.update(
        backend=backend,
        status=status,
        note=note,
        flops=case.flops(),
        median_ms=None,
        q25_ms=None,
        q75_ms=None,
        min_ms=None,
        max_ms=None,
        repeats=0,
        number=0,
        torch_median_ms=None,
        ratio_vs_torch=None,
        ratio_q25=None,
        ratio_q75=None,
        gflops=None,
        gemm_gflops=None,
        peak_mem_bytes=None,
        peak_mem_kind=None,
        max_err=None,
    )
    row.update(fields)
    return row


def measure_case(case: Case, backends: Iterable[str], settings: Settings, gemm_gflops: float | None) -> list[dict]:
    """Rows for torch.nn and each backend on one case: correctness gate first, then interleaved timing."""
    set_threads(case.threads)
    wl = Workload(case)
    rows: dict[str, dict] = {}
    torch_mod = wl.module_for("torch")
    ref = wl.outputs("torch", torch_mod)
    tol = tolerance(case.dtype, case.T)
    timers = [_Timer("torch", wl.call_fn("torch", torch_mod))]
    mods = {"torch": torch_mod}
    for b in backends:
        if b == "torch":
            continue
        ok, why = backend_status(b, case)
        if not ok:
            rows[b] = _row(case, b, "SKIPPED", why)
            continue
        try:
            m = wl.module_for(b)
            got = wl.outputs(b, m)
        except Exception as e:
            status = "SKIPPED" if b == "compile" else "ERROR"
            rows[b] = _row(case, b, status, _one_line(e))
            continue
        good, err, why = compare_outputs(ref, got, tol)
        if not good:
            rows[b] = _row(case, b, "FAILING", f"differs from torch.nn: {why}", max_err=err)
            continue
        rows[b] = _row(case, b, "ok", max_err=err)
        mods[b] = m
        timers.append(_Timer(b, wl.call_fn(b, m)))
    clock = clock_for(case, settings)
    set_threads(case.threads)  # again: a backend's first call may have just imported numba (default: all cores)
    time_interleaved(timers, settings, case.device, clock)
    t_torch = timers[0].samples or []
    for tm in timers:
        base = rows.get(tm.backend) or _row(case, tm.backend, "ok", max_err=0.0)
        if tm.error or not tm.samples:
            base.update(status="ERROR", note=tm.error or "no samples")
            rows[tm.backend] = base
            continue
        s = tm.samples
        med = statistics.median(s)
        paired = [a / b for a, b in zip(t_torch, s, strict=False) if b > 0]
        peak, kind = wl.peak_memory(tm.call, tm.backend, mods[tm.backend])
        tmed = statistics.median(t_torch) if t_torch else None
        base.update(
            median_ms=med * 1e3,
            q25_ms=_quantile(s, 0.25) * 1e3,
            q75_ms=_quantile(s, 0.75) * 1e3,
            min_ms=min(s) * 1e3,
            max_ms=max(s) * 1e3,
            repeats=len(s),
            number=tm.number,
            samples_ms=[float(f"{x * 1e3:.4g}") for x in s],
            clock=clock,
            torch_median_ms=None if tmed is None else tmed * 1e3,
            ratio_vs_torch=statistics.median(paired) if paired else None,
            ratio_q25=_quantile(paired, 0.25) if paired else None,
            ratio_q75=_quantile(paired, 0.75) if paired else None,
            gflops=case.flops() / med / 1e9,
            gemm_gflops=gemm_gflops,
            peak_mem_bytes=peak,
            peak_mem_kind=kind,
        )
        rows[tm.backend] = base
    order = ["torch", *[b for b in backends if b != "torch"]]
    return [rows[b] for b in order if b in rows]


def _case_of(row: dict) -> tuple:
    return tuple(row[f] for f in ("cell", "mode", "T", "B", "H", "I", "dtype", "threads", "device"))


def merge_runs(runs: Sequence[Sequence[dict]]) -> list[dict]:
    """Rows of several runs of the same grid pooled into one row per configuration: samples are concatenated,
    and the per-round ratios of every run are pooled, so the ratio's quartiles cover the drift BETWEEN runs as
    well as within one (what a baseline needs: a lucky run must not set the bar). A configuration that failed
    or errored in any run keeps that row."""
    order: list[tuple] = []
    by_key: dict[tuple, list[dict]] = {}
    for rows in runs:
        for r in rows:
            k = (*_case_of(r), r["backend"])
            if k not in by_key:
                order.append(k)
                by_key[k] = []
            by_key[k].append(r)
    torch_samples: dict[tuple, list[list[float]]] = {}
    for k in order:
        if k[-1] == "torch":
            torch_samples[k[:-1]] = [r.get("samples_ms") or [] for r in by_key[k]]
    merged = []
    for k in order:
        rs = by_key[k]
        bad = [r for r in rs if r["status"] != "ok"]
        if bad or len(rs) == 1:
            merged.append(dict(bad[0] if bad else rs[0], runs=len(rs)))
            continue
        s = [x for r in rs for x in r["samples_ms"]]
        paired = [
            a / b
            for ts, r in zip(torch_samples.get(k[:-1], []), rs, strict=False)
            for a, b in zip(ts, r["samples_ms"], strict=False)
            if b > 0
        ]
        tmed = [x for ts in torch_samples.get(k[:-1], []) for x in ts]
        med = statistics.median(s)
        row = dict(rs[0])
        row.update(
            median_ms=med,
            q25_ms=_quantile(s, 0.25),
            q75_ms=_quantile(s, 0.75),
            min_ms=min(s),
            max_ms=max(s),
            repeats=len(s),
            samples_ms=s,
            runs=len(rs),
            torch_median_ms=statistics.median(tmed) if tmed else None,
            ratio_vs_torch=statistics.median(paired) if paired else None,
            ratio_q25=_quantile(paired, 0.25) if paired else None,
            ratio_q75=_quantile(paired, 0.75) if paired else None,
            gflops=row["flops"] / (med * 1e-3) / 1e9,
            max_err=max(r.get("max_err") or 0.0 for r in rs),
        )
        merged.append(row)
    return merged


def header(device: str, preset: str | None, settings: Settings, gemm_n: int, gemm_gflops: float, threads: int) -> dict:
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(device), "name": machine_name(device), "threads": threads},
        "versions": versions(),
        "git": git_info(),
        "preset": preset,
        "settings": {
            "warmup": settings.warmup,
            "repeats": settings.repeats,
            "min_repeats": settings.min_repeats,
            "max_seconds": settings.max_seconds,
            "min_sample_ms": settings.min_sample_ms,
            "clock": settings.clock,
        },
        "gemm": {"n": gemm_n, "dtype": "float32", "threads": threads, "gflops": gemm_gflops},
        "definitions": {
            "ratio_vs_torch": "median of per-round torch.nn ms / backend ms, rounds interleaved (>1 = faster)",
            "flops": "2*T*B*G*H*(I+H) per forward (input projection + recurrence GEMMs); training = 3x forward",
            "peak_mem_bytes": "cpu: bytes saved for backward by one forward; cuda: max_memory_allocated delta",
            "clock": "cpu = process CPU time (one-thread CPU cases), wall = wall time (more threads, CUDA)",
        },
    }
