"""The triton backend against the reference backend (every output, saved tensor and gradient of the kernel
contract) and, through the drop-in modules, against torch.nn.

Without CUDA the kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it before fastrnn is imported)
on tiny shapes; with CUDA the same tests run on the GPU with larger shapes, plus float16 / bfloat16 checked
against a float64 torch.nn at most 2x torch.nn's own error in that dtype.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import backends
from fastrnn.backends import reference
from fastrnn.cells import GATES
from tests.helpers import assert_close

if not backends.is_available("triton")[0]:
    pytest.skip(f"triton backend unavailable: {backends.is_available('triton')[1]}", allow_module_level=True)

from fastrnn.backends import triton as tb  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if not tb.supports("lstm", torch.float32, DEVICE)[0]:
    pytest.skip(tb.supports("lstm", torch.float32, DEVICE)[1], allow_module_level=True)

F32 = torch.float32
# (T, B, H): tiny under the interpreter, odd and round sizes on the GPU
SHAPES = [(4, 3, 5), (1, 2, 8)] if not CUDA else [(9, 5, 33), (16, 64, 128), (1, 1, 40)]
# several row and column tiles and K loops (slow under the interpreter: a subset of cases)
MULTI_TILE = (2, 18, 70)


def lengths_to_batch_sizes(lengths: list[int]) -> torch.Tensor:
    """lengths sorted descending -> batch_sizes [T] (rows active per step), int64 on the CPU."""
    return torch.tensor([sum(1 for n in lengths if n > t) for t in range(max(lengths))], dtype=torch.int64)


def make_args(cell: str, T: int, B: int, H: int, P: int | None, bias: bool, packed: bool, dtype=F32):
    G = GATES[cell]
    P = P or H
    g = torch.Generator().manual_seed(T * 1000 + B * 100 + H + P + int(bias) + 7 * int(packed))
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE, dtype)  # noqa: E731
    gx = r(T, B, G * H)
    h0 = r(B, P)
    c0 = r(B, H) if cell == "lstm" else None
    w_hh = r(G * H, P) / P**0.5
    b_hh = r(G * H) if bias else None
    w_hr = r(P, H) / H**0.5 if cell == "lstm" and P != H else None
    bsz = None
    if packed:
        lengths = sorted([T] + [int(torch.randint(1, T + 1, (), generator=g)) for _ in range(B - 1)], reverse=True)
        bsz = lengths_to_batch_sizes(lengths)
    return gx, h0, c0, w_hh, b_hh, w_hr, bsz


def active_rows(bsz: torch.Tensor | None, T: int, B: int) -> torch.Tensor:
    """[T, B, 1] bool: the rows each step touches (saved tensors are unspecified elsewhere)."""
    if bsz is None:
        return torch.ones(T, B, 1, dtype=torch.bool, device=DEVICE)
    return (torch.arange(B)[None, :] < bsz[:, None])[:, :, None].to(DEVICE)


CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"reverse": True}, id="reverse"),
    pytest.param({"packed": True}, id="packed"),
    pytest.param({"packed": True, "reverse": True}, id="packed-reverse"),
    pytest.param({"bias": False}, id="nobias"),
]


SHAPE_CASES = [
    pytest.param(shape, case.values[0], id="T{}-B{}-H{}-{}".format(*shape, case.id))
    for shape in SHAPES
    for case in CASES
] + [pytest.param(MULTI_TILE, case.values[0], id="T{}-B{}-H{}-{}".format(*MULTI_TILE, case.id)) for case in CASES[::3]]


@pytest.mark.parametrize("shape,case", SHAPE_CASES)
@pytest.mark.parametrize(
    "cell,proj",
    [("lstm", None), ("lstm", 3), ("gru", None), ("rnn_tanh", None), ("rnn_relu", None)],
    ids=["lstm", "lstm-proj", "gru", "rnn_tanh", "rnn_relu"],
)
def test_contract_vs_reference(cell, proj, shape, case):
    T, B, H = shape
    if proj is not None and proj >= H:
        proj = H - 1
    reverse, packed, bias = case.get("reverse", False), case.get("packed", False), case.get("bias", True)
    if packed and B == 1:
        pytest.skip("packing needs several rows")
    gx, h0, c0, w_hh, b_hh, w_hr, bsz = make_args(cell, T, B, H, proj, bias, packed)
    got = tb.forward(cell, gx, h0, c0, w_hh, b_hh, w_hr, bsz, reverse, True)
    exp = reference.forward(cell, gx, h0, c0, w_hh, b_hh, w_hr, bsz, reverse, True)
    act = active_rows(bsz, T, B)
    for name, a, e in zip(("out", "h_n", "c_n", "gates", "extra"), got, exp, strict=True):
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        if name in ("gates", "extra") and e.numel():
            a, e = torch.where(act, a, 0.0), torch.where(act, e, 0.0)
        assert_close(a, e, F32, T, name)

    out, h_n, c_n, gates, extra = exp
    g = torch.Generator().manual_seed(11)
    d_out = torch.randn(out.shape, generator=g).to(DEVICE)
    d_out = torch.where(active_rows(bsz, T, B), d_out, 0.0)
    d_h_n = torch.randn(h_n.shape, generator=g).to(DEVICE)
    d_c_n = torch.randn(c_n.shape, generator=g).to(DEVICE) if cell == "lstm" else None
    args = (cell, d_out, d_h_n, d_c_n, h0, c0, w_hh, b_hh, w_hr, bsz, reverse, out, gates, extra)
    got_g = tb.backward(*args)
    exp_g = reference.backward(*args)
    for name, a, e in zip(("d_gx", "d_h0", "d_c0", "d_w_hh", "d_b_hh", "d_w_hr"), got_g, exp_g, strict=True):
        if e is None:
            assert a is None, f"{name}: expected None"
            continue
        assert_close(a, e, F32, T * B, name)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_no_saved_when_not_needed(cell):
    T, B, H = SHAPES[0]
    gx, h0, c0, w_hh, b_hh, w_hr, bsz = make_args(cell, T, B, H, None, True, False)
    out, h_n, c_n, gates, extra = tb.forward(cell, gx, h0, c0, w_hh, b_hh, w_hr, bsz, False, False)
    assert gates.numel() == 0 and extra.numel() == 0
    exp = reference.forward(cell, gx, h0, c0, w_hh, b_hh, w_hr, bsz, False, False)
    assert_close(out, exp[0], F32, T, "out")
    assert_close(h_n, exp[1], F32, T, "h_n")


def test_tf32_opt_in(monkeypatch):
    """FASTRNN_TRITON_TF32=1 still computes the same recurrence (to TF32 accuracy on GPUs)."""
    monkeypatch.setenv("FASTRNN_TRITON_TF32", "1")
    T, B, H = SHAPES[0]
    gx, h0, c0, w_hh, b_hh, w_hr, bsz = make_args("gru", T, B, H, None, True, False)
    got = tb.forward("gru", gx, h0, c0, w_hh, b_hh, w_hr, bsz, False, False)
    exp = reference.forward("gru", gx, h0, c0, w_hh, b_hh, w_hr, bsz, False, False)
    assert_close(got[0], exp[0], rtol=5e-3, atol=5e-3, name="out (tf32)")


def test_supports():
    assert tb.supports("gru", torch.float64, DEVICE) == (
        False,
        "triton backend supports float32, float16 and bfloat16, not torch.float64 (use the reference backend)",
    )
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert tb.supports("lstm", dt, DEVICE)[0]
    if os.environ.get("TRITON_INTERPRET") != "1":
        ok, why = tb.supports("lstm", F32, torch.device("cpu"))
        assert not ok and "TRITON_INTERPRET=1" in why


MODULES = [
    pytest.param("LSTM", {}, id="lstm"),
    pytest.param("LSTM", {"proj_size": 3}, id="lstm-proj"),
    pytest.param("GRU", {}, id="gru"),
    pytest.param("RNN", {"nonlinearity": "relu"}, id="rnn_relu"),
]


def run_module(m: nn.Module, x, hx, lengths: list[int] | None):
    """Output, final states and every gradient (input, states, parameters) for a fixed random cotangent."""
    xi = x.detach().clone().requires_grad_()
    hxs = [h.detach().clone().requires_grad_() for h in hx]
    inp = pack_padded_sequence(xi, lengths) if lengths is not None else xi
    out, st = m(inp, tuple(hxs) if len(hxs) == 2 else hxs[0])
    outs = [out.data if lengths is not None else out] + (list(st) if isinstance(st, tuple) else [st])
    g = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [xi, *hxs, *m.parameters()])
    return [o.detach() for o in outs] + list(grads)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind,extra", MODULES)
def test_module_vs_torch(kind, extra, packed, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # cuDNN's RNNs would use TF32 for fp32
    T, B, I, H = (3, 3, 4, 6) if not CUDA else (12, 7, 20, 40)
    kw = dict(input_size=I, hidden_size=H, bidirectional=True, **extra)
    torch.manual_seed(0)
    ref = getattr(nn, kind)(**kw).to(DEVICE)
    fast = getattr(fastrnn, kind)(**kw, backend="triton").to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, device=DEVICE)
    P = extra.get("proj_size") or H
    hx = [torch.randn(2, B, P, device=DEVICE)] + ([torch.randn(2, B, H, device=DEVICE)] if kind == "LSTM" else [])
    lengths = sorted([T] + [int(v) for v in torch.randint(1, T + 1, (B - 1,))], reverse=True) if packed else None
    for i, (a, e) in enumerate(zip(run_module(fast, x, hx, lengths), run_module(ref, x, hx, lengths), strict=True)):
        assert_close(a, e, F32, T * B, f"{kind} result {i}")


def _rel_err(val: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error: an aggregate, so the 2x comparison does not hinge on one rounding."""
    r = ref.double()
    return ((val.double() - r).norm() / r.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind,extra", MODULES)
def test_half_precision_error(kind, extra, dtype):
    """Relative error against a float64 torch.nn at most 2x that of torch.nn (cuDNN on CUDA) in the same dtype,
    for the output, final states and every gradient."""
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("the triton interpreter rounds float32 -> bfloat16 by truncation, GPUs to nearest")
    T, B, I, H = (32, 16, 64, 128) if CUDA else (3, 2, 4, 16)
    kw = dict(input_size=I, hidden_size=H, **extra)
    torch.manual_seed(0)
    ref64 = getattr(nn, kind)(**kw).to(DEVICE, torch.float64)
    ref_lp = getattr(nn, kind)(**kw).to(DEVICE, dtype)
    fast = getattr(fastrnn, kind)(**kw, backend="triton").to(DEVICE, dtype)
    ref_lp.load_state_dict(ref64.state_dict())
    fast.load_state_dict(ref64.state_dict())
    x = torch.randn(T, B, I, device=DEVICE, dtype=dtype)
    P = extra.get("proj_size") or H
    hx = [torch.randn(1, B, P, device=DEVICE, dtype=dtype)]
    if kind == "LSTM":
        hx.append(torch.randn(1, B, H, device=DEVICE, dtype=dtype))
    exact = run_module(ref64, x.double(), [h.double() for h in hx], None)
    e_torch = run_module(ref_lp, x, hx, None)
    e_fast = run_module(fast, x, hx, None)
    for i, (f, t, r) in enumerate(zip(e_fast, e_torch, exact, strict=True)):
        ef, et = _rel_err(f, r), _rel_err(t, r)
        assert ef <= 2 * et + 1e-6, f"{kind} {dtype} result {i}: triton error {ef:.3g} > 2x torch.nn's {et:.3g}"


@pytest.mark.skipif(CUDA, reason="on CUDA the script itself is the check")
def test_gpu_check_script_runs(tmp_path):
    """benchmarks/gpu_check's own logic (config loop, gate, rows, summary) on the interpreter, one tiny config."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check"
    env = {**os.environ, "OUT": str(tmp_path)}
    args = ["--cpu-smoke", "--skip-tests", "--cells", "GRU", "--dtypes", "fp32", "--reps", "1", "--warmup", "0"]
    p = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "geomean" in p.stdout and (tmp_path / "gpu_check.json").exists()
