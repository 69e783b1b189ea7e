"""The cpp backend (fastrnn._C) against the reference backend: the contract itself (outputs, saved gates/extra,
every backward gradient) for every cell, proj_size, packed batch_sizes, reverse, float64 and float32, odd sizes;
the raw extension functions refusing bad arguments with RuntimeError; float64 gradcheck through the modules."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastrnn._C", reason="the C++ extension fastrnn._C is not built")

from fastrnn import _C  # noqa: E402
from fastrnn.backends import get  # noqa: E402
from tests.helpers import assert_close, assert_contract_matches_reference, contract_inputs  # noqa: E402

cpp, ref = get("cpp"), get("reference")
F32, F64 = torch.float32, torch.float64


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
    # a step past 2^24 flops: one GEMM threaded by BLAS, then the parallel pointwise pass
    pytest.param("lstm", 2, 16, 512, 512, [16, 7], True, True, id="lstm-large-step-packed-reverse"),
    pytest.param("gru", 3, 16, 300, 300, [16, 9, 4], False, True, id="gru-parallel-packed"),
    pytest.param("rnn_tanh", 3, 40, 520, 520, None, False, True, id="rnn_tanh-parallel"),
]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell,T,B,H,P,bs,reverse,bias", CASES)
def test_contract_matches_reference(cell, T, B, H, P, bs, reverse, bias, dtype):
    assert_contract_matches_reference(cpp, cell, T, B, H, P, bs, reverse, bias, dtype)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_inference_saves_nothing(cell):
    gx, h0, c0, w_hh, b_hh, _ = contract_inputs(cell, 4, 3, 8, 8, F64, True)
    out, h_n, c_n, gates, extra = cpp.forward(cell, gx, h0, c0, w_hh, b_hh, None, None, False, False)
    assert gates.numel() == 0 and extra.numel() == 0
    exp = ref.forward(cell, gx, h0, c0, w_hh, b_hh, None, None, False, False)
    assert_close(out, exp[0], F64, 4, "out")
    assert_close(h_n, exp[1], F64, 4, "h_n")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("T,B,bs", [(0, 3, None), (3, 0, None), (2, 3, [3, 0])], ids=["T0", "B0", "empty-step"])
def test_degenerate_sizes(cell, T, B, bs):
    gx, h0, c0, w_hh, b_hh, _ = contract_inputs(cell, T, B, 4, 4, F64, True)
    batch_sizes = None if bs is None else torch.tensor(bs, dtype=torch.int64)
    args = (cell, gx, h0, c0, w_hh, b_hh, None, batch_sizes, False, True)
    got, exp = cpp.forward(*args), ref.forward(*args)
    for name, a, e in zip(("out", "h_n", "c_n"), got[:3], exp[:3], strict=True):
        assert_close(a, e, F64, 1, name)
    ones = (torch.ones_like(exp[0]), torch.ones_like(h0), None if c0 is None else torch.ones_like(c0))
    bargs = (cell, *ones, h0, c0, w_hh, b_hh, None, batch_sizes, False, exp[0], *exp[3:])
    for name, a, e in zip(("d_gx", "d_h0", "d_c0", "d_w_hh", "d_b_hh"), cpp.backward(*bargs), ref.backward(*bargs)):
        if e is not None:
            assert_close(a, e, F64, 1, name)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_float32_activations_at_extremes(cell):
    """The float32 gates use a fast exp and reciprocal: saturate like torch at +-inf and huge inputs, keep NaN."""
    gx, h0, c0, w_hh, b_hh, _ = contract_inputs(cell, 3, 4, 40, 40, F32, True)
    gx = gx * 60
    gx[0, 0, :8] = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e30, -1e30, 88.8, -88.8, 1e-8])
    args = (cell, gx, h0, c0, w_hh, b_hh, None, None, False, True)
    for name, a, e in zip(("out", "h_n", "c_n", "gates", "extra"), cpp.forward(*args), ref.forward(*args)):
        if e.numel():
            assert_close(a, e, name=name, rtol=1e-5, atol=1e-6)


def test_relu_nan_propagates_like_torch():
    gx, h0, _, w_hh, b_hh, _ = contract_inputs("rnn_relu", 3, 2, 8, 8, F64, True)
    gx[1, 0, 3] = float("nan")
    got = cpp.forward("rnn_relu", gx, h0, None, w_hh, b_hh, None, None, False, True)
    exp = ref.forward("rnn_relu", gx, h0, None, w_hh, b_hh, None, None, False, True)
    assert_close(got[0], exp[0], F64, 3, "out with a NaN input")


HALF_TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize(
    "cell,P,bs,reverse",
    [
        pytest.param("lstm", 9, PACKED, True, id="lstm-proj-packed-reverse"),
        pytest.param("gru", 16, PACKED, False, id="gru-packed"),
        pytest.param("rnn_relu", 16, None, True, id="rnn_relu-reverse"),
    ],
)
def test_half_precision_matches_reference(cell, P, bs, reverse, dtype):
    """Half types run the float32 kernels on widened inputs: the reference's recipe, so nearly the same bits."""
    inputs = contract_inputs(cell, 5, 5, 16, P, F32, True)
    gx, h0, c0, w_hh, b_hh, w_hr = (None if t is None else t.to(dtype) for t in inputs)
    batch_sizes = None if bs is None else torch.tensor(bs, dtype=torch.int64)
    args = (cell, gx, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse, True)
    got, exp = cpp.forward(*args), ref.forward(*args)
    tol = HALF_TOL[dtype]
    for name, a, e in zip(("out", "h_n", "c_n", "gates", "extra"), got, exp, strict=True):
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        assert_close(a, e, name=f"forward {name}", rtol=tol, atol=tol)
    d_out, d_h_n = torch.randn_like(exp[0]), torch.randn_like(h0)
    d_c_n = torch.randn_like(c0) if c0 is not None else None
    bargs = (cell, d_out, d_h_n, d_c_n, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse, exp[0], *exp[3:])
    for name, a, e in zip(
        ("d_gx", "d_h0", "d_c0", "d_w_hh", "d_b_hh", "d_w_hr"), cpp.backward(*bargs), ref.backward(*bargs), strict=True
    ):
        if e is None:
            assert a is None, f"{name}: expected None"
        else:
            assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
            assert_close(a, e, name=name, rtol=tol, atol=tol)


