"""Every backend against torch.nn with the same weights: outputs, final states and every gradient.

The layer and cell classes run with `backend=<name>`; torch.nn runs the same inputs and random cotangents.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from fastrnn.cells import cell_for, spec
from tests.conftest import BACKENDS_UNDER_TEST, interpreted, skip_unless_supported
from tests.helpers import assert_close, flat

F32, F64 = torch.float32, torch.float64


def cell_name(kind: str, kw: dict) -> str:
    return cell_for(kind, kw.get("nonlinearity", "tanh")).name


def has_c(kind: str) -> bool:
    """Whether the module's state is an (h, c) pair."""
    return cell_for(kind, "tanh").has_cell_state


def make_pair(kind: str, kw: dict, backend: str, dtype, device):
    ref = getattr(nn, kind)(**kw).to(device=device, dtype=dtype)
    fast = getattr(fastrnn, kind)(**kw, backend=backend).to(device=device, dtype=dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def make_hx(kind: str, kw: dict, B: int | None, dtype, device):
    L = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    H = kw["hidden_size"]
    P = kw.get("proj_size") or H
    shape = (L, B) if B is not None else (L,)
    h = torch.randn(*shape, P, dtype=dtype, device=device, requires_grad=True)
    if has_c(kind):
        return (h, torch.randn(*shape, H, dtype=dtype, device=device, requires_grad=True))
    return h


def fresh_leaves(state):
    """New leaf copies of a state (a tensor, or LSTM's (h, c)), so each module sees its own grad leaves."""
    if isinstance(state, tuple):
        return tuple(fresh_leaves(s) for s in state)
    return state.detach().clone().requires_grad_()


def compare_modules(ref, fast, make_inputs, dtype, T, cotangent_seed=0):
    """Run both modules on identical fresh inputs, backprop identical random cotangents, compare all."""
    results = []
    for m in (ref, fast):
        args = make_inputs()
        out = m(*args)
        outs = flat(out)
        g = torch.Generator().manual_seed(cotangent_seed)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device)).sum() for o in outs)
        leaves = [a for a in flat(args) if a.requires_grad]
        params = [p for _, p in m.named_parameters()]
        grads = torch.autograd.grad(loss, leaves + params, allow_unused=False)
        results.append((outs, grads, [n for n, _ in m.named_parameters()]))
    (ro, rg, names), (fo, fg, _) = results
    for i, (a, e) in enumerate(zip(fo, ro)):
        assert_close(a, e, dtype, T, f"output[{i}]")
    n_in = len(rg) - len(names)
    labels = [f"grad input[{i}]" for i in range(n_in)] + [f"grad {n}" for n in names]
    for label, a, e in zip(labels, fg, rg):
        assert_close(a, e, dtype, T, label)


LAYER_CASES = [
    pytest.param("LSTM", {}, id="lstm"),
    pytest.param("LSTM", {"proj_size": 3}, id="lstm-proj"),
    pytest.param("GRU", {}, id="gru"),
    pytest.param("RNN", {}, id="rnn_tanh"),
    pytest.param("RNN", {"nonlinearity": "relu"}, id="rnn_relu"),
]
CONFIGS = [
    pytest.param({}, id="1layer"),
    pytest.param({"num_layers": 2, "bidirectional": True}, id="2layer-bidir"),
    pytest.param({"num_layers": 3, "batch_first": True}, id="3layer-batchfirst"),
    pytest.param({"bias": False, "bidirectional": True}, id="nobias-bidir"),
]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind,extra", LAYER_CASES)
def test_layer(backend, kind, extra, config, with_hx, dtype):
    if interpreted(backend) and (not with_hx or config.get("num_layers", 1) == 3):
        pytest.skip("triton interpreter: covered by the smaller subset")
    kw = dict(input_size=5, hidden_size=7, **extra, **config)
    device = skip_unless_supported(backend, cell_name(kind, kw), dtype)
    T, B = (4, 3) if interpreted(backend) else (6, 3)
    torch.manual_seed(1)
    ref, fast = make_pair(kind, kw, backend, dtype, device)
    x = torch.randn(T, B, 5, dtype=dtype, device=device)
    if kw.get("batch_first"):
        x = x.transpose(0, 1).contiguous()
    hx = make_hx(kind, kw, B, dtype, device) if with_hx else None

    def inputs():
        return (x.clone().requires_grad_(),) + (() if hx is None else (fresh_leaves(hx),))

    compare_modules(ref, fast, inputs, dtype, T)


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind,extra", LAYER_CASES)
def test_packed(backend, kind, extra, dtype, enforce_sorted):
    kw = dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True, **extra)
    device = skip_unless_supported(backend, cell_name(kind, kw), dtype)
    lengths = torch.tensor([5, 5, 3, 2, 1]) if enforce_sorted else torch.tensor([2, 5, 1, 3, 5])
    if interpreted(backend):
        lengths = lengths.clamp(max=3)
    T, B = int(lengths.max()), len(lengths)
    torch.manual_seed(2)
    ref, fast = make_pair(kind, kw, backend, dtype, device)
    x = torch.randn(T, B, 4, dtype=dtype, device=device)
    hx = make_hx(kind, kw, B, dtype, device)

    def inputs():
        xi = x.clone().requires_grad_()
        p = pack_padded_sequence(xi, lengths, enforce_sorted=enforce_sorted)
        h = fresh_leaves(hx)
        return p, h

    compare_modules(ref, fast, inputs, dtype, T)
    # the packed result unpacks to zeros past each row's end, as torch's does
    out, _ = fast(pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted))
    padded, lens = pad_packed_sequence(out)
    assert torch.equal(lens, lengths)
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(padded[n:, b] == 0)


