"""`fastrnn-bench` (also `python -m fastrnn.bench`): run, compare, gate, plot, readme-table.

Exit status: 0 success; 1 a regression or a failing correctness gate (compare, gate); 2 bad input (unknown
cell/backend/flag, missing or malformed file, unavailable backend), reported as one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn

from fastrnn.bench import configs, report
from fastrnn.bench.configs import Case, Settings
from fastrnn.bench.measure import BenchError

PROG = "fastrnn-bench"
FASTRNN_BACKENDS = ("reference", "cpp", "numba", "triton")
KNOWN_BACKENDS = (*configs.PEERS, *FASTRNN_BACKENDS)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (the default prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------- list parsing


def _names(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise BenchError(f"empty {what} list")
    for s in items:
        if s not in allowed:
            raise BenchError(f"unknown {what} {s!r}; expected one of {', '.join(allowed)}")
    return items


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise BenchError(f"{what} must be comma-separated positive integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise BenchError(f"{what} must be comma-separated positive integers, got {text!r}")
    return vals


# ---------------------------------------------------------------------------------------------------- run


def resolve_backends(spec: str | None, device: str, with_compile: bool) -> tuple[list[str], bool]:
    """(backends, explicit). Default: torch.nn plus every fastrnn backend that can run on `device` (triton only
    on CUDA), plus torch.compile when the preset asks for it. Named backends must be available here."""
    from fastrnn import backends as fr

    if spec is None or spec == "auto":
        names = ["torch"]
        for b in FASTRNN_BACKENDS:
            if b == "triton" and device != "cuda":
                continue
            if fr.is_available(b)[0]:
                names.append(b)
        if with_compile:
            names.append("compile")
        return names, False
    names = list(_names(spec, KNOWN_BACKENDS, "backend"))
    for b in names:
        if b in FASTRNN_BACKENDS:
            ok, why = fr.is_available(b)
            if not ok:
                raise BenchError(f"backend {b!r} is not available here: {why}")
    if "torch" not in names:
        names.insert(0, "torch")
    return names, True


def run_cases(
    cases: Sequence[Case],
    backends: Sequence[str],
    settings: Settings,
    explicit: bool,
    gemm: dict[int, float],
    progress: bool,
) -> list[dict]:
    from fastrnn.bench import measure

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
        rows += measure.measure_case(
            case, configs.backends_for(case, backends, explicit), settings, gemm.get(case.threads)
        )
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return rows


def measure_gemm(
    threads: Sequence[int], H: Sequence[int], device: str, clock: str = "auto"
) -> tuple[int, dict[int, float]]:
    """The sgemm rate at each thread count, for a square GEMM as large as the run's largest weight matrix."""
    from fastrnn.bench import measure

    n = min(max(max(H), 256), 1024)
    rates = {}
    for th in threads:
        measure.set_threads(th)
        rates[th] = measure.gemm_rate(n, device=device, clock=measure.clock_name(device, th, clock))
    return n, rates


