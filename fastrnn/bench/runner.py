"""Running a grid: cases x implementations -> long-format rows, correctness gate first, then interleaved timing.

Row fields besides the case's (cell, mode, T, B, H, I, dtype, threads, device) and the timing statistics
(timing.py's docstring):
    backend           the implementation (workload.py's docstring); torch.nn's row is results.YARDSTICK
    status            ok | FAILING (correctness gate failed: not timed) | SKIPPED (cannot run here) | ERROR
    note              why a row is not ok; for auto, the backend fastrnn chose
    flops, gflops     Case.flops() and Case.flops() / median time; gemm_gflops: the machine's measured GEMM rate
    peak_mem_bytes    Workload.peak_memory (peak_mem_kind says which of its two definitions)
    gemm_ms, gemm_eff (run --efficiency) the time of the call's matrix products alone, each a torch.mm of its
                      shape in the case's dtype on the same threads (machine.layer_gemm_ms, Case.gemms), and
                      gemm_ms / median_ms: a lower bound on the rate the row's GEMMs ran at, as a fraction of the
                      measured rate of the same shapes (it counts the pointwise work and the rest as GEMM time).
                      1.0 would be an implementation doing nothing but those products at torch.mm's rate
    max_err           correctness.py's docstring
    ratio_vs_ort, ratio_vs_ort_q25/q75, ort_median_ms
                      where the onnxruntime peer is timed on the case (timing.py's docstring); None elsewhere
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Sequence

from fastrnn.bench import correctness, machine, results, timing, workload
from fastrnn.bench.configs import Case
from fastrnn.bench.results import ORT, YARDSTICK, BenchError
from fastrnn.bench.timing import Settings, Timer

# a row's measured fields, None until measured (repeats and number: 0)
_MEASURED = (
    "median_ms", "q25_ms", "q75_ms", "min_ms", "max_ms", "torch_median_ms", "ratio_vs_torch", "ratio_q25", "ratio_q75",
    "gflops", "gemm_gflops", "gemm_ms", "gemm_eff", "peak_mem_bytes", "peak_mem_kind", "max_err",
    *timing.VS_ORT_FIELDS,
)  # fmt: skip


def _row(case: Case, backend: str, status: str, note: str = "", **fields) -> dict:
    row = case.as_dict()
    row.update(backend=backend, status=status, note=note, flops=case.flops(), repeats=0, number=0)
    row.update(dict.fromkeys(_MEASURED))
    row.update(fields)
    return row


def measure_case(
    case: Case, names: Iterable[str], settings: Settings, gemm_gflops: float | None, efficiency: bool = False
) -> list[dict]:
    """Rows for torch.nn and each implementation in `names` on one case (efficiency: with gemm_ms, gemm_eff)."""
    machine.set_threads(case.threads)
    wl = workload.Workload(case)
    torch_mod = wl.module_for(YARDSTICK)
    yard = correctness.yardstick(wl, torch_mod)
    exact = yard.exact
    rows: dict[str, dict] = {}
    if exact is not None:  # torch.nn's own half-precision error against float64, the bar the others are held to
        own = correctness.compare_half(yard.ref, yard.ref, exact, 0.0)[1]
        rows[YARDSTICK] = _row(case, YARDSTICK, "ok", yard.note, max_err=own)
    timers = [Timer(YARDSTICK, wl.call_fn(YARDSTICK, torch_mod))]
    mods = {YARDSTICK: torch_mod}
    names = [b for b in names if b != YARDSTICK]
    for b in names:
        ok, why = workload.status(b, case)
        if not ok:
            rows[b] = _row(case, b, "SKIPPED", why)
            continue
        try:
            m = wl.module_for(b)
            note = "; ".join(n for n in (workload.note(b, case), yard.note) if n)
            good, err, why = correctness.check(wl, b, m, yard)
        except Exception as e:
            rows[b] = _row(case, b, "SKIPPED" if b == workload.COMPILE else "ERROR", timing.one_line(e))
            continue
        if not good:
            against = "float64 torch.nn" if exact is not None else "torch.nn"
            rows[b] = _row(
                case,
                b,
                "FAILING",
                "; ".join(n for n in (f"differs from {against}: {why}", yard.note) if n),
                max_err=err,
            )
            continue
        rows[b] = _row(case, b, "ok", note, max_err=err)
        mods[b] = m
        timers.append(Timer(b, wl.call_fn(b, m)))
    clock = timing.clock_name(case.device, case.threads, settings.clock)
    machine.set_threads(case.threads)  # again: a backend's first call may have just imported numba (all cores)
    timing.time_interleaved(timers, settings, case.device, clock)
    t_torch = [x * 1e3 for x in timers[0].samples]
    gemm_ms = machine.layer_gemm_ms(case, clock) if efficiency else None
    for tm in timers:
        row = rows.get(tm.name) or _row(case, tm.name, "ok", max_err=0.0)
        rows[tm.name] = row
        if tm.error or not tm.samples:
            row.update(status="ERROR", note=tm.error or "no samples")
            continue
        s = [x * 1e3 for x in tm.samples]
        peak, kind = wl.peak_memory(tm.call, tm.name, mods[tm.name])
        row.update(timing.summarize(s, timing.paired_ratios(t_torch, s), t_torch))
        row.update(
            number=tm.number,
            samples_ms=[float(f"{x:.4g}") for x in s],
            clock=clock,
            gflops=case.flops() / (row["median_ms"] * 1e-3) / 1e9,
            gemm_gflops=gemm_gflops,
            peak_mem_bytes=peak,
            peak_mem_kind=kind,
        )
        if gemm_ms is not None:
            row.update(gemm_ms=gemm_ms, gemm_eff=gemm_ms / row["median_ms"])
    ort = next((tm for tm in timers if tm.name == ORT and rows[ORT]["status"] == "ok"), None)
    if ort is not None:  # every other implementation against the peer, round by round as against torch.nn
        t_ort = [x * 1e3 for x in ort.samples]
        for tm in timers:
            if tm is not ort and rows[tm.name]["status"] == "ok":
                s = [x * 1e3 for x in tm.samples]
                rows[tm.name].update(timing.vs_ort(t_ort, timing.paired_ratios(t_ort, s)))
    return [rows[b] for b in (YARDSTICK, *names) if b in rows]


def run_cases(
    cases: Sequence[Case],
    names: Sequence[str],
    settings: Settings,
    explicit: bool,
    gemm: dict[int, float],
    progress: bool,
    efficiency: bool = False,
) -> list[dict]:
    rows: list[dict] = []
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(cases), unit="case", file=sys.stderr, dynamic_ncols=True)
        except ModuleNotFoundError:
            bar = None
    for case in cases:
        if bar is not None:
            bar.set_description(case.label())
        rows += measure_case(
            case, workload.for_case(case, names, explicit), settings, gemm.get(case.threads), efficiency
        )
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return rows


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def execute(
    cases: Sequence[Case],
    names: Sequence[str],
    settings: Settings,
    explicit: bool,
    device: str,
    preset: str | None,
    progress: bool,
    runs: int = 1,
    command: str | None = None,
    efficiency: bool = False,
) -> dict:
    """Measure `cases` (the whole grid `runs` times, pooled) and return a complete results object."""
    t0 = time.perf_counter()
    load0 = _load()
    threads = sorted({c.threads for c in cases})
    n, rates = machine.measure_gemm(threads, [c.H for c in cases], device, settings.clock)
    runs_rows = [run_cases(cases, names, settings, explicit, rates, progress, efficiency) for _ in range(runs)]
    rows = runs_rows[0] if runs == 1 else timing.merge_runs(runs_rows)
    data = machine.header(device, preset, settings, n, rates[threads[0]], threads[0], command)
    data["gemm"]["gflops_by_threads"] = {str(k): v for k, v in rates.items()}
    data["machine"]["threads"] = threads
    data["backends"] = list(names)
    data["runs"] = runs
    data["load_avg_1min"] = {"start": load0, "end": _load()}
    data["elapsed_s"] = round(time.perf_counter() - t0, 1)
    data["rows"] = rows
    return data


def pool_with(data: dict, earlier: dict, label: str) -> None:
    """Pool `data`'s rows with an earlier results file's (timing.merge_runs), in place. The two must hold the same
    configurations: pooling is for re-measuring unchanged code, not for splicing grids."""
    keys = {results.row_key(r) for r in data["rows"]}
    old = {results.row_key(r) for r in earlier["rows"]}
    if keys != old:
        raise BenchError(
            f"--pool-with {label}: it holds {len(old - keys)} configuration(s) this run does not and lacks "
            f"{len(keys - old)} that it has; pool only runs of the same grid"
        )
    data["rows"] = timing.merge_runs([earlier["rows"], data["rows"]])
    data["runs"] = data["runs"] + earlier.get("runs", 1)
    data["pooled_with"] = {
        "path": label,
        "created": earlier.get("created"),
        "commit": (earlier.get("git") or {}).get("commit"),
        "runs": earlier.get("runs", 1),
    }
