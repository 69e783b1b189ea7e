"""benchmarks/gpu_check's own logic in its --cpu-smoke mode (Triton's interpreter, one tiny config): it passes the
triton backend as it is, and fails it, with a non-zero exit, when one of its results is deliberately wrong or it
raises. The script runs in a fresh interpreter; to break the backend, that interpreter first replaces the walk's
forward or backward with a wrapper that spoils one result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastrnn import backends

if torch.cuda.is_available():
    pytest.skip("on CUDA the script itself is the check", allow_module_level=True)
if not backends.is_available("triton")[0]:
    pytest.skip(f"triton backend unavailable: {backends.is_available('triton')[1]}", allow_module_level=True)

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check"
ARGS = ["--cpu-smoke", "--skip-tests", "--cells", "lstm", "--dtypes", "fp32", "--reps", "1", "--warmup", "0"]

# name: (the walk's function replaced, the body of its replacement, the result the gate must name).
# In the body, `orig` is the function replaced and `a` its arguments.
BREAKS = {
    # forward right but for c_n: the old gate, which compared only out, let this pass
    "c_n": ("forward", "out, st, sv = orig(*a)\nreturn out, st._replace(c=st.c * 1.01), sv", "c_n"),
    # forward right, one gradient wrong
    "d_w_hh": (
        "backward",
        "g = orig(*a)\nreturn g._replace(d_weights=g.d_weights._replace(w_hh=g.d_weights.w_hh * 1.01))",
        "d_weight_hh_l0",
    ),
    "raise": ("backward", "raise RuntimeError('deliberately broken')", None),
}


def run_script(tmp_path: Path, broken: str | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "check.json"
    prelude = ""
    if broken is not None:
        fn, body, _ = BREAKS[broken]
        prelude = (
            "from fastrnn.backends.triton import walk\n"
            f"orig = walk.{fn}\n"
            "def broken(*a):\n" + "".join(f"    {line}\n" for line in body.splitlines()) + f"walk.{fn} = broken\n"
        )
    code = prelude + f"import runpy, sys\nsys.argv = {[str(SCRIPT), *ARGS, '--out', str(out)]!r}\n"
    code += f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("OUT", None)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.exists(), p.stdout + p.stderr
    return p, json.loads(out.read_text(), parse_constant=_not_json)


def _not_json(name: str):
    raise AssertionError(f"the measurements file holds {name}, which strict JSON has not")


def test_passes_the_backend_as_it_is(tmp_path):
    p, doc = run_script(tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert doc["complete"] and doc["rows"] and all(r["status"] == "ok" and r["gate_ok"] for r in doc["rows"])
    assert {r["mode"] for r in doc["rows"]} == {"inference", "training"}
    assert all(r["speedup"] > 0 and r["commit"] is not None for r in doc["rows"])
    assert "geomean" in p.stdout and "gpu_check: PASSED" in p.stdout


@pytest.mark.parametrize("broken", list(BREAKS))
def test_fails_a_broken_backend(tmp_path, broken):
    p, doc = run_script(tmp_path, broken)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "gpu_check: FAILED" in p.stdout
    worst = BREAKS[broken][2]
    status = "FAILING" if worst else "ERROR"
    assert [r["status"] for r in doc["rows"]] == [status, status], p.stdout
    if worst:
        assert {r["gate_worst"] for r in doc["rows"]} == {worst}
        assert not any("speedup" in r for r in doc["rows"]), "a config that fails the gate is not timed"
    else:
        assert all("deliberately broken" in r["error"] for r in doc["rows"])
