"""fastrnn.LayerNormLSTM / LayerNormGRU (torch.nn has no such cells): every backend against a plain-torch
statement of the formulas (tests/ln_oracle.py) on outputs, final states and every gradient, zoneout's training
and eval behaviour, the modules' parameters, initialisation and argument errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from tests import ln_oracle
from tests.conftest import KERNEL_BACKENDS, interpreted, skip_unless_supported
from tests.helpers import assert_close

KINDS = {"lstm": (fastrnn.LayerNormLSTM, "ln_lstm"), "gru": (fastrnn.LayerNormGRU, "ln_gru")}


def _module(kind, backend, dtype=torch.float64, I=3, H=4, seed=0, **kw):
    torch.manual_seed(seed)
    m = KINDS[kind][0](I, H, backend=backend, dtype=dtype, **kw)
    with torch.no_grad():  # move the gains and biases off their init so a wrong index shows
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    return m


def _run(kind, m, x, lengths, hx, packed, train_seed):
    """fastrnn's module and the oracle on the same input, masks and weights -> both (out [B,T,DH], h_n, c_n)."""
    m.train(train_seed is not None)
    if train_seed is not None:
        torch.manual_seed(train_seed)
    if packed:
        inp = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, hid = m(inp, hx)
        out = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]
    else:
        xm = x if m.batch_first else x.transpose(0, 1)
        out, hid = m(xm, hx)
        out = out if m.batch_first else out.transpose(0, 1)
    h_n, c_n = hid if kind == "lstm" else (hid, None)
    # the masks the module drew: one [T, B, H] per layer and direction, in that order, from the same seed
    L, D, T, B, H = m.num_layers, 1 + m.bidirectional, x.shape[1], x.shape[0], m.hidden_size
    if train_seed is not None and m.zoneout > 0:
        torch.manual_seed(train_seed)
        full = torch.full((T, B, H), 1 - m.zoneout, dtype=x.dtype)
        masks = [torch.bernoulli(full) for _ in range(L * D)]
    else:
        masks = [1.0 - m.zoneout] * (L * D)
    h0, c0 = hx if kind == "lstm" else (hx, None)
    ref = ln_oracle.run(kind, m, x, lengths, h0, c0, masks)
    return (out, h_n, c_n), ref


CASES = [
    # kind, layers, bidirectional, packed, zoneout, training, bias, batch_first
    pytest.param("lstm", 1, False, False, 0.0, False, True, False, id="lstm"),
    pytest.param("gru", 1, False, False, 0.0, False, True, True, id="gru-batch_first"),
    pytest.param("lstm", 2, True, True, 0.3, True, True, True, id="lstm-2layer-bidir-packed-zoneout-train"),
    pytest.param("gru", 2, True, True, 0.3, True, True, False, id="gru-2layer-bidir-packed-zoneout-train"),
    pytest.param("lstm", 1, True, False, 0.4, False, False, False, id="lstm-bidir-zoneout-eval-nobias"),
    pytest.param("gru", 1, False, True, 0.4, False, True, True, id="gru-packed-zoneout-eval"),
    pytest.param("gru", 1, True, False, 0.5, True, False, False, id="gru-bidir-zoneout-train-nobias"),
    pytest.param("lstm", 1, False, True, 1.0, True, True, True, id="lstm-packed-zoneout1-train"),
]


