"""The numba backend against the reference backend (the contract itself: outputs, saved gates/extra on the
rows a step touches, every backward gradient, serial and split over threads; the layer-normalised cells with
their Norm and d_extra), its dispatch table against the cell table, empty sizes through the drop-in modules
against torch.nn (the normalised cells: against the reference backend), the on-disk cache across processes and
the uncached fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("numba")

import fastrnn  # noqa: E402
from fastrnn.backends import get  # noqa: E402
from fastrnn.backends.numba import common  # noqa: E402
from fastrnn.backends.numba.common import THREADS_VAR  # noqa: E402
from fastrnn.cells import TABLE, Norm, State, Weights, spec  # noqa: E402
from tests.helpers import assert_close, assert_contract_matches_reference, contract_inputs  # noqa: E402

if not get("numba").available()[0]:
    pytest.skip(get("numba").available()[1], allow_module_level=True)

numba_be, ref = get("numba"), get("reference")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CASES = [
    pytest.param("lstm", 7, 5, 33, 33, None, False, True, 1, id="lstm-T7-H33"),
    pytest.param("lstm", 7, 5, 33, 17, None, False, True, 1, id="lstm-proj"),
    pytest.param("lstm", 5, 5, 16, 16, [5, 5, 3, 2, 1], False, True, 1, id="lstm-packed"),
    pytest.param("lstm", 5, 5, 16, 16, [5, 5, 3, 2, 1], True, True, 1, id="lstm-packed-reverse"),
    pytest.param("lstm", 5, 5, 16, 9, [5, 5, 3, 2, 1], True, False, 1, id="lstm-proj-packed-reverse-nobias"),
    pytest.param("lstm", 1, 1, 8, 8, None, False, True, 1, id="lstm-T1-B1"),
    pytest.param("gru", 7, 5, 33, 33, None, False, True, 1, id="gru-T7-H33"),
    pytest.param("gru", 5, 5, 16, 16, [5, 5, 3, 2, 1], False, True, 1, id="gru-packed"),
    pytest.param("gru", 5, 5, 16, 16, [5, 5, 3, 2, 1], True, False, 1, id="gru-packed-reverse-nobias"),
    pytest.param("gru", 1, 1, 8, 8, None, True, True, 1, id="gru-T1-B1-reverse"),
    pytest.param("rnn_tanh", 7, 5, 33, 33, None, True, True, 1, id="rnn_tanh-T7-H33-reverse"),
    pytest.param("rnn_tanh", 5, 5, 16, 16, [5, 5, 3, 2, 1], True, True, 1, id="rnn_tanh-packed-reverse"),
    pytest.param("rnn_relu", 7, 5, 33, 33, None, False, False, 1, id="rnn_relu-T7-H33-nobias"),
    pytest.param("rnn_relu", 5, 5, 16, 16, [5, 5, 3, 2, 1], False, True, 1, id="rnn_relu-packed"),
    # large enough (common.PARALLEL_MIN_MACS) that with 2 threads a step is split into blocks of hidden units
    pytest.param("lstm", 3, 16, 260, 130, [16, 9, 4], True, True, 2, id="lstm-proj-blocked-packed-reverse"),
    pytest.param("gru", 3, 16, 300, 300, [16, 9, 4], False, True, 2, id="gru-blocked-packed"),
    pytest.param("rnn_tanh", 3, 16, 520, 520, None, False, True, 2, id="rnn_tanh-blocked"),
    pytest.param("rnn_relu", 3, 16, 520, 520, [16, 9, 4], True, False, 2, id="rnn_relu-blocked-packed-reverse"),
    # empty sizes: no step, no row (no hidden unit: test_zero_hidden_units)
    pytest.param("lstm", 0, 3, 8, 8, None, False, True, 1, id="lstm-T0"),
    pytest.param("lstm", 4, 0, 8, 5, None, False, True, 1, id="lstm-proj-B0"),
    pytest.param("gru", 0, 3, 8, 8, None, True, True, 1, id="gru-T0-reverse"),
    pytest.param("gru", 4, 0, 8, 8, None, False, True, 1, id="gru-B0"),
    pytest.param("rnn_tanh", 0, 3, 8, 8, None, False, True, 1, id="rnn_tanh-T0"),
    pytest.param("rnn_relu", 4, 0, 8, 8, None, False, True, 1, id="rnn_relu-B0"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell,T,B,H,P,bs,reverse,bias,threads", CASES)
def test_contract_matches_reference(cell, T, B, H, P, bs, reverse, bias, threads, dtype, monkeypatch):
    monkeypatch.setenv(THREADS_VAR, str(threads))
    if threads > 1:  # the case must really be split into blocks, or it tests the serial walk twice
        if common.threads() < threads:
            pytest.skip(f"numba has fewer than {threads} threads here")
        assert common.n_blocks(B * spec(cell).G * H * P, H) > 1
    assert_contract_matches_reference(numba_be, cell, T, B, H, P, bs, reverse, bias, dtype)


NORM_CASES = [
    # cell, T, B, H, batch_sizes, reverse, zoneout mask (else the constant keep), keep, threads
    pytest.param("ln_lstm", 6, 4, 13, None, False, True, 0.7, 1, id="ln_lstm-T6-H13-mask"),
    pytest.param("ln_lstm", 5, 5, 9, [5, 5, 3, 2, 1], True, False, 0.7, 1, id="ln_lstm-packed-reverse-keep"),
    pytest.param("ln_lstm", 5, 5, 9, [5, 5, 3, 2, 1], False, True, 0.6, 1, id="ln_lstm-packed-mask"),
    pytest.param("ln_lstm", 3, 2, 1, None, True, False, 1.0, 1, id="ln_lstm-H1-reverse"),
    pytest.param("ln_gru", 6, 4, 13, None, True, True, 0.7, 1, id="ln_gru-T6-H13-reverse-mask"),
    pytest.param("ln_gru", 5, 5, 9, [5, 5, 3, 2, 1], False, False, 0.7, 1, id="ln_gru-packed-keep"),
    pytest.param("ln_gru", 5, 5, 9, [5, 5, 3, 2, 1], True, True, 0.6, 1, id="ln_gru-packed-reverse-mask"),
    pytest.param("ln_gru", 1, 1, 8, None, False, False, 1.0, 1, id="ln_gru-T1-B1"),
    # large enough that with 2 threads the GEMMs run in blocks (an uneven last one) and the row passes on threads
    pytest.param("ln_lstm", 3, 16, 257, [16, 9, 4], True, True, 0.7, 2, id="ln_lstm-blocked-packed-reverse"),
    pytest.param("ln_gru", 3, 16, 301, [16, 9, 4], False, False, 0.7, 2, id="ln_gru-blocked-packed"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell,T,B,H,bs,reverse,mask,keep,threads", NORM_CASES)
def test_norm_contract_matches_reference(cell, T, B, H, bs, reverse, mask, keep, threads, dtype, monkeypatch):
    """The normalised cells (cells.py, "Normalised cells") on the contract against the reference backend:
    outputs, final states, the saved rows (skipped rows zero), and every gradient with d_extra (zero on skipped
    rows); d_b_hh is None, as b_hh is."""
    monkeypatch.setenv(THREADS_VAR, str(threads))
    c = spec(cell)
    if threads > 1:
        if common.threads() < threads:
            pytest.skip(f"numba has fewer than {threads} threads here")
        assert common.n_blocks(B * c.G * H * H, H) > 1
    torch.manual_seed(0)
    assert_contract_matches_reference(numba_be, cell, T, B, H, H, bs, reverse, False, dtype, "mask" if mask else keep)


_CACHE_RUN = """
import torch
from fastrnn import ops
from fastrnn.backends.numba import kernels
from fastrnn.cells import Norm, spec
for cell in ("ln_lstm", "ln_gru"):
    c = spec(cell)
    gx = torch.randn(3, 2, c.G * 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=torch.float64)
    c0 = torch.randn(2, 4, dtype=torch.float64) if c.has_cell_state else None
    w = torch.randn(c.G * 4, 4, dtype=torch.float64)
    norm = Norm(torch.ones(c.norm_width * 4, dtype=torch.float64), None, 0.5)
    out = ops.recurrence("numba", cell, gx, h0, c0, w, None, None, None, False, norm=norm)[0]
    out.sum().backward()
    for table in (kernels.FORWARD, kernels.BACKWARD):
        st = table[c.kernel_id, False].stats
        print(cell, sum(st.cache_hits.values()), sum(st.cache_misses.values()))
