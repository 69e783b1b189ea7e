"""The correctness gate: before an implementation is timed on a case, its outputs, final states and (training)
every gradient — input, h0, c0, all parameters — are compared with torch.nn's on the same weights and inputs.
Peers (the onnxruntime peer: outputs and final states, it has no training) pass the same gate.

    max_err    largest error of those tensors against torch.nn, each normalised by that tensor's largest
               finite magnitude
    NaN / inf  must sit exactly where torch.nn has them: a NaN (or infinity) in fastrnn's result where torch.nn's
               is finite fails the gate, and so does a finite value where torch.nn has NaN or infinity
"""

from __future__ import annotations

import math

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


def outputs(wl: Workload, name: str, m: nn.Module | peers.OrtLayer) -> dict[str, Tensor]:
    """Everything the gate compares: outputs, final states, and in training mode the gradients of a loss
    touching out, h_n and c_n with random weights (so every incoming gradient is exercised)."""
    fwd = wl.forward_fn(name)
    training = wl.case.mode == "training"
    x = wl.x.clone().requires_grad_(training)
    h0 = wl.h0.clone().requires_grad_(training)
    c0 = None if wl.c0 is None else wl.c0.clone().requires_grad_(training)
    with torch.set_grad_enabled(wl.case.mode not in NO_GRAD_MODES):
        out, h_n, c_n = fwd(m, x, h0, c0)
    res = {"out": out.detach(), "h_n": h_n.detach()}
    if c_n is not None:
        res["c_n"] = c_n.detach()
    if training:
        gen = torch.Generator().manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=gen).to(out)).sum()
        loss = loss + (h_n * torch.randn(h_n.shape, generator=gen).to(h_n)).sum()
        if c_n is not None:
            loss = loss + (c_n * torch.randn(c_n.shape, generator=gen).to(c_n)).sum()
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


def check(wl: Workload, name: str, m: nn.Module | peers.OrtLayer, ref: dict[str, Tensor]) -> tuple[bool, float, str]:
    """Run implementation `name` (module `m`) on the workload and compare with torch.nn's outputs `ref`."""
    return compare_outputs(ref, outputs(wl, name, m), tolerance(wl.case.dtype, wl.case.T))
