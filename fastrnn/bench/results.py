"""Results files: one JSON object per run, a header and long-format rows; read (validated), written, keyed.

A results file holds: schema, created, command (the exact `fastrnn-bench ...` that wrote it), machine, versions,
git, preset, settings, gemm, definitions (machine.header), backends, runs, load_avg_1min, elapsed_s, and
`rows`: one row per cell x shape x mode x dtype x threads x implementation (fields: runner.py's docstring).
Rows of implementations in NOT_GATED are the yardstick or a peer's: compare and gate never judge them.

Plain Python only: comparing, tabulating and plotting results never imports torch or fastrnn's modules.
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA = "fastrnn-bench/2"
# Schema 1 named torch.nn's rows "torch", before fastrnn had a backend of that name; they are read as YARDSTICK.
_OLD_SCHEMAS = ("fastrnn-bench/1",)
YARDSTICK = "torch.nn"  # torch.nn itself: every ratio's denominator, timed in every case
ORT = "onnxruntime"  # the ONNX Runtime peer (peers.py): its rows and the vs-ORT ratios are reported, never gated
AUTO_CHOSE = "auto chose "  # how an auto row's note starts (workload.note), then the backend auto resolved to
NOT_GATED = (YARDSTICK, ORT)  # implementations whose rows compare/gate do not judge

KEY_FIELDS = ("cell", "backend", "mode", "T", "B", "H", "I", "dtype", "threads", "device")
CASE_FIELDS = tuple(f for f in KEY_FIELDS if f != "backend")
REQUIRED_ROW_FIELDS = (*KEY_FIELDS, "status", "median_ms", "ratio_vs_torch", "ratio_q25", "ratio_q75")
BAD_STATUSES = ("FAILING", "ERROR")  # a run or gate with such a row fails


class BenchError(Exception):
    """Bad input to the benchmark tool; the CLI prints the message as one line and exits non-zero."""


def row_key(row: dict) -> tuple:
    return tuple(row[f] for f in KEY_FIELDS)


def case_key(row: dict) -> tuple:
    """The configuration without the implementation (which torch.nn row a backend's row belongs to)."""
    return tuple(row[f] for f in CASE_FIELDS)


def load(path: str | Path) -> dict:
    """A results file, validated enough that every later step can trust its shape; BenchError otherwise.
    Files of an older schema are returned in the current one."""
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
    if data.get("schema") not in (SCHEMA, *_OLD_SCHEMAS):
        raise BenchError(f"{p}: schema {data.get('schema')!r} is not {SCHEMA!r}; regenerate it with fastrnn-bench run")
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, dict):
            raise BenchError(f"{p}: row {i} is not an object")
        missing = [f for f in REQUIRED_ROW_FIELDS if f not in row]
        if missing:
            raise BenchError(f"{p}: row {i} lacks field(s) {', '.join(missing)}")
    if data["schema"] in _OLD_SCHEMAS:
        for row in data["rows"]:
            if row["backend"] == "torch":
                row["backend"] = YARDSTICK
        data["backends"] = [YARDSTICK if b == "torch" else b for b in data.get("backends") or []]
        data["schema"] = SCHEMA
    return data


def check_writable(path: str | Path) -> Path:
    """Create `path`'s folder now, so a bad --out fails before a long run rather than after it."""
    p = Path(path)
    if p.is_dir():
        raise BenchError(f"{p}: is a directory, expected a file path")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"{p}: cannot create its folder ({e.strerror})") from None
    return p


def write_text(path: str | Path, text: str) -> Path:
    p = check_writable(path)
    try:
        p.write_text(text)
    except OSError as e:
        raise BenchError(f"{p}: cannot write ({e.strerror})") from None
    return p


def save(data: dict, path: str | Path) -> None:
    write_text(path, json.dumps(data, indent=1, sort_keys=False) + "\n")