"""


def test_cache_reused_across_processes(tmp_path):
    """The normalised cells' walks (their steps compiled in as constants, like every cell's) are written to numba's
    on-disk cache by one process and loaded, not compiled again, by the next."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = []
    for _ in range(2):
        p = subprocess.run(
            [sys.executable, "-c", _CACHE_RUN], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert p.returncode == 0, p.stderr
        runs.append([tuple(int(v) for v in line.split()[1:]) for line in p.stdout.splitlines()])
    assert all(misses > 0 for _, misses in runs[0]), runs  # a fresh cache directory: compiled
    assert all(hits > 0 and misses == 0 for hits, misses in runs[1]), runs  # then loaded from the cache


def test_supports():
    ok, _ = numba_be.supports(spec("gru"), torch.float32, torch.device("cpu"))
    assert ok
    ok, why = numba_be.supports(spec("gru"), torch.float16, torch.device("cpu"))
    assert not ok and "float16" in why
    ok, why = numba_be.supports(spec("lstm"), torch.float32, torch.device("meta"))
    assert not ok and "CPU" in why


def test_dispatch_table_matches_cell_table():
    """The kernels find a cell's steps by its kernel_id: every cell of cells.py has its own entry, and a cell the
    kernels have no step for is refused by supports rather than run with another cell's step."""
    from dataclasses import replace

    from fastrnn.backends.numba.kernels import STEPS

    assert {c.kernel_id: c.name for c in TABLE.values()} == {k: s.name for k, s in STEPS.items()}
    unknown = replace(spec("gru"), name="new_cell", kernel_id=max(STEPS) + 1)
    ok, why = numba_be.supports(unknown, torch.float32, torch.device("cpu"))
    assert not ok and "new_cell" in why


@pytest.mark.parametrize("cell", sorted(TABLE))
def test_no_saved_when_not_needed(cell):
    gx, state0, weights = contract_inputs(cell, 3, 2, 8, 8, torch.float64, True)
    args = (spec(cell), gx, state0, weights, None, False, False)
    out, state_n, saved = numba_be.forward(*args)
    assert saved.gates.numel() == 0 and saved.extra.numel() == 0
    exp_out, exp_state, _ = ref.forward(*args)
    assert_close(out, exp_out, torch.float64, 3, "out")
    for name, a, e in zip(spec(cell).states, state_n, exp_state):
        assert_close(a, e, torch.float64, 3, f"{name}_n")
    if not spec(cell).has_cell_state:
        assert state_n.c is None


def test_absent_inputs_give_none():
    """Grads holds None where the input was None (b_hh, w_hr) or the cell has no cell state."""
    for cell in TABLE.values():
        gx, state0, weights = contract_inputs(cell.name, 3, 2, 8, 8, torch.float64, False)
        out, state_n, saved = numba_be.forward(cell, gx, state0, weights, None, False, True)
        d_state_n = State(torch.randn_like(state0.h), torch.randn_like(state0.c) if cell.has_cell_state else None)
        g = numba_be.backward(cell, torch.randn_like(out), d_state_n, state0, weights, None, False, out, saved)
        assert g.d_weights.b_hh is None and g.d_weights.w_hr is None, cell.name
        assert (g.d_state0.c is None) == (not cell.has_cell_state), cell.name
        assert (g.d_extra is None) == (not cell.norm), cell.name
        assert isinstance(g.d_weights, Weights) and isinstance(g.d_state0, State)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "reverse"])
