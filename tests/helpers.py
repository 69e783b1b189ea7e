"""Tolerances, defined once, and a comparison that says where and how two tensors disagree."""

from __future__ import annotations

import math

import torch

# float64: everything is the same maths in a different order, so differences are rounding only.
# float32: error grows with the length of the recurrence (and of the sums forming weight gradients) like a
# random walk, hence sqrt(T). Half types are checked against a float64 reference relative to torch.nn's own
# error in that dtype (at most 2x), not with a fixed bound.
F64_RTOL, F64_ATOL = 1e-7, 1e-9
F32_BASE = 2e-5


def tolerances(dtype: torch.dtype, T: int = 1) -> tuple[float, float]:
    if dtype == torch.float64:
        return F64_RTOL, F64_ATOL
    if dtype == torch.float32:
        t = F32_BASE * math.sqrt(max(T, 1))
        return t, t
    raise ValueError(f"no fixed tolerance for {dtype}; compare against torch.nn's own error instead")


def assert_close(
    actual, expected, dtype: torch.dtype | None = None, T: int = 1, name: str = "", *, rtol=None, atol=None
):
    """torch.testing-like closeness with a mismatch report: count, first bad indices with both values,
    NaN disagreements. NaN == NaN counts as equal (NaN must propagate where torch's does)."""
    assert actual is not None, f"{name}: got None, expected a tensor"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    dtype = dtype or expected.dtype
    if rtol is None or atol is None:
        rtol, atol = tolerances(dtype, T)
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    nan_a, nan_e = a.isnan(), e.isnan()
    bad = (nan_a != nan_e) | (~nan_e & ~nan_a & ((a - e).abs() > atol + rtol * e.abs()))
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        lines = [f"  at {tuple(i)}: got {a[tuple(i)].item():.10g}, expected {e[tuple(i)].item():.10g}" for i in idx]
        diff = (a - e).abs()[~nan_a & ~nan_e]
        worst = diff.max().item() if diff.numel() else float("nan")
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (rtol={rtol:g}, atol={atol:g}, "
            f"max abs diff {worst:.3g}, NaN disagreements {int((nan_a != nan_e).sum())})\n" + "\n".join(lines)
        )


def flat(x) -> list:
    """The tensors of a module's output (PackedSequence data, nested (h, c) tuples) as one flat list."""
    if isinstance(x, torch.nn.utils.rnn.PackedSequence):  # a namedtuple: test before tuple
        return [x.data]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in flat(v)]
    return [x]


def contract_inputs(cell: str, T: int, B: int, H: int, P: int, dtype: torch.dtype, bias: bool, zone="mask"):
    """Random arguments of the kernel contract: gx [T,B,G*H], State(h0 [B,P], c0 [B,H] for cells with a cell
    state), Weights(w_hh [G*H,P], b_hh [G*H], w_hr [P,H] when P != H), weights in torch.nn's init range. For the
    normalised cells b_hh is None and Weights.norm = Norm(params off their init, so a wrong index shows; zoneout:
    a keep mask when zone == "mask", else None with keep = zone)."""
    from fastrnn.cells import Norm, State, Weights, spec

    c = spec(cell)
    s = 1 / math.sqrt(H)
    gx = torch.randn(T, B, c.G * H, dtype=dtype)
    h0 = torch.randn(B, P, dtype=dtype)
    c0 = torch.randn(B, H, dtype=dtype) if c.has_cell_state else None
    w_hh = torch.empty(c.G * H, P, dtype=dtype).uniform_(-s, s)
    b_hh = torch.empty(c.G * H, dtype=dtype).uniform_(-s, s) if bias else None
    w_hr = torch.empty(P, H, dtype=dtype).uniform_(-s, s) if P != H else None
    if not c.norm:
        return gx, State(h0, c0), Weights(w_hh, b_hh, w_hr)
    params = 1 + 0.3 * torch.randn(c.norm_width * H, dtype=dtype)
    mask = torch.bernoulli(torch.full((T, B, H), 0.6, dtype=dtype)) if zone == "mask" else None
    return gx, State(h0, c0), Weights(w_hh, None, None, Norm(params, mask, 1.0 if mask is not None else zone))


def assert_contract_matches_reference(be, cell, T, B, H, P, bs, reverse, bias, dtype, zone="mask"):
    """Backend module `be` against the reference backend on one call of the contract: forward outputs, the
    saved tensors (active rows equal, skipped rows zero) and every backward gradient (with d_extra for the
    normalised cells: zero, like d_gx, on the rows a step skips). zone: contract_inputs's."""
    from fastrnn.backends import get
    from fastrnn.cells import State, batch_sizes_list, spec

    ref = get("reference")
    c = spec(cell)
    gx, state0, weights = contract_inputs(cell, T, B, H, P, dtype, bias, zone)
    batch_sizes = None if bs is None else torch.tensor(bs, dtype=torch.int64)
    args = (c, gx, state0, weights, batch_sizes, reverse, True)
    (out_g, st_g, sv_g), (out_e, st_e, sv_e) = be.forward(*args), ref.forward(*args)
    assert_close(out_g, out_e, dtype, T, "forward out")
    for name, a, e in zip(c.states, st_g, st_e):
        assert_close(a, e, dtype, T, f"forward {name}_n")
    active = torch.arange(B)[None, :] < torch.tensor(batch_sizes_list(batch_sizes, T, B))[:, None]  # [T, B]
    for name, a, e in zip(sv_g._fields, sv_g, sv_e, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, f"{name}: {a.shape} {a.dtype} != {e.shape} {e.dtype}"
        if e.numel():
            assert_close(a[active], e[active], dtype, T, f"saved {name} (active rows)")
            assert (a[~active] == 0).all(), f"saved {name}: rows a step skips must be zero"

    d_out, d_h_n = torch.randn_like(out_e), torch.randn_like(state0.h)
    d_state_n = State(d_h_n, torch.randn_like(state0.c) if c.has_cell_state else None)
    bargs = (c, d_out, d_state_n, state0, weights, batch_sizes, reverse, out_e, sv_e)
    g_got, g_exp = be.backward(*bargs), ref.backward(*bargs)
    flat = lambda g: (g.d_gx, *g.d_state0, *g.d_weights[:3], g.d_extra)  # noqa: E731 - local shorthand
    names = ("d_gx", "d_h0", "d_c0", "d_w_hh", "d_b_hh", "d_w_hr", "d_extra")
    for name, a, e in zip(names, flat(g_got), flat(g_exp), strict=True):
        if e is None:
            assert a is None, f"{name}: expected None for an absent input"
        else:
            assert a.dtype == e.dtype, f"{name}: {a.dtype} != {e.dtype}"
            # weight gradients sum over all T*B rows: allow for that in float32
            n = T * B if name in ("d_w_hh", "d_b_hh", "d_w_hr") else T
            assert_close(a, e, dtype, n, name)
    if c.norm:
        assert (g_got.d_gx[~active] == 0).all() and (g_got.d_extra[~active] == 0).all(), "skipped rows must be zero"
