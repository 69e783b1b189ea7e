"""The cpp backend's own packed float32 GEMM (csrc/common.cpp panel_gemm: the step GEMMs, the inference layer's
projection and the weight gradients where own_gemm_enabled) against torch.nn, with it forced on and off
(FASTRNN_CPP_OWN_GEMM=1/0), so that every machine with an AVX-512 build tests it whatever its CPU's default.

The shapes reach its edges: row blocks of 6 and every tail of 1-5 rows, more rows than a task's chunk (192), column
panels of 64 with tails of 4-35 columns (masked vectors), K in chunks of 256 with a tail, one row. One-row layers
also run their steps on W_hh packed in 16 x 16 blocks (pack_dot, dot_packed_gemm) where the kernel is on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("fastrnn._C", reason="the C++ extension fastrnn._C is not built")

import fastrnn  # noqa: E402
from tests.helpers import assert_close, flat  # noqa: E402

F32 = torch.float32

LAYERS = [
    # kind, extra, T, B, I, H
    pytest.param("LSTM", {}, 3, 7, 300, 70, id="lstm-K300-N280-B7"),
    pytest.param("GRU", {}, 2, 200, 20, 33, id="gru-B200-N99"),
    pytest.param("RNN", {}, 4, 5, 17, 260, id="rnn-K260-N260-B5"),
    pytest.param("LSTM", {"proj_size": 20}, 3, 4, 9, 40, id="lstm-proj"),
    pytest.param("GRU", {"bidirectional": True}, 5, 1, 64, 64, id="gru-bidir-B1"),
    pytest.param("RNN", {"nonlinearity": "relu", "num_layers": 2}, 3, 11, 8, 129, id="rnn-relu-2layer-B11"),
    # one row: W_hh in 16 x 16 blocks (common.cpp pack_dot) with row tails (N % 16) and K tails (K % 16)
    pytest.param("LSTM", {}, 6, 1, 30, 70, id="lstm-B1-N280-K70"),
    pytest.param("GRU", {}, 4, 1, 9, 101, id="gru-B1-N303-K101"),
    pytest.param("LSTM", {"proj_size": 37}, 5, 1, 12, 130, id="lstm-proj-B1-N520-K37"),
]


def _pair(kind, extra, I, H):
    torch.manual_seed(0)
    theirs = getattr(nn, kind)(I, H, **extra)
    ours = getattr(fastrnn, kind)(I, H, **extra, backend="cpp")
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _run(m: nn.Module, x: torch.Tensor, train: bool) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(train)
    with torch.set_grad_enabled(train):
        results = flat(m(x))
    if not train:
        return results
    gen = torch.Generator().manual_seed(5)
    loss = sum((r * torch.randn(r.shape, generator=gen)).sum() for r in results)
    grads = torch.autograd.grad(loss, [x, *m.parameters()])
    return [*results, *grads]


@pytest.mark.parametrize("own", ["1", "0"])
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("kind,extra,T,B,I,H", LAYERS)
def test_layers_match_torch(kind, extra, T, B, I, H, train, own, monkeypatch):
    monkeypatch.setenv("FASTRNN_CPP_OWN_GEMM", own)
    theirs, ours = _pair(kind, extra, I, H)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(1))
    names = ["output", "h_n", "c_n"][: len(flat(theirs(x)))]
    names += ["grad x"] + [f"grad {n}" for n, _ in theirs.named_parameters()] if train else []
    for name, a, e in zip(names, _run(ours, x, train), _run(theirs, x, train), strict=True):
        assert_close(a, e, F32, T * B if name.startswith("grad w") else T, f"{kind} {extra} own={own} {name}")


@pytest.mark.parametrize("own", ["1", "0"])
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell"])
def test_cells_of_many_rows_match_torch(kind, own, monkeypatch):
    """A Cell of more than 16 rows runs its GEMMs through gemm(), which packs W for the own kernel at every call."""
    monkeypatch.setenv("FASTRNN_CPP_OWN_GEMM", own)
    torch.manual_seed(0)
    theirs = getattr(nn, kind)(37, 45)
    ours = getattr(fastrnn, kind)(37, 45, backend="cpp")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(40, 37, generator=torch.Generator().manual_seed(1))
    for i, (a, e) in enumerate(zip(_run(ours, x, True), _run(theirs, x, True), strict=True)):
        assert_close(a, e, F32, 40, f"{kind} own={own} result {i}")


@pytest.mark.parametrize("own", ["1", "0"])
def test_training_projection_takes_the_extension_where_the_own_gemm_runs(own, monkeypatch):
    """A recorded float32 layer's input projection goes to the extension's linear exactly where the own GEMM runs
    (elsewhere F.linear, on MKL)."""
    from fastrnn.backends import cpp

    monkeypatch.setenv("FASTRNN_CPP_OWN_GEMM", own)
    calls = []
    real = cpp.linear
    monkeypatch.setattr(cpp, "linear", lambda *a: calls.append(1) or real(*a))
    m = fastrnn.GRU(8, 16, backend="cpp")
    x = torch.randn(5, 3, 8, requires_grad=True)
    m(x)[0].sum().backward()
    assert len(calls) == (1 if own == "1" else 0)


def test_training_projection_double_backward_matches_torch(monkeypatch):
    """create_graph through the extension's linear: its backward runs ATen's differentiable mm, so a gradient penalty
    (the gradient of a gradient's norm) matches torch.nn's."""
    monkeypatch.setenv("FASTRNN_CPP_OWN_GEMM", "1")
    theirs, ours = _pair("RNN", {}, 6, 10)
    x0 = torch.randn(4, 20, 6, generator=torch.Generator().manual_seed(2))
    results = []
    for m in (ours, theirs):
        x = x0.clone().requires_grad_()
        (gx,) = torch.autograd.grad(m(x)[0].square().sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), [x, *m.parameters()]))
    for i, (a, e) in enumerate(zip(*results, strict=True)):
        assert_close(a, e, F32, 80, f"double backward result {i}")


@pytest.mark.parametrize("transposed", [False, True])
def test_linear_matches_f_linear(transposed):
    """fastrnn._C.linear against F.linear: outputs and every gradient, float32 and float64, strided input, no bias,
    and ATen's error for mismatched sizes."""
    from fastrnn import _C

    for dt in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(3)
        x0 = torch.randn(30, 70, generator=g, dtype=dt)
        x0 = x0.t().contiguous().t() if transposed else x0
        w0, b0 = torch.randn(33, 70, generator=g, dtype=dt), torch.randn(33, generator=g, dtype=dt)
        for bias in (True, False):
            outs = []
            for f in (_C.linear, torch.nn.functional.linear):
                x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
                y = f(x, w, b if bias else None)
                dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=dt)
                outs.append([y, *torch.autograd.grad(y, [x, w, b] if bias else [x, w], dy)])
            for i, (a, e) in enumerate(zip(*outs, strict=True)):
                assert_close(a, e, dt, 30, f"{dt} bias={bias} result {i}")
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        _C.linear(torch.randn(4, 5), torch.randn(3, 6), None)
