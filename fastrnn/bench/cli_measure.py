"""The verbs of `fastrnn-bench` that measure: `run` (a grid, written to a results JSON) and `gate` (the stored
baseline's configurations, compared with it, suspects re-measured). They import torch and fastrnn."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from fastrnn.bench import configs, machine, peers, report, results, runner, timing, workload
from fastrnn.bench.cli import PROG, compare_args, compare_flags, warn_if_other_machine
from fastrnn.bench.configs import Settings
from fastrnn.bench.results import BenchError


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


_BACKENDS_HELP = (
    f"comma list of {', '.join(workload.IMPLEMENTATIONS)}: {workload.AUTO} = fastrnn's own choice (backend=None), "
    f"{workload.COMPILE} = torch.compile of a plain-torch step loop, any other = a fastrnn module with that backend "
    f"({results.YARDSTICK} itself is always timed: it is every ratio's denominator)"
)


# ---------------------------------------------------------------------------------------------------- run


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
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path("bench-results") / f"{machine.machine_name(device)}-{tag}-{stamp}.json"


def cmd_run(args: argparse.Namespace) -> int:
    preset_name = "full" if args.full else args.preset or "quick"
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
    names, explicit = workload.resolve(args.backends, device, preset.with_compile and not args.no_compile)
    names += workload.resolve_peers(args.peers, preset)
    settings = _settings_from(args, preset.settings)
    stream_Bs = preset.stream_B if not args.B else None  # --B sets every mode's batch sizes
    cases = configs.grid(cells, modes, Ts, Bs, Hs, dtypes, threads, args.input_size, device, stream_Bs)
    tag = preset_name if not custom else "custom"
    out = results.check_writable(args.out if args.out else _default_out(device, tag))
    if args.runs < 1:
        raise BenchError(f"--runs must be >= 1, got {args.runs}")
    print(
        f"{PROG} run: {len(cases)} cases x {', '.join(names)} ({tag}; repeats {settings.repeats})",
        file=sys.stderr,
    )
    earlier = results.load(Path(args.pool_with)) if args.pool_with else None
    data = runner.execute(
        cases, names, settings, explicit, device, tag, not args.no_progress, args.runs, args.command_line,
        args.efficiency,
    )  # fmt: skip
    if earlier is not None:
        runner.pool_with(data, earlier, args.pool_with)
    results.save(data, out)
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
            from fastrnn.bench import tables

            print()
            print(tables.provenance(data) + "\n\n" + tables.shapes_table(data))
    print(f"wrote {out} ({len(data['rows'])} rows, {data['elapsed_s']} s)")
    return 1 if timing.failed(data["rows"]) else 0


def add_run_flags(r: argparse.ArgumentParser) -> None:
    g = r.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the gate's small grid (default; about a minute)")
    g.add_argument("--full", action="store_true", help="the kernel issues' CPU grid (long: see the README)")
    g.add_argument(
        "--preset",
        choices=sorted(configs.PRESETS),
        help="a grid by name: quick (= --quick), full (= --full), ort (LSTM and GRU inference and B=1 streaming "
        "against ONNX Runtime, 2 threads; needs onnxruntime)",
    )
    r.add_argument("--cells", help=f"comma list of {', '.join(configs.ALL_CELLS)}")
    r.add_argument("--backends", help=_BACKENDS_HELP + " (default: every fastrnn kernel backend available here)")
    r.add_argument(
        "--peers",
        help=f"comma list of {', '.join(peers.PEERS)} (ONNX Runtime running torch.nn's ONNX export, timed on the "
        "layers' inference and streaming rows), or none (default: the preset's peers that are installed here)",
    )
    r.add_argument(
        "--modes",
        help=f"comma list of {', '.join(configs.MODES)} ({configs.STREAMING}: the layer called once per step, the "
        "state carried)",
    )
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
    r.add_argument(
        "--pool-with",
        metavar="RESULTS",
        help="pool this run's samples with those of an earlier results file of the same grid (for a baseline of "
        "unchanged code re-measured on another machine instance or day, so its spread covers that drift too)",
    )
    r.add_argument(
        "--efficiency",
        action="store_true",
        help="also time each case's matrix products alone (torch.mm of the same shapes and dtype) and report "
        "gemm_eff = that time / the row's time, a GEMM column in the table",
    )
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    r.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the full preset")
    r.add_argument("--out", help="results JSON path (default bench-results/<machine>-<preset>-<time>.json)")
    r.add_argument("--markdown", action="store_true", help="also print the markdown table of every shape")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--quiet", action="store_true", help="no table, only the output path")
    r.set_defaults(func=cmd_run)


# --------------------------------------------------------------------------------------------------- gate


def _default_baseline(name: str) -> Path:
    """benchmarks/baselines/<machine>.json of the source tree fastrnn runs from, else of the current directory."""
    rel = Path("benchmarks") / "baselines" / f"{name}.json"
    src = machine.source_root() / rel
    return src if src.exists() else rel


def cmd_gate(args: argparse.Namespace) -> int:
    """Quick run on the baseline's configurations, compare, re-measure what looks regressed, then decide."""
    t0 = time.perf_counter()
    path = Path(args.baseline) if args.baseline else _default_baseline(machine.machine_name(args.device))
    if not args.baseline and not path.exists():
        # ratios against torch.nn are a property of the machine type: another type's baseline would gate noise
        print(
            f"{PROG} gate: no baseline for this machine type ({path}); nothing to compare against, so nothing is "
            "gated. Make one on an idle machine of this type with: bash scripts/bench_baseline.sh",
            file=sys.stderr,
        )
        return 0
    base = results.load(path)
    thr, k, cap = compare_args(args)
    if args.recheck_factor < 1:
        raise BenchError("--recheck-factor must be >= 1")
    out = results.check_writable(args.out if args.out else Path("bench-results") / "gate-latest.json")
    cases = configs.cases_of_rows(base["rows"])
    if args.threads:
        ths = _ints(args.threads, "--threads")
        cases = list({replace(c, threads=t).key(): replace(c, threads=t) for c in cases for t in ths}.values())
    names, explicit = workload.resolve(args.backends, args.device)
    s0 = base.get("settings") or {}
    settings = Settings(**{f: s0[f] for f in Settings.__dataclass_fields__ if f in s0})
    if args.repeats is not None:
        settings = replace(settings, repeats=args.repeats, min_repeats=min(settings.min_repeats, args.repeats))
    print(
        f"{PROG} gate: baseline {path} ({base.get('machine', {}).get('cpu_model', '?')}, commit "
        f"{(base.get('git', {}).get('commit') or '?')[:10]}); {len(cases)} cases",
        file=sys.stderr,
    )
    new = runner.execute(
        cases, names, settings, explicit, args.device, "gate", not args.no_progress, command=args.command_line
    )
    warn_if_other_machine(base, new)
    verdicts = report.compare(base, new, thr, k, cap)
    flagged = {v.key for v in verdicts if v.verdict == "REGRESSION"}
    if flagged:
        print(
            f"{len(flagged)} configuration(s) look regressed; re-measuring them with "
            f"{args.recheck_factor}x the repeats",
            file=sys.stderr,
        )
        again = configs.cases_of_rows([dict(zip(results.KEY_FIELDS, key, strict=True)) for key in flagged])
        slow = replace(
            settings,
            repeats=settings.repeats * args.recheck_factor,
            min_repeats=settings.min_repeats * args.recheck_factor,
            max_seconds=settings.max_seconds * args.recheck_factor,
        )
        redo_names = [results.YARDSTICK, *sorted({key[1] for key in flagged})]
        redo = runner.execute(again, redo_names, slow, True, args.device, "gate-recheck", not args.no_progress)
        # the re-measured rows (torch.nn's included) replace the first ones; the verdict is theirs alone
        fresh = {results.row_key(r): r for r in redo["rows"]}
        new["rows"] = [fresh.get(results.row_key(r), r) for r in new["rows"]]
        new["rechecked"] = [list(kk) for kk in flagged]
        verdicts = report.compare(base, new, thr, k, cap)
    results.save(new, out)
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


def add_gate_flags(gt: argparse.ArgumentParser) -> None:
    gt.add_argument("--baseline", help="baseline JSON (default benchmarks/baselines/<machine>.json)")
    gt.add_argument("--backends", help=_BACKENDS_HELP + " (default: as for run)")
    gt.add_argument("--threads", help="override the baseline's thread counts, comma list")
    gt.add_argument("--repeats", type=int, help="timed samples per backend and case (default: the baseline's)")
    gt.add_argument("--recheck-factor", type=int, default=3, help="repeat multiplier when re-measuring suspects")
    gt.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    gt.add_argument("--out", help="where the new results go (default bench-results/gate-latest.json)")
    gt.add_argument("--no-progress", action="store_true")
    compare_flags(gt)
    gt.set_defaults(func=cmd_gate)
