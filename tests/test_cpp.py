"""The cpp backend (fastrnn._C) against the reference backend: the contract itself (outputs, saved gates/extra,
every backward gradient) for every cell, proj_size, packed batch_sizes, reverse, float64 and float32, odd and zero
sizes; the normalised cells' contract (Norm params, zoneout mask or keep, d_extra) on the C++ schedules; the
extension's kernel table against fastrnn.cells; the raw entry points refusing bad arguments with RuntimeError; zero
hidden size through the modules against torch.nn."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

pytest.importorskip("fastrnn._C", reason="the C++ extension fastrnn._C is not built")

import fastrnn  # noqa: E402
from fastrnn import _C  # noqa: E402
from fastrnn.backends import get  # noqa: E402
from fastrnn.backends.reference import norm_grads  # noqa: E402
from fastrnn.cells import NORM_CELLS, TABLE, Norm, Saved, State, Weights, cell_for, spec  # noqa: E402
from tests.helpers import assert_close, assert_contract_matches_reference, contract_inputs  # noqa: E402

cpp, ref = get("cpp"), get("reference")
F32, F64 = torch.float32, torch.float64
CPU = torch.device("cpu")


PACKED = [5, 5, 3, 2, 1]
CASES = [
    pytest.param("lstm", 7, 5, 33, 33, None, False, True, id="lstm-T7-H33"),
    pytest.param("lstm", 7, 5, 33, 17, None, False, True, id="lstm-proj"),
    pytest.param("lstm", 5, 5, 16, 16, PACKED, False, True, id="lstm-packed"),
    pytest.param("lstm", 5, 5, 16, 16, PACKED, True, True, id="lstm-packed-reverse"),
    pytest.param("lstm", 5, 5, 16, 9, PACKED, True, False, id="lstm-proj-packed-reverse-nobias"),
    pytest.param("lstm", 1, 1, 8, 8, None, False, True, id="lstm-T1-B1"),
    pytest.param("lstm", 7, 1, 33, 5, None, True, True, id="lstm-proj-B1-reverse"),
    pytest.param("gru", 7, 5, 33, 33, None, False, True, id="gru-T7-H33"),
    pytest.param("gru", 7, 5, 33, 33, None, True, True, id="gru-T7-H33-reverse"),
    pytest.param("gru", 5, 5, 16, 16, PACKED, False, True, id="gru-packed"),
    pytest.param("gru", 5, 5, 16, 16, PACKED, True, False, id="gru-packed-reverse-nobias"),
    pytest.param("gru", 1, 1, 8, 8, None, True, True, id="gru-T1-B1-reverse"),
    pytest.param("rnn_tanh", 7, 5, 33, 33, None, True, True, id="rnn_tanh-T7-H33-reverse"),
    pytest.param("rnn_tanh", 5, 5, 16, 16, PACKED, True, True, id="rnn_tanh-packed-reverse"),
    pytest.param("rnn_tanh", 1, 1, 8, 8, None, False, False, id="rnn_tanh-T1-B1-nobias"),
    pytest.param("rnn_relu", 7, 5, 33, 33, None, False, False, id="rnn_relu-T7-H33-nobias"),
    pytest.param("rnn_relu", 5, 5, 16, 16, PACKED, False, True, id="rnn_relu-packed"),
    pytest.param("rnn_relu", 5, 5, 16, 16, PACKED, True, True, id="rnn_relu-packed-reverse"),
    # enough rows x hidden that a step's pointwise pass is split over threads
    pytest.param("lstm", 3, 16, 260, 130, [16, 9, 4], True, True, id="lstm-proj-parallel-packed-reverse"),
    # small hidden, many rows: each thread runs the GEMM and pointwise pass of its own block of rows
    pytest.param("lstm", 4, 40, 64, 64, [40, 27, 11, 3], True, True, id="lstm-row-blocks-packed-reverse"),
    pytest.param("lstm", 3, 40, 64, 64, None, False, False, id="lstm-row-blocks-nobias"),
    pytest.param("gru", 4, 40, 64, 64, [40, 27, 11, 3], True, True, id="gru-row-blocks-packed-reverse"),
    pytest.param("rnn_relu", 4, 40, 64, 64, [40, 27, 11, 3], False, True, id="rnn_relu-row-blocks-packed"),
    # a step past 2^24 flops: one GEMM threaded by BLAS, then the parallel pointwise pass
    pytest.param("lstm", 2, 16, 512, 512, [16, 7], True, True, id="lstm-large-step-packed-reverse"),
    pytest.param("gru", 3, 16, 300, 300, [16, 9, 4], False, True, id="gru-parallel-packed"),
    pytest.param("rnn_tanh", 3, 40, 520, 520, None, False, True, id="rnn_tanh-parallel"),
]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell,T,B,H,P,bs,reverse,bias", CASES)
def test_contract_matches_reference(cell, T, B, H, P, bs, reverse, bias, dtype):
    assert_contract_matches_reference(cpp, cell, T, B, H, P, bs, reverse, bias, dtype)


def _inputs(cell: str, T: int, B: int, H: int, P: int, dtype=F64, bias=True, mask=True, keep=0.7):
    """contract_inputs, and for a normalised cell its b_hh dropped and cells.Norm added (gains and biases off their
    init, a Bernoulli keep mask or, mask=False, the constant keep)."""
    c = spec(cell)
    gx, state0, weights = contract_inputs(cell, T, B, H, P, dtype, bias and not c.norm)
    if not c.norm:
        return gx, state0, weights
    params = 1 + 0.3 * torch.randn(c.norm_width * H, dtype=dtype)
    m = torch.bernoulli(torch.full((T, B, H), 0.6, dtype=dtype)) if mask else None
    return gx, state0, weights._replace(norm=Norm(params, m, keep))


def _to(ts, dtype):
    """A State, Weights or Norm with every tensor (a nested Norm's too) converted to dtype."""
    conv = lambda t: _to(t, dtype) if isinstance(t, Norm) else t.to(dtype) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return type(ts)(*(conv(t) for t in ts))


def _grad_names(c) -> tuple[str, ...]:
    return GRAD_NAMES + (("d_extra",) if c.norm else ())


# Normalised cells (b_hh None, Norm params, zoneout mask or keep): the C++ schedules (row blocks, one BLAS GEMM then
# the pointwise pass, rows split over threads), packed and reverse walks, odd and unit hidden sizes.
NORM_CASES = [
    pytest.param(4, 3, 5, None, False, True, 1.0, id="T4-B3-H5-mask"),
    pytest.param(4, 3, 5, [3, 3, 2, 1], True, True, 1.0, id="packed-reverse-mask"),
    pytest.param(4, 3, 5, [3, 3, 2, 1], False, False, 0.7, id="packed-keep0.7"),
    pytest.param(4, 3, 1, [3, 3, 2, 1], True, False, 1.0, id="H1-packed-reverse-keep1"),
    pytest.param(5, 4, 7, [4, 2, 2, 1, 0], True, True, 1.0, id="empty-step-reverse"),
    pytest.param(4, 40, 33, [40, 27, 11, 3], True, True, 1.0, id="row-blocks-packed-reverse"),
    pytest.param(3, 64, 256, [64, 60, 30], False, False, 0.8, id="large-step-packed"),
]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("T,B,H,bs,reverse,mask,keep", NORM_CASES)
@pytest.mark.parametrize("cell", NORM_CELLS)
def test_norm_contract_matches_reference(cell, T, B, H, bs, reverse, mask, keep, dtype):
    """The normalised cells against the reference on one call: out, final states, saved gates and extra (skipped rows
    zero), every gradient and d_extra (skipped rows zero); d_b_hh is None as b_hh is."""
    assert_contract_matches_reference(cpp, cell, T, B, H, H, bs, reverse, False, dtype, "mask" if mask else keep)


@pytest.mark.parametrize("threads", [1, 3], ids=["1thread", "3threads"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("T,B,H,bs,reverse,mask,keep", NORM_CASES)
@pytest.mark.parametrize("cell", NORM_CELLS)
def test_norm_params_grad_reduced_in_the_kernel(cell, T, B, H, bs, reverse, mask, keep, dtype, threads):
    """Grads.d_norm, which the backward walk reduces from per-task partial sums, equals reference.norm_grads on the
    same call's d_gx, d_extra and saved extra (skipped rows adding nothing), and a second run gives the same bits."""
    c = spec(cell)
    gx, state0, weights = _inputs(cell, T, B, H, H, dtype, mask=mask, keep=keep)
    batch_sizes = None if bs is None else torch.tensor(bs, dtype=torch.int64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, _, saved = cpp.forward(c, gx, state0, weights, batch_sizes, reverse, True)
        d_out, d_state_n = _cotangents(c, out, state0)
        bargs = (c, d_out, d_state_n, state0, weights, batch_sizes, reverse, out, saved)
        g, again = cpp.backward(*bargs), cpp.backward(*bargs)
    finally:
        torch.set_num_threads(before)
    assert g.d_norm.shape == (c.norm_width * H,) and g.d_norm.dtype == dtype
    expected = norm_grads(c, g.d_gx, g.d_extra, saved.extra)
    assert_close(g.d_norm, expected, dtype, T * B, "d_norm")
    assert torch.equal(g.d_norm, again.d_norm), "d_norm differs between two runs of the same call"


def test_plain_cells_have_no_norm_grad():
    c = spec("lstm")
    gx, state0, weights = _inputs("lstm", 3, 2, 4, 4)
    out, _, saved = cpp.forward(c, gx, state0, weights, None, False, True)
    d_out, d_state_n = _cotangents(c, out, state0)
    assert cpp.backward(c, d_out, d_state_n, state0, weights, None, False, out, saved).d_norm is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cell", NORM_CELLS)
def test_norm_half_precision_runs_widened(cell, dtype):
    """Half types of a normalised cell run the float32 kernels on widened inputs (bfloat16 too: its own kernels see
    blocks of units, a layer norm needs whole rows): the reference's recipe, so nearly the same bits; results come back
    in the call's dtype, saved tensors in float32."""
    c = spec(cell)
    gx, state0, weights = _inputs(cell, 5, 5, 16, 16, F32)
    gx, state0, weights = gx.to(dtype), _to(state0, dtype), _to(weights, dtype)
    batch_sizes = torch.tensor(PACKED, dtype=torch.int64)
    args = (c, gx, state0, weights, batch_sizes, True, True)
    (out, st, saved), (e_out, e_st, e_saved) = cpp.forward(*args), ref.forward(*args)
    tol = HALF_TOL[dtype]
    n = len(c.states)
    for name, a, e in zip(("out", *c.states, "gates", "extra"), (out, *st[:n], *saved), (e_out, *e_st[:n], *e_saved)):
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        assert_close(a, e, name=f"forward {name}", rtol=tol, atol=tol)
    d_out, d_state_n = _cotangents(c, e_out, state0)
    bargs = (c, d_out, d_state_n, state0, weights, batch_sizes, True, e_out, e_saved)
    g, e = cpp.backward(*bargs), ref.backward(*bargs)
    for name, a, x in zip(_grad_names(c), _flat(g), _flat(e), strict=True):
        if x is None:
            assert a is None, f"{name}: expected None"
        else:
            assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
            assert_close(a, x, name=name, rtol=tol, atol=tol)
    assert g.d_norm.dtype == dtype, f"d_norm: dtype {g.d_norm.dtype}"
    e_norm = norm_grads(c, e.d_gx, e.d_extra, e_saved.extra).to(dtype)
    assert_close(g.d_norm, e_norm, name="d_norm", rtol=tol, atol=tol * e_norm.abs().max().item())


@pytest.mark.parametrize("cell", list(TABLE))
def test_kernel_table_matches_cells(cell):
    """The C++ table, indexed by kernel_id, describes each cell exactly as fastrnn.cells does."""
    c = spec(cell)
    expected = (c.name, c.G, *c.saved_widths, c.has_cell_state, c.projection, c.norm_width)
    assert _C.cell_info(c.kernel_id) == expected


@pytest.mark.parametrize("cell_id", [-1, len(TABLE)])
def test_unknown_cell_id_is_refused(cell_id):
    with pytest.raises(RuntimeError, match="unknown cell id"):
        _C.cell_info(cell_id)
    with pytest.raises(RuntimeError, match="unknown cell id"):
        _C.recurrence_forward(**{**_fwd_args("gru"), "cell_id": cell_id})


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", *NORM_CELLS])
def test_inference_saves_nothing(cell):
    c = spec(cell)
    gx, state0, weights = _inputs(cell, 4, 3, 8, 8, F64, True)
    out, st, saved = cpp.forward(c, gx, state0, weights, None, False, False)
    assert saved.gates.numel() == 0 and saved.extra.numel() == 0
    exp_out, exp_st, _ = ref.forward(c, gx, state0, weights, None, False, False)
    assert_close(out, exp_out, F64, 4, "out")
    for name, a, e in zip(c.states, st, exp_st):
        assert_close(a, e, F64, 4, f"{name}_n")


GRAD_NAMES = ("d_gx", "d_h0", "d_c0", "d_w_hh", "d_b_hh", "d_w_hr")


def _flat(g) -> tuple:
    """Grads in GRAD_NAMES order (kernels leave d_weights.norm None), then d_extra for the normalised cells."""
    assert g.d_weights.norm is None, "a kernel's d_weights.norm is None (ops.norm_grads forms it)"
    return (g.d_gx, *g.d_state0, *g.d_weights[:3]) + (() if g.d_extra is None else (g.d_extra,))


def _cotangents(c, out: torch.Tensor, state0: State) -> tuple[torch.Tensor, State]:
    d_c_n = torch.randn_like(state0.c) if c.has_cell_state else None
    return torch.randn_like(out), State(torch.randn_like(state0.h), d_c_n)


def _sized_inputs(cell: str, T: int, B: int, H: int):
    """_inputs, also for H == 0 (empty slices of an H == 1 call)."""
    if H:
        return _inputs(cell, T, B, H, H)
    gx, (h0, c0), weights = _inputs(cell, T, B, 1, 1)
    norm = weights.norm
    if norm is not None:
        norm = Norm(norm.params[:0], norm.mask[..., :0], norm.keep)
    b_hh = None if weights.b_hh is None else weights.b_hh[:0]
    state0 = State(h0[:, :0], None if c0 is None else c0[:, :0])
    return gx[..., :0], state0, Weights(weights.w_hh[:0, :0], b_hh, None, norm)


@pytest.mark.parametrize("cell", list(TABLE))
@pytest.mark.parametrize(
    "T,B,H,bs,reverse",
    [(0, 3, 4, None, False), (3, 0, 4, None, True), (3, 2, 0, None, False), (2, 3, 4, [3, 0], False)],
    ids=["T0", "B0", "H0", "empty-step"],
)  # fmt: skip
def test_degenerate_sizes(cell, T, B, H, bs, reverse):
    """Empty sizes give torch.nn's empty results; zero-size steps leave rows untouched. Where nothing runs at all
    (T, B or H zero) every gradient is known exactly: d_h0 = d_h_n, d_c0 = d_c_n, all else zero."""
    c = spec(cell)
    gx, state0, weights = _sized_inputs(cell, T, B, H)
    batch_sizes = None if bs is None else torch.tensor(bs, dtype=torch.int64)
    args = (c, gx, state0, weights, batch_sizes, reverse, True)
    (out, st, saved), (e_out, e_st, e_saved) = cpp.forward(*args), ref.forward(*args)
    assert_close(out, e_out, F64, 1, "out")
    for name, a, e in zip(c.states, st, e_st):
        assert_close(a, e, F64, 1, f"{name}_n")
    for name, a, e in zip(Saved._fields, saved, e_saved, strict=True):
        assert_close(a, e, F64, 1, f"saved {name}")
    d_out, d_state_n = _cotangents(c, e_out, state0)
    g = cpp.backward(c, d_out, d_state_n, state0, weights, batch_sizes, reverse, e_out, e_saved)
    if min(T, B, H) == 0:
        zero = lambda w: None if w is None else torch.zeros_like(w)  # noqa: E731
        exp = (zero(gx), *d_state_n, *(zero(w) for w in weights[:2]), None)
        exp += (gx.new_zeros(T, B, H),) if c.norm else ()
    else:
        e = ref.backward(c, d_out, d_state_n, state0, weights, batch_sizes, reverse, e_out, e_saved)
        exp = _flat(e)
    for name, a, e in zip(_grad_names(c), _flat(g), exp, strict=True):
        if e is None:
            assert a is None, f"{name}: expected None"
        else:
            assert_close(a, e, F64, T * max(B, 1), name)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_zero_width_projection(reverse, dtype):
    """w_hr [0, H] (P == 0): the cell state still runs, h is empty; nothing is written past an empty out."""
    c = spec("lstm")
    gx, (_, c0), (w_hh, b_hh, *_) = contract_inputs(c.name, 3, 2, 4, 4, dtype, True)
    state0, weights = State(c0[:, :0], c0), Weights(w_hh[:, :0], b_hh, torch.randn(0, 4, dtype=dtype))
    args = (c, gx, state0, weights, None, reverse, True)
    (out, st, saved), (e_out, e_st, e_saved) = cpp.forward(*args), ref.forward(*args)
    for name, a, e in zip(("out", "h_n", "c_n", "gates", "extra"), (out, *st, *saved), (e_out, *e_st, *e_saved)):
        assert_close(a, e, dtype, 3, name)
    d_out, d_state_n = _cotangents(c, e_out, state0)
    bargs = (c, d_out, d_state_n, state0, weights, None, reverse, e_out, e_saved)
    for name, a, e in zip(GRAD_NAMES, _flat(cpp.backward(*bargs)), _flat(ref.backward(*bargs)), strict=True):
        assert_close(a, e, dtype, 6, name)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell", list(TABLE))
def test_trailing_empty_steps_change_nothing(cell, reverse):
    """Steps with no active row (batch_sizes ending in zeros) add zero rows to out and d_gx and change nothing else:
    the same call on the leading steps alone (by the reference) is the oracle."""
    c = spec(cell)
    gx, state0, weights = _inputs(cell, 4, 3, 6, 6)
    bs, n = [3, 2, 0, 0], 2  # the first n steps have rows
    (out, st, saved) = cpp.forward(c, gx, state0, weights, torch.tensor(bs), reverse, True)
    w_n = weights if not c.norm else weights._replace(norm=weights.norm._replace(mask=weights.norm.mask[:n]))
    e_out, e_st, e_saved = ref.forward(c, gx[:n], state0, w_n, torch.tensor(bs[:n]), reverse, True)
    assert_close(out[:n], e_out, F64, n, "out")
    assert (out[n:] == 0).all(), "out of an empty step must be zero"
    for name, a, e in zip(c.states, st, e_st):
        assert_close(a, e, F64, n, f"{name}_n")
    for name, a, e in zip(Saved._fields, saved, e_saved, strict=True):
        if e.numel():
            assert_close(a[:n], e, F64, n, f"saved {name}")
            assert (a[n:] == 0).all(), f"saved {name} of an empty step must be zero"
    d_out, d_state_n = _cotangents(c, out, state0)
    g = cpp.backward(c, d_out, d_state_n, state0, weights, torch.tensor(bs), reverse, out, saved)
    e_saved_n = Saved(*(t[:n] if t.numel() else t for t in saved))
    e = ref.backward(c, d_out[:n], d_state_n, state0, w_n, torch.tensor(bs[:n]), reverse, out[:n], e_saved_n)
    assert_close(g.d_gx[:n], e.d_gx, F64, n, "d_gx")
    assert (g.d_gx[n:] == 0).all(), "d_gx of an empty step must be zero"
    if c.norm:
        assert_close(g.d_extra[:n], e.d_extra, F64, n, "d_extra")
        assert (g.d_extra[n:] == 0).all(), "d_extra of an empty step must be zero"
    for name, a, x in zip(GRAD_NAMES[1:], _flat(g)[1:6], _flat(e)[1:6], strict=True):
        if x is None:
            assert a is None, f"{name}: expected None"
        else:
            assert_close(a, x, F64, 4 * 3, name)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_float32_activations_at_extremes(cell):
    """The float32 gates use a fast exp and reciprocal: saturate like torch at +-inf and huge inputs, keep NaN."""
    c = spec(cell)
    gx, state0, weights = contract_inputs(cell, 3, 4, 40, 40, F32, True)
    gx = gx * 60
    gx[0, 0, :8] = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e30, -1e30, 88.8, -88.8, 1e-8])
    args = (c, gx, state0, weights, None, False, True)
    (out, st, saved), (e_out, e_st, e_saved) = cpp.forward(*args), ref.forward(*args)
    names = ("out", *(f"{s}_n" for s in c.states), "gates", "extra")
    for name, a, e in zip(names, (out, *st[: len(c.states)], *saved), (e_out, *e_st[: len(c.states)], *e_saved)):
        if e.numel():
            assert_close(a, e, name=name, rtol=1e-5, atol=1e-6)


def test_relu_nan_propagates_like_torch():
    c = spec("rnn_relu")
    gx, state0, weights = contract_inputs(c.name, 3, 2, 8, 8, F64, True)
    gx[1, 0, 3] = float("nan")
    got = cpp.forward(c, gx, state0, weights, None, False, True)
    exp = ref.forward(c, gx, state0, weights, None, False, True)
    assert_close(got[0], exp[0], F64, 3, "out with a NaN input")


HALF_TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float16], ids=["f16"])  # bfloat16 has kernels of its own: see below
@pytest.mark.parametrize(
    "cell,P,bs,reverse",
    [
        pytest.param("lstm", 9, PACKED, True, id="lstm-proj-packed-reverse"),
        pytest.param("gru", 16, PACKED, False, id="gru-packed"),
        pytest.param("rnn_relu", 16, None, True, id="rnn_relu-reverse"),
    ],
)
def test_half_precision_matches_reference(cell, P, bs, reverse, dtype):
    """float16 runs the float32 kernels on widened inputs: the reference's recipe, so nearly the same bits. (bfloat16
    runs its own kernels, bfloat16 GEMM operands on AMX: test_bf16_contract_matches_float64 judges them against
    float64, as a fixed tolerance against the reference's rounding cannot.)"""
    c = spec(cell)
    gx, state0, weights = contract_inputs(cell, 5, 5, 16, P, F32, True)
    gx, state0, weights = gx.to(dtype), _to(state0, dtype), _to(weights, dtype)
    batch_sizes = None if bs is None else torch.tensor(bs, dtype=torch.int64)
    args = (c, gx, state0, weights, batch_sizes, reverse, True)
    (out, st, saved), (e_out, e_st, e_saved) = cpp.forward(*args), ref.forward(*args)
    tol = HALF_TOL[dtype]
    names = ("out", "h_n", "c_n", "gates", "extra")
    for name, a, e in zip(names, (out, *st, *saved), (e_out, *e_st, *e_saved), strict=True):
        if e is None:
            assert a is None, f"{name}: expected None"
            continue
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        assert_close(a, e, name=f"forward {name}", rtol=tol, atol=tol)
    d_out, d_state_n = _cotangents(c, e_out, state0)
    bargs = (c, d_out, d_state_n, state0, weights, batch_sizes, reverse, e_out, e_saved)
    g, e = cpp.backward(*bargs), ref.backward(*bargs)
    for name, a, x in zip(GRAD_NAMES, _flat(g), _flat(e), strict=True):
        if x is None:
            assert a is None, f"{name}: expected None"
        else:
            assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
            assert_close(a, x, name=name, rtol=tol, atol=tol)