@pytest.mark.parametrize("cell", sorted(TABLE))
def test_empty_batch_gives_zero_weight_grads(cell, reverse):
    """B == 0 in both directions (the reference backend's backward cannot walk an empty batch in reverse): empty
    outputs and state gradients, weight gradients zero."""
    c = spec(cell)
    gx, state0, weights = contract_inputs(cell, 4, 0, 8, 8, torch.float64, True)
    out, state_n, saved = numba_be.forward(c, gx, state0, weights, None, reverse, True)
    assert out.shape == (4, 0, 8) and state_n.h.shape == (0, 8)
    d_state_n = State(torch.randn_like(state0.h), torch.randn_like(state0.c) if c.has_cell_state else None)
    g = numba_be.backward(c, torch.randn_like(out), d_state_n, state0, weights, None, reverse, out, saved)
    assert g.d_gx.shape == gx.shape and g.d_state0.h.shape == (0, 8)
    for name, d, w in zip(("w_hh", "b_hh"), g.d_weights, weights):
        assert (d is None) == (w is None), name
        assert w is None or (d.shape == w.shape and (d == 0).all()), name


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "reverse"])
@pytest.mark.parametrize("cell", sorted(n for n, c in TABLE.items() if not c.norm))
def test_zero_hidden_units(cell, reverse):
    """H == 0 (as torch.nn's Cell classes allow): empty outputs and gradients of the same shapes as the reference
    backend's, d_h0 and the weight gradients empty too."""
    c = spec(cell)
    T, B = 3, 2
    gx = torch.randn(T, B, 0, dtype=torch.float64)
    state0 = State(
        torch.randn(B, 0, dtype=torch.float64), torch.randn(B, 0, dtype=torch.float64) if c.has_cell_state else None
    )
    weights = Weights(torch.randn(0, 0, dtype=torch.float64), torch.randn(0, dtype=torch.float64))
    args = (c, gx, state0, weights, None, reverse, True)
    (out, st, sv), (out_e, st_e, sv_e) = numba_be.forward(*args), ref.forward(*args)
    for a, e in zip((out, *st, *sv), (out_e, *st_e, *sv_e), strict=True):
        assert (a is None) == (e is None) and (a is None or a.shape == e.shape)
    d_state_n = State(torch.randn_like(state0.h), torch.randn_like(state0.c) if c.has_cell_state else None)
    bargs = (c, torch.randn_like(out_e), d_state_n, state0, weights, None, reverse, out_e, sv_e)
    g, g_e = numba_be.backward(*bargs), ref.backward(*bargs)
    flat = lambda g: (g.d_gx, *g.d_state0, *g.d_weights, g.d_extra)  # noqa: E731 - local shorthand
    for a, e in zip(flat(g), flat(g_e), strict=True):
        assert (a is None) == (e is None) and (a is None or a.shape == e.shape)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "reverse"])
