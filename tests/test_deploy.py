"""Deployment paths: a model holding fastrnn layers is scripted, traced, exported to ONNX (both exporters),
exported with torch.export and packaged by AOTInductor exactly as the same model with torch.nn's layers, and
each artefact computes torch.nn's numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from tests.conftest import KERNEL_BACKENDS
from tests.helpers import assert_close, flat

CPU_BACKENDS = [b for b in KERNEL_BACKENDS if b != "triton"]


class Tagger(nn.Module):
    """Embedding-free sequence model with every layer class: LSTM (bidirectional, projected), GRU, RNN, cells."""

    def __init__(self, proj_size: int = 3):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=proj_size)
        self.gru = nn.GRU(2 * (proj_size or 6), 5, batch_first=False)
        self.rnn = nn.RNN(5, 4, nonlinearity="relu")
        self.cell = nn.LSTMCell(4, 4)
        self.gcell = nn.GRUCell(4, 4)

    def forward(self, x):
        y, _ = self.lstm(x)
        y, h = self.gru(y)
        y, h = self.rnn(y, h[:, :, :4].contiguous())
        hc = self.cell(y[-1])
        return y, self.gcell(hc[0], hc[1])


def _pair(backend, **kw):
    torch.manual_seed(0)
    ref = Tagger(**kw).eval()
    fast = fastrnn.convert(Tagger(**kw).eval(), backend=backend)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _same(got, want, tol=0.0):
    for a, e in zip(got, want, strict=True):
        assert_close(a, e, name="deployed output", rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torchscript_script(backend):
    ref, fast = _pair(backend)
    x = torch.randn(5, 2, 4)
    scripted = torch.jit.script(fast)
    _same(scripted(x), ref(x))
    assert isinstance(scripted.lstm, torch.jit.ScriptModule) and scripted.lstm.original_name == "LSTM"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torchscript_trace(backend):
    ref, fast = _pair(backend)
    x = torch.randn(5, 2, 4)
    traced = torch.jit.trace(fast, (x,), check_trace=False)  # no sanity check to hide behind
    x2 = torch.randn(7, 2, 4)
    _same(traced(x2), ref(x2))
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert kinds == {n.kind() for n in torch.jit.trace(ref, (x,)).inlined_graph.nodes()}
    assert {"aten::lstm", "aten::gru", "aten::rnn_relu"} <= kinds


class Packed(nn.Module):
    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, lengths):
        out, h = self.rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return pad_packed_sequence(out)[0], h


def test_trace_packed_sequence():
    torch.manual_seed(1)
    ref = nn.GRU(3, 4, bidirectional=True)
    fast = Packed(fastrnn.GRU.from_torch(ref, backend=CPU_BACKENDS[-1]))
    x, lengths = torch.randn(5, 3, 3), torch.tensor([5, 2, 4])
    traced = torch.jit.trace(fast, (x, lengths), check_trace=False)
    _same(traced(x, lengths), Packed(ref)(x, lengths))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_onnx_export_matches_torch_and_onnxruntime(tmp_path, dynamo):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    ref, fast = _pair(CPU_BACKENDS[-1], proj_size=0)  # ONNX's LSTM has no projection: torch.nn cannot export it
    x = torch.randn(5, 2, 4)
    ops = []
    for name, m in (("torch", ref), ("fastrnn", fast)):
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(m, (x,), str(path), dynamo=dynamo, input_names=["x"])
        graph = onnx.load(str(path)).graph
        ops.append(sorted(n.op_type for n in graph.node if n.op_type in ("LSTM", "GRU", "RNN")))
        assert len(graph.input) == 1
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        for a, e in zip(got, ref(x), strict=True):
            assert_close(torch.from_numpy(a), e.detach(), torch.float32, 5, f"onnxruntime {name}")
    assert ops[0] == ops[1] and "LSTM" in ops[1] and "GRU" in ops[1]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_export(backend):
    ref, fast = _pair(backend)
    x = torch.randn(5, 2, 4)
    ep = torch.export.export(fast, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"aten.lstm.input", "aten.gru.input"} <= targets
    assert not any("fastrnn" in t for t in targets)
    _same(ep.module()(x), ref(x))


def test_aot_inductor_package(tmp_path):
    ref, fast = _pair(CPU_BACKENDS[-1])
    x = torch.randn(5, 2, 4)
    with torch.no_grad():
        ep = torch.export.export(fast, (x,))
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "tagger.pt2"))
        runner = torch._inductor.aoti_load_package(path)
        for a, e in zip(runner(x), ref(x), strict=True):
            assert_close(a, e, torch.float32, 5, "AOTInductor output")


def test_explicit_backend_does_not_leak_into_a_trace():
    """backend="numba" while tracing still records torch's op: a traced call into a kernel would be a constant."""
    m = fastrnn.LSTM(3, 4, backend=CPU_BACKENDS[-1])
    x = torch.randn(2, 1, 3)
    traced = torch.jit.trace(m, (x,), check_trace=False)
    x2 = torch.randn(2, 1, 3)
    _same(flat(traced(x2)), flat(m(x2)), 1e-6)
