"""Results files (read, validate, write), the end-of-run table and summary, the regression comparison, and the
README markdown table.

A results file is one JSON object: a header (schema, created, machine, versions, git, preset, settings, gemm,
definitions; see measure.header) and `rows`, a list of long-format rows, one per cell x shape x mode x dtype x
threads x backend (fields: measure.py's module docstring).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastrnn.bench.measure import SCHEMA, BenchError

KEY_FIELDS = ("cell", "backend", "mode", "T", "B", "H", "I", "dtype", "threads", "device")
REQUIRED_ROW_FIELDS = (*KEY_FIELDS, "status", "median_ms", "ratio_vs_torch", "ratio_q25", "ratio_q75")

# compare's defaults (documented in `fastrnn-bench compare --help` and the README)
DEFAULT_THRESHOLD = 0.10
DEFAULT_NOISE_K = 1.0
DEFAULT_NOISE_CAP = 0.5


def row_key(row: dict) -> tuple:
    return tuple(row[f] for f in KEY_FIELDS)


def case_key(row: dict) -> tuple:
    """The configuration without the backend (which torch.nn row a backend's row belongs to)."""
    return tuple(row[f] for f in KEY_FIELDS if f != "backend")


def load(path: str | Path) -> dict:
    """A results file, validated enough that every later step can trust its shape; BenchError otherwise."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise BenchError(f"{p}: no such results file") from None
    except IsADirectoryError:
        raise BenchError(f"{p}: is a directory, expected a results JSON file") from None
    except OSError as e:
        raise BenchError(f"{p}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise BenchError(f"{p}: not a fastrnn-bench results file (expected an object with a 'rows' list)")
    if data.get("schema") != SCHEMA:
        raise BenchError(f"{p}: schema {data.get('schema')!r} is not {SCHEMA!r}; regenerate it with fastrnn-bench run")
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, dict):
            raise BenchError(f"{p}: row {i} is not an object")
        missing = [f for f in REQUIRED_ROW_FIELDS if f not in row]
        if missing:
            raise BenchError(f"{p}: row {i} lacks field(s) {', '.join(missing)}")
    return data


def check_writable(path: str | Path) -> Path:
    """Create `path`'s folder now, so a bad --out fails before a long run rather than after it."""
    p = Path(path)
    if p.is_dir():
        raise BenchError(f"{p}: is a directory, expected a file path for the results")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"{p}: cannot create its folder ({e.strerror})") from None
    return p


def save(data: dict, path: str | Path) -> None:
    p = check_writable(path)
    try:
        p.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    except OSError as e:
        raise BenchError(f"{p}: cannot write ({e.strerror})") from None


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def geomean(xs: Iterable[float]) -> float:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def _table(headers: Sequence[str], lines: list[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*headers), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in lines)])


def _shape(r: dict) -> str:
    return f"T={r['T']} B={r['B']} H={r['H']} I={r['I']} {r['dtype']} thr={r['threads']}"


def results_table(data: dict) -> str:
    """Per cell x shape x mode and backend: torch ms, backend ms, ratio (with its quartiles), GFLOP/s, and
    the sgemm rate; FAILING/SKIPPED/ERROR rows show their note instead of numbers."""
    rows = data["rows"]
    torch_rows = {case_key(r): r for r in rows if r["backend"] == "torch"}
    with_peer = {case_key(r) for r in rows if r["backend"] != "torch"}
    # a case no backend could time still shows torch.nn's own time
    shown = [r for r in rows if r["backend"] != "torch" or case_key(r) not in with_peer]
    lines = []
    for r in shown:
        t = torch_rows.get(case_key(r), {})
        if r["status"] != "ok":
            note = (r.get("note") or "")[:70]
            lines.append(
                [
                    f"{r['cell']} {r['mode']}",
                    _shape(r),
                    r["backend"],
                    _f(t.get("median_ms"), ".3f"),
                    r["status"],
                    note,
                    "",
                    "",
                    "",
                ]
            )
            continue
        ratio = r.get("ratio_vs_torch")
        spread = f"{_f(r.get('ratio_q25'), '.2f')}-{_f(r.get('ratio_q75'), '.2f')}"
        lines.append(
            [
                f"{r['cell']} {r['mode']}",
                _shape(r),
                r["backend"],
                _f(t.get("median_ms"), ".3f"),
                _f(r.get("median_ms"), ".3f"),
                _f(ratio, ".2f") + "x",
                spread,
                _f(r.get("gflops"), ".2f"),
                _f(r.get("gemm_gflops"), ".1f"),
            ]
        )
    return _table(
        ["case", "shape", "backend", "torch ms", "ms", "ratio", "ratio IQR", "GFLOP/s", "sgemm GFLOP/s"], lines
    )


