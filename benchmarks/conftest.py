"""pytest-benchmark suite on the same cases and implementations as `fastrnn-bench run` (fastrnn.bench).

    pytest benchmarks/ --benchmark-only                           quick preset, torch.nn + available backends
    pytest benchmarks/ --benchmark-only --bench-preset full       the kernel issues' CPU grid (long)
    pytest benchmarks/ --benchmark-only --bench-backends torch,numba

Each benchmark module names its cells in BENCH_CELLS; every test is parametrized over the preset's cases for
those cells x backends, runs the correctness gate against torch.nn first (a wrong backend fails, it is not
timed), and groups torch.nn and the backends of one case together in pytest-benchmark's table.
This directory is outside the project's testpaths, so the default `pytest` run never collects it.
"""

from __future__ import annotations

import pytest

from fastrnn import backends as fr_backends
from fastrnn.bench import configs, measure
from fastrnn.bench.configs import Case

_FASTRNN = ("reference", "cpp", "numba", "triton")


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("fastrnn-bench")
    g.addoption(
        "--bench-preset",
        choices=sorted(configs.PRESETS),
        default="quick",
        help="which fastrnn-bench grid to benchmark (default quick)",
    )
    g.addoption(
        "--bench-backends",
        default=None,
        help="comma list of torch, compile, reference, cpp, numba, triton (default: torch.nn and every "
        "available CPU backend)",
    )


def _backends(config: pytest.Config) -> tuple[list[str], bool]:
    spec = config.getoption("--bench-backends")
    if spec:
        return [s.strip() for s in spec.split(",") if s.strip()], True
    return ["torch", *[b for b in _FASTRNN if b != "triton" and fr_backends.is_available(b)[0]]], False


def _case_id(c: Case) -> str:
    return f"{c.mode}-T{c.T}-B{c.B}-H{c.H}-{c.dtype}-thr{c.threads}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not {"case", "backend"} <= set(metafunc.fixturenames):
        return
    cells = getattr(metafunc.module, "BENCH_CELLS", configs.CELLS)
    p = configs.PRESETS[metafunc.config.getoption("--bench-preset")]
    backends, explicit = _backends(metafunc.config)
    params = [
        pytest.param(case, b, id=f"{case.cell}-{_case_id(case)}-{b}")
        for case in configs.grid(cells, p.modes, p.T, p.B, p.H, p.dtypes, p.threads)
        for b in configs.backends_for(case, backends, explicit)
    ]
    metafunc.parametrize(("case", "backend"), params)


@pytest.fixture
def bench_rnn(benchmark):
    """bench_rnn(case, backend): gate `backend` on `case` against torch.nn, then let pytest-benchmark time one
    call of the case's mode."""
    return lambda case, backend: _run(benchmark, case, backend)


def _run(benchmark, case: Case, backend: str) -> None:
    ok, why = measure.backend_status(backend, case)
    if not ok:
        pytest.skip(f"{backend}: {why}")
    measure.set_threads(case.threads)
    wl = measure.Workload(case)
    m = wl.module_for(backend)
    if backend != "torch":
        ref = wl.outputs("torch", wl.module_for("torch"))
        good, err, what = measure.compare_outputs(ref, wl.outputs(backend, m), measure.tolerance(case.dtype, case.T))
        assert good, f"{backend} differs from torch.nn on {case.label()}: {what}"
    benchmark.group = f"{case.cell} {_case_id(case)}"
    benchmark.extra_info.update(case.as_dict(), backend=backend, flops=case.flops())
    benchmark(wl.call_fn(backend, m))
