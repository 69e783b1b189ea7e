"""pytest-benchmark suite on the same cases and implementations as `fastrnn-bench run` (fastrnn.bench).

    pytest benchmarks/ --benchmark-only                           quick preset, torch.nn + available backends
    pytest benchmarks/ --benchmark-only --bench-preset full       the kernel issues' CPU grid (long)
    pytest benchmarks/ --benchmark-only --bench-backends cpp,auto
    pytest benchmarks/ --benchmark-only --bench-preset ort --bench-peers onnxruntime

Each benchmark module names the fastrnn layer class it measures in BENCH_LAYER; every test is parametrized over
the preset's cases for that layer's cells (from fastrnn's cell table) x implementations (fastrnn.bench.workload,
whose list of fastrnn backends is fastrnn.backends'), runs the correctness gate against torch.nn first (a wrong
backend fails, it is not timed), and groups torch.nn and the backends of one case in pytest-benchmark's table.
Peers (`--bench-peers`; by default the preset's that are installed: the onnxruntime peer on the inference and
streaming cases) are gated and timed the same way.
This directory is outside the project's testpaths, so the default `pytest` run never collects it.
"""

from __future__ import annotations

import pytest

from fastrnn.bench import configs, correctness, machine, workload
from fastrnn.bench.configs import Case
from fastrnn.bench.results import BenchError


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
        help=f"comma list of {', '.join(workload.IMPLEMENTATIONS)} (default: torch.nn and every fastrnn kernel "
        "backend available on the CPU)",
    )
    g.addoption(
        "--bench-peers",
        default=None,
        help="comma list of onnxruntime, or none (default: the preset's peers that are installed here)",
    )


def _case_id(c: Case) -> str:
    return f"{c.mode}-T{c.T}-B{c.B}-H{c.H}-{c.dtype}-thr{c.threads}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not {"case", "backend"} <= set(metafunc.fixturenames):
        return
    layer = getattr(metafunc.module, "BENCH_LAYER", None)
    cells = configs.layer_cells(layer.__name__) if layer is not None else configs.CELLS
    p = configs.PRESETS[metafunc.config.getoption("--bench-preset")]
    try:
        names, explicit = workload.resolve(metafunc.config.getoption("--bench-backends"), "cpu")
        names += workload.resolve_peers(metafunc.config.getoption("--bench-peers"), p)
    except BenchError as e:
        raise pytest.UsageError(str(e)) from None
    params = [
        pytest.param(case, b, id=f"{case.cell}-{_case_id(case)}-{b}")
        for case in configs.grid(cells, p.modes, p.T, p.B, p.H, p.dtypes, p.threads, stream_Bs=p.stream_B)
        for b in workload.for_case(case, names, explicit)
    ]
    metafunc.parametrize(("case", "backend"), params)


@pytest.fixture
def bench_rnn(benchmark):
    """bench_rnn(case, backend): gate `backend` on `case` against torch.nn, then let pytest-benchmark time one
    call of the case's mode."""
    return lambda case, backend: _run(benchmark, case, backend)


def _run(benchmark, case: Case, backend: str) -> None:
    ok, why = workload.status(backend, case)
    if not ok:
        pytest.skip(f"{backend}: {why}")
    machine.set_threads(case.threads)
    wl = workload.Workload(case)
    m = wl.module_for(backend)
    if backend != workload.YARDSTICK:
        yard = correctness.yardstick(wl, wl.module_for(workload.YARDSTICK))
        good, _, what = correctness.check(wl, backend, m, yard)
        assert good, f"{backend} differs from torch.nn on {case.label()}: {what}"
    benchmark.group = f"{case.cell} {_case_id(case)}"
    benchmark.extra_info.update(case.as_dict(), backend=backend, flops=case.flops())
    benchmark(wl.call_fn(backend, m))