# ---- bfloat16 kernels (float32 state and accumulation, bfloat16 GEMM operands on AMX) ----

BF16 = torch.bfloat16
# Relative (Frobenius) error of a bfloat16 kernel against float64 on the same inputs: a few roundings of 2^-9
# (h_{t-1} and d_gates enter the GEMMs rounded, outputs are rounded); a wrong block, row or step is off by O(1).
BF16_REL_TOL = 1e-2


def _rel_err(val: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error: an aggregate, so a comparison does not hinge on one rounding."""
    r = ref.double()
    return ((val.double() - r).norm() / r.norm().clamp_min(1e-30)).item()


def _skipped_rows_zero(t: torch.Tensor, active: torch.Tensor, name: str) -> None:
    if t.numel():
        assert (t[~active] == 0).all(), f"{name}: rows a step skips must be zero"


@pytest.mark.parametrize("amx", ["1", "0"], ids=["amx", "mkl"])
@pytest.mark.parametrize("cell,T,B,H,P,bs,reverse,bias", CASES)
def test_bf16_contract_matches_float64(cell, T, B, H, P, bs, reverse, bias, amx, monkeypatch):
    """bfloat16 calls against the reference in float64 on the same (bfloat16-valued) inputs: forward outputs and saved
    tensors, then backward on the kernel's own forward results (its out and saved float32 gates), so that a relu kink
    which rounding moves is not counted as a kernel error. dtypes: bfloat16 results, float32 saved tensors.
    amx=0 runs the GEMMs through MKL instead (FASTRNN_CPP_AMX=0), as on a CPU without AMX."""
    monkeypatch.setenv("FASTRNN_CPP_AMX", amx)
    _check_bf16_contract(cell, T, B, H, P, bs, reverse, bias)


# bfloat16 weight gradients (d W_hh, d W_hr) over all T*B rows with the own float32 kernel forced on (bfloat16 widened
# into its panels and as A is read) and off (MKL's bfloat16 GEMM), whatever the CPU's default: K = (T-1)*B rows in
# chunks of 256 with a tail, G*H rows of d W_hh in blocks of 6 with tails and past a task's 192, P columns in panels
# of 64 with tails; packed and reverse walks.
BF16_WEIGHT_GRAD_CASES = [
    pytest.param("lstm", 40, 7, 70, 70, None, False, True, id="lstm-K273-M280-N70"),
    pytest.param("lstm", 6, 20, 40, 20, [20, 20, 13, 9, 9, 2], True, True, id="lstm-proj-packed-reverse"),
    pytest.param("gru", 3, 100, 33, 33, None, True, False, id="gru-K200-M99-reverse"),
    pytest.param("rnn_tanh", 20, 17, 130, 130, [17] * 10 + [11] * 10, False, True, id="rnn_tanh-K323-N130-packed"),
]


@pytest.mark.parametrize("own", ["1", "0"])
@pytest.mark.parametrize("cell,T,B,H,P,bs,reverse,bias", BF16_WEIGHT_GRAD_CASES)
def test_bf16_weight_gradients_own_gemm_on_and_off(cell, T, B, H, P, bs, reverse, bias, own, monkeypatch):
    monkeypatch.setenv("FASTRNN_CPP_OWN_GEMM", own)
    _check_bf16_contract(cell, T, B, H, P, bs, reverse, bias)


def _check_bf16_contract(cell, T, B, H, P, bs, reverse, bias):
    c = spec(cell)
    gx, state0, weights = contract_inputs(cell, T, B, H, P, F32, bias)
    gx, state0, weights = gx.to(BF16), _to(state0, BF16), _to(weights, BF16)
    batch_sizes = None if bs is None else torch.tensor(bs, dtype=torch.int64)
    active = torch.arange(B)[None, :] < torch.tensor(bs if bs is not None else [B] * T)[:, None]  # [T, B]
    out, st, saved = cpp.forward(c, gx, state0, weights, batch_sizes, reverse, True)
    e_out, e_st, e_saved = ref.forward(c, gx.double(), _to(state0, F64), _to(weights, F64), batch_sizes, reverse, True)
    for name, a, e in zip(("out", *c.states), (out, *st), (e_out, *e_st)):
        assert a.dtype == BF16, f"{name}: dtype {a.dtype}"
        err = _rel_err(a, e)
        assert err <= BF16_REL_TOL, f"forward {name}: relative error {err:.3g} > {BF16_REL_TOL}"
    _skipped_rows_zero(out, active, "out")
    for name, a, e in zip(Saved._fields, saved, e_saved, strict=True):
        assert a.dtype == F32, f"saved {name}: dtype {a.dtype}, expected float32 (cells.saved_dtype)"
        assert a.shape == e.shape, f"saved {name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        if e.numel():
            err = _rel_err(a[active], e[active])
            assert err <= BF16_REL_TOL, f"saved {name}: relative error {err:.3g} > {BF16_REL_TOL}"
            _skipped_rows_zero(a, active, f"saved {name}")
    d_out, d_state_n = _cotangents(c, out, state0)
    g = cpp.backward(c, d_out, d_state_n, state0, weights, batch_sizes, reverse, out, saved)
    e = ref.backward(
        c, d_out.double(), _to(d_state_n, F64), _to(state0, F64), _to(weights, F64), batch_sizes, reverse,
        out.double(), Saved(*(t.double() for t in saved)),
    )  # fmt: skip
    for name, a, x in zip(GRAD_NAMES, _flat(g), _flat(e), strict=True):
        if x is None:
            assert a is None, f"{name}: expected None"
            continue
        assert a.dtype == BF16, f"{name}: dtype {a.dtype}"
        err = _rel_err(a, x)
        assert err <= BF16_REL_TOL, f"{name}: relative error {err:.3g} > {BF16_REL_TOL}"
    _skipped_rows_zero(g.d_gx, active, "d_gx")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_fp32_bf16_gemm_opt_in(cell, monkeypatch):
    """FASTRNN_CPP_FP32_BF16_GEMM=1: float32 calls keep float32 tensors but round their step GEMMs' operands to
    bfloat16, so they land within bfloat16's error of float64 and no longer within float32's; unset, float32 is exact
    to float32 again."""
    c = spec(cell)
    T, B, H = 6, 5, 40
    gx, state0, weights = contract_inputs(cell, T, B, H, H, F32, True)
    args64 = (c, gx.double(), _to(state0, F64), _to(weights, F64), None, False, True)
    e_out, _, e_saved = ref.forward(*args64)
    d_out, d_state_n = _cotangents(c, e_out, state0)
    d_state_n = _to(d_state_n, F32)
    errs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FASTRNN_CPP_FP32_BF16_GEMM", flag)
        out, _, saved = cpp.forward(c, gx, state0, weights, None, False, True)
        g = cpp.backward(c, d_out.float(), d_state_n, state0, weights, None, False, out, saved)
        e = ref.backward(
            c, d_out.double(), _to(d_state_n, F64), _to(state0, F64), _to(weights, F64), None, False, out.double(),
            Saved(*(t.double() for t in saved)),
        )  # fmt: skip
        assert out.dtype == F32 and g.d_gx.dtype == F32 and g.d_weights.w_hh.dtype == F32
        errs[flag] = [_rel_err(out, e_out), _rel_err(g.d_gx, e.d_gx), _rel_err(g.d_state0.h, e.d_state0.h)]
    for name, on, off in zip(("out", "d_gx", "d_h0"), errs["1"], errs["0"], strict=True):
        assert on <= BF16_REL_TOL, f"{name} with bfloat16 GEMMs: relative error {on:.3g} > {BF16_REL_TOL}"
        assert off <= 1e-5, f"{name} in float32: relative error {off:.3g}"
        assert on > 1e-5, f"{name}: FASTRNN_CPP_FP32_BF16_GEMM=1 left float32's error ({on:.3g}): GEMMs not bfloat16?"


def _module_results(m: nn.Module, x, hx, lengths, dtype, autocast: bool) -> list[torch.Tensor]:
    """Output, final states and every gradient (input, states, parameters) for a fixed random cotangent."""
    from torch.nn.utils.rnn import pack_padded_sequence

    xi = x.detach().clone().to(dtype).requires_grad_()
    hxs = [h.detach().clone().to(dtype).requires_grad_() for h in hx]
    inp = pack_padded_sequence(xi, lengths) if lengths is not None else xi
    with torch.autocast("cpu", BF16, enabled=autocast):
        out, st = m(inp, tuple(hxs) if len(hxs) == 2 else hxs[0])
    outs = [out.data if lengths is not None else out] + (list(st) if isinstance(st, tuple) else [st])
    gen = torch.Generator().manual_seed(3)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=F64)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [xi, *hxs, *m.parameters()])
    return [o.detach() for o in outs] + list(grads)


BIDIR2 = {"bidirectional": True, "num_layers": 2}
BF16_MODULES = [
    pytest.param("LSTM", {}, 6, 4, None, False, id="lstm"),
    pytest.param("LSTM", {"proj_size": 12}, 5, 3, None, False, id="lstm-proj"),
    pytest.param("LSTM", BIDIR2, 6, 5, [6, 5, 5, 3, 1], False, id="lstm-2layer-bidir-packed"),
    pytest.param("LSTM", {}, 7, 1, None, False, id="lstm-B1"),
    pytest.param("LSTM", {}, 6, 4, None, True, id="lstm-autocast"),
    pytest.param("GRU", {}, 6, 4, None, False, id="gru"),
    pytest.param("GRU", {"bidirectional": True}, 6, 5, [6, 4, 4, 2, 1], False, id="gru-bidir-packed"),
    pytest.param("GRU", {}, 7, 1, None, False, id="gru-B1"),
    pytest.param("RNN", {}, 6, 4, None, False, id="rnn-tanh"),
    pytest.param("RNN", {"nonlinearity": "relu"}, 6, 4, None, False, id="rnn-relu"),
    pytest.param("RNN", {"bidirectional": True}, 6, 5, [6, 5, 3, 3, 2], False, id="rnn-tanh-bidir-packed"),
    pytest.param("RNN", {}, 7, 1, None, True, id="rnn-tanh-B1-autocast"),
]


@pytest.mark.parametrize("kind,extra,T,B,lengths,autocast", BF16_MODULES)
def test_bf16_module_error_vs_torch(kind, extra, T, B, lengths, autocast):
    """bfloat16 modules (and float32 ones under CPU autocast) on the cpp backend: relative error against a float64
    torch.nn at most 2x that of torch.nn itself in the same setting, for the output, final states and every gradient."""
    I, H = 24, 48
    kw = dict(input_size=I, hidden_size=H, **extra)
    torch.manual_seed(0)
    ref64 = getattr(nn, kind)(**kw).double()
    theirs = getattr(nn, kind)(**kw)
    ours = getattr(fastrnn, kind)(**kw, backend="cpp")
    theirs.load_state_dict(ref64.state_dict())
    ours.load_state_dict(ref64.state_dict())
    dt = F32 if autocast else BF16
    if not autocast:
        theirs, ours = theirs.to(BF16), ours.to(BF16)
    D, L = (2 if extra.get("bidirectional") else 1), extra.get("num_layers", 1)
    P = extra.get("proj_size") or H
    x = torch.randn(T, B, I).to(BF16).double()  # bfloat16 values, so every run sees the same input
    hx = [torch.randn(D * L, B, P).to(BF16).double()]
    if kind == "LSTM":
        hx.append(torch.randn(D * L, B, H).to(BF16).double())
    exact = _module_results(ref64, x, hx, lengths, F64, False)
    e_torch = _module_results(theirs, x, hx, lengths, dt, autocast)
    e_ours = _module_results(ours, x, hx, lengths, dt, autocast)
    for i, (f, t, r) in enumerate(zip(e_ours, e_torch, exact, strict=True)):
        assert f.dtype == t.dtype, f"{kind} result {i}: dtype {f.dtype} != torch.nn's {t.dtype}"
        ef, et = _rel_err(f, r), _rel_err(t, r)
        if os.environ.get("FASTRNN_TEST_REPORT_ERRORS") == "1":
            print(f"{kind} {extra} result {i}: cpp {ef:.3g} torch.nn {et:.3g} ratio {ef / max(et, 1e-30):.2f}")
        assert ef <= 2 * et + 1e-6, f"{kind} result {i}: cpp error {ef:.3g} > 2x torch.nn's {et:.3g}"


def test_supports_and_available():
    assert cpp.available() == (True, "")
    for dtype in (F32, F64, torch.bfloat16, torch.float16):
        for cell in ("gru", *NORM_CELLS):
            assert cpp.supports(spec(cell), dtype, CPU)[0]
    ok, why = cpp.supports(spec("gru"), torch.int32, CPU)
    assert not ok and "int32" in why
    ok, why = cpp.supports(spec("lstm"), F32, torch.device("meta"))
    assert not ok and "CPU" in why


# ---- zero hidden size through the modules, against torch.nn ----

ZERO_H_CELLS = [
    pytest.param("LSTMCell", {}, id="lstmcell"),
    pytest.param("GRUCell", {}, id="grucell"),
    pytest.param("RNNCell", {}, id="rnncell-tanh"),
    pytest.param("RNNCell", {"nonlinearity": "relu"}, id="rnncell-relu"),
]


@pytest.mark.parametrize("shape", ["batched", "unbatched", "hx"])
@pytest.mark.parametrize("kind,extra", ZERO_H_CELLS)
def test_zero_hidden_size_cell(kind, extra, shape):
    """torch.nn's Cell(10, 0) returns empty states, zero gradients for the input and empty ones for the weights."""
    torch.manual_seed(0)
    theirs = getattr(nn, kind)(10, 0, **extra)
    ours = getattr(fastrnn, kind)(10, 0, **extra, backend="cpp")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(10) if shape == "unbatched" else torch.randn(3, 10)
    lead = x.shape[:-1]
    hx = None
    if shape == "hx":
        hx = torch.randn(*lead, 0)
        hx = (hx, torch.randn(*lead, 0)) if cell_for(kind, extra.get("nonlinearity", "tanh")).has_cell_state else hx
    results = []
    for m in (theirs, ours):
        xi = x.clone().requires_grad_()
        y = m(xi) if hx is None else m(xi, hx)
        ys = y if isinstance(y, tuple) else (y,)
        loss = sum(t.sum() for t in ys)
        grads = torch.autograd.grad(loss, [xi, *m.parameters()])
        results.append((ys, grads))
    (e_ys, e_grads), (a_ys, a_grads) = results
    for i, (a, e) in enumerate(zip(a_ys, e_ys, strict=True)):
        assert_close(a, e, F32, 1, f"output[{i}]")
    for i, (a, e) in enumerate(zip(a_grads, e_grads, strict=True)):
        assert_close(a, e, F32, 1, f"grad[{i}]")


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_zero_hidden_size_layer_raises_like_torch(kind):
    with pytest.raises(ValueError) as theirs:
        getattr(nn, kind)(10, 0)
    with pytest.raises(ValueError) as ours:
        getattr(fastrnn, kind)(10, 0, backend="cpp")
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_zero_steps_raises_like_torch(kind):
    x = torch.randn(0, 3, 10)
    with pytest.raises(RuntimeError) as theirs:
        getattr(nn, kind)(10, 4)(x)
    with pytest.raises(RuntimeError) as ours:
        getattr(fastrnn, kind)(10, 4, backend="cpp")(x)
    assert str(ours.value) == str(theirs.value)


# ---- the raw entry points must refuse bad arguments with RuntimeError before touching memory ----


def _fwd_args(cell: str, T=4, B=3, H=5, P=None, dtype=F32) -> dict:
    """Keyword arguments of _C.recurrence_forward for a valid call (a normalised cell's with norm, zmask, zkeep)."""
    c = spec(cell)
    gx, state0, (w_hh, b_hh, w_hr, norm) = _inputs(cell, T, B, H, P or H, dtype, True)
    kw = dict(
        cell_id=c.kernel_id, gx=gx, h0=state0.h, c0=state0.c, w_hh=w_hh, b_hh=b_hh, w_hr=w_hr, batch_sizes=None,
        reverse=False, need_saved=True,
    )  # fmt: skip
    if norm is not None:
        kw.update(norm=norm.params, zmask=norm.mask, zkeep=norm.keep)
    return kw


def _bwd_args(cell: str) -> dict:
    """Keyword arguments of _C.recurrence_backward for a valid call, on what forward returned."""
    kw = _fwd_args(cell)
    out, h_n, c_n, gates, extra = _C.recurrence_forward(**kw)
    norm = {k: kw[k] for k in ("norm", "zmask", "zkeep") if k in kw}
    return dict(
        **norm,
        cell_id=kw["cell_id"],
        d_out=torch.randn_like(out),
        d_h_n=torch.randn_like(h_n),
        d_c_n=None if c_n is None else torch.randn_like(c_n),
        h0=kw["h0"],
        c0=kw["c0"],
        w_hh=kw["w_hh"],
        b_hh=kw["b_hh"],
        w_hr=kw["w_hr"],
        batch_sizes=None,
        reverse=False,
        out=out,
        gates=gates,
        extra=extra,
    )


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, not contiguous (a slice of a wider tensor)."""
    w = torch.cat([t, t], dim=-1)
    return w[..., : t.shape[-1]]


BAD = [
    pytest.param("lstm", "gx", lambda t: t[:, :, :-1], "gx", id="lstm-gx-width"),
    pytest.param("lstm", "gx", lambda t: t[0], "gx", id="lstm-gx-2d"),
    pytest.param("lstm", "h0", lambda t: t[:-1], "h0", id="lstm-h0-rows"),
    pytest.param("lstm", "c0", lambda t: t[:, :-1], "c0", id="lstm-c0-width"),
    pytest.param("lstm", "c0", _wide, "contiguous", id="lstm-c0-noncontiguous"),
    pytest.param("lstm", "c0", lambda t: None, "c0 .* is required", id="lstm-c0-missing"),
    pytest.param("lstm", "w_hh", lambda t: t[:-1], "w_hh", id="lstm-w_hh-rows"),
    pytest.param("lstm", "b_hh", lambda t: t[:-4], "b_hh", id="lstm-b_hh"),
    pytest.param("lstm", "b_hh", lambda t: t.double(), "dtype", id="lstm-b_hh-dtype"),
    pytest.param("lstm", "w_hr", lambda t: torch.randn(5, 4), "w_hr", id="lstm-w_hr"),
    pytest.param("lstm", "gx", lambda t: t.half(), "float32 or float64", id="lstm-gx-half"),
    pytest.param("lstm", "gx", lambda t: t.to(torch.device("meta")), "CPU", id="lstm-gx-meta"),
    pytest.param("gru", "gx", _wide, "contiguous", id="gru-gx-noncontiguous"),
    pytest.param("gru", "h0", lambda t: t.double(), "dtype", id="gru-h0-dtype"),
    pytest.param("gru", "w_hh", lambda t: t[:, :-1], "w_hh", id="gru-w_hh"),
    pytest.param("gru", "c0", lambda t: torch.randn(3, 5), "no cell state", id="gru-c0-given"),
    pytest.param("gru", "w_hr", lambda t: torch.randn(5, 5), "no projection", id="gru-w_hr-given"),
    pytest.param("gru", "batch_sizes", lambda t: torch.tensor([3, 2, 3, 1]), "non-increasing", id="gru-bs-increasing"),
    pytest.param("gru", "batch_sizes", lambda t: torch.tensor([9, 3, 2, 1]), "outside", id="gru-bs-too-large"),
    pytest.param("gru", "batch_sizes", lambda t: torch.tensor([3, 2, 1]), "batch_sizes", id="gru-bs-length"),
    pytest.param("gru", "batch_sizes", lambda t: torch.tensor([3, 2, 1, -1]), "outside", id="gru-bs-negative"),
    pytest.param("gru", "batch_sizes", lambda t: torch.tensor([3.0, 2, 1, 1]), "int64", id="gru-bs-float"),
    pytest.param("rnn_tanh", "w_hh", lambda t: torch.randn(5, 4), "w_hh", id="rnn-w_hh"),
    pytest.param("rnn_tanh", "gx", lambda t: t[:, :, :-1], "gx", id="rnn-gx"),
    pytest.param("rnn_tanh", "gx", lambda t: t.to(torch.int64), "float32 or float64", id="rnn-gx-int"),
    # the normalised cells' Norm arguments, and Norm refused by the other cells
    pytest.param("ln_lstm", "norm", lambda t: t[:-1], r"norm \[10H\]", id="ln_lstm-norm-length"),
    pytest.param("ln_lstm", "norm", lambda t: torch.randn(6 * 5), r"norm \[10H\]", id="ln_lstm-norm-gru-width"),
    pytest.param("ln_lstm", "norm", lambda t: None, "norm .* is required", id="ln_lstm-norm-missing"),
    pytest.param("ln_lstm", "norm", lambda t: t.double(), "dtype", id="ln_lstm-norm-dtype"),
    pytest.param("ln_lstm", "norm", lambda t: t.to(torch.device("meta")), "CPU", id="ln_lstm-norm-meta"),
    pytest.param(
        "ln_lstm", "norm", lambda t: torch.stack([t, t], 1)[:, 0], "contiguous", id="ln_lstm-norm-noncontiguous"
    ),
    pytest.param("ln_lstm", "zmask", lambda t: t[:, :, :-1], "zmask", id="ln_lstm-zmask-width"),
    pytest.param("ln_lstm", "zmask", lambda t: t[:-1], "zmask", id="ln_lstm-zmask-steps"),
    pytest.param("ln_lstm", "zmask", lambda t: t.double(), "zmask .* dtype", id="ln_lstm-zmask-dtype"),
    pytest.param("ln_lstm", "zmask", _wide, "zmask .* contiguous", id="ln_lstm-zmask-noncontiguous"),
    pytest.param("ln_lstm", "zkeep", lambda t: float("nan"), "zkeep", id="ln_lstm-zkeep-nan"),
    pytest.param("ln_lstm", "b_hh", lambda t: torch.zeros(20), "b_hh must be None", id="ln_lstm-b_hh-given"),
    pytest.param("ln_lstm", "c0", lambda t: None, "c0 .* is required", id="ln_lstm-c0-missing"),
    pytest.param("ln_lstm", "w_hr", lambda t: torch.randn(5, 5), "no projection", id="ln_lstm-w_hr-given"),
    pytest.param("ln_gru", "norm", lambda t: t[:-1], r"norm \[6H\]", id="ln_gru-norm-length"),
    pytest.param("ln_gru", "norm", lambda t: t.view(6, 5), r"norm \[6H\]", id="ln_gru-norm-2d"),
    pytest.param("ln_gru", "zmask", lambda t: t[0], "zmask", id="ln_gru-zmask-2d"),
    pytest.param("ln_gru", "c0", lambda t: torch.randn(3, 5), "no cell state", id="ln_gru-c0-given"),
    pytest.param("ln_gru", "bf16_gemm", lambda t: True, "bf16_gemm must be false", id="ln_gru-bf16_gemm"),
    pytest.param("lstm", "norm", lambda t: torch.ones(50), "not layer-normalised", id="lstm-norm-given"),
    pytest.param("gru", "zmask", lambda t: torch.ones(4, 3, 5), "no zoneout", id="gru-zmask-given"),
]


@pytest.mark.parametrize("cell,arg,bad,msg", BAD)
def test_forward_rejects_bad_arguments(cell, arg, bad, msg):
    kw = _fwd_args(cell)
    _C.recurrence_forward(**kw)  # the unchanged arguments are accepted
    kw[arg] = bad(kw.get(arg))
    with pytest.raises(RuntimeError, match=msg):
        _C.recurrence_forward(**kw)


@pytest.mark.parametrize("cell", NORM_CELLS)
def test_norm_bfloat16_is_refused_by_the_kernels(cell):
    """The extension has no bfloat16 kernel for a normalised cell (whole-row layer norms): a bfloat16 call is refused
    by name, and fastrnn.backends.cpp runs it on the float32 kernels instead."""
    kw = _fwd_args(cell)
    bf = {k: v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
    with pytest.raises(RuntimeError, match=f"{cell} has no bfloat16 kernel"):
        _C.recurrence_forward(**bf)


def test_missing_tensor_is_a_type_error():
    """pybind11 refuses None for a required tensor before any C++ runs."""
    with pytest.raises(TypeError, match="incompatible function arguments"):
        _C.recurrence_forward(**{**_fwd_args("rnn_tanh"), "h0": None})


BAD_BWD = [
    pytest.param("lstm", "gates", lambda t: t[:, :-1], "gates", id="lstm-gates-rows"),
    pytest.param("lstm", "extra", lambda t: t[:-1], "extra", id="lstm-extra-steps"),
    pytest.param("lstm", "d_out", lambda t: t[..., :-1], "d_out", id="lstm-d_out"),
    pytest.param("lstm", "d_c_n", _wide, "contiguous", id="lstm-d_c_n-noncontiguous"),
    pytest.param("lstm", "d_c_n", lambda t: None, "d_c_n .* is required", id="lstm-d_c_n-missing"),
    pytest.param("lstm", "out", lambda t: t.double(), "dtype", id="lstm-out-dtype"),
    pytest.param("lstm", "batch_sizes", lambda t: torch.tensor([3, 3, 3, 7]), "batch_sizes", id="lstm-bs"),
    pytest.param("gru", "gates", lambda t: torch.empty(0), "gates", id="gru-gates-empty"),
    pytest.param("gru", "extra", lambda t: t.double(), "dtype", id="gru-extra-dtype"),
    pytest.param("gru", "d_h_n", lambda t: t[:-1], "d_h_n", id="gru-d_h_n"),
    pytest.param("rnn_relu", "out", lambda t: t[:, :-1], "out", id="rnn-out-rows"),
    pytest.param("rnn_relu", "d_out", _wide, "d_out", id="rnn-d_out-noncontiguous"),
    pytest.param("rnn_relu", "gates", lambda t: torch.zeros(4, 3, 5), "gates", id="rnn-gates-not-empty"),
    pytest.param("ln_lstm", "extra", lambda t: t[..., :5], r"extra \[T, B, 5H\]", id="ln_lstm-extra-width"),
    pytest.param("ln_lstm", "gates", lambda t: t[..., :15], "gates", id="ln_lstm-gates-width"),
    pytest.param("ln_lstm", "norm", lambda t: None, "norm .* is required", id="ln_lstm-norm-missing"),
    pytest.param("ln_lstm", "norm", lambda t: t[:-5], r"norm \[10H\]", id="ln_lstm-norm-length"),
    pytest.param("ln_lstm", "zmask", lambda t: t[:, :-1], "zmask", id="ln_lstm-zmask-rows"),
    pytest.param("ln_gru", "extra", lambda t: t[..., :5], r"extra \[T, B, 4H\]", id="ln_gru-extra-width"),
    pytest.param("ln_gru", "zmask", lambda t: t.double(), "zmask .* dtype", id="ln_gru-zmask-dtype"),
    pytest.param("ln_gru", "b_hh", lambda t: torch.zeros(15), "b_hh must be None", id="ln_gru-b_hh-given"),
    pytest.param("gru", "norm", lambda t: torch.ones(30), "not layer-normalised", id="gru-norm-given"),
]


@pytest.mark.parametrize("cell,arg,bad,msg", BAD_BWD)
def test_backward_rejects_bad_arguments(cell, arg, bad, msg):
    b = _bwd_args(cell)
    _C.recurrence_backward(**b)  # the unchanged arguments are accepted
    b[arg] = bad(b.get(arg))
    with pytest.raises(RuntimeError, match=msg):
        _C.recurrence_backward(**b)
