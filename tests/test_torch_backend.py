"""The `torch` backend: torch.nn's own kernels behind fastrnn's modules, equal to torch.nn bit for bit, and
selectable like any backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence

import fastrnn
from fastrnn import backends
from tests.helpers import assert_close, flat

LAYERS = [
    pytest.param("LSTM", {}, id="lstm"),
    pytest.param("LSTM", {"proj_size": 3}, id="lstm-proj"),
    pytest.param("GRU", {}, id="gru"),
    pytest.param("RNN", {"nonlinearity": "relu"}, id="rnn_relu"),
]
CELLS = [
    pytest.param("LSTMCell", {}, id="lstmcell"),
    pytest.param("GRUCell", {}, id="grucell"),
    pytest.param("RNNCell", {"nonlinearity": "tanh"}, id="rnncell"),
]


def _bitwise(fast, ref, make_inputs):
    """Outputs and every gradient of `fast` equal `ref`'s exactly (rtol = atol = 0)."""
    got, want = flat(fast(*make_inputs())), flat(ref(*make_inputs()))
    for a, e in zip(got, want, strict=True):
        assert_close(a, e, name="output", rtol=0, atol=0)
    torch.manual_seed(1)
    cot = [torch.randn_like(e) for e in want]
    ga = torch.autograd.grad(got, list(fast.parameters()), cot)
    gb = torch.autograd.grad(want, list(ref.parameters()), cot)
    for (n, _), a, e in zip(fast.named_parameters(), ga, gb, strict=True):
        assert_close(a, e, name=f"grad {n}", rtol=0, atol=0)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind,extra", LAYERS)
def test_layers_equal_torch_bit_for_bit(kind, extra, packed):
    torch.manual_seed(0)
    kw = dict(input_size=4, hidden_size=5, num_layers=2, bidirectional=True, **extra)
    ref = getattr(nn, kind)(**kw)
    fast = getattr(fastrnn, kind)(**kw, backend="torch")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 4)

    def inputs():
        return (pack_padded_sequence(x, [6, 4, 2], enforce_sorted=True),) if packed else (x,)

    _bitwise(fast, ref, inputs)


@pytest.mark.parametrize("kind,extra", CELLS)
def test_cells_equal_torch_bit_for_bit(kind, extra):
    torch.manual_seed(0)
    ref = getattr(nn, kind)(4, 5, **extra)
    fast = getattr(fastrnn, kind)(4, 5, **extra, backend="torch")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4)
    _bitwise(fast, ref, lambda: (x,))


def test_selectable_by_context_and_env(monkeypatch):
    torch.manual_seed(0)
    ref = nn.GRU(3, 4, batch_first=True)
    fast = fastrnn.GRU.from_torch(ref)
    x = pack_sequence([torch.randn(5, 3), torch.randn(2, 3)])
    want = ref(x)[0].data
    with fastrnn.use_backend("torch"):
        assert backends.select("gru", torch.float32, torch.device("cpu")) == "torch"
        assert torch.equal(fast(x)[0].data, want)
    monkeypatch.setenv("FASTRNN_BACKEND", "torch")
    assert torch.equal(fast(x)[0].data, want)


def test_autocast_matches_torch():
    torch.manual_seed(0)
    ref = nn.LSTM(8, 16)
    fast = fastrnn.LSTM.from_torch(ref, backend="torch")
    x = torch.randn(5, 2, 8)
    with torch.autocast("cpu", torch.bfloat16):
        a, e = fast(x)[0], ref(x)[0]
    assert a.dtype == e.dtype and torch.equal(a, e)