@pytest.mark.parametrize("cell", sorted(n for n, c in TABLE.items() if c.norm))
def test_norm_zero_hidden_units(cell, reverse):
    """H == 0 for the normalised cells (the modules refuse it, the contract does not): empty outputs and gradients
    of the contract's shapes (the reference backend cannot split an empty Norm.params, so the shapes come from
    the cell table)."""
    c = spec(cell)
    T, B = 3, 2
    f64 = dict(dtype=torch.float64)
    gx = torch.randn(T, B, 0, **f64)
    state0 = State(torch.randn(B, 0, **f64), torch.randn(B, 0, **f64) if c.has_cell_state else None)
    weights = Weights(torch.randn(0, 0, **f64), None, None, Norm(torch.randn(0, **f64), None, 0.5))
    out, st, sv = numba_be.forward(c, gx, state0, weights, None, reverse, True)
    assert out.shape == (T, B, 0) and all(s.shape == (B, 0) for s in st if s is not None)
    assert (st.c is None) == (not c.has_cell_state)
    assert tuple(x.shape for x in sv) == c.saved_shapes(T, B, 0)
    d_state_n = State(torch.randn_like(state0.h), torch.randn_like(state0.c) if c.has_cell_state else None)
    g = numba_be.backward(c, torch.randn_like(out), d_state_n, state0, weights, None, reverse, out, sv)
    assert g.d_gx.shape == (T, B, 0) and g.d_extra.shape == (T, B, 0) and g.d_weights.w_hh.shape == (0, 0)
    assert g.d_state0.h.shape == (B, 0) and (g.d_state0.c is None) == (not c.has_cell_state)
    assert g.d_weights.b_hh is None and g.d_weights.w_hr is None