def summary(data: dict) -> str:
    """One line per cell x mode x backend: geometric mean and minimum of the ratio over shapes."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in data["rows"]:
        if r["backend"] != "torch":
            groups[(r["cell"], r["mode"], r["backend"])].append(r)
    out = []
    for (cell, mode, backend), rs in sorted(groups.items()):
        ok = [r["ratio_vs_torch"] for r in rs if r["status"] == "ok" and r["ratio_vs_torch"]]
        bad = [r for r in rs if r["status"] in ("FAILING", "ERROR")]
        skipped = sum(r["status"] == "SKIPPED" for r in rs)
        tail = f"; {len(bad)} FAILING/ERROR" if bad else ""
        tail += f"; {skipped} skipped" if skipped else ""
        if ok:
            out.append(
                f"{cell:<14} {mode:<10} {backend:<10} geomean ratio {geomean(ok):6.2f}x   "
                f"min {min(ok):6.2f}x   over {len(ok)} shapes{tail}"
            )
        else:
            out.append(f"{cell:<14} {mode:<10} {backend:<10} no timed shapes{tail}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- compare


@dataclass
class Verdict:
    key: tuple
    verdict: str  # ok | REGRESSION | noisy | improved | FAILING | ERROR | new | missing | skipped
    base_ratio: float | None = None
    new_ratio: float | None = None
    change: float | None = None  # new/base - 1
    allowance: float | None = None  # the drop noise can explain (fraction)
    note: str = ""

    @property
    def fails(self) -> bool:
        return self.verdict in ("REGRESSION", "FAILING", "ERROR")


def relative_spread(row: dict) -> float:
    """The ratio's interquartile range over its median: how much one run's ratio moves by noise alone."""
    r, q25, q75 = row.get("ratio_vs_torch"), row.get("ratio_q25"), row.get("ratio_q75")
    if not r or q25 is None or q75 is None:
        return 0.0
    return max(0.0, (q75 - q25) / r)


def judge(
    base: dict | None,
    new: dict | None,
    threshold: float = DEFAULT_THRESHOLD,
    noise_k: float = DEFAULT_NOISE_K,
    noise_cap: float = DEFAULT_NOISE_CAP,
) -> Verdict:
    """The rule: a configuration regresses when its speed-up ratio drops by more than `threshold` AND by more
    than the noise allowance  min(noise_k * sqrt(s_base^2 + s_new^2), noise_cap)  where s is each file's
    relative ratio IQR. The cap (default 50%) means a slowdown past 2x always fails, however noisy the runs."""
    row = new or base
    assert row is not None
    key = row_key(row)
    if new is None:
        return Verdict(key, "missing", base_ratio=base and base.get("ratio_vs_torch"), note="not in the new run")
    if new["status"] in ("FAILING", "ERROR"):
        return Verdict(key, new["status"], note=new.get("note", ""))
    if new["status"] != "ok":
        return Verdict(key, "skipped", note=new.get("note", ""))
    if base is None or base["status"] != "ok" or not base.get("ratio_vs_torch"):
        return Verdict(key, "new", new_ratio=new["ratio_vs_torch"], note="no timed baseline")
    b, n = base["ratio_vs_torch"], new["ratio_vs_torch"]
    change = n / b - 1
    allowance = min(noise_k * math.hypot(relative_spread(base), relative_spread(new)), noise_cap)
    drop = -change
    if drop > threshold and drop > allowance:
        verdict = "REGRESSION"
    elif drop > threshold:
        verdict = "noisy"
    elif change > threshold:
        verdict = "improved"
    else:
        verdict = "ok"
    return Verdict(key, verdict, b, n, change, allowance)


def compare(
    base: dict,
    new: dict,
    threshold: float = DEFAULT_THRESHOLD,
    noise_k: float = DEFAULT_NOISE_K,
    noise_cap: float = DEFAULT_NOISE_CAP,
) -> list[Verdict]:
    """A verdict per backend configuration in either file (torch.nn's own rows are the yardstick, not judged)."""
    b_rows = {row_key(r): r for r in base["rows"] if r["backend"] != "torch"}
    n_rows = {row_key(r): r for r in new["rows"] if r["backend"] != "torch"}
    keys = list(b_rows) + [k for k in n_rows if k not in b_rows]
    return [judge(b_rows.get(k), n_rows.get(k), threshold, noise_k, noise_cap) for k in keys]


def compare_table(verdicts: list[Verdict], threshold: float) -> str:
    lines = []
    for v in verdicts:
        d = dict(zip(KEY_FIELDS, v.key, strict=True))
        lines.append(
            [
                f"{d['cell']} {d['mode']}",
                f"T={d['T']} B={d['B']} H={d['H']} {d['dtype']} thr={d['threads']}",
                d["backend"],
                _f(v.base_ratio, ".2f"),
                _f(v.new_ratio, ".2f"),
                "-" if v.change is None else f"{v.change * 100:+.1f}%",
                "-" if v.allowance is None else f"{max(v.allowance, threshold) * 100:.0f}%",
                v.verdict,
                v.note[:60],
            ]
        )
    counts = defaultdict(int)
    for v in verdicts:
        counts[v.verdict] += 1
    tail = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    return (
        _table(["case", "shape", "backend", "base ratio", "new ratio", "change", "tolerated", "verdict", "note"], lines)
        + f"\n{len(verdicts)} configurations: {tail}"
    )


def parse_threshold(text: str) -> float:
    """'10%' or '0.1' -> 0.1."""
    s = text.strip()
    try:
        v = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise BenchError(f"threshold {text!r} is not a number or percentage (e.g. 10% or 0.1)") from None
    if not 0 < v < 1:
        raise BenchError(f"threshold {text!r} must lie strictly between 0% and 100%")
    return v


# ------------------------------------------------------------------------------------------ README markdown


def markdown_table(data: dict) -> str:
    """The README's results table: one line per cell x mode x shape x backend, with the run's provenance."""
    m, v, g = data.get("machine", {}), data.get("versions", {}), data.get("git", {})
    commit = (g.get("commit") or "unknown")[:10] + (" + uncommitted changes" if g.get("dirty") else "")
    lines = [
        f"Measured on {m.get('cpu_model', '?')} ({m.get('cores', '?')} cores), torch {v.get('torch', '?')}, "
        f"fastrnn {v.get('fastrnn', '?')} at commit `{commit}`, {data.get('created', '?')}; "
        f"sgemm {_f(data.get('gemm', {}).get('gflops'), '.1f')} GFLOP/s. Ratio = torch.nn time / backend time "
        "(> 1 is faster; median over rounds that time both back to back in the same run).",
        "",
        "| cell | mode | T | B | H | threads | backend | torch.nn ms | backend ms | ratio | GFLOP/s |",
        "|---|---|--:|--:|--:|--:|---|--:|--:|--:|--:|",
    ]
    torch_rows = {case_key(r): r for r in data["rows"] if r["backend"] == "torch"}
    for r in data["rows"]:
        if r["backend"] == "torch":
            continue
        t = torch_rows.get(case_key(r), {})
        if r["status"] == "ok":
            cells = [_f(r["median_ms"], ".3f"), f"{_f(r['ratio_vs_torch'], '.2f')}x", _f(r.get("gflops"), ".2f")]
        else:
            cells = ["-", r["status"], "-"]
        lines.append(
            f"| {r['cell']} | {r['mode']} | {r['T']} | {r['B']} | {r['H']} | {r['threads']} | {r['backend']} | "
            f"{_f(t.get('median_ms'), '.3f')} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"
