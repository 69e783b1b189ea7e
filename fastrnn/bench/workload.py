"""The implementations a case is timed on, and the workload that runs them: one torch.nn module and its inputs,
deep copies of it run by torch.nn, by torch.compile, or converted to fastrnn on a chosen backend.

Implementations (the `backend` field of a row):
    torch.nn      torch.nn itself (results.YARDSTICK): every ratio's denominator, always timed; for the normalised
                  cells, which torch.nn lacks, the plain-PyTorch eager loop of bench/lnloop.py in its place
    compile       torch.compile of a plain-torch step loop, the step being the reference backend's (lnloop's
                  step for the normalised cells)
    auto          a fastrnn module with backend=None: what fastrnn chooses by itself (the row's note says what)
    <backend>     a fastrnn module with that backend, any of fastrnn.backends.BACKENDS (`torch`: torch.nn's own
                  kernels behind fastrnn's module, which shows what fastrnn's module layer costs)
    onnxruntime   a peer (`--peers`, peers.py): ONNX Runtime running torch.nn's ONNX export of the layer; on the
                  layers' no-grad modes only
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastrnn
from fastrnn import backends as fr_backends
from fastrnn.backends import BACKENDS, KERNEL_BACKENDS
from fastrnn.bench import lnloop, peers
from fastrnn.bench.configs import NO_GRAD_MODES, STREAMING, Case, Preset, cell_spec, is_cell_class
from fastrnn.bench.results import AUTO_CHOSE, ORT, YARDSTICK, BenchError

COMPILE = "compile"
AUTO = "auto"
NOT_FASTRNN = (YARDSTICK, COMPILE, ORT)  # implementations that are not fastrnn modules
IMPLEMENTATIONS = (YARDSTICK, COMPILE, AUTO, *BACKENDS)  # what --backends names

# The reference backend is a readable oracle, not a contender: a default run times it only where it is quick.
REFERENCE_MAX_H = 64
REFERENCE_MAX_T = 32

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def default_implementations(device: str, with_compile: bool = False) -> list[str]:
    """torch.nn plus every fastrnn kernel backend available here that runs natively on `device` (triton on
    CPU runs only in its interpreter, a test mode), plus torch.compile when asked for."""
    names = [YARDSTICK]
    for b in KERNEL_BACKENDS:
        if (b != "triton" or device == "cuda") and fr_backends.is_available(b)[0]:
            names.append(b)
    return names + ([COMPILE] if with_compile else [])


def resolve(spec: str | None, device: str, with_compile: bool = False) -> tuple[list[str], bool]:
    """(implementations, explicit) for a `--backends` value: None = the defaults; otherwise the named ones
    (each fastrnn backend must be available here), torch.nn first in any case."""
    if spec is None:
        return default_implementations(device, with_compile), False
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise BenchError("empty backend list")
    for b in names:
        if b not in IMPLEMENTATIONS:
            raise BenchError(f"unknown backend {b!r}; expected one of {', '.join(IMPLEMENTATIONS)}")
        if b in BACKENDS:
            ok, why = fr_backends.is_available(b)
            if not ok:
                raise BenchError(f"backend {b!r} is not available here: {why}")
    return [YARDSTICK, *dict.fromkeys(b for b in names if b != YARDSTICK)], True


def resolve_peers(spec: str | None, preset: Preset) -> list[str]:
    """The peers of a run: `--peers` (a comma list, or `none`), each required to be installed; without the flag
    the preset's, left out when not installed unless the preset requires them."""
    if spec is None:
        names, required = list(preset.peers), preset.peers_required
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
        if not names:
            raise BenchError("empty peer list (use --peers none for no peers)")
        if names == ["none"]:
            return []
        required = True
    for p in names:
        if p not in peers.PEERS:
            raise BenchError(f"unknown peer {p!r}; expected one of {', '.join(peers.PEERS)} (or none)")
    chosen = []
    for p in dict.fromkeys(names):
        ok, why = peers.available(p)
        if ok:
            chosen.append(p)
        elif required:
            raise BenchError(f"peer {p!r} cannot run here: {why}")
    return chosen