@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("kind,extra", LAYER_CASES)
def test_unbatched(backend, kind, extra, with_hx):
    kw = dict(input_size=3, hidden_size=5, num_layers=2, **extra)
    device = skip_unless_supported(backend, cell_name(kind, kw), F32)
    torch.manual_seed(3)
    ref, fast = make_pair(kind, kw, backend, F32, device)
    x = torch.randn(4, 3, device=device)
    hx = make_hx(kind, kw, None, F32, device) if with_hx else None

    def inputs():
        return (x.clone().requires_grad_(),) + (() if hx is None else (fresh_leaves(hx),))

    compare_modules(ref, fast, inputs, F32, 4)


@pytest.mark.parametrize("T,B,H,I", [(1, 1, 4, 3), (7, 2, 33, 9), (3, 5, 16, 16)], ids=["T1-B1", "T7-H33", "H16"])
@pytest.mark.parametrize("kind,extra", LAYER_CASES)
def test_odd_sizes(backend, kind, extra, T, B, H, I):
    if interpreted(backend) and H > 16:
        pytest.skip("triton interpreter: small shapes only")
    kw = dict(input_size=I, hidden_size=H, **extra)
    if kw.get("proj_size", 0) >= H:
        kw["proj_size"] = H - 1
    device = skip_unless_supported(backend, cell_name(kind, kw), F32)
    torch.manual_seed(4)
    ref, fast = make_pair(kind, kw, backend, F32, device)
    x = torch.randn(T, B, I, device=device)
    compare_modules(ref, fast, lambda: (x.clone().requires_grad_(),), F32, T)


CELL_CASES = [
    pytest.param("LSTMCell", {}, "lstm", id="lstmcell"),
    pytest.param("GRUCell", {}, "gru", id="grucell"),
    pytest.param("RNNCell", {}, "rnn_tanh", id="rnncell-tanh"),
    pytest.param("RNNCell", {"nonlinearity": "relu"}, "rnn_relu", id="rnncell-relu"),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", ["batched", "unbatched", "nohx"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind,extra,cell", CELL_CASES)
def test_cell(backend, kind, extra, cell, dtype, shape, bias):
    device = skip_unless_supported(backend, cell, dtype)
    torch.manual_seed(5)
    ref = getattr(nn, kind)(4, 6, bias=bias, **extra).to(device=device, dtype=dtype)
    fast = getattr(fastrnn, kind)(4, 6, bias=bias, **extra, backend=backend).to(device=device, dtype=dtype)
    fast.load_state_dict(ref.state_dict())
    lead = () if shape == "unbatched" else (3,)
    x = torch.randn(*lead, 4, dtype=dtype, device=device)
    hs = [torch.randn(*lead, 6, dtype=dtype, device=device) for _ in range(len(spec(cell).states))]

    def inputs():
        xi = x.clone().requires_grad_()
        if shape == "nohx":
            return (xi,)
        h = [t.clone().requires_grad_() for t in hs]
        return (xi, tuple(h) if spec(cell).has_cell_state else h[0])

    compare_modules(ref, fast, inputs, dtype, 1)


