"""The end-of-run table and summary, and the regression comparison of two results files (compare, gate).

Plain Python on results files (results.py): nothing here imports torch or fastrnn's modules.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from fastrnn.bench.results import (
    AUTO_CHOSE,
    BAD_STATUSES,
    KEY_FIELDS,
    NOT_GATED,
    ORT,
    YARDSTICK,
    BenchError,
    case_key,
    row_key,
)

# compare's defaults (documented in `fastrnn-bench compare --help` and the README)
DEFAULT_THRESHOLD = 0.10
DEFAULT_NOISE_K = 1.0
DEFAULT_NOISE_CAP = 0.5


def fmt(x: float | None, spec: str) -> str:
    """x formatted, or "-" when there is no number."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def geomean(xs: Iterable[float]) -> float:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def _table(headers: Sequence[str], lines: list[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(headers)]
    line = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    rule = line.format(*("-" * w for w in widths))
    return "\n".join([line.format(*headers), rule, *(line.format(*r) for r in lines)])


def _shape(r: dict) -> str:
    return f"T={r['T']} B={r['B']} H={r['H']} I={r['I']} {r['dtype']} thr={r['threads']}"


def _backend(r: dict) -> str:
    """The row's backend; for auto, with what it chose at that shape ("auto (torch)"), from the row's note."""
    note = r.get("note") or ""
    if note.startswith(AUTO_CHOSE):
        return f"{r['backend']} ({note[len(AUTO_CHOSE) :]})"
    return r["backend"]


def _times(x: float | None) -> str:
    """1.23 -> "1.23x"; None -> "-"."""
    return "-" if x is None else f"{x:.2f}x"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.0f}%"


def has_vs_ort(rows: Iterable[dict]) -> bool:
    """Does any row carry a ratio against the onnxruntime peer?"""
    return any(r.get("ratio_vs_ort") for r in rows)


def results_table(data: dict) -> str:
    """Per cell x shape x mode and backend: torch ms, backend ms, ratio (with its quartiles), GFLOP/s, and
    the sgemm rate; FAILING/SKIPPED/ERROR rows show their note instead of numbers. Where the onnxruntime peer was
    timed, its own row (ratio = torch.nn time / ORT time) and a column "vs ORT" = ORT time / backend time."""
    rows = data["rows"]
    vs_ort = has_vs_ort(rows)
    eff = any(r.get("gemm_eff") is not None for r in rows)
    torch_rows = {case_key(r): r for r in rows if r["backend"] == YARDSTICK}
    with_peer = {case_key(r) for r in rows if r["backend"] != YARDSTICK}
    # a case no backend could time still shows torch.nn's own time
    shown = [r for r in rows if r["backend"] != YARDSTICK or case_key(r) not in with_peer]
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
                    fmt(t.get("median_ms"), ".3f"),
                    r["status"],
                    note,
                    "",
                    *([""] if vs_ort else []),
                    "",
                    "",
                    *(["", ""] if eff else []),
                ]
            )
            continue
        ratio = r.get("ratio_vs_torch")
        spread = f"{fmt(r.get('ratio_q25'), '.2f')}-{fmt(r.get('ratio_q75'), '.2f')}"
        lines.append(
            [
                f"{r['cell']} {r['mode']}",
                _shape(r),
                _backend(r),
                fmt(t.get("median_ms"), ".3f"),
                fmt(r.get("median_ms"), ".3f"),
                fmt(ratio, ".2f") + "x",
                spread,
                *([_times(r.get("ratio_vs_ort"))] if vs_ort else []),
                fmt(r.get("gflops"), ".2f"),
                fmt(r.get("gemm_gflops"), ".1f"),
                *([pct(r.get("gemm_eff")), pct(t.get("gemm_eff"))] if eff else []),
            ]
        )
    headers = ["case", "shape", "backend", "torch ms", "ms", "ratio", "ratio IQR", "GFLOP/s", "sgemm GFLOP/s"]
    if vs_ort:
        headers.insert(7, "vs ORT")
    if eff:  # run --efficiency: the call's GEMMs alone (torch.mm, same shapes) / the call, this row's and torch.nn's
        headers += ["GEMM eff", "torch.nn GEMM eff"]
    return _table(headers, lines)


@dataclass
class Group:
    """The rows of one backend x mode x (cell ...) over the shapes of a run."""

    ratios: list[float] = field(default_factory=list)  # ratio_vs_torch of the timed shapes
    ort_ratios: list[float] = field(default_factory=list)  # ratio_vs_ort of the shapes the peer timed too
    bad: int = 0  # FAILING or ERROR
    skipped: int = 0

    @property
    def geomean(self) -> float:
        return geomean(self.ratios)

    def vs_ort(self) -> str:
        """What the summary line adds where the peer was timed: '; vs onnxruntime geomean 1.31x min 1.02x over 4
        shapes' (onnxruntime time / this backend's time); '' elsewhere."""
        if not self.ort_ratios:
            return ""
        return (
            f"; vs {ORT} geomean {geomean(self.ort_ratios):.2f}x min {min(self.ort_ratios):.2f}x "
            f"over {len(self.ort_ratios)} shapes"
        )

    def tail(self) -> str:
        """What kept shapes out of the ratios, e.g. "; 1 FAILING/ERROR; 2 skipped"."""
        bad = f"; {self.bad} FAILING/ERROR" if self.bad else ""
        return bad + (f"; {self.skipped} skipped" if self.skipped else "")


