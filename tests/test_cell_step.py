"""The cpp backend's one-call Cell step (csrc/cell_step.cpp, backends/cpp.py cell_step): taken for eager,
unrecorded float32 / float64 / bfloat16 calls without autocast, equal to torch.nn's cells on outputs and every
gradient (whichever operands require grad), differentiable twice, and refusing bad arguments with an error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("fastrnn._C", reason="the C++ extension fastrnn._C is not built")

import fastrnn  # noqa: E402
from fastrnn import _C, ops  # noqa: E402
from fastrnn.backends import cpp  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16

KINDS = [
    pytest.param("LSTMCell", {}, id="lstmcell"),
    pytest.param("GRUCell", {}, id="grucell"),
    pytest.param("RNNCell", {}, id="rnncell-tanh"),
    pytest.param("RNNCell", {"nonlinearity": "relu"}, id="rnncell-relu"),
]


def _pair(kind, extra, dtype, bias=True, I=5, H=7):
    torch.manual_seed(0)
    theirs = getattr(nn, kind)(I, H, bias=bias, **extra).to(dtype)
    ours = getattr(fastrnn, kind)(I, H, bias=bias, **extra, backend="cpp").to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _hx(kind, B, H, dtype, gen):
    lead = () if B is None else (B,)
    h = torch.randn(*lead, H, generator=gen, dtype=dtype)
    return (h, torch.randn(*lead, H, generator=gen, dtype=dtype)) if kind == "LSTMCell" else h


def _run(m, x, hx, grad_of):
    """Outputs and the gradients of a random projection of them with respect to the operands named in grad_of."""
    x = x.clone().requires_grad_("x" in grad_of)
    hs = None
    if hx is not None:
        hs = [h.clone().requires_grad_("h" in grad_of) for h in (hx if isinstance(hx, tuple) else (hx,))]
    for p in m.parameters():
        p.requires_grad_("w" in grad_of)
    y = m(x) if hs is None else m(x, tuple(hs) if len(hs) == 2 else hs[0])
    ys = y if isinstance(y, tuple) else (y,)
    wrt = ([x] if "x" in grad_of else []) + (hs if "h" in grad_of and hs else []) + (
        list(m.parameters()) if "w" in grad_of else []
    )  # fmt: skip
    if not wrt:
        return list(ys)
    gen = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in ys)
    return list(ys) + list(torch.autograd.grad(loss, wrt))


def test_fast_path_is_taken(monkeypatch):
    """An eager float32 Cell call on cpp goes straight to the extension's cell_step: the op layer never runs."""
    calls = []
    real = cpp.cell_step
    monkeypatch.setattr(cpp, "cell_step", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(ops, "recurrence", lambda *a, **k: pytest.fail("the op layer ran"))
    m = fastrnn.GRUCell(4, 3, backend="cpp")
    m(torch.randn(2, 4))
    m(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert len(calls) == 2


@pytest.mark.parametrize("setting", ["record", "float16"])
def test_op_layer_where_the_fast_path_does_not_apply(setting, monkeypatch):
    """Recording and float16 (widened) keep the op layer's path."""
    monkeypatch.setattr(cpp, "cell_step", lambda *a: pytest.fail("the one-call step ran"))
    m = fastrnn.LSTMCell(4, 3, backend="cpp")
    x = torch.randn(2, 4)
    if setting == "record":
        with fastrnn.record() as rec:
            m(x)
        assert rec[m].h.shape[0] == 1  # one step recorded
    else:
        m.half()(x.half())


GRADS = [
    pytest.param("xhw", id="all"),
    pytest.param("x", id="input-only"),
    pytest.param("h", id="state-only"),
    pytest.param("w", id="weights-only"),
    pytest.param("", id="none"),
]


@pytest.mark.parametrize("kind,extra", KINDS)
def test_autocast_matches_torch(kind, extra):
    """Under CPU autocast the step runs (one call, autocast off) in the dtype torch.nn's Cell returns there."""
    theirs, ours = _pair(kind, extra, F32, I=16, H=32)
    gen = torch.Generator().manual_seed(5)
    x, hx = torch.randn(4, 16, generator=gen), _hx(kind, 4, 32, F32, gen)
    with torch.autocast("cpu", BF16):
        e, a = _run(theirs, x, hx, "xhw"), _run(ours, x, hx, "xhw")
    for i, (ai, ei) in enumerate(zip(a, e, strict=True)):
        assert ai.dtype == ei.dtype, f"{kind} result {i}: {ai.dtype} != torch.nn's {ei.dtype}"
        torch.testing.assert_close(ai.float(), ei.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("grad_of", GRADS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind,extra", KINDS)
def test_matches_torch_float64(kind, extra, bias, grad_of):
    theirs, ours = _pair(kind, extra, F64, bias)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, generator=gen, dtype=F64)
    hx = _hx(kind, 3, 7, F64, gen)
    e, a = _run(theirs, x, hx, grad_of), _run(ours, x, hx, grad_of)
    for i, (ai, ei) in enumerate(zip(a, e, strict=True)):
        assert_close(ai, ei, F64, 1, f"{kind} result {i}")


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("kind,extra", KINDS)
def test_operands_are_left_untouched(kind, extra, B):
    """A call writes only its outputs: the parameters and inputs are unchanged and a second call gives the same
    result (the projection starts from a copy of b_ih's rows, never from b_ih itself)."""
    _, ours = _pair(kind, extra, F32, H=64, I=64)
    gen = torch.Generator().manual_seed(6)
    x, hx = torch.randn(B, 64, generator=gen), _hx(kind, B, 64, F32, gen)
    before = [t.detach().clone() for t in (x, *(hx if isinstance(hx, tuple) else (hx,)), *ours.parameters())]
    with torch.no_grad():
        first = ours(x, hx)
        second = ours(x, hx)
    after = [t.detach() for t in (x, *(hx if isinstance(hx, tuple) else (hx,)), *ours.parameters())]
    for i, (a, b) in enumerate(zip(after, before, strict=True)):
        assert torch.equal(a, b), f"{kind} operand {i} changed"
    for a, b in zip(
        first if isinstance(first, tuple) else (first,), second if isinstance(second, tuple) else (second,)
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", ["unbatched", "no-hx", "strided-hx"])
@pytest.mark.parametrize("kind,extra", KINDS)
def test_matches_torch_float32_layouts(kind, extra, shape):
    theirs, ours = _pair(kind, extra, F32)
    gen = torch.Generator().manual_seed(2)
    B = None if shape == "unbatched" else 4
    x = torch.randn(*(() if B is None else (B,)), 5, generator=gen)
    hx = None if shape == "no-hx" else _hx(kind, B, 7, F32, gen)
    if shape == "strided-hx":  # every other column of a wider tensor
        hx = tuple(torch.randn(4, 14, generator=gen)[:, ::2] for _ in hx) if isinstance(hx, tuple) else hx
        hx = hx if isinstance(hx, tuple) else torch.randn(4, 14, generator=gen)[:, ::2]
    grad_of = "xw" if hx is None else "xhw"
    e, a = _run(theirs, x, hx, grad_of), _run(ours, x, hx, grad_of)
    for i, (ai, ei) in enumerate(zip(a, e, strict=True)):
        assert_close(ai, ei, F32, 1, f"{kind} {shape} result {i}")


# The float32 step GEMMs of up to 16 rows (csrc/common.cpp): forward's dot_gemm (every register block 4x4, 2x8,
# 1x16, the columns a 16-wide panel leaves over, K tails shorter than a vector; in the input projection, K = I, and
# the recurrent GEMM, K = H) and backward's axpy_gemm for d h = d_gates W_hh (rows in 4, 3, 2, 1, column blocks of
# 64 with a partial last vector, K = G*H in chunks of 128: LSTM H = 33 and 70).
@pytest.mark.parametrize(
    "B,I,H", [(1, 1, 1), (2, 17, 5), (3, 16, 9), (5, 33, 13), (7, 3, 16), (9, 64, 17), (16, 70, 33), (4, 8, 70)]
)
@pytest.mark.parametrize("kind,extra", [KINDS[0], KINDS[2]])
def test_matches_torch_float32_sizes(kind, extra, B, I, H):
    torch.manual_seed(0)
    theirs = getattr(nn, kind)(I, H, **extra)
    ours = getattr(fastrnn, kind)(I, H, **extra, backend="cpp")
    ours.load_state_dict(theirs.state_dict())
    gen = torch.Generator().manual_seed(3)
    x, hx = torch.randn(B, I, generator=gen), _hx(kind, B, H, F32, gen)
    with torch.no_grad():
        for i, (a, e) in enumerate(zip(_run(ours, x, hx, ""), _run(theirs, x, hx, ""), strict=True)):
            assert_close(a, e, F32, 1, f"{kind} B={B} I={I} H={H} no_grad result {i}")
    for i, (a, e) in enumerate(zip(_run(ours, x, hx, "xhw"), _run(theirs, x, hx, "xhw"), strict=True)):
        assert_close(a, e, F32, 1, f"{kind} B={B} I={I} H={H} result {i}")


@pytest.mark.parametrize("kind,extra", KINDS)
def test_double_backward(kind, extra):
    """create_graph differentiates torch's own cell maths on the saved operands: second derivatives are exact."""
    _, ours = _pair(kind, extra, F64, I=3, H=4)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, generator=gen, dtype=F64, requires_grad=True)
    hx = _hx(kind, 2, 4, F64, gen)
    hs = [t.requires_grad_() for t in (hx if isinstance(hx, tuple) else (hx,))]
    flat = [x, *hs, *ours.parameters()]

    def f(*args):
        n = len(flat) - len(list(ours.parameters()))
        x_, *h_ = args[:n]
        out = torch.func.functional_call(
            ours, dict(zip((k for k, _ in ours.named_parameters()), args[n:], strict=True)),
            (x_, tuple(h_) if len(h_) == 2 else h_[0]),
        )  # fmt: skip
        return out

    assert torch.autograd.gradgradcheck(f, tuple(flat))


# (6, 24, 48) and, for the bfloat16 step kernels of CPUs without AMX (csrc/common.cpp dot_gemm and axpy_gemm on
# pairs: K in columns of 32), K tails of 1-31, whole columns, row blocks of 4, 2 and 1, a batch of 16, column tails.
@pytest.mark.parametrize("B,I,H", [(6, 24, 48), (2, 17, 5), (5, 33, 13), (9, 64, 17), (16, 70, 33), (4, 8, 70)])
@pytest.mark.parametrize("kind,extra", KINDS)
def test_bfloat16_error_vs_torch(kind, extra, B, I, H):
    """bfloat16 Cells: relative error against float64 at most 2x that of torch.nn's bfloat16 Cell."""
    ref, _ = _pair(kind, extra, F64, I=I, H=H)
    theirs, ours = _pair(kind, extra, BF16, I=I, H=H)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, I, generator=gen).to(BF16)
    hx = _hx(kind, B, H, F32, gen)
    hx = tuple(h.to(BF16) for h in hx) if isinstance(hx, tuple) else hx.to(BF16)
    as64 = (lambda h: tuple(t.double() for t in h) if isinstance(h, tuple) else h.double())(hx)
    exact = _run(ref, x.double(), as64, "xhw")
    for i, (a, t, r) in enumerate(zip(_run(ours, x, hx, "xhw"), _run(theirs, x, hx, "xhw"), exact, strict=True)):
        assert a.dtype == t.dtype == BF16
        ea = ((a.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
        et = ((t.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
        assert ea <= 2 * et + 1e-6, f"{kind} result {i}: cpp error {ea:.3g} > 2x torch.nn's {et:.3g}"


def test_fp32_bf16_gemm_opt_in_reaches_cells(monkeypatch):
    theirs, ours = _pair("LSTMCell", {}, F32, I=64, H=64)
    x, hx = torch.randn(8, 64), (torch.randn(8, 64), torch.randn(8, 64))
    exact = ours(x, hx)
    monkeypatch.setenv(cpp.FP32_BF16_GEMM_ENV, "1")
    low = ours(x, hx)
    for a, e in zip(low, exact, strict=True):
        assert a.dtype == F32
        assert not torch.equal(a, e)  # the GEMMs ran on bfloat16 operands
        torch.testing.assert_close(a, e, atol=3e-2, rtol=3e-2)


# A step on plain operands runs the cell's walks on raw pointers, with their scratch in one allocation
# (csrc/cell_step.cpp direct_step, and direct_backward for its gradients): every cell, both kernel dtypes, with and
# without biases, few rows (the unpacked kernels) and more than 16 (the projection and d W_ih on the own kernel's
# panels where it runs), the kernel forced on and off, gradients of all operands and of all but x.
@pytest.mark.parametrize("own", ["1", "0"])
@pytest.mark.parametrize("grad_of", ["", "xhw", "hw"], ids=["no-grad", "all", "not-x"])
@pytest.mark.parametrize("B", [1, 17, 40])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind,extra", KINDS)
def test_step_on_plain_operands_matches_torch(kind, extra, bias, dtype, B, grad_of, own, monkeypatch):
    monkeypatch.setenv("FASTRNN_CPP_OWN_GEMM", own)
    theirs, ours = _pair(kind, extra, dtype, bias, I=23, H=37)
    gen = torch.Generator().manual_seed(4)
    x, hx = torch.randn(B, 23, generator=gen, dtype=dtype), _hx(kind, B, 37, dtype, gen)
    with torch.set_grad_enabled(bool(grad_of)):
        results = zip(_run(ours, x, hx, grad_of), _run(theirs, x, hx, grad_of), strict=True)
    n_out = 2 if kind == "LSTMCell" else 1  # then the gradients, sums over B rows
    for i, (a, e) in enumerate(results):
        assert a.shape == e.shape and a.dtype == e.dtype
        scale = 1 if i < n_out else B
        assert_close(a, e, dtype, scale, f"{kind} bias={bias} B={B} grad_of={grad_of!r} own={own} result {i}")


@pytest.mark.parametrize("kind,extra", KINDS[:2])
def test_output_changed_in_place_before_backward(kind, extra):
    """torch's LSTMCell and GRUCell save no output of theirs for backward, so h' may be changed in place before it
    runs: fastrnn's step keeps its own copy of what backward reads."""
    theirs, ours = _pair(kind, extra, F64, I=6, H=9)
    gen = torch.Generator().manual_seed(8)
    x, hx = torch.randn(3, 6, generator=gen, dtype=F64), _hx(kind, 3, 9, F64, gen)
    grads = []
    for m in (ours, theirs):
        xr = x.clone().requires_grad_(True)
        y = m(xr, hx)
        h = y[0] if isinstance(y, tuple) else y
        h.mul_(3.0).add_(1.0)
        (h * h).sum().backward()
        grads.append([xr.grad, *(p.grad for p in m.parameters())])
    for i, (a, e) in enumerate(zip(*grads, strict=True)):
        assert_close(a, e, F64, 1, f"{kind} gradient {i}")


@pytest.mark.parametrize(
    "call,msg",
    [
        (lambda x, h, w: _C.cell_step(4, x, h, None, w[0], w[1], None, None), "Cell classes' cells"),
        (lambda x, h, w: _C.cell_step(1, x[None], h, None, w[0], w[1], None, None), r"x \[B, I\]"),
        (
            lambda x, h, w: _C.cell_step(1, x, h[:, :2], None, w[0], w[1], None, None),
            "hidden0 has inconsistent hidden_size",
        ),
        (lambda x, h, w: _C.cell_step(1, x, h, None, w[0], w[1][:3], None, None), "w_hh"),
        (
            lambda x, h, w: _C.cell_step(1, x, h, None, w[0][:, :2], w[1], None, None),
            "input has inconsistent input_size",
        ),
        (
            lambda x, h, w: _C.cell_step(1, x, h[:1], None, w[0], w[1], None, None),
            "Input batch size 2 doesn't match hidden0",
        ),
        (lambda x, h, w: _C.cell_step(1, x, h.double(), None, w[0], w[1], None, None), "dtype"),
        (lambda x, h, w: _C.cell_step(0, x, h, None, w[0].new_zeros(12, 4), w[1].new_zeros(12, 3), None, None), "c0"),
    ],
    ids=["ln-cell", "x-rank", "h-shape", "w_hh-shape", "w_ih-shape", "h-batch", "h-dtype", "lstm-without-c"],
)
def test_extension_refuses_bad_arguments(call, msg):
    m = fastrnn.GRUCell(4, 3)
    x, h = torch.randn(2, 4), torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=msg):
        call(x, h, (m.weight_ih.detach(), m.weight_hh.detach()))


# ---- layers called one step at a time (T = 1, streaming) take the same one-call step ----

LAYERS = [
    pytest.param("LSTM", {}, id="lstm"),
    pytest.param("GRU", {"num_layers": 2, "bidirectional": True}, id="gru-2layer-bidir"),
    pytest.param("RNN", {"nonlinearity": "relu", "batch_first": True}, id="rnn-relu-batch-first"),
    pytest.param("LSTM", {"num_layers": 2, "bidirectional": True, "bias": False}, id="lstm-2layer-bidir-nobias"),
]


@pytest.mark.parametrize("kind,extra", LAYERS)
def test_one_step_layer_matches_torch(kind, extra, monkeypatch):
    """A T = 1 layer call runs its layers as Cell steps (the op layer never runs) and equals torch.nn, outputs,
    final states and every gradient, in float64."""
    monkeypatch.setattr(ops, "recurrence", lambda *a, **k: pytest.fail("the op layer ran"))
    torch.manual_seed(0)
    theirs = getattr(nn, kind)(5, 7, **extra).double()
    ours = getattr(fastrnn, kind)(5, 7, **extra, backend="cpp").double()
    ours.load_state_dict(theirs.state_dict())
    L, D = extra.get("num_layers", 1), 2 if extra.get("bidirectional") else 1
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 1, 5, generator=gen, dtype=F64)  # [B, T=1, I] with batch_first, else [T=1, B, I]
    x = x if extra.get("batch_first") else x.transpose(0, 1).contiguous()
    h0 = torch.randn(L * D, 3, 7, generator=gen, dtype=F64)
    hx = (h0, torch.randn(L * D, 3, 7, generator=gen, dtype=F64)) if kind == "LSTM" else h0
    results = []
    for m in (theirs, ours):
        xi = x.clone().requires_grad_()
        hs = [t.clone().requires_grad_() for t in (hx if isinstance(hx, tuple) else (hx,))]
        out, st = m(xi, tuple(hs) if len(hs) == 2 else hs[0])
        ys = [out, *(st if isinstance(st, tuple) else (st,))]
        g = torch.Generator().manual_seed(9)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=F64)).sum() for t in ys)
        results.append(ys + list(torch.autograd.grad(loss, [xi, *hs, *m.parameters()])))
    for i, (a, e) in enumerate(zip(results[1], results[0], strict=True)):
        assert_close(a, e, F64, 1, f"{kind} {extra} result {i}")


def test_one_step_layer_with_dropout_keeps_the_op_layer(monkeypatch):
    """Inter-layer dropout in training draws torch.nn's masks on the op layer's path, also at T = 1."""
    calls = []
    real = ops.recurrence
    monkeypatch.setattr(ops, "recurrence", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = fastrnn.GRU(4, 3, num_layers=2, dropout=0.5, backend="cpp").train()
    m(torch.randn(1, 2, 4))
    assert len(calls) == 2