def for_case(case: Case, names: Sequence[str], explicit: bool) -> list[str]:
    """The implementations that time `case`: the reference backend only on tiny shapes unless named; the
    onnxruntime peer only on the layers' no-grad modes (it has no training, and the Cell classes are not its)."""
    quick = explicit or (case.H <= REFERENCE_MAX_H and case.T <= REFERENCE_MAX_T)
    ort = case.mode in NO_GRAD_MODES and not is_cell_class(case.cell) and not cell_spec(case.cell).norm
    return [b for b in names if (b != "reference" or quick) and (b != ORT or ort)]


def status(name: str, case: Case) -> tuple[bool, str]:
    """Can implementation `name` run `case` here? (ok, reason)."""
    if name == ORT:
        ok, why = peers.available(name)
        return (ok, why) if not ok else peers.supports(case.dtype, case.device)
    if name not in BACKENDS:
        return True, ""
    ok, why = fr_backends.is_available(name)
    if ok:
        dev = torch.device(case.device)
        ok, why = fr_backends.get(name).supports(cell_spec(case.cell), torch_dtype(case.dtype), dev)
    return ok, why


def note(name: str, case: Case) -> str:
    """What a row should say about itself: for auto, the backend fastrnn chose at this case's shape and mode
    (as functional.rnn / cell_step ask: batch, hidden size, whether autograd records, layer or Cell step)."""
    if name != AUTO:
        return ""
    chosen = fr_backends.select(
        cell_spec(case.cell).name, torch_dtype(case.dtype), torch.device(case.device), None, case.B, case.H,
        case.mode not in NO_GRAD_MODES, is_cell_class(case.cell),
    )  # fmt: skip
    return AUTO_CHOSE + chosen


_compiled: dict[str, Callable] = {}


def _compiled_step(cell: str) -> Callable:
    """torch.compile of one step: h_{t-1} W_hh^T + b_hh, then the reference backend's pointwise step."""
    if cell not in _compiled:
        import torch._dynamo

        from fastrnn.backends import reference
        from fastrnn.bench import lnloop

        pointwise = reference._STEPS[cell].forward  # the readable statement of each cell's step

        def step(gx_t: Tensor, h: Tensor, c: Tensor | None, w_hh: Tensor, b_hh: Tensor):
            hbar, c_t, _, _ = pointwise(gx_t, F.linear(h, w_hh, b_hh), h, c)
            return hbar, c_t

        if cell_spec(cell).norm:
            step = lnloop.ln_lstm_step if cell_spec(cell).has_cell_state else lnloop.ln_gru_step

        for name in ("cache_size_limit", "recompile_limit"):  # one graph per shape, and the full grid has many
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 512)
        _compiled[cell] = torch.compile(step, dynamic=False)
    return _compiled[cell]


