"""The markdown tables the repository keeps (`fastrnn-bench readme-table`), each headed by the two commands that
made it: the `fastrnn-bench run` that wrote its results file (recorded in the file) and the `readme-table` call.

    summary      geometric mean (minimum) over the run's shapes of torch.nn time / backend time, one line per
                 cell and one column per backend x mode: what the README shows between its markers; where the
                 onnxruntime peer was timed, it has its own columns there, and a second table gives the geometric
                 mean (minimum) of onnxruntime time / backend time
    every shape  one line per cell x mode x shape x backend (and "vs ORT" where the peer was timed)

Plain Python on results files: nothing here imports torch or fastrnn's modules.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

from fastrnn.bench.report import Group, fmt, has_vs_ort, pct, ratio_groups
from fastrnn.bench.results import ORT, YARDSTICK, BenchError, case_key

PROG = "fastrnn-bench"
README_START = "<!-- bench-summary:start -->"
README_END = "<!-- bench-summary:end -->"
_WIDTH = 110  # command lines are wrapped (with a trailing backslash) to fit this width


def command_line(argv: Sequence[str]) -> str:
    """`fastrnn-bench ARGS` as a shell would take it back (`python -m fastrnn.bench` is the same command)."""
    return shlex.join([PROG, *argv])


def _wrapped(command: str) -> str:
    """One line, or several ending in a backslash, breaking only between a flag (with its value) and the next."""
    groups: list[list[str]] = []
    for tok in shlex.split(command):
        joins = groups and len(groups[-1]) == 1 and groups[-1][0].startswith("-") and not tok.startswith("-")
        if joins:
            groups[-1].append(tok)
        else:
            groups.append([tok])
    lines, cur = [], ""
    for g in groups:
        words = shlex.join(g)
        if cur and len(cur) + 1 + len(words) > _WIDTH - 2:
            lines.append(cur + " \\")
            cur = "  " + words
        else:
            cur = f"{cur} {words}" if cur else words
    return "\n".join([*lines, cur])


def commands_block(data: dict, table_command: str) -> str:
    """The bash block that regenerates a table: the run that wrote `data`, then the table command."""
    run = data.get("command")
    first = _wrapped(run) if run else "# the run's command is not recorded in its file (made before runs recorded it)"
    return f"```bash\n{first}\n{_wrapped(table_command)}\n```"


def provenance(data: dict) -> str:
    m, v, g = data.get("machine", {}), data.get("versions", {}), data.get("git", {})
    commit = (g.get("commit") or "unknown")[:10] + (" + uncommitted changes" if g.get("dirty") else "")
    uarch = m.get("cpu_microarch")
    cpu = m.get("cpu_model", "?") + (f" ({uarch.replace('zen', 'Zen ')})" if uarch else "")
    return (
        f"Measured on {cpu}, {m.get('cores', '?')} cores, torch {v.get('torch', '?')}, "
        f"fastrnn {v.get('fastrnn', '?')} at commit `{commit}`, {data.get('created', '?')}; "
        f"sgemm {_sgemm(data)} GFLOP/s. Ratio = torch.nn time / backend time "
        "(> 1 is faster; median over rounds that time both back to back in the same run)."
    )


def _sgemm(data: dict) -> str:
    gemm = data.get("gemm") or {}
    by = gemm.get("gflops_by_threads") or {}
    if len(by) > 1:
        return " / ".join(fmt(x, ".0f") for x in by.values()) + f" at {' / '.join(by)} threads"
    return fmt(gemm.get("gflops"), ".0f")


def _order(values: Sequence) -> dict:
    """First-appearance rank of each value."""
    return {v: i for i, v in enumerate(dict.fromkeys(values))}


def _cell(g: Group, show_n: bool) -> str:
    """Geometric mean and minimum, as "1.16x (0.86x)", then what kept shapes out of them."""
    parts = []
    if g.ratios:
        parts.append(f"{fmt(g.geomean, '.2f')}x ({fmt(min(g.ratios), '.2f')}x)" + (f" [n={len(g.ratios)}]" * show_n))
    if g.bad:
        parts.append(f"{g.bad} FAILING/ERROR")
    if g.skipped:
        parts.append(f"{g.skipped} skipped")
    return ", ".join(parts) or "-"


def summary_table(data: dict) -> str:
    """Geometric mean (minimum) of the ratio per cell (x dtype, threads, device where the run has several) and
    backend x mode, with the sentence that says what it is."""
    rows = [r for r in data["rows"] if r["backend"] != YARDSTICK]
    if not rows:
        raise BenchError("the results file has no backend rows to summarise")
    variants = [f for f in ("dtype", "threads", "device") if len({r[f] for r in rows}) > 1]

    def label(r: dict) -> str:
        return " ".join([r["cell"], *(f"thr={r[f]}" if f == "threads" else str(r[f]) for f in variants)])

    groups = ratio_groups(rows, lambda r: (label(r), r["backend"], r["mode"]))
    backend_rank = _order([r["backend"] for r in rows])
    mode_rank = _order([r["mode"] for r in rows])
    columns = sorted({k[1:] for k in groups}, key=lambda c: (backend_rank[c[0]], mode_rank[c[1]]))
    counts = {len(g.ratios) for g in groups.values() if g.ratios} or {0}
    show_n = len(counts) > 1
    over = f"the {counts.pop()} shapes" if not show_n else "each entry's timed shapes (n)"
    lines = [
        f"Geometric mean (minimum) over {over} of torch.nn time / backend time, sgemm {_sgemm(data)} GFLOP/s:",
        "",
        "| cell | " + " | ".join(f"{b} {m}" for b, m in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for lab in _order([label(r) for r in rows]):
        entries = [_cell(groups[(lab, *c)], show_n) if (lab, *c) in groups else "" for c in columns]
        lines.append(f"| {lab} | " + " | ".join(entries) + " |")
    if has_vs_ort(rows):
        lines += ["", *_vs_ort_table(rows, label)]
    return "\n".join(lines)


def _vs_ort_table(rows: list[dict], label: Callable[[dict], str]) -> list[str]:
    """Geometric mean (minimum) of onnxruntime time / backend time over the shapes the peer timed, per cell and
    backend x mode (the peer's own column in the table above is torch.nn time / onnxruntime time)."""
    groups = ratio_groups((r for r in rows if r["backend"] != ORT), lambda r: (label(r), r["backend"], r["mode"]))
    groups = {k: Group(ratios=g.ort_ratios) for k, g in groups.items() if g.ort_ratios}
    backend_rank, mode_rank = _order([r["backend"] for r in rows]), _order([r["mode"] for r in rows])
    columns = sorted({k[1:] for k in groups}, key=lambda c: (backend_rank[c[0]], mode_rank[c[1]]))
    lines = [
        f"Against ONNX Runtime ({ORT} running torch.nn's ONNX export, same threads, same rounds): geometric mean "
        f"(minimum) over the shapes it timed of {ORT} time / backend time (> 1: faster than ONNX Runtime):",
        "",
        "| cell | " + " | ".join(f"{b} {m}" for b, m in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for lab in _order([k[0] for k in groups]):
        entries = [_cell(groups[(lab, *c)], True) if (lab, *c) in groups else "" for c in columns]
        lines.append(f"| {lab} | " + " | ".join(entries) + " |")
    return lines


def shapes_table(data: dict) -> str:
    """One line per cell x mode x shape x backend; where the onnxruntime peer was timed, a column "vs ORT"
    (onnxruntime time / backend time, same rounds)."""
    vs_ort = has_vs_ort(data["rows"])
    eff = any(r.get("gemm_eff") is not None for r in data["rows"])  # run --efficiency
    lines = [
        "| cell | mode | T | B | H | threads | backend | torch.nn ms | backend ms | ratio | "
        + ("vs ORT | " if vs_ort else "")
        + "GFLOP/s |"
        + (" GEMM eff | torch.nn GEMM eff |" if eff else ""),
        "|---|---|--:|--:|--:|--:|---|--:|--:|--:|" + ("--:|" if vs_ort else "") + "--:|" + ("--:|--:|" if eff else ""),
    ]
    torch_rows = {case_key(r): r for r in data["rows"] if r["backend"] == YARDSTICK}
    for r in data["rows"]:
        if r["backend"] == YARDSTICK:
            continue
        t = torch_rows.get(case_key(r), {})
        if r["status"] == "ok":
            cells = [fmt(r["median_ms"], ".3f"), f"{fmt(r['ratio_vs_torch'], '.2f')}x", fmt(r.get("gflops"), ".2f")]
        else:
            cells = ["-", r["status"], "-"]
        if vs_ort:
            ort = r.get("ratio_vs_ort")
            cells.insert(2, "-" if r["status"] != "ok" or not ort else f"{ort:.2f}x")
        if eff:
            cells += [pct(r.get("gemm_eff") if r["status"] == "ok" else None), pct(t.get("gemm_eff"))]
        lines.append(
            f"| {r['cell']} | {r['mode']} | {r['T']} | {r['B']} | {r['H']} | {r['threads']} | {r['backend']} | "
            f"{fmt(t.get('median_ms'), '.3f')} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def readme_block(data: dict, table_command: str) -> str:
    """What the README holds between its markers: the commands, then the summary table."""
    return f"{commands_block(data, table_command)}\n\n{summary_table(data)}"


def tables_file(data: dict, table_command: str) -> str:
    """The whole markdown file readme-table writes: the summary, then every shape, each headed by its commands."""
    block = commands_block(data, table_command)
    return (
        f"# Speed-up over torch.nn\n\n{provenance(data)}\n\n"
        f"## Summary\n\nMade by\n\n{block}\n\n{summary_table(data)}\n\n"
        f"## Every shape\n\nMade by\n\n{block}\n\n{shapes_table(data)}\n"
    )


def replace_between_markers(path: str | Path, block: str) -> Path:
    """Put `block` between README_START and README_END in the file at `path` (each marker exactly once)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise BenchError(f"{p}: cannot read ({e.strerror})") from None
    for marker in (README_START, README_END):
        n = text.count(marker)
        if n != 1:
            raise BenchError(f"{p}: expected the marker {marker} once, found it {n} times")
    head, rest = text.split(README_START)
    if README_END not in rest:
        raise BenchError(f"{p}: {README_END} comes before {README_START}")
    _, tail = rest.split(README_END)
    new = f"{head}{README_START}\n{block}\n\n{README_END}{tail}"
    try:
        p.write_text(new)
    except OSError as e:
        raise BenchError(f"{p}: cannot write ({e.strerror})") from None
    return p
