"""The op layer: torch.library checks on the custom ops, and torch.compile seeing no graph break."""

from __future__ import annotations

import pytest
import torch

import fastrnn
from fastrnn import ops
from fastrnn.cells import cell_for, spec
from tests.conftest import KERNEL_BACKENDS, interpreted, skip_unless_supported
from tests.helpers import assert_close


def _args(cell, backend, device, packed, reverse, proj, T=4, B=3, H=5, dtype=torch.float64):
    c = spec(cell)
    G = c.G
    P = 3 if proj else H
    r = lambda *s: torch.randn(*s, dtype=dtype, device=device, requires_grad=True)  # noqa: E731
    return (
        backend,
        cell,
        r(T, B, G * H),
        r(B, P),
        r(B, H) if c.has_cell_state else None,
        r(G * H, P),
        None if c.norm else r(G * H),
        r(P, H) if proj else None,
        r(c.norm_width * H) if c.norm else None,  # Norm.params
        (torch.rand(T, B, H, dtype=dtype, device=device) > 0.3).to(dtype) if c.norm else None,  # zoneout mask
        0.7,
        torch.tensor([3, 3, 2, 1])[:T] if packed else None,
        reverse,
        True,
    )


OPCHECK_CASES = [
    pytest.param("lstm", False, False, False, id="lstm"),
    pytest.param("lstm", True, True, True, id="lstm-packed-reverse-proj"),
    pytest.param("gru", True, False, False, id="gru-packed"),
    pytest.param("rnn_tanh", False, True, False, id="rnn_tanh-reverse"),
    pytest.param("rnn_relu", False, False, False, id="rnn_relu"),
    pytest.param("ln_lstm", True, True, False, id="ln_lstm-packed-reverse"),
    pytest.param("ln_gru", True, False, False, id="ln_gru-packed"),
]


@pytest.mark.parametrize("cell,packed,reverse,proj", OPCHECK_CASES)
def test_opcheck(kernel_backend, cell, packed, reverse, proj):
    backend = kernel_backend
    if interpreted(backend):
        pytest.skip("triton interpreter: opcheck replays the op many times; covered on CUDA")
    dtype = torch.float64 if backend != "triton" else torch.float32
    device = skip_unless_supported(backend, cell, dtype)
    args = _args(cell, backend, device, packed, reverse, proj, dtype=dtype)
    torch.library.opcheck(ops.recurrence_fwd, args)


def test_custom_ops_are_registered():
    assert hasattr(torch.ops.fastrnn, "recurrence_fwd") and hasattr(torch.ops.fastrnn, "recurrence_bwd")


class Model(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.lstm = fastrnn.LSTM(4, 6, num_layers=2, bidirectional=True, backend=backend)
        self.gru = fastrnn.GRU(12, 5, backend=backend)
        self.cell = fastrnn.RNNCell(5, 3, backend=backend)

    def forward(self, x):
        y, _ = self.lstm(x)
        y, h = self.gru(y)
        return self.cell(y[-1], h[0][:, :3] * 0 + 1).sum() + y.sum()


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b != "triton"])
def test_compile_fullgraph_matches_eager(backend):
    """fullgraph=True fails on any graph break, so this proves dynamo traces fastrnn end to end."""
    torch.manual_seed(0)
    m = Model(backend)
    x = torch.randn(5, 2, 4)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    want = m(x)
    want.backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    got = compiled(x)
    got.backward()
    assert_close(got, want, torch.float32, 5, "compiled output")
    for (n, p), g in zip(m.named_parameters(), grads):
        assert_close(p.grad, g, torch.float32, 5, f"compiled grad {n}")


def test_dynamo_explain_no_graph_break():
    m = Model("reference")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(m)(torch.randn(5, 2, 4))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compile_inductor_inference():
    torch.manual_seed(0)
    m = fastrnn.GRU(4, 6, num_layers=2).eval()
    x = torch.randn(5, 2, 4)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(m, fullgraph=True)(x)
        want = m(x)
    assert_close(got[0], want[0], torch.float32, 5, "inductor output")
    assert_close(got[1], want[1], torch.float32, 5, "inductor h_n")


def test_double_backward_raises_clearly_under_compile():
    """Under torch.compile a second derivative must fail loudly, never come back missing the recurrence's part."""
    m = fastrnn.GRU(3, 4, backend="reference").double()
    torch._dynamo.reset()
    m = torch.compile(m, backend="aot_eager")
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m(x)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        (g * g).sum().backward()


DOUBLE_BACKWARD = [
    pytest.param("LSTM", {"proj_size": 2}, id="lstm-proj"),
    pytest.param("GRU", {}, id="gru"),
    pytest.param("RNN", {"nonlinearity": "relu"}, id="rnn_relu"),
    pytest.param("LSTMCell", {}, id="lstmcell"),
]


@pytest.mark.parametrize("kind,extra", DOUBLE_BACKWARD)
def test_double_backward_matches_torch(kernel_backend, kind, extra):
    """Gradient penalties: d/dtheta of |d loss / d x|^2 equals torch.nn's, and gradgradcheck passes."""
    if interpreted(kernel_backend):
        pytest.skip("triton interpreter: covered on CUDA")
    device = skip_unless_supported(kernel_backend, cell_for(kind, extra.get("nonlinearity")).name, torch.float64)
    torch.manual_seed(0)
    layer = "Cell" not in kind
    kw = dict(bidirectional=True) if layer else {}
    ref = getattr(torch.nn, kind)(3, 4, **kw, **extra).double().to(device)
    fast = getattr(fastrnn, kind)(3, 4, **kw, **extra, backend=kernel_backend).double().to(device)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(*((5, 2, 3) if layer else (2, 3)), dtype=torch.float64, device=device, requires_grad=True)

    def penalty(m):
        y = m(x)
        y = y[0] if isinstance(y, tuple) else y
        (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), [x, *m.parameters()])

    for a, e in zip(penalty(fast), penalty(ref), strict=True):
        assert_close(a, e, torch.float64, name="second derivative")
    if layer:
        small = getattr(fastrnn, kind)(2, 3, **extra, backend=kernel_backend).double().to(device)
        xs = torch.randn(3, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda v: small(v)[0], (xs,))


def test_torch_lstm_still_compiles_beside_fastrnn():
    """fastrnn's dynamo rule is scoped to its own classes: torch's LSTM keeps torch's behaviour."""
    m = torch.nn.LSTM(3, 4)
    x = torch.randn(2, 1, 3)
    torch._dynamo.reset()
    out = torch.compile(m, backend="eager")(x)[0]
    assert torch._dynamo.config.allow_rnn is False
    assert_close(out, m(x)[0], torch.float32, 2, "torch LSTM under compile")