@pytest.mark.parametrize("kind,layers,bidir,packed,zoneout,training,bias,batch_first", CASES)
def test_backend_matches_formulas(kernel_backend, kind, layers, bidir, packed, zoneout, training, bias, batch_first):
    """Outputs, final states and every gradient (input, h0, c0, each parameter) against the oracle."""
    dtype = torch.float32 if kernel_backend == "triton" else torch.float64
    device = skip_unless_supported(kernel_backend, KINDS[kind][1], dtype)
    if interpreted(kernel_backend) and layers > 1:
        pytest.skip("triton interpreter: the one-layer cases")
    B, T, I, H = 3, 5, 3, 4
    m = _module(kind, kernel_backend, dtype, I, H, num_layers=layers, bidirectional=bidir, bias=bias,
                batch_first=batch_first, zoneout=zoneout).to(device)  # fmt: skip
    torch.manual_seed(1)
    x = torch.randn(B, T, I, dtype=dtype, device=device, requires_grad=True)
    lengths = [5, 3, 2] if packed else [T] * B
    D = 2 if bidir else 1
    h0 = torch.randn(layers * D, B, H, dtype=dtype, device=device, requires_grad=True)
    c0 = torch.randn(layers * D, B, H, dtype=dtype, device=device, requires_grad=True)
    hx = (h0, c0) if kind == "lstm" else h0
    mine, ref = _run(kind, m, x, lengths, hx, packed, 7 if training else None)
    cots = [torch.randn_like(t) for t in ref if t is not None]
    inputs = [x, h0] + ([c0] if kind == "lstm" else []) + list(m.parameters())
    names = ["input", "h0"] + (["c0"] if kind == "lstm" else []) + [n for n, _ in m.named_parameters()]
    got = torch.autograd.grad([t for t in mine if t is not None], inputs, cots)
    want = torch.autograd.grad([t for t in ref if t is not None], inputs, cots)
    tol = {} if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    for what, a, b in zip(("output", "h_n", "c_n"), mine, ref):
        if b is not None:
            assert_close(a, b, name=what, **tol)
    for name, a, b in zip(names, got, want):
        assert_close(a, b, name=f"d {name}", **tol)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b != "triton"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind, backend):
    """A float64 gradcheck of the whole module on the reference and the fused CPU backends (zoneout in eval, so
    the function is deterministic; packed, bidirectional)."""
    skip_unless_supported(backend, KINDS[kind][1], torch.float64)
    m = _module(kind, backend, I=2, H=3, bidirectional=True, zoneout=0.25).eval()
    params = list(m.parameters())
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    bs = torch.tensor([3, 2, 2, 1])

    def f(x, *ps):
        sd = dict(zip([n for n, _ in m.named_parameters()], ps))
        out, hid = torch.func.functional_call(m, sd, (nn.utils.rnn.PackedSequence(x.reshape(-1, 2)[:8], bs),))
        return out.data, hid[0] if kind == "lstm" else hid

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_zoneout_behaviour(kind):
    """Training: each element keeps its previous h with probability p, masks drawn fresh at each call; p = 1 keeps
    h0 at every step. Eval: h_t = p h_{t-1} + (1 - p) hbar_t, deterministic."""
    m = _module(kind, "reference", H=6, zoneout=1.0)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    h0 = torch.randn(1, 2, 6, dtype=torch.float64)
    hx = (h0, torch.randn_like(h0)) if kind == "lstm" else h0
    out, _ = m.train()(x, hx)
    assert torch.equal(out, h0.expand(5, 2, 6))
    m.zoneout = 0.5
    a, b = m(x, hx)[0], m(x, hx)[0]
    assert not torch.equal(a, b), "zoneout masks must be drawn fresh at each call"
    m.eval()
    assert torch.equal(m(x, hx)[0], m(x, hx)[0])
    m.zoneout = 0.0
    plain = m(x, hx)[0]
    m.zoneout = 0.5
    assert not torch.allclose(m(x, hx)[0], plain)


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_init_and_state_dict(kind):
    cls, cell = KINDS[kind]
    G = fastrnn.cells.spec(cell).G
    torch.manual_seed(3)
    m = cls(5, 7, num_layers=2, bidirectional=True)
    torch.manual_seed(3)
    t = getattr(nn, kind.upper())(5, 7, num_layers=2, bidirectional=True)
    sd, tsd = m.state_dict(), t.state_dict()
    for name, v in tsd.items():  # torch.nn's parameters: same names, shapes and initial values (same RNG draws)
        assert torch.equal(sd[name], v), name
    extra = sorted(set(sd) - set(tsd))
    want = ["ln_ih_weight", "ln_hh_weight"] + (["ln_c_weight", "ln_c_bias"] if kind == "lstm" else [])
    assert extra == sorted(f"{n}_l{k}{s}" for n in want for k in (0, 1) for s in ("", "_reverse"))
    for name in extra:
        shape = (7,) if name.startswith("ln_c") else (G * 7,)
        assert sd[name].shape == shape
        assert torch.equal(sd[name], torch.zeros(shape) if name.startswith("ln_c_bias") else torch.ones(shape))
    m2 = cls(5, 7, num_layers=2, bidirectional=True)
    m2.load_state_dict(sd)
    x = torch.randn(4, 2, 5)
    m.eval(), m2.eval()
    assert torch.equal(m(x)[0], m2(x)[0])
    assert "zoneout" not in repr(m) and "zoneout=0.2" in repr(cls(2, 3, zoneout=0.2))


