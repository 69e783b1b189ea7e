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