@pytest.mark.parametrize("packed", [True, False], ids=["packed-bidir", "padded-2layer"])
@pytest.mark.parametrize("kind,extra", LAYER_CASES)
def test_gradcheck_f64(backend, kind, extra, packed):
    """Finite differences in float64 through the whole module, input, hx and every parameter."""
    layout = {"bidirectional": True} if packed else {"num_layers": 2}
    kw = dict(input_size=3, hidden_size=4, **layout, **extra)
    device = skip_unless_supported(backend, cell_name(kind, kw), F64)
    torch.manual_seed(6)
    m = getattr(fastrnn, kind)(**kw, backend=backend).to(device=device, dtype=F64)
    names = [n for n, _ in m.named_parameters()]
    lengths = torch.tensor([4, 2, 1])
    x = torch.randn(4, 3, 3, dtype=F64, device=device, requires_grad=True)
    hx = make_hx(kind, kw, 3, F64, device)
    hx_leaves = list(hx) if has_c(kind) else [hx]

    def f(x, *rest):
        hs, ps = rest[: len(hx_leaves)], rest[len(hx_leaves) :]
        state = tuple(hs) if has_c(kind) else hs[0]
        inp = pack_padded_sequence(x, lengths) if packed else x
        out, h = torch.func.functional_call(m, dict(zip(names, ps)), (inp, state))
        return (*flat(out), *flat(h))

    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradcheck(f, (x, *hx_leaves, *params), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind,extra,cell", CELL_CASES)
def test_gradcheck_cell_f64(backend, kind, extra, cell):
    device = skip_unless_supported(backend, cell, F64)
    torch.manual_seed(11)
    m = getattr(fastrnn, kind)(3, 5, **extra, backend=backend).to(device=device, dtype=F64)
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(4, 3, dtype=F64, device=device, requires_grad=True)
    hs = [torch.randn(4, 5, dtype=F64, device=device, requires_grad=True) for _ in range(len(spec(cell).states))]

    def f(x, *rest):
        state = tuple(rest[: len(hs)]) if spec(cell).has_cell_state else rest[0]
        return tuple(flat(torch.func.functional_call(m, dict(zip(names, rest[len(hs) :])), (x, state))))

    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradcheck(f, (x, *hs, *params), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind,extra", LAYER_CASES)
def test_dropout(backend, kind, extra):
    """eval(): dropout off, equal to torch. train(): applied between layers, with torch's RNG draws."""
    kw = dict(input_size=4, hidden_size=6, num_layers=3, dropout=0.5, **extra)
    device = skip_unless_supported(backend, cell_name(kind, kw), F64)
    torch.manual_seed(7)
    ref, fast = make_pair(kind, kw, backend, F64, device)
    x = torch.randn(5, 2, 4, dtype=F64, device=device)
    ref.eval(), fast.eval()
    compare_modules(ref, fast, lambda: (x.clone().requires_grad_(),), F64, 5)
    ref.train(), fast.train()
    # padded and packed input (torch.nn drops out the packed rows between layers, and so must fastrnn)
    for what, inp in (("padded", x), ("packed", torch.nn.utils.rnn.pack_padded_sequence(x, [5, 3]))):
        torch.manual_seed(8)
        out_ref = flat(ref(inp))
        torch.manual_seed(8)
        out_fast = flat(fast(inp))
        for a, e in zip(out_fast, out_ref):
            assert_close(a, e, F64, 5, f"train-mode dropout output, {what} input")
    with torch.no_grad():
        assert not torch.allclose(fast.eval()(x)[0], flat(fast.train()(x))[0]), "train mode must apply dropout"


@pytest.mark.parametrize("kind,extra", LAYER_CASES)
def test_nan_propagates(backend, kind, extra):
    kw = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True, **extra)
    device = skip_unless_supported(backend, cell_name(kind, kw), F32)
    torch.manual_seed(9)
    ref, fast = make_pair(kind, kw, backend, F32, device)
    x = torch.randn(5, 2, 3, device=device)
    x[2, 1, 0] = float("nan")
    for a, e in zip(flat(fast(x)), flat(ref(x))):
        assert torch.equal(a.isnan(), e.isnan()), "NaN pattern differs from torch.nn"
        assert_close(a, e, F32, 5, "finite part")


@pytest.mark.parametrize("kind,extra", LAYER_CASES)
def test_non_contiguous(backend, kind, extra):
    """Inputs and states sliced out of wider tensors give the same results as contiguous copies."""
    kw = dict(input_size=3, hidden_size=5, num_layers=2, **extra)
    device = skip_unless_supported(backend, cell_name(kind, kw), F32)
    torch.manual_seed(10)
    m = getattr(fastrnn, kind)(**kw, backend=backend).to(device)
    wide = torch.randn(4, 3, 7, device=device)
    x = wide[:, :, 1:7:2]  # [4, 3, 3], strided
    assert not x.is_contiguous()
    hx = make_hx(kind, kw, 6, F32, device)
    hx = tuple(h.detach()[:, ::2] for h in hx) if has_c(kind) else hx.detach()[:, ::2]
    got = flat(m(x, hx))
    want = flat(m(x.contiguous(), tuple(h.contiguous() for h in hx) if has_c(kind) else hx.contiguous()))
    # Bit for bit where the backend owns its arithmetic on the views; reference and torch hand them to torch's
    # BLAS, where MKL picks its kernel by layout (on AMD a strided x rounds 1 ulp differently: 3e-8), so within
    # float32 rounding there: a stride mistake is off by O(1) either way.
    exact = {"rtol": 0, "atol": 0} if backend not in ("reference", "torch") else {}
    for a, e in zip(got, want):
        assert_close(a, e, F32, 4, "non-contiguous", **exact)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in memory that is not dense: a transposed copy's transpose, every other element of one."""
    t = t.detach()
    return t.t().contiguous().t() if t.dim() == 2 else torch.stack([t, t], -1)[..., 0]


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("kind,extra", LAYER_CASES)
def test_strided_parameters_and_states(backend, kind, extra, grad):
    """torch.nn runs on strided parameters (a transposed or tied weight) and states sliced out of wider tensors, in
    inference and in training; so does fastrnn, with torch.nn's results (the cpp inference path once read a
    strided w_hh as if dense)."""
    kw = dict(input_size=3, hidden_size=5, **extra)
    device = skip_unless_supported(backend, cell_name(kind, kw), F32)
    torch.manual_seed(11)
    ref, fast = make_pair(kind, kw, backend, F32, device)
    for m in (ref, fast):
        for name, p in list(m.named_parameters()):
            setattr(m, name, nn.Parameter(_strided(p)))
            assert not getattr(m, name).is_contiguous()
    x = torch.randn(4, 3, 3, device=device)
    h = torch.randn(1, 3, 2 * (kw.get("proj_size") or 5), device=device)[..., ::2]  # every other column
    hx = (h, torch.randn(1, 3, 10, device=device)[..., ::2]) if has_c(kind) else h
    with torch.set_grad_enabled(grad):
        for a, e in zip(flat(fast(x, hx)), flat(ref(x, hx)), strict=True):
            assert_close(a, e, F32, 4, "strided")


def test_backends_under_test_include_reference():
    assert "reference" in BACKENDS_UNDER_TEST


@pytest.mark.parametrize("kind,extra", LAYER_CASES)
def test_empty_batch(backend, kind, extra):
    """torch.nn accepts a batch of size 0; so does fastrnn, with the same shapes."""
    kw = dict(input_size=3, hidden_size=4, bidirectional=True, **extra)
    device = skip_unless_supported(backend, cell_name(kind, kw), F32)
    ref, fast = make_pair(kind, kw, backend, F32, device)
    x = torch.randn(5, 0, 3, device=device, requires_grad=True)
    for a, e in zip(flat(fast(x)), flat(ref(x))):
        assert a.shape == e.shape
    sum(t.sum() for t in flat(fast(x))).backward()  # a backward over no rows, both directions
    assert x.grad.shape == x.shape and all(p.grad is not None for p in fast.parameters())
