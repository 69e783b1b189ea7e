"""`fastrnn-bench compare`, `plot` and `readme-table` read results files without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BASELINE = Path(__file__).resolve().parents[1] / "benchmarks" / "baselines" / "cpu-2core-x86_64-intel-xeon-amx.json"


@pytest.mark.parametrize(
    "verb",
    [
        ["compare", str(BASELINE), str(BASELINE)],
        ["readme-table", str(BASELINE), "--out", "{tmp}/table.md"],
    ],
    ids=["compare", "readme-table"],
)
def test_reading_verbs_do_not_import_torch(tmp_path, verb):
    argv = [a.format(tmp=tmp_path) for a in verb]
    code = (
        "import json, sys, fastrnn_bench\n"
        f"rc = fastrnn_bench.main({argv!r})\n"
        "print(json.dumps({'rc': rc, 'loaded': sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'numba', 'triton', 'fastrnn') and not m.startswith('fastrnn.bench') and m != 'fastrnn')}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=BASELINE.parents[2])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0
    assert result["loaded"] == [], f"reading a results file imported {result['loaded'][:5]}"


def test_plain_import_still_registers_everything():
    code = (
        "import fastrnn, sys, torch\n"
        "from torch.serialization import get_safe_globals\n"
        "assert fastrnn.LSTM in get_safe_globals() and 'fastrnn.modules' in sys.modules\n"
        "print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
