"""The correctness gate: before an implementation is timed on a case, its outputs, final states and (training)
every gradient — input, h0, c0, all parameters — are compared with torch.nn's on the same weights and inputs.
Peers (the onnxruntime peer: outputs and final states, it has no training) pass the same gate.

    max_err    largest error of those tensors against torch.nn, each normalised by that tensor's largest
               finite magnitude
    NaN / inf  must sit exactly where torch.nn has them: a NaN (or infinity) in fastrnn's result where torch.nn's
               is finite fails the gate, and so does a finite value where torch.nn has NaN or infinity

A ReLU's derivative jumps at 0. Where a pre-activation lies within rounding of 0, either sign is a correct result
in the case's dtype, and the other sign flips that unit's derivative and so its row's gradients at every earlier
step, by O(their size): at T*B*H ~ 10^6 pre-activations some such tie is likely (rnn_relu T=128 B=64 H=256 had one
at 8.6e-9, where cpp, numba and the reference all rounded the other way than torch.nn). So a ReLU training case is
judged, for its gradients, on the batch rows (independent of each other) whose every pre-activation, in float64,
lies farther from 0 than 4x torch.nn's own forward error there (its forward results on every row); the row's note
says how many were left out.

Half-precision cases (bfloat16, float16) are judged against torch.nn run in float64 on the same rounded weights
and inputs, as the test suite judges them: each tensor's error may be at most twice torch.nn's own half-precision
error against float64 (or the tolerance, where that is larger), and max_err is the error against float64. Judged
against torch.nn's half-precision result instead, a correct kernel fails wherever torch.nn's own is far off: its
bfloat16 LSTM training gradients at H=1024 here (grad_x 1.2-1.5 against float64; fastrnn's 3.6e-3).
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastrnn.bench import peers
from fastrnn.bench.configs import NO_GRAD_MODES
from fastrnn.bench.workload import Workload

# Largest accepted error relative to a tensor's largest magnitude, before the sqrt(T) growth (see tolerance).
_BASE_TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2, "float16": 4e-3}


def tolerance(dtype: str, T: int) -> float:
    """Rounding grows like sqrt(T) over the steps; a wrong kernel misses this bound by orders of magnitude."""
    return _BASE_TOLERANCE[dtype] * 10 * math.sqrt(T)


HALF_DTYPES = ("bfloat16", "float16")


def outputs(
    wl: Workload,
    name: str,
    m: nn.Module | peers.OrtLayer,
    dtype: torch.dtype | None = None,
    rows: Tensor | None = None,
) -> dict[str, Tensor]:
    """Everything the gate compares: outputs, final states, and in training mode the gradients of a loss
    touching out, h_n and c_n with random weights (so every incoming gradient is exercised; the weights are
    rounded to the case's dtype, so a float64 run sees the same ones). dtype: run on the inputs cast to it;
    rows: on those batch rows of the inputs only."""
    fwd = wl.forward_fn(name)
    training = wl.case.mode == "training"

    def inp(t: Tensor | None, dim: int) -> Tensor | None:
        if t is None:
            return None
        t = t if rows is None else t.index_select(dim, rows.to(t.device))
        return t.to(dtype or t.dtype, copy=True).requires_grad_(training)

    x, h0, c0 = inp(wl.x, 1), inp(wl.h0, 0), inp(wl.c0, 0)
    with torch.set_grad_enabled(wl.case.mode not in NO_GRAD_MODES):
        out, h_n, c_n = fwd(m, x, h0, c0)
    res = {"out": out.detach(), "h_n": h_n.detach()}
    if c_n is not None:
        res["c_n"] = c_n.detach()
    if training:
        gen = torch.Generator().manual_seed(1)

        def weights(t: Tensor) -> Tensor:
            return torch.randn(t.shape, generator=gen).to(wl.dtype).to(t)

        loss = (out * weights(out)).sum() + (h_n * weights(h_n)).sum()
        if c_n is not None:
            loss = loss + (c_n * weights(c_n)).sum()
        loss.backward()
        res["grad_x"], res["grad_h0"] = x.grad, h0.grad
        if c0 is not None:
            res["grad_c0"] = c0.grad
        for pname, p in m.named_parameters():
            res[f"grad_{pname}"] = p.grad
        m.zero_grad(set_to_none=True)
    return res


def _compare_one(name: str, r: Tensor, g: Tensor) -> tuple[float, str]:
    """(normalised error, what is wrong beyond the error: "" if nothing)."""
    if g.shape != r.shape:
        return math.inf, f"{name}: shape {tuple(g.shape)} != torch.nn's {tuple(r.shape)}"
    r64, g64 = r.double(), g.double()
    r_nan, g_nan = torch.isnan(r64), torch.isnan(g64)
    if bool((g_nan & ~r_nan).any()):
        return math.inf, f"{name}: NaN where torch.nn is finite (first at {_first(g_nan & ~r_nan)})"
    if bool((r_nan & ~g_nan).any()):
        return math.inf, f"{name}: finite where torch.nn has NaN (first at {_first(r_nan & ~g_nan)})"
    r_inf, g_inf = torch.isinf(r64), torch.isinf(g64)
    bad_inf = (r_inf | g_inf) & (r64 != g64)
    if bool(bad_inf.any()):
        i = _first(bad_inf)
        return math.inf, f"{name}: {float(g64[i])} where torch.nn has {float(r64[i])} at {i}"
    finite = torch.isfinite(r64)  # NaN and infinities agree exactly; the error is over the rest
    if not bool(finite.any()):
        return 0.0, ""
    scale = max(float(r64[finite].abs().max()), 1e-30)
    return float((g64[finite] - r64[finite]).abs().max()) / scale, ""


def _first(mask: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def compare_outputs(ref: dict[str, Tensor], got: dict[str, Tensor], tol: float) -> tuple[bool, float, str]:
    """(ok, worst normalised error, what failed first)."""
    worst, why = 0.0, ""
    for name, r in ref.items():
        g = got.get(name)
        if r is None and g is None:
            continue
        if g is None or r is None:
            return False, math.inf, f"{name}: missing"
        err, wrong = _compare_one(name, r, g)
        if wrong:
            return False, err, wrong
        worst = max(worst, err)
        if not err <= tol and not why:
            why = f"{name}: normalised error {err:.2e} > {tol:.1e}"
    return not why, worst, why


def exact_outputs(wl: Workload, torch_mod: nn.Module, rows: Tensor | None = None) -> dict[str, Tensor] | None:
    """For a half-precision case, torch.nn's outputs in float64 on the case's own rounded weights and inputs;
    None for the other dtypes (their yardstick is torch.nn in the case's dtype)."""
    if wl.case.dtype not in HALF_DTYPES:
        return None
    return outputs(wl, "torch.nn", copy.deepcopy(torch_mod).double(), dtype=torch.float64, rows=rows)


def relu_tie_free_rows(wl: Workload, torch_mod: nn.Module, ref: dict[str, Tensor]) -> Tensor | None:
    """For a ReLU training case (the module docstring): the batch rows whose every pre-activation lies farther
    from 0, in float64, than 4x torch.nn's own forward error (ref: its outputs in the case's dtype); None when
    no row holds a tie, or when every row does (then all are judged, as elsewhere)."""
    if wl.spec.nonlinearity != "relu" or wl.case.mode != "training" or wl.spec.norm:
        return None
    m64 = copy.deepcopy(torch_mod).double()
    sfx = "" if wl.is_cell_class else "_l0"
    w_ih, w_hh = getattr(m64, "weight_ih" + sfx), getattr(m64, "weight_hh" + sfx)
    b_ih, b_hh = getattr(m64, "bias_ih" + sfx), getattr(m64, "bias_hh" + sfx)
    with torch.no_grad():
        x, h0 = wl.x.double(), wl.h0.double()
        out64 = wl.forward_fn("torch.nn")(m64, x, h0, None)[0]  # [T, B, H]
        prev = torch.cat([h0.unsqueeze(0), out64[:-1]])
        pre = nn.functional.linear(x, w_ih, b_ih) + nn.functional.linear(prev, w_hh, b_hh)
        delta = 4 * float((ref["out"].double() - out64).abs().max())
        tie = (pre.abs() <= delta).any(dim=2).any(dim=0)  # [B]
    n_tie = int(tie.sum())
    if n_tie == 0 or n_tie == tie.numel():
        return None
    return (~tie).nonzero().flatten()


class Yardstick(NamedTuple):
    """What a case's implementations are judged against: torch.nn's outputs `ref` in the case's dtype, `exact`
    (its float64 outputs, half-precision cases), `rows` (the batch rows judged; None: all) and `note` (why not all).
    Where rows leaves some out, the forward results (which a ReLU tie does not disturb) are judged on every row as
    well, against whole_ref (and whole_exact)."""

    ref: dict[str, Tensor]
    exact: dict[str, Tensor] | None
    rows: Tensor | None
    note: str
    whole_ref: dict[str, Tensor] | None = None
    whole_exact: dict[str, Tensor] | None = None


_FORWARD_RESULTS = ("out", "h_n", "c_n")


def _forward_results(res: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    return None if res is None else {k: res[k] for k in _FORWARD_RESULTS if k in res}


def yardstick(wl: Workload, torch_mod: nn.Module) -> Yardstick:
    ref, exact = outputs(wl, "torch.nn", torch_mod), exact_outputs(wl, torch_mod)
    rows = relu_tie_free_rows(wl, torch_mod, ref)
    if rows is None:
        return Yardstick(ref, exact, None, "")
    B = wl.case.B
    note = (
        f"gradients judged on {rows.numel()} of {B} rows: {B - rows.numel()} hold a ReLU pre-activation within "
        "rounding of 0, where either sign is correct"
    )
    part_ref, part_exact = outputs(wl, "torch.nn", torch_mod, rows=rows), exact_outputs(wl, torch_mod, rows)
    return Yardstick(part_ref, part_exact, rows, note, _forward_results(ref), _forward_results(exact))


def compare_half(
    ref: dict[str, Tensor], got: dict[str, Tensor], exact: dict[str, Tensor], tol: float
) -> tuple[bool, float, str]:
    """(ok, worst error against float64, what failed first): each tensor's error against `exact` may be at most
    twice torch.nn's (`ref`'s), or `tol` where that is larger."""
    worst, why = 0.0, ""
    for name, e in exact.items():
        g, r = got.get(name), ref.get(name)
        if e is None and g is None:
            continue
        if g is None or e is None or r is None:
            return False, math.inf, f"{name}: missing"
        err, wrong = _compare_one(name, e, g)
        if wrong:
            return False, err, wrong.replace("torch.nn", "float64 torch.nn")
        own, _ = _compare_one(name, e, r)
        bound = max(tol, 2 * own)
        worst = max(worst, err)
        if not err <= bound and not why:
            why = f"{name}: error {err:.2e} against float64, above 2x torch.nn's own {own:.2e} (or {tol:.1e})"
    return not why, worst, why


def check(wl: Workload, name: str, m: nn.Module | peers.OrtLayer, yard: Yardstick) -> tuple[bool, float, str]:
    """Run implementation `name` (module `m`) on the workload and compare with torch.nn's outputs yard.ref (with
    yard.exact, torch.nn's float64 outputs, for a half-precision case: compare_half); where yard.rows leaves rows
    out, the forward results on every row first, then everything on yard.rows."""
    tol = tolerance(wl.case.dtype, wl.case.T)

    def judge(ref: dict[str, Tensor], got: dict[str, Tensor], exact: dict[str, Tensor] | None):
        return compare_outputs(ref, got, tol) if exact is None else compare_half(ref, got, exact, tol)

    if yard.rows is None:
        return judge(yard.ref, outputs(wl, name, m), yard.exact)
    ok, err, why = judge(yard.whole_ref, _forward_results(outputs(wl, name, m)), yard.whole_exact)
    if not ok:
        return ok, err, why
    ok, part_err, why = judge(yard.ref, outputs(wl, name, m, rows=yard.rows), yard.exact)
    return ok, max(err, part_err), why