def test_supports_and_available():
    assert cpp.available() == (True, "")
    for dtype in (F32, F64, torch.bfloat16, torch.float16):
        assert cpp.supports("gru", dtype, torch.device("cpu"))[0]
    ok, why = cpp.supports("gru", torch.int32, torch.device("cpu"))
    assert not ok and "int32" in why
    ok, why = cpp.supports("lstm", F32, torch.device("meta"))
    assert not ok and "CPU" in why


# ---- the raw extension must refuse bad arguments with RuntimeError before touching memory ----


def _lstm_args(T=4, B=3, H=5, P=5, dtype=F32):
    gx, h0, c0, w_hh, b_hh, w_hr = contract_inputs("lstm", T, B, H, P, dtype, True)
    return dict(gx=gx, h0=h0, c0=c0, w_hh=w_hh, b_hh=b_hh, w_hr=w_hr, batch_sizes=None, reverse=False, need_saved=True)


def _gru_args(T=4, B=3, H=5, dtype=F32):
    gx, h0, _, w_hh, b_hh, _ = contract_inputs("gru", T, B, H, H, dtype, True)
    return dict(gx=gx, h0=h0, w_hh=w_hh, b_hh=b_hh, batch_sizes=None, reverse=False, need_saved=True)


def _rnn_args(T=4, B=3, H=5, dtype=F32):
    gx, h0, _, w_hh, b_hh, _ = contract_inputs("rnn_tanh", T, B, H, H, dtype, True)
    return dict(gx=gx, h0=h0, w_hh=w_hh, b_hh=b_hh, batch_sizes=None, reverse=False, relu=False)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, not contiguous (a slice of a wider tensor)."""
    w = torch.cat([t, t], dim=-1)
    return w[..., : t.shape[-1]]


BAD = [
    pytest.param(_C.lstm_forward, _lstm_args, "gx", lambda t: t[:, :, :-1], "gx", id="lstm-gx-width"),
    pytest.param(_C.lstm_forward, _lstm_args, "gx", lambda t: t[0], "gx", id="lstm-gx-2d"),
    pytest.param(_C.lstm_forward, _lstm_args, "h0", lambda t: t[:-1], "h0", id="lstm-h0-rows"),
    pytest.param(_C.lstm_forward, _lstm_args, "c0", lambda t: t[:, :-1], "c0", id="lstm-c0-width"),
    pytest.param(_C.lstm_forward, _lstm_args, "c0", _wide, "contiguous", id="lstm-c0-noncontiguous"),
    pytest.param(_C.lstm_forward, _lstm_args, "w_hh", lambda t: t[:-1], "w_hh", id="lstm-w_hh-rows"),
    pytest.param(_C.lstm_forward, _lstm_args, "b_hh", lambda t: t[:-4], "b_hh", id="lstm-b_hh"),
    pytest.param(_C.lstm_forward, _lstm_args, "b_hh", lambda t: t.double(), "dtype", id="lstm-b_hh-dtype"),
    pytest.param(_C.lstm_forward, _lstm_args, "w_hr", lambda t: torch.randn(5, 4), "w_hr", id="lstm-w_hr"),
    pytest.param(_C.lstm_forward, _lstm_args, "gx", lambda t: t.half(), "float32 or float64", id="lstm-gx-half"),
    pytest.param(_C.lstm_forward, _lstm_args, "gx", lambda t: t.to(torch.device("meta")), "CPU", id="lstm-gx-meta"),
    pytest.param(_C.gru_forward, _gru_args, "gx", _wide, "contiguous", id="gru-gx-noncontiguous"),
    pytest.param(_C.gru_forward, _gru_args, "h0", lambda t: t.double(), "dtype", id="gru-h0-dtype"),
    pytest.param(_C.gru_forward, _gru_args, "w_hh", lambda t: t[:, :-1], "w_hh", id="gru-w_hh"),
    pytest.param(
        _C.gru_forward,
        _gru_args,
        "batch_sizes",
        lambda t: torch.tensor([3, 2, 3, 1]),
        "non-increasing",
        id="gru-bs-increasing",
    ),
    pytest.param(
        _C.gru_forward, _gru_args, "batch_sizes", lambda t: torch.tensor([9, 3, 2, 1]), "outside", id="gru-bs-too-large"
    ),
    pytest.param(
        _C.gru_forward, _gru_args, "batch_sizes", lambda t: torch.tensor([3, 2, 1]), "batch_sizes", id="gru-bs-length"
    ),
    pytest.param(
        _C.gru_forward, _gru_args, "batch_sizes", lambda t: torch.tensor([3, 2, 1, -1]), "outside", id="gru-bs-negative"
    ),
    pytest.param(
        _C.gru_forward, _gru_args, "batch_sizes", lambda t: torch.tensor([3.0, 2, 1, 1]), "int64", id="gru-bs-float"
    ),
    pytest.param(_C.rnn_forward, _rnn_args, "w_hh", lambda t: torch.randn(5, 4), "w_hh", id="rnn-w_hh"),
    pytest.param(_C.rnn_forward, _rnn_args, "gx", lambda t: t[:, :, :-1], "gx", id="rnn-gx"),
    pytest.param(_C.rnn_forward, _rnn_args, "gx", lambda t: t.to(torch.int64), "float32 or float64", id="rnn-gx-int"),
]


@pytest.mark.parametrize("fn,make,arg,bad,msg", BAD)
def test_forward_rejects_bad_arguments(fn, make, arg, bad, msg):
    kw = make()
    kw[arg] = bad(kw[arg])
    with pytest.raises(RuntimeError, match=msg):
        fn(**kw)


def test_missing_tensor_is_a_type_error():
    """pybind11 refuses None for a required tensor before any C++ runs."""
    with pytest.raises(TypeError, match="incompatible function arguments"):
        _C.rnn_forward(**{**_rnn_args(), "h0": None})


def _saved(cell: str, kw: dict):
    fwd = {"lstm": _C.lstm_forward, "gru": _C.gru_forward}[cell]
    return fwd(**kw)


BAD_BWD = [
    pytest.param("lstm", "gates", lambda t: t[:, :-1], "gates", id="lstm-gates-rows"),
    pytest.param("lstm", "extra", lambda t: t[:-1], "extra", id="lstm-extra-steps"),
    pytest.param("lstm", "d_out", lambda t: t[..., :-1], "d_out", id="lstm-d_out"),
    pytest.param("lstm", "d_c_n", _wide, "contiguous", id="lstm-d_c_n-noncontiguous"),
    pytest.param("lstm", "out", lambda t: t.double(), "dtype", id="lstm-out-dtype"),
    pytest.param("lstm", "batch_sizes", lambda t: torch.tensor([3, 3, 3, 7]), "batch_sizes", id="lstm-bs"),
    pytest.param("gru", "gates", lambda t: torch.empty(0), "gates", id="gru-gates-empty"),
    pytest.param("gru", "extra", lambda t: t.double(), "dtype", id="gru-extra-dtype"),
    pytest.param("gru", "d_h_n", lambda t: t[:-1], "d_h_n", id="gru-d_h_n"),
]


@pytest.mark.parametrize("cell,arg,bad,msg", BAD_BWD)
def test_backward_rejects_bad_arguments(cell, arg, bad, msg):
    kw = _lstm_args() if cell == "lstm" else _gru_args()
    saved = _saved(cell, kw)
    out, h_n = saved[0], saved[1]
    b = dict(
        d_out=torch.randn_like(out),
        d_h_n=torch.randn_like(h_n),
        h0=kw["h0"],
        w_hh=kw["w_hh"],
        b_hh=kw["b_hh"],
        batch_sizes=None,
        reverse=False,
        out=out,
        gates=saved[-2],
        extra=saved[-1],
    )
    fn = _C.gru_backward
    if cell == "lstm":
        b.update(d_c_n=torch.randn_like(kw["c0"]), c0=kw["c0"], w_hr=None)
        fn = _C.lstm_backward
    b[arg] = bad(b[arg])
    with pytest.raises(RuntimeError, match=msg):
        fn(**b)


def test_rnn_backward_rejects_bad_arguments():
    kw = _rnn_args()
    out, h_n = _C.rnn_forward(**kw)
    b = dict(
        d_out=torch.randn_like(out),
        d_h_n=torch.randn_like(h_n),
        h0=kw["h0"],
        w_hh=kw["w_hh"],
        b_hh=kw["b_hh"],
        batch_sizes=None,
        reverse=False,
        out=out,
        relu=True,
    )
    _C.rnn_backward(**b)
    with pytest.raises(RuntimeError, match="out"):
        _C.rnn_backward(**{**b, "out": out[:, :-1]})
    with pytest.raises(RuntimeError, match="d_out"):
        _C.rnn_backward(**{**b, "d_out": _wide(b["d_out"])})