def ratio_groups(rows: Iterable[dict], key: Callable[[dict], tuple]) -> dict[tuple, Group]:
    """The backends' rows (not torch.nn's) grouped by `key`, in order of first appearance."""
    groups: dict[tuple, Group] = {}
    for r in rows:
        if r["backend"] == YARDSTICK:
            continue
        g = groups.setdefault(key(r), Group())
        if r["status"] == "ok" and r["ratio_vs_torch"]:
            g.ratios.append(r["ratio_vs_torch"])
            if r.get("ratio_vs_ort"):
                g.ort_ratios.append(r["ratio_vs_ort"])
        elif r["status"] in BAD_STATUSES:
            g.bad += 1
        elif r["status"] == "SKIPPED":
            g.skipped += 1
    return groups


def summary(data: dict) -> str:
    """One line per cell x mode x backend: geometric mean and minimum of the ratio over shapes (and of the
    ratio against the onnxruntime peer, where it was timed)."""
    out = []
    groups = ratio_groups(data["rows"], lambda r: (r["cell"], r["mode"], r["backend"]))
    for (cell, mode, backend), g in sorted(groups.items()):
        if g.ratios:
            out.append(
                f"{cell:<14} {mode:<10} {backend:<11} geomean ratio {g.geomean:6.2f}x   "
                f"min {min(g.ratios):6.2f}x   over {len(g.ratios)} shapes{g.vs_ort()}{g.tail()}"
            )
        else:
            out.append(f"{cell:<14} {mode:<10} {backend:<11} no timed shapes{g.tail()}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- compare


@dataclass
class Verdict:
    key: tuple
    verdict: str  # ok | REGRESSION | drift | noisy | improved | FAILING | ERROR | new | missing | skipped
    base_ratio: float | None = None
    new_ratio: float | None = None
    change: float | None = None  # new/base - 1
    allowance: float | None = None  # the drop noise can explain (fraction)
    note: str = ""

    @property
    def fails(self) -> bool:
        return self.verdict in ("REGRESSION", *BAD_STATUSES)


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
    peer_drift: float | None = None,
) -> Verdict:
    """The rule: a configuration regresses when its speed-up ratio drops by more than `threshold` AND by more
    than the noise allowance  min(noise_k * sqrt(s_base^2 + s_new^2), noise_cap)  where s is each file's
    relative ratio IQR. The cap (default 50%) means a slowdown past 2x always fails, however noisy the runs.

    `peer_drift` is the drift control: the median new/base ratio of the other fastrnn backends on the same shape
    in the same two files. torch.nn is every ratio's denominator, and on another machine instance (or another
    hour) its time moves by 20-40% against all of them at once. A drop that the shape's other backends share
    is that drift, not this backend's: such a row is a regression only if it also drops past the threshold and
    the allowance relative to its peers (verdict "drift" otherwise, reported, not failing)."""
    row = new or base
    assert row is not None
    key = row_key(row)
    if new is None:
        return Verdict(key, "missing", base_ratio=base and base.get("ratio_vs_torch"), note="not in the new run")
    if new["status"] in BAD_STATUSES:
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
        if peer_drift is not None:
            rel_drop = 1 - (n / b) / peer_drift
            if not (rel_drop > threshold and rel_drop > allowance):
                verdict = "drift"
                return Verdict(
                    key, verdict, b, n, change, allowance, f"the shape's other backends moved {peer_drift - 1:+.0%}"
                )
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
    """A verdict per backend configuration in either file. torch.nn's own rows are the yardstick and the
    onnxruntime peer's are another runtime's speed, not fastrnn's: neither is judged (results.NOT_GATED)."""
    b_rows = {row_key(r): r for r in base["rows"] if r["backend"] not in NOT_GATED}
    n_rows = {row_key(r): r for r in new["rows"] if r["backend"] not in NOT_GATED}
    keys = list(b_rows) + [k for k in n_rows if k not in b_rows]
    moves = defaultdict(dict)  # shape -> backend -> new ratio / base ratio, for the drift control
    for k in keys:
        b, n = b_rows.get(k), n_rows.get(k)
        if b and n and b["status"] == n["status"] == "ok" and b.get("ratio_vs_torch") and n.get("ratio_vs_torch"):
            moves[_shape_key(k)][k[1]] = n["ratio_vs_torch"] / b["ratio_vs_torch"]

    def peer_drift(k: tuple) -> float | None:
        others = [m for name, m in moves[_shape_key(k)].items() if name != k[1]]
        return statistics.median(others) if others else None

    return [judge(b_rows.get(k), n_rows.get(k), threshold, noise_k, noise_cap, peer_drift(k)) for k in keys]


def _shape_key(key: tuple) -> tuple:
    """A row key without its backend: the case every backend of a run times against the same torch.nn row."""
    return key[:1] + key[2:]


def compare_table(verdicts: list[Verdict], threshold: float) -> str:
    lines = []
    for v in verdicts:
        d = dict(zip(KEY_FIELDS, v.key, strict=True))
        lines.append(
            [
                f"{d['cell']} {d['mode']}",
                f"T={d['T']} B={d['B']} H={d['H']} {d['dtype']} thr={d['threads']}",
                d["backend"],
                fmt(v.base_ratio, ".2f"),
                fmt(v.new_ratio, ".2f"),
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
