"""Peers: other runtimes timed on the same cases as fastrnn, in the same rounds and after the same correctness
gate (a peer that disagrees with torch.nn is reported FAILING and not timed).

    onnxruntime   ONNX Runtime's CPU execution provider running torch.nn's ONNX export of the case's layer
                  (torch.onnx.export with dynamo=False: one ONNX LSTM / GRU / RNN operator), exported once per
                  layer, weights and input shape into a temporary folder that is removed at exit. The session
                  runs on the case's thread count (intra_op_num_threads = threads, inter_op_num_threads = 1)
                  with spinning off, so it takes no more cores than torch.nn and burns no core while it waits.
                  It times the layers' no-grad modes (inference, streaming), float32 on the CPU: ORT has no
                  training here, and its CPU LSTM / GRU / RNN kernels are float only.

onnx and onnxruntime are optional (the `bench` extra); only "module not found" means "not installed": any other
import error is raised.
"""

from __future__ import annotations

import hashlib
import importlib
import tempfile
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from fastrnn.bench.results import ORT

PEERS = (ORT,)
INSTALL_HINT = "pip install 'fastrnn[bench]' (or pip install onnx onnxruntime)"
ORT_DTYPES = ("float32",)
ORT_OPSET = 17

_INPUTS = ("x", "h0", "c0")
_OUTPUTS = ("out", "h_n", "c_n")


def missing_module(names: tuple[str, ...] = ("onnx", "onnxruntime")) -> str | None:
    """The first of `names` that is not installed, or None."""
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or e.name.split(".")[0] == name:
                return name
            raise
    return None


def available(peer: str = ORT) -> tuple[bool, str]:
    """(ok, why not): the ORT peer needs onnx (torch's exporter writes with it) and onnxruntime."""
    if peer != ORT:
        return False, f"unknown peer {peer!r}"
    name = missing_module()
    if name is not None:
        return False, f"{name} is not installed: {INSTALL_HINT}"
    return True, ""


def supports(dtype: str, device: str) -> tuple[bool, str]:
    if device != "cpu":
        return False, "the onnxruntime peer runs on the CPU only"
    if dtype not in ORT_DTYPES:
        return False, f"onnxruntime's CPU LSTM/GRU/RNN kernels are float32 only, not {dtype}"
    return True, ""


class _Exported(nn.Module):
    """The torch.nn layer as ONNX sees it: (x [T,B,I], h0 [1,B,H], c0 [1,B,H]) -> (out, h_n, c_n)."""

    def __init__(self, layer: nn.Module, has_cell_state: bool):
        super().__init__()
        self.layer = layer
        self.has_cell_state = has_cell_state

    def forward(self, x: Tensor, h0: Tensor, c0: Tensor | None = None):
        if self.has_cell_state:
            out, (h_n, c_n) = self.layer(x, (h0, c0))
            return out, h_n, c_n
        out, h_n = self.layer(x, h0)
        return out, h_n


_cache_dir: tempfile.TemporaryDirectory | None = None
_exported: dict[tuple, str] = {}


def _digest(module: nn.Module) -> str:
    """The module's class, settings (hidden size, nonlinearity ...: its plain attributes) and weights: two layers
    with one digest export to the same graph (an RNN's nonlinearity is in no repr, and the weights of a tanh and
    a relu RNN made from one seed are equal)."""
    h = hashlib.sha1(type(module).__qualname__.encode())
    plain = {k: v for k, v in vars(module).items() if isinstance(v, (bool, int, float, str, type(None)))}
    h.update(repr(sorted(plain.items())).encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def export(layer: nn.Module, args: tuple[Tensor, ...], has_cell_state: bool) -> str:
    """Path of torch.nn's ONNX export of `layer` on inputs shaped like `args`, exported once per layer, weights
    and shapes (the exporter's deprecation notes are silenced: dynamo=False is chosen, it exports fastest)."""
    global _cache_dir
    key = (tuple(tuple(a.shape) for a in args), str(args[0].dtype), _digest(layer))
    if key not in _exported:
        if _cache_dir is None:
            _cache_dir = tempfile.TemporaryDirectory(prefix="fastrnn-bench-onnx-")
        path = f"{_cache_dir.name}/{len(_exported)}.onnx"
        n = len(args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Exported(layer, has_cell_state).eval(),
                args,
                path,
                dynamo=False,
                input_names=list(_INPUTS[:n]),
                output_names=list(_OUTPUTS[:n]),
                opset_version=ORT_OPSET,
            )
        _exported[key] = path
    return _exported[key]


def session_options(threads: int):
    """The case's thread count, one inter-op thread, no spinning (a spinning pool would hold the cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only
    return so


class OrtLayer:
    """A workload's torch.nn layer exported to ONNX and run by an ONNX Runtime session.

    Whole sequence: one session.run on x [T,B,I]. Streaming: the export of a one-step call (x [1,B,I]), run once
    per step with the h_n (and c_n) it returned fed back as the next step's h0 (c0)."""

    def __init__(self, layer: nn.Module, has_cell_state: bool, x: Tensor, streaming: bool, threads: int):
        import onnxruntime as ort

        self.has_cell_state = has_cell_state
        self.streaming = streaming
        B, H = x.shape[1], layer.hidden_size
        x_in = x[:1] if streaming else x
        state = torch.zeros(1, B, H, dtype=x.dtype)
        args = (x_in, state, state) if has_cell_state else (x_in, state)
        self.path = export(layer, args, has_cell_state)
        self.session = ort.InferenceSession(self.path, session_options(threads), providers=["CPUExecutionProvider"])

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)

    def _feeds(self, x: Tensor, h0: Tensor, c0: Tensor | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        def arr(t: Tensor) -> np.ndarray:
            return np.ascontiguousarray(t.detach().cpu().numpy())

        return arr(x), arr(h0.unsqueeze(0)), None if c0 is None else arr(c0.unsqueeze(0))

    def caller(self, x: Tensor, h0: Tensor, c0: Tensor | None) -> Callable[[], list[np.ndarray]]:
        """A call on these inputs, converted to numpy once: what the timing calls. Returns [out, h_n, c_n]."""
        xs, h, c = self._feeds(x, h0, c0)
        names = _INPUTS if self.has_cell_state else _INPUTS[:2]

        if not self.streaming:
            feeds = dict(zip(names, (xs, h, c), strict=False))
            return lambda: self.run(feeds)

        steps = [xs[t : t + 1] for t in range(xs.shape[0])]

        def stream() -> list[np.ndarray]:
            hs, cs, outs = h, c, []
            for xt in steps:
                res = self.run(dict(zip(names, (xt, hs, cs), strict=False)))
                outs.append(res[0])
                hs = res[1]
                cs = res[2] if self.has_cell_state else None
            return [np.concatenate(outs), *res[1:]]

        return stream

    def forward(self, x: Tensor, h0: Tensor, c0: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """out [T,B,H], h_n [B,H], c_n [B,H] | None, as torch tensors (what the correctness gate compares)."""
        res = self.caller(x, h0, c0)()
        out, h_n = torch.from_numpy(res[0]), torch.from_numpy(res[1])[0]
        c_n = torch.from_numpy(res[2])[0] if self.has_cell_state else None
        return out, h_n, c_n