# what torch.nn does with each empty size, for every layer class; fastrnn on numba must do the same
EMPTY = [pytest.param(T, B, H, id=f"T{T}-B{B}-H{H}") for T, B, H in [(0, 3, 5), (4, 0, 5), (4, 3, 0)]]


def _layer_kw(cell):
    return {"nonlinearity": cell.nonlinearity} if cell.nonlinearity else {}


def _run(make, x):
    """Outputs, input gradient and parameter gradients of one forward+backward, or the exception it raised."""
    try:
        m = make()
        y = m(x)
        outs = [y] if isinstance(y, torch.Tensor) else [y[0], *(y[1] if isinstance(y[1], tuple) else (y[1],))]
        sum(o.sum() for o in outs).backward()
        return outs + [x.grad] + [p.grad for p in m.parameters()]
    except Exception as e:  # noqa: BLE001 - the exception itself is compared
        return type(e), str(e)


@pytest.mark.parametrize("T,B,H", EMPTY)
@pytest.mark.parametrize(
    "cell,proj", [(n, p) for n, c in TABLE.items() for p in (False, True) if c.projection or not p]
)
def test_empty_sizes_like_torch_layers(cell, T, B, H, proj):
    """torch.nn is the oracle where it has the layer; for the normalised cells, fastrnn's reference backend."""
    c = spec(cell)
    kw = dict(_layer_kw(c), **({"proj_size": 2} if proj else {}))
    torch.manual_seed(0)
    x = torch.randn(T, B, 3, requires_grad=True)
    xf = x.detach().clone().requires_grad_()
    if c.torch_mode is None:
        want = _run(lambda: getattr(fastrnn, c.layer)(3, H, backend="reference", **kw), x)
    else:
        want = _run(lambda: getattr(torch.nn, c.layer)(3, H, **kw), x)
    torch.manual_seed(0)
    got = _run(lambda: getattr(fastrnn, c.layer)(3, H, backend="numba", **kw), xf)
    _assert_same(got, want)


@pytest.mark.parametrize("B,H", [(0, 5), (3, 0)], ids=["B0", "H0"])
@pytest.mark.parametrize("cell", sorted(n for n, c in TABLE.items() if c.cell_class is not None))
def test_empty_sizes_like_torch_cells(cell, B, H):
    c = spec(cell)
    torch.manual_seed(0)
    x = torch.randn(B, 3, requires_grad=True)
    xf = x.detach().clone().requires_grad_()
    want = _run(lambda: getattr(torch.nn, c.cell_class)(3, H, **_layer_kw(c)), x)
    torch.manual_seed(0)
    got = _run(lambda: getattr(fastrnn, c.cell_class)(3, H, backend="numba", **_layer_kw(c)), xf)
    _assert_same(got, want)


def _assert_same(got, want):
    if isinstance(want, tuple):  # torch.nn raised
        assert got == want, f"torch.nn raised {want}, fastrnn gave {got}"
        return
    assert isinstance(got, list), f"fastrnn raised {got}, torch.nn did not"
    assert len(got) == len(want)
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        assert (a is None) == (e is None), f"result {i}: {a} vs {e}"
        if e is not None:
            assert a.shape == e.shape, f"result {i}: shape {tuple(a.shape)} != {tuple(e.shape)}"
            assert_close(a, e, torch.float32, 1, f"result {i}")


def test_jit_runs_uncached_where_no_cache_dir_is_writable(monkeypatch):
    from numba.core.caching import CacheImpl

    from fastrnn.backends.numba.common import jit

    monkeypatch.setattr(CacheImpl, "_locator_classes", [])  # no writable location anywhere
    with pytest.warns(RuntimeWarning, match="NUMBA_CACHE_DIR"):
        twice = jit()(lambda x: 2 * x)
    assert twice(21) == 42
