"""fastrnn's benchmark suite and `fastrnn-bench`, one module per concern (DESIGN.md, "Speed"):

    results      results files: long-format JSON rows, read (validated) and written; BenchError
    timing       interleaved rounds against torch.nn, the clock, medians / quartiles / per-round ratios
    machine      CPU, versions, commit, thread counts, the measured GEMM rate, the results header
    configs      the grid: cases (cell x shape x mode x dtype x threads) and the presets
    workload     the implementations (torch.nn, compile, auto, fastrnn's backends, peers) and running them on a case
    peers        other runtimes on the same cases: ONNX Runtime running torch.nn's ONNX export (optional)
    correctness  the gate before timing: outputs, states and every gradient against torch.nn
    runner       running a grid: cases x implementations -> rows
    report       end-of-run tables, the regression comparison (compare, gate)
    tables       the markdown tables the repository keeps (readme-table)
    plot         PNG charts
    cli, cli_measure   the command line

results, timing, report, tables, plot and cli import neither torch nor fastrnn's modules, so reading, comparing
and tabulating results files does not either; the names below are imported on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "PRESETS": "configs",
    "Case": "configs",
    "grid": "configs",
    "Settings": "timing",
    "measure_case": "runner",
    "compare": "report",
    "BenchError": "results",
    "load": "results",
    "save": "results",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'fastrnn.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fastrnn.bench.{mod}"), name)