class Workload:
    """A case's torch.nn module, inputs and the callables that run it on each implementation."""

    def __init__(self, case: Case, seed: int = 0):
        self.case = case
        self.spec = cell_spec(case.cell)
        self.dtype = torch_dtype(case.dtype)
        self.is_cell_class = is_cell_class(case.cell)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        if self.spec.norm:  # fastrnn's own layer: torch.nn has none
            cls = getattr(fastrnn, self.spec.layer)
        else:
            cls = getattr(nn, self.spec.cell_class if self.is_cell_class else self.spec.layer)
        kw = {"nonlinearity": self.spec.nonlinearity} if self.spec.nonlinearity else {}
        self.module = cls(case.I, case.H, **kw).to(device=case.device, dtype=self.dtype)
        z = {"dtype": self.dtype, "device": case.device}
        self.x = torch.randn(case.T, case.B, case.I, generator=gen).to(**z)
        self.h0 = torch.randn(case.B, case.H, generator=gen).to(**z)
        self.c0 = torch.randn(case.B, case.H, generator=gen).to(**z) if self.spec.has_cell_state else None

    def module_for(self, name: str) -> nn.Module | peers.OrtLayer:
        """A deep copy of the torch.nn module (same weights), converted to fastrnn unless `name` is not fastrnn;
        for the onnxruntime peer, the module's ONNX export in an ORT session."""
        m = copy.deepcopy(self.module)
        if name == ORT:
            streaming = self.case.mode == STREAMING
            return peers.OrtLayer(m, self.spec.has_cell_state, self.x, streaming, self.case.threads)
        if name == YARDSTICK and self.spec.norm:
            return lnloop.LayerNormLoop(m)
        if name in NOT_FASTRNN:
            return m
        return fastrnn.convert(m, backend=None if name == AUTO else name)

    # One forward of a module (layer or Cell class) -> out [T,B,H], h_n [B,H], c_n [B,H] | None.
    def _forward_module(self, m: nn.Module, x: Tensor, h0: Tensor, c0: Tensor | None):
        two = self.spec.has_cell_state  # the state is an (h, c) pair
        if not self.is_cell_class and self.case.mode == STREAMING:
            state, outs = ((h0.unsqueeze(0), c0.unsqueeze(0)) if two else h0.unsqueeze(0)), []
            for t in range(x.shape[0]):
                out_t, state = m(x[t : t + 1], state)  # [1, B, H]; the state carried into the next call
                outs.append(out_t)
            return (torch.cat(outs), state[0][0], state[1][0]) if two else (torch.cat(outs), state[0], None)
        if not self.is_cell_class:
            out, hn = m(x, (h0.unsqueeze(0), c0.unsqueeze(0)) if two else h0.unsqueeze(0))
            return (out, hn[0][0], hn[1][0]) if two else (out, hn[0], None)
        h, c, outs = h0, c0, []
        for t in range(x.shape[0]):
            if two:
                h, c = m(x[t], (h, c))
            else:
                h = m(x[t], h)
            outs.append(h)
        return torch.stack(outs), h, c

    def _forward_compiled(self, m: nn.Module, x: Tensor, h0: Tensor, c0: Tensor | None):
        step = _compiled_step(self.spec.name)
        if self.spec.norm:
            return lnloop.run(m, x, h0, c0, step)
        sfx = "" if self.is_cell_class else "_l0"
        w_ih, w_hh = getattr(m, "weight_ih" + sfx), getattr(m, "weight_hh" + sfx)
        b_ih, b_hh = getattr(m, "bias_ih" + sfx), getattr(m, "bias_hh" + sfx)
        gx = F.linear(x, w_ih, b_ih)  # [T, B, G*H] in one GEMM, as torch.nn and fastrnn do
        h, c, outs = h0, c0, []
        for t in range(x.shape[0]):
            h, c = step(gx[t], h, c, w_hh, b_hh)
            outs.append(h)
        return torch.stack(outs), h, c

    @staticmethod
    def _forward_ort(m: peers.OrtLayer, x: Tensor, h0: Tensor, c0: Tensor | None):
        return m.forward(x, h0, c0)

    def forward_fn(self, name: str) -> Callable:
        if name == ORT:
            return self._forward_ort
        return self._forward_compiled if name == COMPILE else self._forward_module

    def call_fn(self, name: str, m: nn.Module | peers.OrtLayer) -> Callable[[], None]:
        """One timed call of the case's mode: inference = no_grad forward; streaming = no_grad, one call per
        step carrying the state; forward = forward with grad enabled; training = forward + backward of out.sum()
        (input and h0 require grad, as inside a deeper model). The onnxruntime peer's inputs are numpy arrays
        made once, outside the timed call."""
        x, h0, c0 = self.x, self.h0, self.c0
        if isinstance(m, peers.OrtLayer):
            run = m.caller(x, h0, c0)

            def call() -> None:
                run()

            return call
        fwd = self.forward_fn(name)
        params = list(m.parameters())
        if self.case.mode in NO_GRAD_MODES:

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

    def peak_memory(self, call: Callable[[], None], name: str, m: nn.Module | peers.OrtLayer) -> tuple[int, str]:
        """CUDA: max_memory_allocated during one call minus what was allocated before. CPU: bytes of the
        tensors autograd saves for backward during one forward (distinct storages), i.e. the activation memory
        training holds; 0 for the no-grad modes (inference, streaming) by construction."""
        if self.case.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            call()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before, "cuda_max_allocated"
        if self.case.mode in NO_GRAD_MODES:
            return 0, "saved_for_backward"
        seen: dict[tuple[int, int], int] = {}

        def pack(t: Tensor) -> Tensor:
            s = t.untyped_storage()
            seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
            return t

        x = self.x.clone().requires_grad_(True)
        h0 = self.h0.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.forward_fn(name)(m, x, h0, self.c0)
        return sum(seen.values()), "saved_for_backward"
