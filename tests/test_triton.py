"""The triton backend against the reference backend (the contract itself: outputs, final states, the saved
tensors with the rows a step skips zero, every gradient, with d_out random on skipped rows too) and, through
the drop-in modules, against torch.nn.

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
from fastrnn.cells import spec
from tests.helpers import assert_close, assert_contract_matches_reference, contract_inputs

if not backends.is_available("triton")[0]:
    pytest.skip(f"triton backend unavailable: {backends.is_available('triton')[1]}", allow_module_level=True)

tb, ref = backends.get("triton"), backends.get("reference")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if not tb.supports(spec("lstm"), torch.float32, DEVICE)[0]:
    pytest.skip(tb.supports(spec("lstm"), torch.float32, DEVICE)[1], allow_module_level=True)

F32 = torch.float32


def _to(x, device):
    """Floating tensors (inside the contract's named tuples too) moved to `device`; batch_sizes stays put."""
    if isinstance(x, torch.Tensor):
        return x.to(device) if x.is_floating_point() else x
    if isinstance(x, tuple):
        vals = [_to(v, device) for v in x]
        return type(x)(*vals) if hasattr(x, "_fields") else tuple(vals)
    return x


class _OnDevice:
    """The backend on DEVICE for the helpers' CPU tensors: arguments moved there, results moved back."""

    def __init__(self, be):
        self.be = be

    def forward(self, *args):
        return _to(self.be.forward(*_to(args, DEVICE)), "cpu")

    def backward(self, *args):
        return _to(self.be.backward(*_to(args, DEVICE)), "cpu")


BE = _OnDevice(tb) if CUDA else tb

# (cell, T, B, H, P, batch_sizes, reverse, bias): tiny under the interpreter, which is slow
CASES = [
    pytest.param("lstm", 4, 3, 5, 5, None, False, True, id="lstm"),
    pytest.param("lstm", 4, 3, 5, 3, None, True, True, id="lstm-proj-reverse"),
    pytest.param("lstm", 4, 3, 5, 5, [3, 2, 2, 1], False, True, id="lstm-packed"),
    pytest.param("lstm", 4, 3, 5, 3, [3, 2, 2, 1], True, False, id="lstm-proj-packed-reverse-nobias"),
    pytest.param("lstm", 1, 1, 8, 8, None, False, True, id="lstm-T1-B1"),
    pytest.param("gru", 4, 3, 5, 5, None, True, True, id="gru-reverse"),
    pytest.param("gru", 4, 3, 5, 5, [3, 2, 2, 1], False, False, id="gru-packed-nobias"),
    pytest.param("gru", 4, 3, 5, 5, [3, 2, 2, 1], True, True, id="gru-packed-reverse"),
    pytest.param("rnn_tanh", 4, 3, 5, 5, None, False, False, id="rnn_tanh-nobias"),
    pytest.param("rnn_tanh", 4, 3, 5, 5, [3, 2, 2, 1], True, True, id="rnn_tanh-packed-reverse"),
    pytest.param("rnn_relu", 4, 3, 5, 5, [3, 2, 2, 1], False, True, id="rnn_relu-packed"),
    pytest.param("rnn_relu", 1, 2, 8, 8, None, True, True, id="rnn_relu-T1-reverse"),
    # several row and column tiles, K loops of more than one block, a tile's rows split between continuing and
    # starting from h0 (reverse packed)
    pytest.param("lstm", 2, 18, 70, 70, [18, 9], True, True, id="lstm-tiles-packed-reverse"),
    pytest.param("lstm", 2, 18, 70, 33, [18, 17], False, True, id="lstm-proj-tiles-packed"),
    pytest.param("gru", 2, 18, 70, 70, [18, 9], True, True, id="gru-tiles-packed-reverse"),
    pytest.param("rnn_tanh", 2, 18, 70, 70, None, False, True, id="rnn_tanh-tiles"),
]
if CUDA:
    CASES += [
        pytest.param("lstm", 16, 64, 128, 128, None, False, True, id="lstm-T16-B64-H128"),
        pytest.param("lstm", 9, 5, 33, 17, [5, 4, 4, 3, 3, 2, 1, 1, 1], True, True, id="lstm-proj-T9-H33-packed"),
        pytest.param("gru", 16, 64, 128, 128, None, True, False, id="gru-T16-B64-H128-reverse"),
        pytest.param("rnn_relu", 9, 5, 33, 33, [5, 5, 4, 4, 3, 2, 2, 1, 1], False, True, id="rnn_relu-T9-H33-packed"),
    ]


@pytest.mark.parametrize("cell,T,B,H,P,bs,reverse,bias", CASES)
def test_contract_matches_reference(cell, T, B, H, P, bs, reverse, bias):
    assert_contract_matches_reference(BE, cell, T, B, H, P, bs, reverse, bias, F32)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_no_saved_when_not_needed(cell):
    T, B, H = 4, 3, 5
    c = spec(cell)
    gx, state0, weights = contract_inputs(cell, T, B, H, H, F32, True)
    out, st, saved = BE.forward(c, gx, state0, weights, None, False, False)
    assert saved.gates.numel() == 0 and saved.extra.numel() == 0
    e_out, e_st, _ = ref.forward(c, gx, state0, weights, None, False, False)
    assert_close(out, e_out, F32, T, "out")
    for name, a, e in zip(c.states, st, e_st):  # State(h, c): c is None for cells without a cell state
        assert_close(a, e, F32, T, f"{name}_n")
    assert (st.c is None) == (not c.has_cell_state)


def test_tf32_opt_in(monkeypatch):
    """FASTRNN_TRITON_TF32=1 still computes the same recurrence (to TF32 accuracy on GPUs)."""
    monkeypatch.setenv("FASTRNN_TRITON_TF32", "1")
    c = spec("gru")
    gx, state0, weights = contract_inputs("gru", 4, 3, 5, 5, F32, True)
    got = BE.forward(c, gx, state0, weights, None, False, False)
    exp = ref.forward(c, gx, state0, weights, None, False, False)
    assert_close(got[0], exp[0], rtol=5e-3, atol=5e-3, name="out (tf32)")


def test_supports():
    assert tb.supports(spec("gru"), torch.float64, DEVICE) == (
        False,
        "triton backend supports float32, float16 and bfloat16, not torch.float64 (use the reference backend)",
    )
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert tb.supports(spec("lstm"), dt, DEVICE)[0]
    if os.environ.get("TRITON_INTERPRET") != "1":
        ok, why = tb.supports(spec("lstm"), F32, torch.device("cpu"))
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


# (cell, T, B, H, batch_sizes, reverse, zoneout: "mask" or the constant keep): the normalised cells' contract
NORM_CASES = [
    pytest.param("ln_lstm", 4, 3, 5, None, False, "mask", id="ln_lstm-mask"),
    pytest.param("ln_lstm", 4, 3, 5, [3, 3, 2, 1], True, 0.7, id="ln_lstm-packed-reverse-keep0.7"),
    pytest.param("ln_lstm", 3, 2, 1, [2, 1, 1], False, 1.0, id="ln_lstm-H1-packed"),
    pytest.param("ln_gru", 4, 3, 5, [3, 3, 2, 1], False, "mask", id="ln_gru-packed-mask"),
    pytest.param("ln_gru", 4, 3, 5, None, True, 0.7, id="ln_gru-reverse-keep0.7"),
    pytest.param("ln_gru", 2, 3, 8, [3, 1], True, 1.0, id="ln_gru-packed-reverse"),
]


@pytest.mark.parametrize("cell,T,B,H,bs,reverse,zone", NORM_CASES)
def test_norm_contract_matches_reference(cell, T, B, H, bs, reverse, zone):
    """The normalised cells: out, final states, the saved rows (skipped rows zero), every gradient and d_extra."""
    torch.manual_seed(0)
    assert_contract_matches_reference(BE, cell, T, B, H, H, bs, reverse, False, F32, zone)


BACKS = ("triton", "reference")


@pytest.mark.parametrize("kind", ["LayerNormLSTM", "LayerNormGRU"])
def test_norm_module_matches_reference(kind):
    """Through the module (two layers, bidirectional, packed, zoneout in training) against the reference backend on
    the same device (the same zoneout masks): every result and gradient."""
    T, B, I, H = 3, 2, 3, 5
    torch.manual_seed(0)
    mods = {b: getattr(fastrnn, kind)(I, H, num_layers=2, bidirectional=True, zoneout=0.3, backend=b) for b in BACKS}
    with torch.no_grad():  # gains and biases off their init, so a wrong index shows
        for name, p in mods["triton"].named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    mods["reference"].load_state_dict(mods["triton"].state_dict())
    x = torch.randn(T, B, I, device=DEVICE)
    hx = [torch.randn(4, B, H, device=DEVICE) for _ in range(2 if kind == "LayerNormLSTM" else 1)]
    res = {}
    for b, m in mods.items():
        torch.manual_seed(5)  # the same zoneout masks
        res[b] = run_module(m.to(DEVICE), x, hx, [3, 2])
    for i, (a, e) in enumerate(zip(res["triton"], res["reference"], strict=True)):
        assert_close(a, e, F32, T * B, f"{kind} result {i}")


def test_norm_hidden_cap():
    from fastrnn.backends.triton.common import NORM_MAX_H, norm_tiles

    assert norm_tiles(3, NORM_MAX_H).block_h == NORM_MAX_H
    with pytest.raises(ValueError, match=f"at most {NORM_MAX_H}"):
        norm_tiles(3, NORM_MAX_H + 1)


_SM90_COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from fastrnn.backends.triton import walk
from fastrnn.cells import spec

LOW = {  # the pointers in the input dtype (the rest are the launchers' float32 buffers)
    True: ("gx_ptr", "h0_ptr", "w_ptr", "b_ptr", "out_ptr", "p_ptr", "m_ptr"),
    False: ("w_ptr", "dhn_ptr", "dout_ptr", "c0_ptr", "hs_ptr", "h0_ptr", "h_ptr", "p_ptr", "m_ptr"),
}
CASES = [("ln_lstm", 5, "*fp32"), ("ln_lstm", 1024, "*fp32"), ("ln_gru", 5, "*fp32"), ("ln_gru", 64, "*bf16")]
for cell, H, dt in CASES:
    c = spec(cell)
    for fwd in (True, False):
        meta = dict(walk._shape(c, 3, H, H if fwd else c.G * H)[1])
        opts = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
        SG, SE = c.saved_widths
        k = dict(CELL=c.kernel_id, G=c.G, SG=SG, SE=SE, HAS_C=c.has_cell_state, PRECISION="ieee", DOT_F32=False,
                 NORM=True, HAS_MASK=True, **meta)
        k.update(HAS_BIAS=False, WRITE_OUT=True) if fwd else k.update(S=0, DIRECT=True, CARRY=True)
        jit = walk._fwd_step if fwd else walk._bwd_step
        sig = {a: "constexpr" if a in k else "i32" if a in ("n", "k", "kc", "H", "P") else "fp32" if a == "keep"
               else dt if a in LOW[fwd] else "*fp32" for a in jit.arg_names}
        src = triton.compiler.ASTSource(fn=jit, signature=sig, constexprs=k)
        shared = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).metadata.shared
        assert shared <= 101376, f"{cell} H={H}: {shared} bytes of shared memory, over sm_86's 99 KB"
print("compiled")
"""


@pytest.mark.skipif(CUDA, reason="on CUDA the kernels run for real")
def test_norm_kernels_compile_for_sm90():
    """Without a GPU the interpreter never compiles a kernel: compile the normalised cells' steps for sm_90 (the
    launchers' own tile choice, smallest and largest tiles, a bfloat16 variant), within sm_86's shared memory."""
    import subprocess
    import sys

    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any reason the CUDA compiler is missing
        pytest.skip(f"triton's CUDA compiler is unavailable: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