@pytest.mark.parametrize("kind", KINDS)
def test_argument_errors(kind):
    cls = KINDS[kind][0]
    for bad in (-0.1, 1.5, "0.2", True):
        with pytest.raises(ValueError, match="zoneout"):
            cls(3, 4, zoneout=bad)
    with pytest.raises(ValueError):
        cls(3, 4, dropout=2.0)
    m = cls(3, 4)
    with pytest.raises(ValueError, match="2D or 3D"):
        m(torch.randn(2, 3, 3, 3))
    with pytest.raises(RuntimeError, match="input.size"):
        m(torch.randn(5, 2, 6))
    h_bad = torch.randn(1, 3, 4)
    with pytest.raises(RuntimeError, match="Expected hidden"):
        m(torch.randn(5, 2, 3), (h_bad, h_bad) if kind == "lstm" else h_bad)
    with pytest.raises(TypeError, match="no torch.nn counterpart"):
        m.to_torch()


@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_and_default_state(kind):
    """Unbatched input and hx=None behave as batched input of one row with zero states, as in torch.nn."""
    m = _module(kind, "reference").eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    out, hid = m(x)
    out_b, hid_b = m(x.unsqueeze(1))
    assert torch.equal(out, out_b.squeeze(1))
    h, hb = (hid[0], hid_b[0]) if kind == "lstm" else (hid, hid_b)
    assert h.shape == (1, 4) and torch.equal(h, hb.squeeze(1))


@pytest.mark.parametrize("kind", KINDS)
def test_float32_auto_backend(kind):
    """The automatic choice in float32 against the float64 oracle, at a longer sequence."""
    m64 = _module(kind, None, H=16, I=8, num_layers=2, zoneout=0.2).eval()
    m32 = copy.deepcopy(m64).float()
    x = torch.randn(24, 3, 8, dtype=torch.float64)
    out = m32(x.float())[0]
    zeros = torch.zeros(2, 3, 16, dtype=torch.float64)
    ref = ln_oracle.run(kind, m64, x.transpose(0, 1), [24] * 3, zeros, zeros if kind == "lstm" else None, [0.8, 0.8])
    assert_close(out, ref[0].transpose(0, 1), dtype=torch.float32, T=24)


def _haste_forward(kind, sd, x, h0, c0, zoneout):
    """haste's layers in eval mode, in haste's own layout (kernel [I, G*H], its gate order), written from the
    maths its documentation states; x [T, B, I]."""
    G = 4 if kind == "lstm" else 3
    H = sd["recurrent_kernel"].shape[0]

    def ln(v, w, b=None):
        return nn.functional.layer_norm(v, (v.shape[-1],), w, b, 1e-5)

    wx = ln(x @ sd["kernel"], sd["gamma"][0])
    h, c, outs = h0, c0, []
    for t in range(x.shape[0]):
        if kind == "lstm":
            v = ln(h @ sd["recurrent_kernel"], sd["gamma"][1]) + wx[t] + sd["bias"]
            i, g, f, o = v.chunk(G, 1)
            c = f.sigmoid() * c + i.sigmoid() * g.tanh()
            new = o.sigmoid() * ln(c, sd["gamma_h"], sd["beta_h"]).tanh()
        else:
            vx = (wx[t] + sd["bias"]).chunk(G, 1)
            vh = (ln(h @ sd["recurrent_kernel"], sd["gamma"][1]) + sd["recurrent_bias"]).chunk(G, 1)
            z, r = (vx[0] + vh[0]).sigmoid(), (vx[1] + vh[1]).sigmoid()
            new = z * h + (1 - z) * (vx[2] + r * vh[2]).tanh()
        h = zoneout * h + (1 - zoneout) * new
        outs.append(h)
    assert H == h.shape[1]
    return torch.stack(outs)


