"""fastrnn.record and fastrnn.inspect: every recorded gate and state against a step-by-step recomputation from the
module's weights in plain torch (the formulas stated once more here, independently of the backends), recording
leaving outputs, gradients and the random generator untouched, and the plots and LSTMVis export."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import matplotlib
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from fastrnn import inspect as fi
from fastrnn.cells import cell_for, spec
from tests.conftest import BACKENDS_UNDER_TEST
from tests.helpers import assert_close

matplotlib.use("Agg")

F64 = torch.float64
BACKENDS = [b for b in ("reference", "cpp", "numba", "torch") if b in BACKENDS_UNDER_TEST]
PACKED_LENGTHS = [3, 6, 2, 5]  # unsorted, so the module sorts and unsorts rows


# ---- the formulas, once more: torch.nn's documentation, one row and one step at a time ----


def _lin(x, w, b):
    return x @ w.t() + (0 if b is None else b)


def _lstm(w, x, h, c):
    i, f, g, o = (_lin(x, w["ih"], w["b_ih"]) + _lin(h, w["hh"], w["b_hh"])).chunk(4, -1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c = f * c + i * g
    h = o * c.tanh()
    if w["hr"] is not None:
        h = h @ w["hr"].t()
    return h, c, {"i": i, "f": f, "g": g, "o": o}


def _gru(w, x, h, c):
    xr, xz, xn = _lin(x, w["ih"], w["b_ih"]).chunk(3, -1)
    hr, hz, hn = _lin(h, w["hh"], w["b_hh"]).chunk(3, -1)
    r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
    n = (xn + r * hn).tanh()
    return (1 - z) * n + z * h, None, {"r": r, "z": z, "n": n}


def _elman(act):
    return lambda w, x, h, c: (act(_lin(x, w["ih"], w["b_ih"]) + _lin(h, w["hh"], w["b_hh"])), None, {})


FORMULAS = {"lstm": _lstm, "gru": _gru, "rnn_tanh": _elman(torch.tanh), "rnn_relu": _elman(torch.relu)}


def _weights(m, sfx=""):
    g = lambda n: getattr(m, n + sfx, None)  # noqa: E731 - local shorthand
    return dict(ih=g("weight_ih"), hh=g("weight_hh"), b_ih=g("bias_ih"), b_hh=g("bias_hh"), hr=g("weight_hr"))


def _cell_of(m) -> str:
    return cell_for(m._torch_class.__name__, getattr(m, "nonlinearity", None)).name


@torch.no_grad()
def oracle(m, x, lengths, hx=None):
    """Every step of layer module `m` on x [T, B, I] (time-major, the caller's rows) with row b running for
    lengths[b] steps: h [L, D, T, B, P], c (or None), gates {name: [L, D, T, B, H]}; zeros past each length."""
    step = FORMULAS[_cell_of(m)]
    L, D, (T, B) = m.num_layers, 2 if m.bidirectional else 1, x.shape[:2]
    H, P = m.hidden_size, m.proj_size or m.hidden_size
    h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
    hs, cs, gates, has_c = x.new_zeros(L, D, T, B, P), x.new_zeros(L, D, T, B, H), {}, False
    inp = x
    for layer in range(L):
        for d in range(D):
            w = _weights(m, f"_l{layer}" + ("_reverse" if d else ""))
            for b in range(B):
                h = x.new_zeros(P) if h0 is None else h0[layer * D + d, b]
                c = x.new_zeros(H) if c0 is None else c0[layer * D + d, b]
                for t in range(lengths[b] - 1, -1, -1) if d else range(lengths[b]):
                    h, c_new, g = step(w, inp[t, b], h, c)
                    hs[layer, d, t, b] = h
                    if c_new is not None:
                        c = cs[layer, d, t, b] = c_new
                        has_c = True
                    for name, v in g.items():
                        gates.setdefault(name, x.new_zeros(L, D, T, B, H))[layer, d, t, b] = v
        inp = torch.cat(list(hs[layer]), -1)  # [T, B, D*P]
    return SimpleNamespace(h=hs, c=cs if has_c else None, gates=gates)


def assert_states(got: fastrnn.States, want, lengths, what=""):
    T, B = got.h.shape[2:4]
    assert torch.equal(got.lengths, torch.tensor(lengths, dtype=torch.int64)), f"{what} lengths {got.lengths}"
    assert got.lengths.dtype == torch.int64
    assert list(got.gates) == list(want.gates), f"{what} gate names/order {list(got.gates)}"
    pairs = [("h", got.h, want.h)] + [(f"gate {k}", got.gates[k], want.gates[k]) for k in want.gates]
    if want.c is None:
        assert got.c is None, f"{what} c should be None"
    else:
        pairs.append(("c", got.c, want.c))
    past = ~got.mask()
    for name, a, e in pairs:
        assert_close(a, e, F64, T, f"{what} {name}")
        assert (a[:, :, past] == 0).all(), f"{what} {name}: steps past a row's length must hold zeros"


# ---- layers ----

LAYER_CASES = [
    pytest.param("LSTM", dict(num_layers=2, bidirectional=True), "padded", True, id="lstm-2layer-bidir-hx"),
    pytest.param("LSTM", dict(num_layers=2, proj_size=3), "padded", False, id="lstm-proj"),
    pytest.param(
        "LSTM", dict(num_layers=2, bidirectional=True, proj_size=2), "packed", True, id="lstm-proj-bidir-packed"
    ),
    pytest.param("LSTM", dict(batch_first=True, bias=False), "padded", True, id="lstm-batchfirst-nobias"),
    pytest.param("LSTM", {}, "unbatched", True, id="lstm-unbatched"),
    pytest.param("GRU", dict(num_layers=2, bidirectional=True), "packed", True, id="gru-2layer-bidir-packed"),
    pytest.param("GRU", dict(batch_first=True, num_layers=2), "padded", False, id="gru-batchfirst"),
    pytest.param("GRU", {}, "unbatched", False, id="gru-unbatched"),
    pytest.param("RNN", dict(bidirectional=True), "padded", True, id="rnn_tanh-bidir"),
    pytest.param("RNN", dict(nonlinearity="relu", num_layers=2), "packed", False, id="rnn_relu-packed"),
]


def _hx(m, B, unbatched):
    L, D = m.num_layers, 2 if m.bidirectional else 1
    h = torch.randn(L * D, B, m.proj_size or m.hidden_size, dtype=F64)
    state = (h, torch.randn(L * D, B, m.hidden_size, dtype=F64)) if spec(_cell_of(m)).has_cell_state else h
    if not unbatched:
        return state, state
    return state, (tuple(s[:, 0] for s in state) if isinstance(state, tuple) else state[:, 0])


def _call(m, x, mode, hx_arg):
    """m on x [T, B, I] given as `mode` -> output as padded time-major [T, B, D*P], and the lengths."""
    T, B = x.shape[:2]
    if mode == "packed":
        out = m(pack_padded_sequence(x, PACKED_LENGTHS, enforce_sorted=False), hx_arg)[0]
        return pad_packed_sequence(out)[0], PACKED_LENGTHS
    if mode == "unbatched":
        return m(x[:, 0], hx_arg)[0].unsqueeze(1), [T]
    out = m(x.transpose(0, 1) if m.batch_first else x, hx_arg)[0]
    return (out.transpose(0, 1) if m.batch_first else out), [T] * B


@pytest.mark.parametrize("kind,kw,mode,with_hx", LAYER_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_states_match_formulas(backend, kind, kw, mode, with_hx):
    torch.manual_seed(0)
    m = getattr(fastrnn, kind)(3, 4, backend=backend, **kw).double()
    T, B = 6, 1 if mode == "unbatched" else len(PACKED_LENGTHS)
    x = torch.randn(T, B, 3, dtype=F64)
    hx, hx_arg = _hx(m, B, mode == "unbatched") if with_hx else (None, None)
    with fastrnn.record() as rec:
        out, lengths = _call(m, x, mode, hx_arg)
    got = rec[m]
    D = 2 if m.bidirectional else 1
    assert got.h.shape == (m.num_layers, D, T, B, m.proj_size or m.hidden_size)
    assert_states(got, oracle(m, x, lengths, hx), lengths, f"{backend} {kind}")
    top = torch.cat(list(got.h[-1]), -1)  # the last layer's h, both directions, is the module's output
    assert_close(top, out, F64, T, "last layer's h vs the output")
    assert len(rec.calls(m)) == 1 and list(rec) == [m]


# ---- cells: each call a step ----

CELL_CASES = [
    pytest.param("LSTMCell", {}, id="lstmcell"),
    pytest.param("GRUCell", {}, id="grucell"),
    pytest.param("RNNCell", {}, id="rnncell-tanh"),
    pytest.param("RNNCell", dict(nonlinearity="relu", bias=False), id="rnncell-relu-nobias"),
]


@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
@pytest.mark.parametrize("kind,kw", CELL_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_calls_stack_along_time(backend, kind, kw, unbatched):
    torch.manual_seed(1)
    m = getattr(fastrnn, kind)(3, 5, backend=backend, **kw).double()
    step = FORMULAS[_cell_of(m)]
    has_c = spec(_cell_of(m)).has_cell_state
    T, B = 5, 1 if unbatched else 3
    xs = torch.randn(T, B, 3, dtype=F64)
    state = None
    with fastrnn.record() as rec:
        for t in range(T):
            xt = xs[t, 0] if unbatched else xs[t]
            state = m(xt, state)
    want_h, want_c, want_g = torch.zeros(T, B, 5, dtype=F64), torch.zeros(T, B, 5, dtype=F64), {}
    h = c = torch.zeros(B, 5, dtype=F64)
    with torch.no_grad():
        for t in range(T):
            h, c_new, g = step(_weights(m), xs[t], h, c)
            want_h[t] = h
            if c_new is not None:
                c = want_c[t] = c_new
            for name, v in g.items():
                want_g.setdefault(name, torch.zeros(T, B, 5, dtype=F64))[t] = v
    one = lambda x: x[None, None]  # noqa: E731 - L = D = 1
    want = SimpleNamespace(
        h=one(want_h), c=one(want_c) if has_c else None, gates={k: one(v) for k, v in want_g.items()}
    )
    assert_states(rec[m], want, [T] * B, f"{backend} {kind}")
    calls = rec.calls(m)
    assert len(calls) == T and all(s.h.shape == (1, 1, 1, B, 5) for s in calls)
    assert all(torch.equal(s.h, rec[m].h[:, :, t : t + 1]) for t, s in enumerate(calls))


def test_cell_calls_of_different_batch_sizes_do_not_stack():
    m = fastrnn.GRUCell(3, 4, backend="reference")
    with fastrnn.record() as rec:
        m(torch.randn(2, 3))
        m(torch.randn(5, 3))
    with pytest.raises(ValueError, match="batch sizes"):
        rec[m]
    assert [s.h.shape[3] for s in rec.calls(m)] == [2, 5]


# ---- a module inside a model, after fastrnn.convert ----


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 3)
        self.rnn = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        return self.head(self.rnn(self.emb(ids))[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_inside_converted_model(backend):
    torch.manual_seed(2)
    model = fastrnn.convert(Tagger().double(), backend=backend)
    a, b = torch.randint(0, 11, (5, 2)), torch.randint(0, 11, (7, 3))
    with fastrnn.record() as rec:
        model(a)
        model(b)
    calls = rec.calls(model.rnn)
    assert len(calls) == 2
    for ids, s in zip((a, b), calls):
        assert_states(
            s, oracle(model.rnn, model.emb(ids).detach(), [ids.shape[0]] * ids.shape[1]), [ids.shape[0]] * ids.shape[1]
        )
    assert torch.equal(rec[model.rnn].h, calls[-1].h)
    with pytest.raises(KeyError, match="Tagger"):
        rec[model]  # only fastrnn modules record


# ---- recording changes nothing ----


@pytest.mark.parametrize("mode", ["no_grad", "train"])
@pytest.mark.parametrize("inp", ["padded", "packed"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_recording_changes_no_output_gradient_or_random_draw(backend, kind, inp, mode):
    """Same outputs, final states and gradients bit for bit, and the random generator left where it would be.
    In training the module has inter-layer dropout, so the masks must come out the same too."""
    train = mode == "train"
    torch.manual_seed(3)
    m = getattr(fastrnn, kind)(4, 6, num_layers=2, bidirectional=True, dropout=0.4 if train else 0.0, backend=backend)
    m.train(train)
    x0 = torch.randn(6, 4, 4)

    def run(recording):
        torch.manual_seed(4)
        x = x0.clone().requires_grad_(train)
        arg = pack_padded_sequence(x, PACKED_LENGTHS, enforce_sorted=False) if inp == "packed" else x
        with fastrnn.record() if recording else contextlib.nullcontext() as rec, torch.set_grad_enabled(train):
            out, hidden = m(arg)
        drawn = torch.rand(4)
        out = pad_packed_sequence(out)[0] if inp == "packed" else out
        flat = [out, *(hidden if isinstance(hidden, tuple) else (hidden,))]
        grads = []
        if train:
            loss = sum((t * torch.randn_like(t)).sum() for t in flat)
            grads = torch.autograd.grad(loss, [x, *m.parameters()])
        return flat, grads, drawn, rec

    base, rec_run = run(False), run(True)
    for name, got, want in zip(("outputs", "gradients"), rec_run[:2], base[:2]):
        assert len(got) == len(want)
        for i, (a, e) in enumerate(zip(got, want)):
            assert torch.equal(a, e), f"{name}[{i}] changed by recording (max diff {(a - e).abs().max():.3g})"
    assert torch.equal(rec_run[2], base[2]), "recording moved the random generator"
    s = rec_run[3][m]
    # the recorded top layer is the output: the very dropout masks of the call (torch: its rerun on reference)
    assert_close(torch.cat(list(s.h[-1]), -1), rec_run[0][0], torch.float32, 6, "last layer's h vs output")
    assert not s.h.requires_grad and all(not g.requires_grad for g in s.gates.values())


def test_recorded_tensors_are_copies():
    m = fastrnn.RNN(3, 4, backend="reference")
    with fastrnn.record() as rec:
        out, _ = m(torch.randn(5, 2, 3))
    kept = rec[m].h.clone()
    out.mul_(0)
    assert torch.equal(rec[m].h, kept)


# ---- where nothing is recorded ----


def test_keyerror_outside_a_block_and_nesting():
    m, n = fastrnn.GRU(3, 4, backend="reference"), fastrnn.LSTM(3, 4, backend="reference")
    x = torch.randn(5, 2, 3)
    m(x)  # before any block: kept nowhere
    with fastrnn.record() as outer:
        with pytest.raises(KeyError, match="GRU"):
            outer[m]
        with fastrnn.record() as inner:
            m(x)
        n(x)
    n(x)  # after the block: not kept
    assert not fi.RECORDING
    assert len(outer.calls(m)) == 1 and len(inner.calls(m)) == 1
    assert len(outer.calls(n)) == 1 and n not in inner
    with pytest.raises(KeyError):
        inner[n]
    with pytest.raises(KeyError):
        inner.calls(n)


def test_other_threads_calls_are_not_recorded():
    m = fastrnn.GRU(3, 4, backend="reference")
    x = torch.randn(5, 2, 3)
    with fastrnn.record() as rec:
        t = threading.Thread(target=m, args=(x,))
        t.start()
        t.join()
        assert m not in rec
        m(x)
    assert len(rec.calls(m)) == 1


def test_compile_fullgraph_unaffected():
    m = fastrnn.LSTM(3, 4, backend="reference")
    x = torch.randn(5, 2, 3)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x)[0], m(x)[0])
    with fastrnn.record() as rec:
        assert torch.equal(compiled(x)[0], m(x)[0])
    assert len(rec.calls(m)) == 1  # the eager call; traced calls are not recorded


def test_import_stays_light():
    code = "import sys, fastrnn; print(sorted({'matplotlib', 'h5py'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "[]"


# ---- numbers ----


def _synthetic(cell="lstm", L=1, D=1, T=6, B=3, H=4, lengths=(6, 4, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    mask = torch.arange(T)[:, None] < lengths[None, :]
    z = lambda x: x * mask[None, None, :, :, None]  # noqa: E731 - zero past each length, as recorded
    c = spec(cell)
    gates = {}
    for name, floor in fi._gate_floor(cell).items():
        gates[name] = z(floor + (1 - floor) * torch.rand(L, D, T, B, H, generator=g, dtype=F64))
    h = z(torch.rand(L, D, T, B, H, generator=g, dtype=F64) * 2 - 1)
    return fastrnn.States(h, h.clone() if c.has_cell_state else None, gates, lengths, cell)


def test_gate_ranges_read_from_the_formulas():
    assert fi._gate_floor("lstm") == {"i": 0.0, "f": 0.0, "g": -1.0, "o": 0.0}
    assert fi._gate_floor("gru") == {"r": 0.0, "z": 0.0, "n": -1.0}
    assert fi._gate_floor("rnn_tanh") == {}


def test_saturation_counts_valid_steps():
    s = _synthetic("gru", L=2, D=2)
    sat = fi.saturation(s)
    assert list(sat) == ["r", "z", "n"]
    mask = s.mask()
    for name, (left, right) in sat.items():
        lo = -1.0 if name == "n" else 0.0
        v = s.gates[name]
        for layer, d, u in [(0, 0, 0), (1, 1, 3), (0, 1, 2)]:
            vals = v[layer, d][mask][:, u]
            assert left[layer, d, u] == (vals < lo + 0.1 * (1 - lo)).double().mean()
            assert right[layer, d, u] == (vals > lo + 0.9 * (1 - lo)).double().mean()
    assert fi.saturation(_synthetic("rnn_tanh")) == {}


def test_rank_units_pearson_over_valid_steps():
    s = _synthetic("lstm", H=6)
    mask = s.mask()
    signal = torch.randn(mask.shape, dtype=F64)
    h = s.h.clone()
    h[0, 0, :, :, 4] = (3 * signal + 1) * mask  # unit 4 is the signal itself
    h[0, 0, :, :, 1] = (-signal + 0.3 * h[0, 0, :, :, 1]) * mask
    h[0, 0, :, :, 5] = 0.5 * mask  # constant: no correlation defined
    s = fastrnn.States(h, s.c, s.gates, s.lengths, s.cell)
    rank = fi.rank_units(s, signal)
    assert rank.units[0] == 4 and rank.r[0] == pytest.approx(1.0)
    assert rank.units[1] == 1 and rank.r[1] < -0.8
    assert rank.units[-1] == 5 and rank.r[-1].isnan()
    for u, r in zip(rank.units[:-1].tolist(), rank.r[:-1].tolist()):
        x, y = h[0, 0, :, :, u][mask], signal[mask]
        assert r == pytest.approx(torch.corrcoef(torch.stack([x, y]))[0, 1].item(), abs=1e-12)
    ragged = [signal[:n, b].tolist() for b, n in enumerate(s.lengths.tolist())]  # one sequence per row
    assert torch.equal(fi.rank_units(s, ragged).units, rank.units)
    with pytest.raises(ValueError, match="row 1"):
        fi.rank_units(s, [r[:-1] if b == 1 else r for b, r in enumerate(ragged)])
    with pytest.raises(ValueError, match=r"\[T, B\]"):
        fi.rank_units(s, signal.t())


# ---- plots ----


def test_heatmap_and_saturation_plots_write_files(tmp_path):
    torch.manual_seed(5)
    m = fastrnn.LSTM(3, 8, num_layers=2, backend="reference")
    text = "a (b) c"
    with fastrnn.record() as rec:
        m(torch.randn(len(text), 1, 3))
    s = rec[m]
    fig = fi.heatmap(s, tmp_path / "heat.png", units=[1, 5, 2], tokens=list(text), layer=1)
    assert (tmp_path / "heat.png").stat().st_size > 1000
    shown = fig.axes[0].images[0].get_array()
    assert torch.allclose(torch.as_tensor(shown.data), s.h[1, 0, :, 0][:, [1, 5, 2]].t())
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "␣", "(", "b", ")", "␣", "c"]
    fig = fi.heatmap(s, tmp_path / "gate.png", state="f", steps=(2, 5))
    assert fig.axes[0].images[0].get_array().shape == (8, 3)
    fig = fi.heatmap(s, state="c", units=[0, 3], per_unit=True)
    shown = torch.as_tensor(fig.axes[0].images[0].get_array().data)
    want = s.c[-1, 0, :, 0][:, [0, 3]].t()  # default: the last layer
    assert torch.allclose(shown, want / want.abs().amax(1, keepdim=True))
    with pytest.raises(KeyError, match="has h, c, i, f, g, o"):
        fi.heatmap(s, state="r")
    fig = fi.plot_saturation(s, tmp_path / "sat.png")
    assert (tmp_path / "sat.png").stat().st_size > 1000
    assert [ax.get_title() for ax in fig.axes] == ["gate i", "gate f", "gate g", "gate o"]
    with fastrnn.record() as rec:
        rnn = fastrnn.RNN(3, 4, backend="reference")
        rnn(torch.randn(4, 1, 3))
    with pytest.raises(ValueError, match="no gates"):
        fi.plot_saturation(rec[rnn])


# ---- LSTMVis ----


def _read_lstm_yml(path):
    """lstm.yml as a dict: PyYAML when installed, otherwise a reader for the subset to_lstmvis writes (mappings
    by indentation, one flow list of flow mappings)."""
    text = path.read_text(encoding="utf-8")
    try:
        import yaml
    except ModuleNotFoundError:
        yaml = None
    if yaml is not None:
        return yaml.safe_load(text)
    root: dict = {}
    section = None
    lines = iter(text.splitlines())
    for line in lines:
        if not line.strip():
            continue
        key, _, value = line.strip().partition(":")
        value = value.strip()
        if not line.startswith(" "):
            if value:
                root[key] = value.strip('"')
            else:
                section = root[key] = {}
        elif value == "[":
            items = []
            for item in lines:
                if item.strip() == "]":
                    break
                body = item.strip().rstrip(",").strip("{}")
                items.append({k.strip(): v.strip() for k, v in (kv.split(":") for kv in body.split(","))})
            section[key] = items
        else:
            section[key] = value
    for t in root.get("states", {}).get("types", []):
        t["layer"] = int(t["layer"])
    return root


@pytest.mark.parametrize("backend", ["reference", "cpp"] if "cpp" in BACKENDS else ["reference"])
def test_to_lstmvis_files_read_back(tmp_path, backend):
    h5py = pytest.importorskip("h5py")
    torch.manual_seed(6)
    m = fastrnn.LSTM(3, 4, num_layers=2, bidirectional=True, backend=backend)
    rows = ["ab ba", "cab\ncc", "b", "a  c"]  # lengths 5, 6, 1, 4; the space and newline are tokens too
    lengths = [len(r) for r in rows]
    x = torch.randn(max(lengths), len(rows), 3)
    with fastrnn.record() as rec:
        m(pack_padded_sequence(x, lengths, enforce_sorted=False))
    s = rec[m]
    out = fi.to_lstmvis(s, tmp_path / "proj", [list(r) for r in rows], name="toy: chars")
    cfg = _read_lstm_yml(out / "lstm.yml")
    assert cfg["name"] == "toy: chars"
    assert cfg["word_sequence"] == {"file": "train", "path": "word_ids", "dict_file": "words"}
    files = cfg["files"]
    assert cfg["states"]["file"] == "states" and files["states"].endswith(".hdf5")
    N = sum(lengths)
    with h5py.File(out / files["train"]) as f:
        ids = f[cfg["word_sequence"]["path"]][()]
    words = dict(reversed(line.split()) for line in (out / files["words"]).read_text(encoding="utf-8").splitlines())
    assert [words[str(i)] for i in ids] == [fi._visible(ch) for r in rows for ch in r]
    types = cfg["states"]["types"]
    want = {(kind, layer + 1, d) for layer in range(2) for d in range(2) for kind in ("state", "output")}
    assert {(t["type"], t["layer"], t["path"].endswith("_reverse")) for t in types} == want
    with h5py.File(out / files["states"]) as f:
        for t in types:
            data = torch.from_numpy(f[t["path"]][()])
            d = int(t["path"].endswith("_reverse"))
            src = (s.c if t["type"] == "state" else s.h)[t["layer"] - 1, d]  # [T, B, H]
            expected = torch.cat([src[:n, b] for b, n in enumerate(lengths)])
            assert data.shape == (N, 4) and torch.equal(data, expected), t
            assert (t.get("transform") == "none") == bool(expected.abs().max() <= 1), t
    with pytest.raises(ValueError, match="row 2 has 2 tokens"):
        fi.to_lstmvis(s, tmp_path / "bad", [list(rows[0]), list(rows[1]), ["b", "b"], list(rows[3])])


def test_to_lstmvis_without_h5py_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    s = _synthetic("gru", T=2, B=1, lengths=(2,))
    with pytest.raises(ImportError, match="pip install h5py"):
        fi.to_lstmvis(s, tmp_path, [["a", "b"]])


def test_torch_backend_recording_refuses_masks_it_cannot_redraw(monkeypatch):
    """Where the rerun's dropout masks do not reproduce torch's call (cuDNN draws from its own state; simulated
    here by a rerun that draws differently), recording raises rather than returning other states."""
    from fastrnn import functional

    m = fastrnn.LSTM(4, 6, num_layers=2, dropout=0.4, backend="torch").train()
    monkeypatch.setattr(functional, "_rng_state", lambda device: torch.Generator().manual_seed(99).get_state())
    with pytest.raises(RuntimeError, match="dropout"), fastrnn.record():
        m(torch.randn(5, 3, 4))