def execute(
    cases: Sequence[Case],
    backends: Sequence[str],
    settings: Settings,
    explicit: bool,
    device: str,
    preset: str | None,
    progress: bool,
    runs: int = 1,
) -> dict:
    """Measure `cases` (the whole grid `runs` times, pooled) and return a complete results object."""
    from fastrnn.bench import measure

    t0 = time.perf_counter()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    threads = sorted({c.threads for c in cases})
    n, rates = measure_gemm(threads, [c.H for c in cases], device, settings.clock)
    runs_rows = [run_cases(cases, backends, settings, explicit, rates, progress) for _ in range(runs)]
    rows = runs_rows[0] if runs == 1 else measure.merge_runs(runs_rows)
    data = measure.header(device, preset, settings, n, rates[threads[0]], threads[0])
    data["gemm"]["gflops_by_threads"] = {str(k): v for k, v in rates.items()}
    data["machine"]["threads"] = threads
    data["backends"] = list(backends)
    data["runs"] = runs
    data["load_avg_1min"] = {"start": load0, "end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    data["elapsed_s"] = round(time.perf_counter() - t0, 1)
    data["rows"] = rows
    return data


def _settings_from(args: argparse.Namespace, base: Settings) -> Settings:
    s = base
    if args.repeats is not None:
        s = replace(s, repeats=args.repeats, min_repeats=min(s.min_repeats, args.repeats))
    if args.warmup is not None:
        s = replace(s, warmup=args.warmup)
    if args.max_seconds is not None:
        s = replace(s, max_seconds=args.max_seconds)
    if args.min_sample_ms is not None:
        s = replace(s, min_sample_ms=args.min_sample_ms)
    return s


def _default_out(device: str, tag: str) -> Path:
    from fastrnn.bench.measure import machine_name

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path("bench-results") / f"{machine_name(device)}-{tag}-{stamp}.json"


def cmd_run(args: argparse.Namespace) -> int:
    preset_name = "full" if args.full else "quick"
    preset = configs.PRESETS[preset_name]
    custom = any(getattr(args, k) is not None for k in ("cells", "modes", "T", "B", "H", "dtypes", "threads"))
    device = args.device
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BenchError("--device cuda asked for, but torch sees no CUDA device")
    cells = _names(args.cells, configs.ALL_CELLS, "cell") if args.cells else preset.cells
    modes = _names(args.modes, configs.MODES, "mode") if args.modes else preset.modes
    dtypes = _names(args.dtypes, configs.DTYPES, "dtype") if args.dtypes else preset.dtypes
    Ts = _ints(args.T, "--T") if args.T else preset.T
    Bs = _ints(args.B, "--B") if args.B else preset.B
    Hs = _ints(args.H, "--H") if args.H else preset.H
    threads = _ints(args.threads, "--threads") if args.threads else preset.threads
    if args.input_size is not None and args.input_size <= 0:
        raise BenchError("--input-size must be a positive integer")
    for r in ("repeats", "warmup"):
        v = getattr(args, r)
        if v is not None and v < (1 if r == "repeats" else 0):
            raise BenchError(f"--{r} must be {'>= 1' if r == 'repeats' else '>= 0'}, got {v}")
    backends, explicit = resolve_backends(args.backends, device, preset.with_compile and not args.no_compile)
    settings = _settings_from(args, preset.settings)
    cases = configs.grid(cells, modes, Ts, Bs, Hs, dtypes, threads, args.input_size, device)
    tag = preset_name if not custom else "custom"
    out = report.check_writable(args.out if args.out else _default_out(device, tag))
    if args.runs < 1:
        raise BenchError(f"--runs must be >= 1, got {args.runs}")
    print(
        f"{PROG} run: {len(cases)} cases x backends {', '.join(backends)} ({tag}; repeats {settings.repeats})",
        file=sys.stderr,
    )
    data = execute(cases, backends, settings, explicit, device, tag, not args.no_progress, args.runs)
    report.save(data, out)
    load = data["load_avg_1min"]["start"]
    cores = data["machine"]["cores"]
    if load is not None and load > cores - 0.5:
        print(
            f"note: load average {load:.1f} on {cores} cores at the start: other work shares this machine, so "
            "multi-threaded (wall-clock) timings are noisy; one-thread cases are timed on CPU time",
            file=sys.stderr,
        )
    if not args.quiet:
        print(
            f"sgemm (n={data['gemm']['n']}): "
            + ", ".join(f"{v:.1f} GFLOP/s at {k} thread(s)" for k, v in data["gemm"]["gflops_by_threads"].items())
        )
        print(report.results_table(data))
        print()
        print(report.summary(data))
        if args.markdown:
            print()
            print(report.markdown_table(data))
    print(f"wrote {out} ({len(data['rows'])} rows, {data['elapsed_s']} s)")
    return 1 if any(r["status"] in ("FAILING", "ERROR") for r in data["rows"]) else 0


# ----------------------------------------------------------------------------------- compare / gate / plot


def _compare_args(args: argparse.Namespace) -> tuple[float, float, float]:
    if args.noise_k < 0:
        raise BenchError("--noise-k must be >= 0")
    return report.parse_threshold(args.threshold), args.noise_k, report.parse_threshold(args.noise_cap)


def _warn_if_other_machine(base: dict, new: dict) -> None:
    a, b = (base.get("machine") or {}).get("name"), (new.get("machine") or {}).get("name")
    if a and b and a != b:
        print(
            f"note: comparing runs from different machine types ({a} vs {b}); ratios may differ legitimately",
            file=sys.stderr,
        )


def cmd_compare(args: argparse.Namespace) -> int:
    base, new = report.load(args.base), report.load(args.new)
    thr, k, cap = _compare_args(args)
    _warn_if_other_machine(base, new)
    verdicts = report.compare(base, new, thr, k, cap)
    print(report.compare_table(verdicts, thr))
    bad = [v for v in verdicts if v.fails]
    if bad:
        print(f"FAIL: {len(bad)} configuration(s) regressed past {thr:.0%} beyond noise, or fail correctness")
        return 1
    print(f"OK: no regression past {thr:.0%} beyond noise")
    return 0


def _cases_from_rows(rows: Sequence[dict]) -> list[Case]:
    seen: dict[tuple, Case] = {}
    for r in rows:
        c = Case(r["cell"], r["mode"], r["T"], r["B"], r["H"], r["I"], r["dtype"], r["threads"], r["device"])
        seen.setdefault(c.key(), c)
    return list(seen.values())


def _default_baseline(machine: str) -> Path:
    """benchmarks/baselines/<machine>.json of the source tree fastrnn runs from, else of the current directory."""
    import fastrnn

    rel = Path("benchmarks") / "baselines" / f"{machine}.json"
    src = Path(fastrnn.__file__).resolve().parent.parent / rel
    return src if src.exists() else rel


def cmd_gate(args: argparse.Namespace) -> int:
    """Quick run on the baseline's configurations, compare, re-measure what looks regressed, then decide."""
    from fastrnn.bench.measure import machine_name

    t0 = time.perf_counter()
    path = Path(args.baseline) if args.baseline else _default_baseline(machine_name(args.device))
    base = report.load(path)
    thr, k, cap = _compare_args(args)
    if args.recheck_factor < 1:
        raise BenchError("--recheck-factor must be >= 1")
    out = report.check_writable(args.out if args.out else Path("bench-results") / "gate-latest.json")
    cases = _cases_from_rows(base["rows"])
    if args.threads:
        ths = _ints(args.threads, "--threads")
        cases = list({replace(c, threads=t).key(): replace(c, threads=t) for c in cases for t in ths}.values())
    backends, explicit = resolve_backends(args.backends, args.device, False)
    s0 = base.get("settings") or {}
    settings = Settings(**{f: s0[f] for f in Settings.__dataclass_fields__ if f in s0})
    if args.repeats is not None:
        settings = replace(settings, repeats=args.repeats, min_repeats=min(settings.min_repeats, args.repeats))
    print(
        f"{PROG} gate: baseline {path} ({base.get('machine', {}).get('cpu_model', '?')}, commit "
        f"{(base.get('git', {}).get('commit') or '?')[:10]}); {len(cases)} cases",
        file=sys.stderr,
    )
    new = execute(cases, backends, settings, explicit, args.device, "gate", not args.no_progress)
    _warn_if_other_machine(base, new)
    verdicts = report.compare(base, new, thr, k, cap)
    flagged = {v.key for v in verdicts if v.verdict == "REGRESSION"}
    if flagged:
        print(
            f"{len(flagged)} configuration(s) look regressed; re-measuring them with "
            f"{args.recheck_factor}x the repeats",
            file=sys.stderr,
        )
        again = _cases_from_rows([dict(zip(report.KEY_FIELDS, key, strict=True)) for key in flagged])
        slow = replace(
            settings,
            repeats=settings.repeats * args.recheck_factor,
            min_repeats=settings.min_repeats * args.recheck_factor,
            max_seconds=settings.max_seconds * args.recheck_factor,
        )
        redo_backends = ["torch", *sorted({key[1] for key in flagged})]
        redo = execute(again, redo_backends, slow, True, args.device, "gate-recheck", not args.no_progress)
        # the re-measured rows (torch.nn's included) replace the first ones; the verdict is theirs alone
        fresh = {report.row_key(r): r for r in redo["rows"]}
        new["rows"] = [fresh.get(report.row_key(r), r) for r in new["rows"]]
        new["rechecked"] = [list(kk) for kk in flagged]
        verdicts = report.compare(base, new, thr, k, cap)
    report.save(new, out)
    print(report.compare_table(verdicts, thr))
    print(f"wrote {out}")
    bad = [v for v in verdicts if v.fails]
    if bad:
        print(
            f"GATE FAIL: {len(bad)} configuration(s) regressed past {thr:.0%} beyond noise (confirmed by a "
            "re-measurement) or fail the correctness gate"
        )
        return 1
    print(f"GATE OK: no regression past {thr:.0%} beyond noise ({time.perf_counter() - t0:.0f} s)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from fastrnn.bench.plot import plot

    data = report.load(args.results)
    for p in plot(data, args.out_dir):
        print(f"wrote {p}")
    return 0


def cmd_readme_table(args: argparse.Namespace) -> int:
    text = report.markdown_table(report.load(args.results))
    if args.out:
        p = report.check_writable(args.out)
        try:
            p.write_text(text)
        except OSError as e:
            raise BenchError(f"{p}: cannot write ({e.strerror})") from None
        print(f"wrote {p}")
    else:
        print(text, end="")
    return 0


# ------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="fastrnn's benchmark suite and performance-regression gate.")
    p.add_argument("--traceback", action="store_true", help="show Python tracebacks of internal errors")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    sub.required = True

    r = sub.add_parser("run", help="measure backends against torch.nn and write a results JSON")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the gate's small grid (default; about a minute)")
    g.add_argument("--full", action="store_true", help="the kernel issues' CPU grid (long: see the README)")
    r.add_argument("--cells", help=f"comma list of {', '.join(configs.ALL_CELLS)}")
    r.add_argument(
        "--backends",
        help=f"comma list of {', '.join(KNOWN_BACKENDS)} or auto (torch.nn is always "
        "included: it is every ratio's denominator)",
    )
    r.add_argument("--modes", help=f"comma list of {', '.join(configs.MODES)}")
    r.add_argument("--dtypes", help=f"comma list of {', '.join(configs.DTYPES)}")
    r.add_argument("--T", help="sequence lengths, comma list")
    r.add_argument("--B", help="batch sizes, comma list")
    r.add_argument("--H", help="hidden sizes, comma list")
    r.add_argument("--input-size", type=int, help="input size I (default: I = H)")
    r.add_argument("--threads", help="intra-op thread counts, comma list")
    r.add_argument("--repeats", type=int, help="timed samples per backend and case")
    r.add_argument("--warmup", type=int, help="untimed calls per backend and case")
    r.add_argument("--max-seconds", type=float, help="time budget per backend and case before repeats are cut")
    r.add_argument("--min-sample-ms", type=float, help="calls are batched until one sample lasts this long")
    r.add_argument(
        "--runs",
        type=int,
        default=1,
        help="measure the whole grid this many times and pool the "
        "samples, so the ratio's spread includes run-to-run drift (use 3 for a stored baseline)",
    )
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    r.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the full preset")
    r.add_argument("--out", help="results JSON path (default bench-results/<machine>-<preset>-<time>.json)")
    r.add_argument("--markdown", action="store_true", help="also print the README markdown table")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--quiet", action="store_true", help="no table, only the output path")
    r.set_defaults(func=cmd_run)

    def compare_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--threshold",
            default=f"{report.DEFAULT_THRESHOLD:.0%}",
            help="smallest ratio drop that counts, e.g. 10%% (default %(default)s)",
        )
        q.add_argument(
            "--noise-k",
            type=float,
            default=report.DEFAULT_NOISE_K,
            help="a drop must also exceed k x the combined relative ratio IQR of both runs (default %(default)s)",
        )
        q.add_argument(
            "--noise-cap",
            default=f"{report.DEFAULT_NOISE_CAP:.0%}",
            help="noise never excuses a drop larger than this (default %(default)s, i.e. a 2x slowdown always fails)",
        )

    c = sub.add_parser("compare", help="ratio changes between two results files; exit 1 on a regression")
    c.add_argument("base", help="baseline results JSON")
    c.add_argument("new", help="new results JSON")
    compare_flags(c)
    c.set_defaults(func=cmd_compare)

    gt = sub.add_parser("gate", help="run the baseline's configurations, compare, re-measure suspects, decide")
    gt.add_argument("--baseline", help="baseline JSON (default benchmarks/baselines/<machine>.json)")
    gt.add_argument("--backends", help="as for run (default: every available backend)")
    gt.add_argument("--threads", help="override the baseline's thread counts, comma list")
    gt.add_argument("--repeats", type=int, help="timed samples per backend and case (default: the baseline's)")
    gt.add_argument("--recheck-factor", type=int, default=3, help="repeat multiplier when re-measuring suspects")
    gt.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    gt.add_argument("--out", help="where the new results go (default bench-results/gate-latest.json)")
    gt.add_argument("--no-progress", action="store_true")
    compare_flags(gt)
    gt.set_defaults(func=cmd_gate)

    pl = sub.add_parser("plot", help="PNG charts (speed-up and GFLOP/s vs hidden size) from a results JSON")
    pl.add_argument("results")
    pl.add_argument("--out-dir", default="bench-results/plots")
    pl.set_defaults(func=cmd_plot)

    md = sub.add_parser("readme-table", help="the README's markdown results table from a results JSON")
    md.add_argument("results")
    md.add_argument("--out", help="write to this file instead of stdout")
    md.set_defaults(func=cmd_readme_table)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except BenchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.traceback:
            raise
        msg = " ".join(str(e).split())
        print(
            f"{PROG}: internal error: {type(e).__name__}: {msg} (rerun with --traceback for details)", file=sys.stderr
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
