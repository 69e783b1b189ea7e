"""`fastrnn-bench` (also `python -m fastrnn.bench`): run, gate, compare, plot, readme-table.

The verbs that measure (run, gate: cli_measure.py) import torch and fastrnn; their flags, which list cells and
backends from the package, are added only when one of them is parsed. The verbs that read results files
(compare, plot, readme-table) import neither.

Exit status: 0 success; 1 a regression or a failing correctness gate (run, compare, gate); 2 bad input (unknown
cell/backend/flag, missing or malformed file, unavailable backend), reported as one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from fastrnn.bench import report, results, tables
from fastrnn.bench.results import BenchError

PROG = tables.PROG


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (the default prints the whole usage first), and whose
    arguments may be added on first use (`add_arguments`), so a verb's imports happen only for that verb."""

    def __init__(self, *args, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_arguments = add_arguments

    def _complete(self) -> None:
        if self._add_arguments is not None:
            add, self._add_arguments = self._add_arguments, None
            add(self)

    def parse_known_args(self, args=None, namespace=None):
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._complete()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------- shared by compare, gate


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


def compare_args(args: argparse.Namespace) -> tuple[float, float, float]:
    if args.noise_k < 0:
        raise BenchError("--noise-k must be >= 0")
    return report.parse_threshold(args.threshold), args.noise_k, report.parse_threshold(args.noise_cap)


def warn_if_other_machine(base: dict, new: dict) -> None:
    a, b = (base.get("machine") or {}).get("name"), (new.get("machine") or {}).get("name")
    if a and b and a != b:
        print(
            f"note: comparing runs from different machine types ({a} vs {b}); ratios may differ legitimately",
            file=sys.stderr,
        )


# ------------------------------------------------------------------------------ compare / plot / readme-table


def cmd_compare(args: argparse.Namespace) -> int:
    base, new = results.load(args.base), results.load(args.new)
    thr, k, cap = compare_args(args)
    warn_if_other_machine(base, new)
    verdicts = report.compare(base, new, thr, k, cap)
    print(report.compare_table(verdicts, thr))
    bad = [v for v in verdicts if v.fails]
    if bad:
        print(f"FAIL: {len(bad)} configuration(s) regressed past {thr:.0%} beyond noise, or fail correctness")
        return 1
    print(f"OK: no regression past {thr:.0%} beyond noise")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from fastrnn.bench.plot import plot

    data = results.load(args.results)
    for p in plot(data, args.out_dir):
        print(f"wrote {p}")
    return 0


def cmd_readme_table(args: argparse.Namespace) -> int:
    data = results.load(args.results)
    text = tables.tables_file(data, args.command_line)
    if args.readme:
        block = tables.readme_block(data, args.command_line)  # built first: a bad file changes nothing
        out = results.check_writable(args.out) if args.out else None
        print(f"wrote {tables.replace_between_markers(args.readme, block)} (between its bench-summary markers)")
        if out is not None:
            print(f"wrote {results.write_text(out, text)}")
    elif args.out:
        print(f"wrote {results.write_text(args.out, text)}")
    else:
        print(text, end="")
    return 0


# ------------------------------------------------------------------------------------------------- parser


def _measure_flags(verb: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        from fastrnn.bench import cli_measure

        getattr(cli_measure, f"add_{verb}_flags")(p)

    return add


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="fastrnn's benchmark suite and performance-regression gate.")
    p.add_argument("--traceback", action="store_true", help="show Python tracebacks of internal errors")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    sub.required = True

    sub.add_parser(
        "run", help="measure backends against torch.nn and write a results JSON", add_arguments=_measure_flags("run")
    )
    c = sub.add_parser("compare", help="ratio changes between two results files; exit 1 on a regression")
    c.add_argument("base", help="baseline results JSON")
    c.add_argument("new", help="new results JSON")
    compare_flags(c)
    c.set_defaults(func=cmd_compare)

    sub.add_parser(
        "gate",
        help="run the baseline's configurations, compare, re-measure suspects, decide",
        add_arguments=_measure_flags("gate"),
    )

    pl = sub.add_parser("plot", help="PNG charts (speed-up and GFLOP/s vs hidden size) from a results JSON")
    pl.add_argument("results")
    pl.add_argument("--out-dir", default="bench-results/plots")
    pl.set_defaults(func=cmd_plot)

    md = sub.add_parser(
        "readme-table",
        help="the markdown tables (summary and every shape, each headed by the commands that made it) of a "
        "results JSON",
    )
    md.add_argument("results")
    md.add_argument("--out", help="write the tables to this file instead of stdout")
    md.add_argument(
        "--readme",
        help=f"also put the commands and the summary table into this file, between {tables.README_START} and "
        f"{tables.README_END}",
    )
    md.set_defaults(func=cmd_readme_table)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = tables.command_line(argv)
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
