"""The cpp backend's inference layer (csrc/recurrence.cpp layer_forward, backends/cpp.py layer_forward): an unpacked
layer that autograd does not record makes its input projection inside the extension, in one GEMM or in chunks of
steps. Taken where it should be, equal to torch.nn (float64 tight, float32 within its bound, bfloat16 within 2x
torch.nn's own error against float64) in one chunk and in many, and refusing bad arguments with an error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("fastrnn._C", reason="the C++ extension fastrnn._C is not built")

import fastrnn  # noqa: E402
from fastrnn import _C  # noqa: E402
from fastrnn.backends import cpp  # noqa: E402

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16

LAYERS = [
    pytest.param("LSTM", {}, id="lstm"),
    pytest.param("GRU", {"num_layers": 2, "bidirectional": True}, id="gru-2layer-bidir"),
    pytest.param("RNN", {"nonlinearity": "relu", "batch_first": True}, id="rnn-relu-batch-first"),
    pytest.param("LSTM", {"num_layers": 2, "bidirectional": True, "bias": False}, id="lstm-2layer-bidir-nobias"),
    pytest.param("GRU", {"bias": False, "batch_first": True}, id="gru-nobias-batch-first"),
    pytest.param("RNN", {"num_layers": 2}, id="rnn-tanh-2layer"),
]


def _pair(kind, extra, dtype, I=5, H=6):
    torch.manual_seed(0)
    theirs = getattr(nn, kind)(I, H, **extra).to(dtype)
    ours = getattr(fastrnn, kind)(I, H, **extra, backend="cpp").to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _inputs(theirs, dtype, T=7, B=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, theirs.input_size, generator=g) if theirs.batch_first else torch.randn(T, B, 5, generator=g)
    L = theirs.num_layers * (2 if theirs.bidirectional else 1)
    h0 = torch.randn(L, B, theirs.hidden_size, generator=g)
    hx = (h0, torch.randn(L, B, theirs.hidden_size, generator=g)) if isinstance(theirs, nn.LSTM) else h0
    cast = (lambda t: tuple(s.to(dtype) for s in t)) if isinstance(hx, tuple) else (lambda t: t.to(dtype))
    return x.to(dtype), cast(hx)


def _flat(out):
    o, hn = out
    return [o, *hn] if isinstance(hn, tuple) else [o, hn]


@pytest.fixture
def calls(monkeypatch):
    n = [0]
    real = cpp.layer_forward

    def counting(*args, **kwargs):
        n[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cpp, "layer_forward", counting)
    return n


@pytest.mark.parametrize("chunk", [None, "1", "3"], ids=["whole", "chunks-of-1", "chunks-of-3"])
@pytest.mark.parametrize("kind, extra", LAYERS)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_matches_torch(kind, extra, dtype, chunk, calls, monkeypatch):
    if chunk is not None:
        monkeypatch.setenv("FASTRNN_CPP_CHUNK_STEPS", chunk)
    theirs, ours = _pair(kind, extra, dtype)
    x, hx = _inputs(theirs, dtype)
    with torch.no_grad():
        want, got = _flat(theirs(x, hx)), _flat(ours(x, hx))
    layers = theirs.num_layers * (2 if theirs.bidirectional else 1)
    assert calls[0] == layers  # every layer and direction took the in-extension projection
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == F64 else {"atol": 2e-6, "rtol": 2e-6}
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("chunk", [None, "2"], ids=["whole", "chunks-of-2"])
@pytest.mark.parametrize("kind, extra", LAYERS)
def test_bfloat16_within_twice_torch_error(kind, extra, chunk, calls, monkeypatch):
    if chunk is not None:
        monkeypatch.setenv("FASTRNN_CPP_CHUNK_STEPS", chunk)
    theirs, ours = _pair(kind, extra, BF16, I=5, H=24)
    x, hx = _inputs(theirs, BF16, T=9)
    with torch.no_grad():
        want, got = _flat(theirs(x, hx)), _flat(ours(x, hx))
        exact = _flat(
            theirs.double()(x.double(), tuple(s.double() for s in hx) if isinstance(hx, tuple) else hx.double())
        )
    assert calls[0] > 0
    for w, g, e in zip(want, got, exact, strict=True):
        assert g.dtype == BF16
        own = (w.double() - e).abs().max().item()
        assert (g.double() - e).abs().max().item() <= max(2 * own, 1e-2)


def test_recorded_packed_and_streaming_calls_keep_their_paths(calls):
    theirs, ours = _pair("LSTM", {}, F32)
    x, hx = _inputs(theirs, F32)
    ours(x, hx)  # autograd records: the op layer
    with torch.no_grad():
        ours(nn.utils.rnn.pack_padded_sequence(x, [7, 5, 2]), hx)  # packed: the op layer
        ours(x[:1], hx)  # one step: the one-call Cell step
    assert calls[0] == 0
    with torch.no_grad():
        ours(x, hx)
    assert calls[0] == 1


@pytest.mark.parametrize(
    "args, msg",
    [
        (lambda x, w, h, c: (0, x[0], w[0], w[2], h, c, w[1], w[3]), r"x must have shape \[T, B, I\]"),
        (lambda x, w, h, c: (0, x, w[0][:, :2], w[2], h, c, w[1], w[3]), r"w_ih \[4H, I\]"),
        (lambda x, w, h, c: (0, x, w[0], w[2][:3], h, c, w[1], w[3]), r"b_ih \[4H\]"),
        (lambda x, w, h, c: (0, x, w[0], w[2], h[:1], c, w[1], w[3]), r"h0 \[B, P\]"),
        (lambda x, w, h, c: (0, x, w[0], w[2], h, None, w[1], w[3]), "c0 .* is required"),
        (lambda x, w, h, c: (0, x.double(), w[0], w[2], h, c, w[1], w[3]), "dtype"),
        (lambda x, w, h, c: (4, x, w[0], w[2], h, c, w[1], w[3]), "layer_forward runs the plain cells"),
        (lambda x, w, h, c: (0, x.transpose(0, 1), w[0], w[2], h, c, w[1], w[3]), "contiguous|shape"),
        (lambda x, w, h, c: (0, x, w[0], w[2], h, c, w[1].t().contiguous().t(), w[3]), r"w_hh \[4H, P\] must be cont"),
        (lambda x, w, h, c: (0, x, w[0], w[2], h, c, w[1].double(), w[3]), r"w_hh must have dtype"),
    ],
    ids=[
        "x-rank",
        "w_ih-shape",
        "b_ih-shape",
        "h0-shape",
        "lstm-without-c0",
        "x-dtype",
        "ln-cell",
        "x-strided",
        "w_hh-strided",
        "w_hh-dtype",
    ],  # fmt: skip
)
def test_extension_refuses_bad_arguments(args, msg):
    m = nn.LSTM(5, 6)
    w = [p.detach() for p in (m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0)]
    x, h, c = torch.randn(4, 3, 5), torch.randn(3, 6), torch.randn(3, 6)
    with pytest.raises(RuntimeError, match=msg):
        _C.layer_forward(*args(x, w, h, c), False)
