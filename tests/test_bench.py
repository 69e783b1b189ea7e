"""The benchmark tool itself: bad input gives one line and a non-zero exit, the compare rule, the results
schema of a tiny run, the correctness gate, the gate's re-measurement, and the table/plot outputs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastrnn import backends as fr_backends
from fastrnn.bench import cli, measure, report
from fastrnn.bench.configs import Case, Settings

TINY = [
    "--cells",
    "lstm",
    "--T",
    "2",
    "--B",
    "1",
    "--H",
    "8",
    "--repeats",
    "2",
    "--warmup",
    "1",
    "--threads",
    "1",
    "--min-sample-ms",
    "0.1",
    "--backends",
    "reference",
    "--no-progress",
    "--quiet",
]


def _errors_cleanly(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must exit non-zero with exactly one stderr line and no traceback."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's usage errors exit through SystemExit
        rc = e.code
    err = capsys.readouterr().err
    assert rc not in (0, None), err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("fastrnn-bench")
    return err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    assert cli.main(["run", *TINY, "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "argv, needle",
    [
        pytest.param(["run", "--cells", "lstmm"], "unknown cell 'lstmm'", id="unknown-cell"),
        pytest.param(["run", "--backends", "cuda_magic"], "unknown backend 'cuda_magic'", id="unknown-backend"),
        pytest.param(["run", "--modes", "train"], "unknown mode 'train'", id="unknown-mode"),
        pytest.param(["run", "--H", "64,x"], "--H must be", id="bad-int-list"),
        pytest.param(["run", "--T", "0"], "--T must be", id="zero-length"),
        pytest.param(["run", "--frobnicate"], "unrecognized arguments", id="unknown-flag"),
        pytest.param(["bogus"], "invalid choice", id="unknown-command"),
        pytest.param(
            ["compare", "/nonexistent/a.json", "/nonexistent/b.json"], "no such results file", id="missing-file"
        ),
        pytest.param(["plot", "/nonexistent/a.json"], "no such results file", id="plot-missing-file"),
        pytest.param(["gate", "--baseline", "/nonexistent/base.json"], "no such results file", id="gate-no-baseline"),
        pytest.param(["run", "--out", "/proc/nope/r.json"], "cannot create its folder", id="unwritable-out"),
        pytest.param(["run", "--runs", "0"], "--runs must be >= 1", id="zero-runs"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, needle):
    assert needle in _errors_cleanly(capsys, argv)


def test_malformed_json_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not valid JSON" in _errors_cleanly(capsys, ["compare", str(bad), str(bad)])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    assert "not a fastrnn-bench results file" in _errors_cleanly(capsys, ["readme-table", str(other)])


def test_bad_threshold_is_one_line(capsys, tiny_run):
    assert "threshold" in _errors_cleanly(capsys, ["compare", str(tiny_run), str(tiny_run), "--threshold", "ten"])


def test_unavailable_backend_is_one_line(capsys, monkeypatch):
    real = fr_backends.is_available
    monkeypatch.setattr(fr_backends, "is_available", lambda n: (False, "not built here") if n == "cpp" else real(n))
    assert "backend 'cpp' is not available here: not built here" in _errors_cleanly(
        capsys, ["run", "--backends", "cpp", "--cells", "lstm", "--T", "2", "--B", "1", "--H", "8"]
    )


def test_console_entry_point_prints_no_traceback():
    r = subprocess.run(
        [sys.executable, "-m", "fastrnn.bench", "run", "--cells", "nope"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "fastrnn-bench: error: unknown cell 'nope'; expected one of "
        "lstm, gru, rnn_tanh, rnn_relu, lstm_cell, gru_cell, rnn_tanh_cell, rnn_relu_cell"
    )


# -------------------------------------------------------------------------------------------- compare rule


def _row(ratio: float, spread: float, backend: str = "numba", status: str = "ok") -> dict:
    """A row whose ratio IQR is `spread` (relative) around `ratio`."""
    return {
        "cell": "lstm",
        "backend": backend,
        "mode": "training",
        "T": 32,
        "B": 16,
        "H": 256,
        "I": 256,
        "dtype": "float32",
        "threads": 1,
        "device": "cpu",
        "status": status,
        "median_ms": 1.0,
        "ratio_vs_torch": ratio,
        "ratio_q25": ratio * (1 - spread / 2),
        "ratio_q75": ratio * (1 + spread / 2),
    }


@pytest.mark.parametrize(
    "base, new, verdict",
    [
        pytest.param(_row(2.0, 0.02), _row(2.0 / 3, 0.02), "REGRESSION", id="3x-slowdown-quiet"),
        pytest.param(_row(2.0, 0.9), _row(2.0 / 3, 1.5), "REGRESSION", id="3x-slowdown-very-noisy"),
        pytest.param(_row(2.0, 0.02), _row(1.9, 0.02), "ok", id="5pct-wobble-quiet"),
        pytest.param(_row(2.0, 0.0), _row(1.9, 0.0), "ok", id="5pct-wobble-no-spread"),
        pytest.param(_row(2.0, 0.3), _row(1.6, 0.3), "noisy", id="20pct-drop-within-noise"),
        pytest.param(_row(2.0, 0.03), _row(1.6, 0.03), "REGRESSION", id="20pct-drop-beyond-noise"),
        pytest.param(_row(2.0, 0.03), _row(2.6, 0.03), "improved", id="faster"),
        pytest.param(_row(2.0, 0.03), _row(2.0, 0.03, status="FAILING"), "FAILING", id="now-failing"),
        pytest.param(_row(2.0, 0.03), _row(2.0, 0.03, status="SKIPPED"), "skipped", id="now-skipped"),
        pytest.param(None, _row(2.0, 0.03), "new", id="new-backend"),
        pytest.param(_row(2.0, 0.03), None, "missing", id="missing-backend"),
    ],
)
def test_compare_rule(base, new, verdict):
    v = report.judge(base, new, threshold=0.10)
    assert v.verdict == verdict
    assert v.fails == (verdict in ("REGRESSION", "FAILING", "ERROR"))


def _results(rows: list[dict]) -> dict:
    torch_rows = [dict(r, backend="torch", ratio_vs_torch=1.0, ratio_q25=1.0, ratio_q75=1.0) for r in rows]
    return {"schema": measure.SCHEMA, "rows": torch_rows + rows}


@pytest.mark.parametrize(
    "new_ratio, spread, rc",
    [
        pytest.param(2.0 / 3, 0.05, 1, id="3x-fails"),
        pytest.param(1.9, 0.05, 0, id="5pct-passes"),
        pytest.param(1.6, 0.4, 0, id="noisy-passes"),
    ],
)
def test_compare_cli_exit_status(tmp_path, capsys, new_ratio, spread, rc):
    base, new = tmp_path / "base.json", tmp_path / "new.json"
    report.save(_results([_row(2.0, spread)]), base)
    report.save(_results([_row(new_ratio, spread)]), new)
    assert cli.main(["compare", str(base), str(new), "--threshold", "10%"]) == rc
    assert ("FAIL" in capsys.readouterr().out) == bool(rc)


# ------------------------------------------------------------------------------------------ a tiny real run


def test_tiny_run_schema(tiny_run):
    data = report.load(tiny_run)
    for key in ("schema", "created", "machine", "versions", "git", "settings", "gemm", "rows"):
        assert key in data
    assert {"cpu_model", "cores", "threads", "name"} <= set(data["machine"])
    assert {"python", "torch", "numba", "triton", "fastrnn"} <= set(data["versions"])
    assert "commit" in data["git"]
    assert data["gemm"]["gflops"] > 0
    rows = data["rows"]
    assert {(r["backend"], r["mode"]) for r in rows} == {
        (b, m) for b in ("torch", "reference") for m in ("inference", "training")
    }
    for r in rows:
        assert r["status"] == "ok", r
        assert (r["cell"], r["T"], r["B"], r["H"], r["I"], r["dtype"], r["threads"]) == (
            "lstm",
            2,
            1,
            8,
            8,
            "float32",
            1,
        )
        assert 0 < r["q25_ms"] <= r["median_ms"] <= r["q75_ms"]
        assert r["repeats"] == 2 and r["number"] >= 1
        assert r["ratio_vs_torch"] > 0 and r["ratio_q25"] <= r["ratio_q75"]
        assert r["gflops"] > 0 and r["gemm_gflops"] > 0
        assert r["flops"] == 2 * 2 * 1 * 4 * 8 * 16 * (3 if r["mode"] == "training" else 1)
        assert r["peak_mem_kind"] == "saved_for_backward"
        assert (r["peak_mem_bytes"] > 0) == (r["mode"] == "training")
        assert r["max_err"] < 1e-4
    assert all(r["ratio_vs_torch"] == 1.0 for r in rows if r["backend"] == "torch")


def test_readme_table_and_plot(tiny_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["readme-table", str(tiny_run)]) == 0
    md = capsys.readouterr().out
    assert "| cell | mode |" in md and "| lstm | training | 2 | 1 | 8 | 1 | reference |" in md
    assert cli.main(["plot", str(tiny_run), "--out-dir", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["gflops_inference.png", "gflops_training.png", "speedup_inference.png", "speedup_training.png"]
    assert all((tmp_path / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


# --------------------------------------------------------------------------------------- correctness gate


def test_wrong_backend_is_failing_not_timed(monkeypatch):
    ref = fr_backends.get("reference")
    real_forward = ref.forward

    def wrong_forward(*args, **kwargs):
        out, h_n, c_n, gates, extra = real_forward(*args, **kwargs)
        return out + 1e-2, h_n, c_n, gates, extra

    monkeypatch.setattr(ref, "forward", wrong_forward)
    rows = measure.measure_case(
        Case("gru", "inference", 3, 2, 8, 8, threads=1),
        ["reference"],
        Settings(warmup=1, repeats=2, min_repeats=1, min_sample_ms=0.1),
        None,
    )
    by = {r["backend"]: r for r in rows}
    assert by["torch"]["status"] == "ok"
    assert by["reference"]["status"] == "FAILING"
    assert "differs from torch.nn" in by["reference"]["note"] and "out" in by["reference"]["note"]
    assert by["reference"]["median_ms"] is None and by["reference"]["ratio_vs_torch"] is None


def test_wrong_gradient_is_failing(monkeypatch):
    ref = fr_backends.get("reference")
    real_backward = ref.backward

    def wrong_backward(*args, **kwargs):
        grads = list(real_backward(*args, **kwargs))
        grads[3] = grads[3] * 1.1  # d_w_hh
        return tuple(grads)

    monkeypatch.setattr(ref, "backward", wrong_backward)
    rows = measure.measure_case(
        Case("lstm", "training", 3, 2, 8, 8, threads=1),
        ["reference"],
        Settings(warmup=1, repeats=2, min_repeats=1, min_sample_ms=0.1),
        None,
    )
    bad = rows[-1]
    assert bad["status"] == "FAILING" and "grad_weight_hh" in bad["note"]


# --------------------------------------------------------------------------------------------------- gate


def test_gate_passes_on_itself_and_confirms_a_regression(tiny_run, tmp_path, capsys):
    args = ["--backends", "reference", "--no-progress", "--out", str(tmp_path / "gate.json")]
    # Against a baseline whose ratios are 4x better than anything this run can reach: flagged, re-measured,
    # still regressed -> exit 1.
    data = report.load(tiny_run)
    fast = copy.deepcopy(data)
    for r in fast["rows"]:
        if r["backend"] != "torch":
            r.update(
                ratio_vs_torch=r["ratio_vs_torch"] * 4,
                ratio_q25=r["ratio_vs_torch"] * 4,
                ratio_q75=r["ratio_vs_torch"] * 4,
            )
    base = tmp_path / "fast.json"
    report.save(fast, base)
    assert cli.main(["gate", "--baseline", str(base), *args]) == 1
    out = capsys.readouterr()
    assert "re-measuring" in out.err and "GATE FAIL" in out.out
    assert json.loads((tmp_path / "gate.json").read_text())["rechecked"]
    # Against a baseline 4x worse: only improvements, exit 0.
    slow = copy.deepcopy(data)
    for r in slow["rows"]:
        if r["backend"] != "torch":
            r.update(ratio_vs_torch=r["ratio_vs_torch"] / 4, ratio_q25=r["ratio_q25"] / 4, ratio_q75=r["ratio_q75"] / 4)
    report.save(slow, base)
    assert cli.main(["gate", "--baseline", str(base), *args]) == 0
    assert "GATE OK" in capsys.readouterr().out


def test_merged_runs_pool_samples_and_widen_the_spread():
    def run(torch_ms: list[float], numba_ms: list[float]) -> list[dict]:
        t = dict(_row(1.0, 0.0, backend="torch"), samples_ms=torch_ms, flops=10**6, max_err=0.0)
        n = dict(_row(1.0, 0.0), samples_ms=numba_ms, flops=10**6, max_err=1e-7)
        return [t, n]

    merged = measure.merge_runs([run([2.0] * 4, [1.0] * 4), run([2.0] * 4, [0.5] * 4)])
    numba = merged[1]
    assert numba["runs"] == 2 and numba["repeats"] == 8
    assert numba["ratio_q25"] == pytest.approx(2.0) and numba["ratio_q75"] == pytest.approx(4.0)
    assert report.relative_spread(numba) > 0.5  # run-to-run drift shows up as spread
    failing = dict(_row(1.0, 0.0, status="FAILING"), samples_ms=[], flops=1)
    assert measure.merge_runs([run([2.0], [1.0]), [run([2.0], [1.0])[0], failing]])[1]["status"] == "FAILING"