@pytest.mark.parametrize("kind", KINDS)
def test_haste_state_dict_round_trip(kind):
    """haste -> fastrnn -> haste is the identity, and fastrnn loaded from haste computes haste's function."""
    from fastrnn import haste

    G, I, H = (4 if kind == "lstm" else 3), 3, 5
    torch.manual_seed(0)
    r = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    sd = {"kernel": r(I, G * H), "recurrent_kernel": r(H, G * H), "bias": r(G * H), "gamma": 1 + 0.3 * r(2, G * H)}
    if kind == "lstm":
        sd["gamma_h"], sd["beta_h"] = 1 + 0.3 * r(H), 0.3 * r(H)
    else:
        sd["recurrent_bias"] = r(G * H)
    m = KINDS[kind][0](I, H, zoneout=0.25, dtype=torch.float64).eval()
    m.load_state_dict(haste.from_haste(sd, kind))  # strict: every parameter of the module, nothing else
    back = haste.to_haste(m.state_dict(), kind)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    x, h0 = r(6, 2, I), r(2, H)
    c0 = r(2, H) if kind == "lstm" else None
    out = m(x, (h0[None], c0[None]) if kind == "lstm" else h0[None])[0]
    assert_close(out, _haste_forward(kind, sd, x, h0, c0, 0.25))
    again = KINDS[kind][0](I, H, zoneout=0.25, dtype=torch.float64).eval()  # fastrnn -> haste -> fastrnn: same function
    again.load_state_dict(haste.from_haste(haste.to_haste(m.state_dict(), kind), kind))
    assert_close(again(x, (h0[None], c0[None]) if kind == "lstm" else h0[None])[0], out)


@pytest.mark.parametrize("kind", KINDS)
def test_record_gates_and_states(kind):
    """fastrnn.record() keeps every gate and state at every step of the normalised cells: h is the output, c and
    the gates are what the formulas give (recomputed here from the recorded h and c of the step before)."""
    m = _module(kind, "reference", num_layers=2, bidirectional=True).eval()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with fastrnn.record() as rec:
        out, _ = m(x)
    st = rec[m]
    H = 4
    assert st.h.shape == (2, 2, 5, 2, H) and set(st.gates) == set(fastrnn.cells.spec(KINDS[kind][1]).gates)
    assert torch.equal(st.h[1].permute(1, 2, 0, 3).reshape(5, 2, 2 * H), out)
    p = {n[: -len("_l0")]: v for n, v in m.named_parameters() if n.endswith("_l0")}
    N = ln_oracle.N
    h_prev = torch.zeros(2, H, dtype=torch.float64)
    for t in range(2):  # layer 0, forward direction, the first steps
        if kind == "lstm":
            a = p["ln_ih_weight"] * N(x[t] @ p["weight_ih"].t()) + p["bias_ih"]
            a = a + p["ln_hh_weight"] * N(h_prev @ p["weight_hh"].t()) + p["bias_hh"]
            i, f, g, o = a.chunk(4, -1)
            assert_close(st.gates["f"][0, 0, t], f.sigmoid(), name="f")
            assert_close(st.gates["g"][0, 0, t], g.tanh(), name="g")
            assert st.c is not None and st.c.shape == st.h.shape
        else:
            ax = p["ln_ih_weight"] * N(x[t] @ p["weight_ih"].t()) + p["bias_ih"]
            ah = p["ln_hh_weight"] * N(h_prev @ p["weight_hh"].t()) + p["bias_hh"]
            assert_close(st.gates["z"][0, 0, t], (ax + ah).chunk(3, -1)[1].sigmoid(), name="z")
        h_prev = st.h[0, 0, t]


@pytest.mark.parametrize("kind", KINDS)
def test_export_and_compile(kind):
    """torch.export traces the reference's plain torch ops (torch.nn has no such cell to call); torch.compile
    (fullgraph) runs fastrnn's custom op, forward and backward, equal to eager."""
    m = _module(kind, None, torch.float32, num_layers=2).eval()
    x = torch.randn(5, 2, 3)
    want = m(x)[0]
    assert_close(torch.export.export(m, (x,)).module()(x)[0], want, rtol=1e-6, atol=1e-6, name="export")
    xg = x.clone().requires_grad_()
    got = torch.compile(m, fullgraph=True)(xg)[0]
    assert_close(got, want, torch.float32, 5, name="compile")  # inductor's layer norm of W_ih x rounds its own way
    (g,) = torch.autograd.grad(got.sum(), xg)
    xe = x.clone().requires_grad_()
    (e,) = torch.autograd.grad(m(xe)[0].sum(), xe)
    assert_close(g, e, torch.float32, 5, name="compile d input")
    with pytest.raises(RuntimeError, match="cannot be scripted"):
        torch.jit.script(m)
