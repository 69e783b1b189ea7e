"""The benchmark tool itself: bad input gives one line and a non-zero exit, the compare rule, the results
schema of a tiny run, the correctness gate, the gate's re-measurement, the table/plot outputs, and that the
verbs reading results files import neither torch nor fastrnn's modules."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastrnn
from fastrnn import backends as fr_backends
from fastrnn.bench import cli, configs, correctness, peers, report, results, runner, tables, timing, workload
from fastrnn.bench.configs import Case
from fastrnn.bench.results import ORT, YARDSTICK
from fastrnn.bench.timing import Settings

BASELINE = Path(__file__).resolve().parent.parent / "benchmarks" / "baselines" / "cpu-2core-x86_64-intel-xeon-amx.json"

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
    "--peers",
    "none",
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
        "lstm, gru, rnn_tanh, rnn_relu, lstm_cell, gru_cell, rnn_tanh_cell, rnn_relu_cell, ln_lstm, ln_gru"
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


def _shape_rows(ratios: dict[str, float], spread: float = 0.02) -> dict:
    return _results([_row(r, spread, backend=b) for b, r in ratios.items()])


@pytest.mark.parametrize(
    "new, verdicts",
    [
        # torch.nn got faster on this machine: every backend's ratio fell by about as much: drift, not a regression
        pytest.param(
            {"reference": 0.8, "cpp": 1.6, "numba": 1.2}, ["drift", "drift", "drift"], id="shared-drop-is-drift"
        ),
        # one backend fell and its peers did not: a regression, with or without the control
        pytest.param({"reference": 1.0, "cpp": 1.4, "numba": 1.5}, ["ok", "REGRESSION", "ok"], id="one-backend"),
        # one backend fell twice as far as its peers: a regression relative to them too
        pytest.param(
            {"reference": 0.85, "cpp": 1.1, "numba": 1.275}, ["noisy", "REGRESSION", "noisy"], id="past-the-drift"
        ),
    ],
)
def test_compare_drift_control(new, verdicts):
    """The drift control: a drop the shape's other backends share (torch.nn's time moved against all of them) is
    reported as drift; a backend falling apart from its peers still fails."""
    base = _shape_rows({"reference": 1.0, "cpp": 2.0, "numba": 1.5})
    got = report.compare(base, _shape_rows(new, spread=0.3 if "noisy" in verdicts else 0.02))
    assert [v.verdict for v in got] == verdicts
    assert all(v.fails == (v.verdict == "REGRESSION") for v in got)
    # a lone backend on its shape has no peers: judged on its ratio alone
    alone = report.compare(_shape_rows({"cpp": 2.0}), _shape_rows({"cpp": 1.6}))
    assert [v.verdict for v in alone] == ["REGRESSION"]


def _results(rows: list[dict]) -> dict:
    torch_rows = [dict(r, backend=YARDSTICK, ratio_vs_torch=1.0, ratio_q25=1.0, ratio_q75=1.0) for r in rows]
    return {"schema": results.SCHEMA, "rows": torch_rows + rows}


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
    results.save(_results([_row(2.0, spread)]), base)
    results.save(_results([_row(new_ratio, spread)]), new)
    assert cli.main(["compare", str(base), str(new), "--threshold", "10%"]) == rc
    assert ("FAIL" in capsys.readouterr().out) == bool(rc)


# ------------------------------------------------------------------------------------------ a tiny real run


def test_tiny_run_schema(tiny_run):
    data = results.load(tiny_run)
    for key in ("schema", "created", "command", "machine", "versions", "git", "settings", "gemm", "rows"):
        assert key in data
    assert data["command"].startswith("fastrnn-bench run --cells lstm ") and str(tiny_run) in data["command"]
    assert {"cpu_model", "cores", "threads", "name"} <= set(data["machine"])
    assert {"python", "torch", "numba", "triton", "fastrnn"} <= set(data["versions"])
    assert "commit" in data["git"]
    assert data["gemm"]["gflops"] > 0
    rows = data["rows"]
    assert {(r["backend"], r["mode"]) for r in rows} == {
        (b, m) for b in (YARDSTICK, "reference") for m in ("inference", "training")
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
    assert all(r["ratio_vs_torch"] == 1.0 for r in rows if r["backend"] == YARDSTICK)


def test_readme_table_and_plot(tiny_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["readme-table", str(tiny_run)]) == 0
    md = capsys.readouterr().out
    assert "| cell | mode |" in md and "| lstm | training | 2 | 1 | 8 | 1 | reference |" in md
    assert cli.main(["plot", str(tiny_run), "--out-dir", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["gflops_inference.png", "gflops_training.png", "speedup_inference.png", "speedup_training.png"]
    assert all((tmp_path / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def _unwrapped(text: str) -> str:
    """Commands as one line each (tables wrap long ones with a trailing backslash)."""
    return text.replace(" \\\n  ", " ")


def test_readme_table_writes_both_tables_headed_by_their_commands(tiny_run, tmp_path):
    md, readme = tmp_path / "grid.md", tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n{tables.README_START}\nhand-made table\n{tables.README_END}\nafter\n")
    argv = ["readme-table", str(tiny_run), "--out", str(md), "--readme", str(readme)]
    assert cli.main(argv) == 0
    data = results.load(tiny_run)
    run_cmd, table_cmd = data["command"], tables.command_line(argv)
    ratio = {r["mode"]: r["ratio_vs_torch"] for r in data["rows"] if r["backend"] == "reference"}
    summary_line = f"| lstm | {ratio['inference']:.2f}x ({ratio['inference']:.2f}x) | " + (
        f"{ratio['training']:.2f}x ({ratio['training']:.2f}x) |"
    )
    text = _unwrapped(md.read_text())
    # the summary, then every shape; each under a block with the run's command and this one
    at_summary, at_shapes = text.index(summary_line), text.index("| lstm | training | 2 | 1 | 8 | 1 | reference |")
    runs = [i for i in range(len(text)) if text.startswith(f"```bash\n{run_cmd}\n{table_cmd}\n```", i)]
    assert len(runs) == 2 and runs[0] < at_summary < runs[1] < at_shapes, text
    assert "| cell | reference inference | reference training |" in text
    assert "Geometric mean (minimum) over the 1 shapes of torch.nn time / backend time" in text
    # the README: the same summary block between its markers, the rest untouched, and the same on a rerun
    got = _unwrapped(readme.read_text())
    head, rest = got.split(tables.README_START + "\n")
    block, tail = rest.split("\n" + tables.README_END)
    assert head == "# title\n\nintro\n" and tail == "\nafter\n" and "hand-made" not in block
    assert block.startswith(f"```bash\n{run_cmd}\n{table_cmd}\n```\n\nGeometric mean") and summary_line in block
    first = readme.read_text()
    assert cli.main(argv) == 0
    assert readme.read_text() == first


def test_readme_without_markers_is_one_line(tiny_run, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    err = _errors_cleanly(capsys, ["readme-table", str(tiny_run), "--readme", str(readme)])
    assert f"expected the marker {tables.README_START} once, found it 0 times" in err
    assert readme.read_text() == "no markers here\n"


def test_stored_baseline_is_read_by_compare_gate_and_tables():
    """The stored baseline (bash scripts/bench_baseline.sh --peers none) loads, torch.nn's rows as the
    yardstick, compares with itself as all ok, and tabulates under the command that made it."""
    base = results.load(BASELINE)
    assert base["schema"] == results.SCHEMA
    assert {r["backend"] for r in base["rows"]} == {YARDSTICK, "reference", "cpp", "numba"}
    verdicts = report.compare(base, base)
    assert len(verdicts) == sum(r["backend"] != YARDSTICK for r in base["rows"])
    assert all(v.verdict == "ok" for v in verdicts)
    assert len(configs.cases_of_rows(base["rows"])) == sum(r["backend"] == YARDSTICK for r in base["rows"])
    text = tables.tables_file(base, "fastrnn-bench readme-table base.json")
    assert "fastrnn-bench run --quick" in text and "| lstm | " in text


def test_reading_verbs_import_neither_torch_nor_fastrnn_modules(tiny_run, tmp_path):
    """compare, readme-table, plot and --help on results files, in a fresh interpreter. fastrnn/__init__.py
    itself imports torch (it registers fastrnn's classes with torch), so the interpreter loads `fastrnn` as a
    bare package: what is checked is that the bench's reading side imports nothing that needs torch."""
    readme = tmp_path / "README.md"
    readme.write_text(f"{tables.README_START}\n{tables.README_END}\n")
    r, md, plots = str(tiny_run), str(tmp_path / "t.md"), str(tmp_path / "plots")
    verbs = [["compare", r, r], ["readme-table", r, "--out", md, "--readme", str(readme)], ["--help"]]
    try:
        import matplotlib  # noqa: F401

        verbs.append(["plot", r, "--out-dir", plots])
    except ModuleNotFoundError:
        pass
    code = textwrap.dedent(f"""
        import json, sys, types
        pkg = types.ModuleType("fastrnn")
        pkg.__path__ = [{str(Path(fastrnn.__file__).parent)!r}]
        sys.modules["fastrnn"] = pkg
        from fastrnn.bench import cli
        rcs = []
        for argv in {verbs!r}:
            try:
                rcs.append(cli.main(argv))
            except SystemExit as e:
                rcs.append(e.code)
        heavy = ("torch", "numba", "triton", "fastrnn.modules", "fastrnn.backends", "fastrnn.cells")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy or m.startswith(heavy[3:]))
        print(json.dumps({{"rcs": rcs, "loaded": loaded}}))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["rcs"] == [0] * len(verbs), p.stdout + p.stderr
    assert got["loaded"] == []
    assert Path(md).exists() and "Geometric mean" in readme.read_text()


# --------------------------------------------------------------------------------------- correctness gate


QUICK = Settings(warmup=1, repeats=2, min_repeats=1, min_sample_ms=0.1)


def _plus_one_percent(out: torch.Tensor) -> torch.Tensor:
    return out + 1e-2


def _one_nan(out: torch.Tensor) -> torch.Tensor:
    out = out.clone()
    out[-1, 0, 0] = math.nan
    return out


@pytest.mark.parametrize(
    "spoil, needle",
    [
        pytest.param(_plus_one_percent, "out: normalised error", id="off-by-1e-2"),
        pytest.param(_one_nan, "out: NaN where torch.nn is finite", id="one-nan"),
    ],
)
def test_wrong_backend_is_failing_not_timed(monkeypatch, spoil, needle):
    ref = fr_backends.get("reference")
    real_forward = ref.forward

    def wrong_forward(*args, **kwargs):
        out, state_n, saved = real_forward(*args, **kwargs)
        return spoil(out), state_n, saved

    monkeypatch.setattr(ref, "forward", wrong_forward)
    rows = runner.measure_case(Case("gru", "inference", 3, 2, 8, 8, threads=1), ["reference"], QUICK, None)
    by = {r["backend"]: r for r in rows}
    assert by[YARDSTICK]["status"] == "ok"
    assert by["reference"]["status"] == "FAILING"
    assert "differs from torch.nn" in by["reference"]["note"] and needle in by["reference"]["note"]
    assert by["reference"]["median_ms"] is None and by["reference"]["ratio_vs_torch"] is None


def _spoil_reference_w_hh_grad(monkeypatch, factor: float) -> None:
    """The reference backend's d W_hh scaled by factor: a wrong gradient for the gate to catch."""
    ref = fr_backends.get("reference")
    real_backward = ref.backward

    def wrong_backward(*args, **kwargs):
        g = real_backward(*args, **kwargs)
        return g._replace(d_weights=g.d_weights._replace(w_hh=g.d_weights.w_hh * factor))

    monkeypatch.setattr(ref, "backward", wrong_backward)


def test_wrong_gradient_is_failing(monkeypatch):
    _spoil_reference_w_hh_grad(monkeypatch, 1.1)
    rows = runner.measure_case(Case("lstm", "training", 3, 2, 8, 8, threads=1), ["reference"], QUICK, None)
    bad = rows[-1]
    assert bad["status"] == "FAILING" and "grad_weight_hh" in bad["note"]


def _relu_case_with_a_tie(monkeypatch, row: int = 2) -> Case:
    """An rnn_relu training case whose row `row` has a pre-activation of exactly 0 at step 0, unit 0 (float64):
    the Workload's first input row is set so x_0 W_ih^T + b_ih + h0 W_hh^T + b_hh is 0 there."""
    case = Case("rnn_relu", "training", 3, 4, 5, 5, threads=1)
    real_init = workload.Workload.__init__

    def init(self, c, seed=0):
        real_init(self, c, seed)
        if c.cell != "rnn_relu":
            return
        m = self.module.double()
        with torch.no_grad():
            rest = (self.x[0, row].double() @ m.weight_ih_l0[0] + m.bias_ih_l0[0] + self.h0[row].double()
                    @ m.weight_hh_l0[0] + m.bias_hh_l0[0])  # fmt: skip
            m.bias_hh_l0[0] -= rest  # now exactly 0 for that row (float64); the others are moved by the same shift
        self.module = m.float()

    monkeypatch.setattr(workload.Workload, "__init__", init)
    return case


def test_relu_ties_leave_their_rows_out_of_the_judgement(monkeypatch):
    """A ReLU training case is judged on the rows whose pre-activations are all clear of 0 (correctness.py): a row
    with a tie is left out and said so; a wrong gradient still fails on the others."""
    case = _relu_case_with_a_tie(monkeypatch)
    wl = workload.Workload(case)
    yard = correctness.yardstick(wl, wl.module_for(YARDSTICK))
    assert yard.rows is not None and 2 not in yard.rows.tolist() and yard.rows.numel() < 4
    assert yard.ref["grad_x"].shape == (3, yard.rows.numel(), 5) and "judged on" in yard.note
    assert yard.whole_ref["out"].shape == (3, 4, 5) and "grad_x" not in yard.whole_ref  # forward: every row
    rows = runner.measure_case(case, ["reference"], QUICK, None)
    good = rows[-1]
    assert good["status"] == "ok" and "rows: " in good["note"] and good["max_err"] < 1e-5, good
    _spoil_reference_w_hh_grad(monkeypatch, 1.1)
    bad = runner.measure_case(case, ["reference"], QUICK, None)[-1]
    assert bad["status"] == "FAILING" and "grad_weight_hh" in bad["note"], bad
    # a wrong output in a row left out of the gradients' judgement fails too
    real_forward = fr_backends.get("reference").forward

    def wrong_row_two(*args, **kwargs):
        out, state, saved = real_forward(*args, **kwargs)
        if out.shape[1] == 4:
            out = out.clone()
            out[:, 2] += 1.0
        return out, state, saved

    monkeypatch.undo()
    case = _relu_case_with_a_tie(monkeypatch)
    monkeypatch.setattr(fr_backends.get("reference"), "forward", wrong_row_two)
    bad = runner.measure_case(case, ["reference"], QUICK, None)[-1]
    assert bad["status"] == "FAILING" and "differs from torch.nn: out:" in bad["note"], bad
    # a case without ties (or not a ReLU) is judged on every row
    plain = workload.Workload(Case("rnn_tanh", "training", 3, 4, 5, 5, threads=1))
    assert correctness.yardstick(plain, plain.module_for(YARDSTICK)).rows is None


def test_half_precision_cases_are_judged_against_float64(monkeypatch):
    """A bfloat16 case: each tensor may be off float64 by at most 2x torch.nn's own bfloat16 error (or the
    tolerance), so a kernel more exact than torch.nn passes where torch.nn itself is far off, and a wrong one
    still fails; the torch.nn row reports its own error against float64."""
    e = torch.linspace(-1, 1, 64, dtype=torch.float64)
    exact, tol = {"out": e}, 1e-3
    torch_off = {"out": e + 0.1}  # torch.nn's own half-precision result, far off
    assert correctness.compare_half(torch_off, {"out": e + 1e-4}, exact, tol)[0]  # more exact than torch.nn
    assert correctness.compare_half(torch_off, {"out": e + 0.15}, exact, tol)[0]  # within 2x of torch.nn's error
    ok, err, why = correctness.compare_half(torch_off, {"out": e + 0.3}, exact, tol)
    assert not ok and err == pytest.approx(0.3) and "above 2x torch.nn's own 1.00e-01" in why
    assert not correctness.compare_half({"out": e}, {"out": e + 2e-3}, exact, tol)[0]  # tol floors the bar
    case = Case("lstm", "training", 3, 2, 8, 8, dtype="bfloat16", threads=1)
    rows = runner.measure_case(case, ["reference"], QUICK, None)
    by = {r["backend"]: r for r in rows}
    assert by["reference"]["status"] == "ok" and 0 < by["reference"]["max_err"] < 0.05
    assert 0 < by[YARDSTICK]["max_err"] < 0.05  # torch.nn's bfloat16 error against float64
    wl = workload.Workload(case)
    got = correctness.exact_outputs(wl, wl.module_for(YARDSTICK))
    assert got["out"].dtype == torch.float64 and "grad_weight_hh_l0" in got
    assert correctness.exact_outputs(workload.Workload(dataclasses.replace(case, dtype="float32")), wl.module) is None
    # a wrong bfloat16 gradient still fails, named against float64
    _spoil_reference_w_hh_grad(monkeypatch, 1.5)
    bad = runner.measure_case(case, ["reference"], QUICK, None)[-1]
    assert bad["status"] == "FAILING" and "differs from float64 torch.nn: grad_weight_hh" in bad["note"], bad


@pytest.mark.parametrize(
    "cell, mode", [("lstm", "training"), ("gru", "inference"), ("rnn_tanh_cell", "training"), ("lstm", "streaming")]
)
def test_case_gemms_are_its_flops(cell, mode):
    """The products the efficiency column times are exactly the ones Case.flops() counts."""
    case = Case(cell, mode, 5, 3, 8, 6)
    assert sum(2 * M * K * N * n for M, K, N, n in case.gemms()) == case.flops()


def test_efficiency_column(tmp_path, capsys):
    """run --efficiency: every timed row carries gemm_ms (the same products alone, torch.mm) and gemm_eff =
    gemm_ms / its median time; the tables show both the row's and torch.nn's."""
    out = tmp_path / "e.json"
    argv = ["run", "--cells", "lstm", "--backends", "reference", "--modes", "inference", "--T", "2", "--B", "16",
            "--H", "8", "--threads", "1", "--repeats", "2", "--warmup", "0", "--max-seconds", "0.2",
            "--min-sample-ms", "0", "--no-progress", "--peers", "none", "--efficiency", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "GEMM eff" in printed and "torch.nn GEMM eff" in printed
    rows = results.load(out)["rows"]
    assert len(rows) == 2
    for r in rows:
        assert r["gemm_ms"] > 0 and r["gemm_eff"] == pytest.approx(r["gemm_ms"] / r["median_ms"])
    assert "| GEMM eff | torch.nn GEMM eff |" in tables.shapes_table(results.load(out))


def _with(t: torch.Tensor, **at: float) -> torch.Tensor:
    """A copy of t with the given flat positions (p0=..., p5=...) set."""
    t = t.clone()
    for k, v in at.items():
        t.view(-1)[int(k[1:])] = v
    return t


_X = torch.linspace(-1.0, 1.0, 12).reshape(3, 4)


@pytest.mark.parametrize(
    "ref, got, ok, needle",
    [
        pytest.param(_X, _X + 1e-9, True, "", id="equal"),
        pytest.param(_with(_X, p0=math.nan), _with(_X, p0=math.nan), True, "", id="nan-where-torch-has-nan"),
        pytest.param(_X, _with(_X, p5=math.nan), False, "NaN where torch.nn is finite", id="nan-where-finite"),
        # both sides have a NaN, at different places: the old rule (any NaN on both sides) let this pass
        pytest.param(_with(_X, p0=math.nan), _with(_X, p5=math.nan), False, "NaN where torch.nn is finite",
                     id="nans-elsewhere"),
        # NaNs agree, but the rest is wrong: the NaN must not hide the error
        pytest.param(_with(_X, p0=math.nan), _with(_X + 0.5, p0=math.nan), False, "normalised error",
                     id="nan-agrees-rest-wrong"),
        pytest.param(_with(_X, p0=math.nan), _X, False, "finite where torch.nn has NaN", id="finite-where-nan"),
        pytest.param(_X, torch.full_like(_X, math.nan), False, "NaN where torch.nn is finite", id="all-nan"),
        pytest.param(_X, _with(_X, p3=math.inf), False, "inf where torch.nn has", id="inf-where-finite"),
        pytest.param(_with(_X, p3=-math.inf), _with(_X, p3=-math.inf), True, "", id="inf-where-torch-has-inf"),
    ],
)  # fmt: skip
def test_correctness_rule_on_nan_and_inf(ref, got, ok, needle):
    good, err, why = correctness.compare_outputs({"out": ref}, {"out": got}, tol=1e-6)
    assert good == ok, why
    assert needle in why
    assert (err <= 1e-6) == ok or not math.isfinite(err)


def test_torch_and_auto_rows(monkeypatch, tmp_path):
    """`--backends torch,auto`: fastrnn's torch backend (torch.nn's kernels behind fastrnn's module: equal bit
    for bit) and fastrnn's automatic choice, each timed against torch.nn itself."""
    monkeypatch.setenv(fr_backends.ENV_VAR, "reference")  # what auto picks, whatever is built here
    out = tmp_path / "r.json"
    argv = [*TINY[: TINY.index("--backends")], "--backends", "torch,auto", "--no-progress", "--quiet"]
    assert cli.main(["run", *argv, "--out", str(out)]) == 0
    rows = results.load(out)["rows"]
    assert {(r["backend"], r["mode"]) for r in rows} == {
        (b, m) for b in (YARDSTICK, "torch", "auto") for m in ("inference", "training")
    }
    assert all(r["status"] == "ok" and r["ratio_vs_torch"] > 0 for r in rows), rows
    assert all(r["max_err"] == 0.0 for r in rows if r["backend"] == "torch")
    assert all(r["note"] == "auto chose reference" for r in rows if r["backend"] == "auto")


def test_auto_row_names_what_auto_picked_at_its_shape(monkeypatch):
    """The auto row's note is select() at the case's own batch, hidden size and mode (auto's shape rules), and the
    end-of-run table shows it beside the backend's name."""
    monkeypatch.delenv(fr_backends.ENV_VAR, raising=False)
    # the rules of the Xeon the cited grid ran on, whatever CPU this is (tests/test_backends.py tests each class's)
    monkeypatch.setattr(fr_backends, "_RULE_INDEX", fr_backends._rule_index(fr_backends._AUTO_RULES, "intel-amx"))
    order = fr_backends.select("lstm", torch.float32, torch.device("cpu"))  # what auto's order gives here
    assert workload.note("auto", Case("lstm", "inference", 4, 64, 64, 64)) == "auto chose torch"
    assert workload.note("auto", Case("lstm", "training", 4, 64, 64, 64)) == "auto chose torch"
    assert workload.note("auto", Case("lstm", "training", 4, 64, 256, 256)) == f"auto chose {order}"
    assert workload.note("auto", Case("lstm", "inference", 4, 1, 64, 64)) == f"auto chose {order}"
    assert workload.note("auto", Case("lstm_cell", "inference", 4, 64, 64, 64)) == f"auto chose {order}"
    assert workload.note("cpp", Case("lstm", "inference", 4, 64, 64, 64)) == ""
    row = {"backend": "auto", "note": "auto chose torch"}
    assert report._backend(row) == "auto (torch)" and report._backend({"backend": "cpp", "note": ""}) == "cpp"


# --------------------------------------------------------------------------------------------------- gate


def test_gate_passes_on_itself_and_confirms_a_regression(tiny_run, tmp_path, capsys):
    args = ["--backends", "reference", "--no-progress", "--out", str(tmp_path / "gate.json")]
    # Against a baseline whose ratios are 4x better than anything this run can reach: flagged, re-measured,
    # still regressed -> exit 1.
    data = results.load(tiny_run)
    fast = copy.deepcopy(data)
    for r in fast["rows"]:
        if r["backend"] != YARDSTICK:
            r.update(
                ratio_vs_torch=r["ratio_vs_torch"] * 4,
                ratio_q25=r["ratio_vs_torch"] * 4,
                ratio_q75=r["ratio_vs_torch"] * 4,
            )
    base = tmp_path / "fast.json"
    results.save(fast, base)
    assert cli.main(["gate", "--baseline", str(base), *args]) == 1
    out = capsys.readouterr()
    assert "re-measuring" in out.err and "GATE FAIL" in out.out
    assert json.loads((tmp_path / "gate.json").read_text())["rechecked"]
    # Against a baseline 4x worse: only improvements, exit 0.
    slow = copy.deepcopy(data)
    for r in slow["rows"]:
        if r["backend"] != YARDSTICK:
            r.update(ratio_vs_torch=r["ratio_vs_torch"] / 4, ratio_q25=r["ratio_q25"] / 4, ratio_q75=r["ratio_q75"] / 4)
    results.save(slow, base)
    assert cli.main(["gate", "--baseline", str(base), *args]) == 0
    assert "GATE OK" in capsys.readouterr().out


def test_gate_without_a_baseline_for_this_machine_type_passes_and_says_so(monkeypatch, capsys):
    """Ratios against torch.nn belong to a machine type (MKL runs AVX2 kernels on AMD, oneDNN AVX-512): a type
    with no stored baseline is not gated against another type's numbers; the gate says so and times nothing."""
    from fastrnn.bench import machine

    monkeypatch.setattr(machine, "machine_name", lambda device="cpu": "cpu-1core-nowhere-imaginary")
    monkeypatch.setattr(runner, "execute", lambda *a, **k: pytest.fail("the gate timed something"))
    assert cli.main(["gate", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "no baseline for this machine type" in err and "cpu-1core-nowhere-imaginary.json" in err
    assert "bash scripts/bench_baseline.sh" in err


@pytest.mark.parametrize(
    "model, flags, uarch, slug",
    [
        ("Intel(R) Xeon(R) Processor", "fpu avx512f amx_bf16 amx_tile", None, "intel-xeon-amx"),
        ("Intel(R) Xeon(R) Processor", "fpu avx512f", None, "intel-xeon"),
        ("AMD EPYC 9B45 96-Core Processor", "fpu avx512_bf16", "zen5", "amd-epyc-9b45-zen5"),
        ("AMD EPYC", "fpu avx512_bf16", "zen4", "amd-epyc-zen4"),  # a virtual machine's model name
        ("Intel(R) Core(TM) i7-9700K CPU @ 3.60GHz", "fpu", None, "intel-core-i7-9700k"),
        ("", "", None, "unknown"),
    ],
)
def test_machine_type_names_the_cpu(model, flags, uarch, slug):
    from fastrnn.bench import machine

    assert machine.cpu_slug(model, flags, uarch) == slug
    assert machine.machine_name().startswith("cpu-")


@pytest.mark.parametrize(
    "vendor, family, model, uarch",
    [
        ("AuthenticAMD", 25, 17, "zen4"),  # EPYC 9004 (Genoa)
        ("AuthenticAMD", 25, 1, "zen3"),  # EPYC 7003 (Milan)
        ("AuthenticAMD", 26, 2, "zen5"),  # EPYC 9005 (Turin)
        ("AuthenticAMD", 23, 49, "zen2"),
        ("AuthenticAMD", 27, 0, "f27m0"),  # a generation the table does not know yet
        ("GenuineIntel", 6, 143, None),
        ("AuthenticAMD", None, None, None),  # no family in /proc/cpuinfo
    ],
)
def test_amd_core_generation_from_family_and_model(vendor, family, model, uarch):
    """Zen 4 and Zen 5 guests both read "AMD EPYC"; their ratios against torch.nn differ, so the machine type
    (and auto's CPU class) tells them apart by cpu family and model."""
    from fastrnn import cpuinfo

    assert cpuinfo.microarch(vendor, family, model) == uarch


def test_merged_runs_pool_samples_and_widen_the_spread():
    def run(torch_ms: list[float], numba_ms: list[float]) -> list[dict]:
        t = dict(_row(1.0, 0.0, backend=YARDSTICK), samples_ms=torch_ms, flops=10**6, max_err=0.0)
        n = dict(_row(1.0, 0.0), samples_ms=numba_ms, flops=10**6, max_err=1e-7)
        return [t, n]

    merged = timing.merge_runs([run([2.0] * 4, [1.0] * 4), run([2.0] * 4, [0.5] * 4)])
    numba = merged[1]
    assert numba["runs"] == 2 and numba["repeats"] == 8
    assert numba["ratio_q25"] == pytest.approx(2.0) and numba["ratio_q75"] == pytest.approx(4.0)
    assert report.relative_spread(numba) > 0.5  # run-to-run drift shows up as spread
    failing = dict(_row(1.0, 0.0, status="FAILING"), samples_ms=[], flops=1)
    assert timing.merge_runs([run([2.0], [1.0]), [run([2.0], [1.0])[0], failing]])[1]["status"] == "FAILING"


def test_pool_with_an_earlier_run_of_the_same_grid():
    """run --pool-with: the earlier file's samples join this run's (its runs counted), and a file of another grid
    is refused rather than spliced."""

    def run(torch_ms: list[float], numba_ms: list[float], runs: int = 1) -> dict:
        t = dict(_row(1.0, 0.0, backend=YARDSTICK), samples_ms=torch_ms, flops=10**6, max_err=0.0, runs=runs)
        n = dict(_row(1.0, 0.0), samples_ms=numba_ms, flops=10**6, max_err=1e-7, runs=runs)
        return {"rows": [t, n], "runs": runs, "created": "then", "git": {"commit": "abc"}}

    data, earlier = run([2.0] * 4, [1.0] * 4), run([2.0] * 4, [0.5] * 4, runs=3)
    runner.pool_with(data, earlier, "old.json")
    numba = data["rows"][1]
    assert data["runs"] == 4 and numba["runs"] == 4 and numba["repeats"] == 8
    assert numba["ratio_q25"] == pytest.approx(2.0) and numba["ratio_q75"] == pytest.approx(4.0)
    assert data["pooled_with"] == {"path": "old.json", "created": "then", "commit": "abc", "runs": 3}
    other = run([2.0], [1.0])
    other["rows"][1]["H"] = 512
    with pytest.raises(results.BenchError, match="--pool-with old.json: it holds 1 configuration"):
        runner.pool_with(run([2.0], [1.0]), other, "old.json")


# ------------------------------------------------------------------------------- the ONNX Runtime peer

needs_ort = pytest.mark.skipif(not peers.available()[0], reason="onnx / onnxruntime not installed")


def _by_backend(rows: list[dict]) -> dict[str, dict]:
    return {r["backend"]: r for r in rows}


@needs_ort
@pytest.mark.parametrize(
    "cells, mode",
    [
        pytest.param(configs.layer_cells("LSTM"), "inference", id="lstm-inference"),
        pytest.param(configs.layer_cells("GRU"), "streaming", id="gru-streaming"),
        # a tanh and a relu RNN from one seed have equal weights: each must still run its own export
        pytest.param(configs.layer_cells("RNN"), "inference", id="rnn-tanh-then-relu"),
    ],
)
def test_ort_peer_agrees_and_is_paired_with_each_round(cells, mode):
    for cell in cells:
        rows = _by_backend(
            runner.measure_case(Case(cell, mode, 5, 2, 8, 8, threads=1), ["reference", ORT], QUICK, None)
        )
        o, ref = rows[ORT], rows["reference"]
        assert o["status"] == "ok", o
        assert o["max_err"] < correctness.tolerance("float32", 5) and o["ratio_vs_torch"] > 0
        # fastrnn's row against the peer: per-round onnxruntime ms / backend ms, as against torch.nn
        assert ref["ort_median_ms"] == pytest.approx(o["median_ms"])
        per_round = [a / b for a, b in zip(o["samples_ms"], ref["samples_ms"], strict=False)]
        assert ref["ratio_vs_ort"] == pytest.approx(statistics.median(per_round), rel=1e-3)
        assert ref["ratio_vs_ort_q25"] <= ref["ratio_vs_ort"] <= ref["ratio_vs_ort_q75"]
        assert o["ratio_vs_ort"] is None  # the peer is not compared with itself


def _off_by_1e_2(outs: list) -> list:
    return [outs[0] + 1e-2, *outs[1:]]


def _h_n_nan(outs: list) -> list:
    h_n = outs[1].copy()
    h_n[0, 0, 0] = math.nan
    return [outs[0], h_n, *outs[2:]]


@needs_ort
@pytest.mark.parametrize(
    "cell, mode, spoil, needle",
    [
        pytest.param("lstm", "inference", _off_by_1e_2, "out: normalised error", id="lstm-out-off"),
        pytest.param("gru", "inference", _h_n_nan, "h_n: NaN where torch.nn is finite", id="gru-h_n-nan"),
        pytest.param("lstm", "streaming", _off_by_1e_2, "out: normalised error", id="lstm-streaming-out-off"),
    ],
)
def test_wrong_ort_output_is_failing_not_timed(monkeypatch, cell, mode, spoil, needle):
    real_run = peers.OrtLayer.run
    monkeypatch.setattr(peers.OrtLayer, "run", lambda self, feeds: spoil(real_run(self, feeds)))
    rows = _by_backend(runner.measure_case(Case(cell, mode, 3, 2, 8, 8, threads=1), ["reference", ORT], QUICK, None))
    bad = rows[ORT]
    assert bad["status"] == "FAILING" and "differs from torch.nn" in bad["note"] and needle in bad["note"], bad
    assert bad["median_ms"] is None and bad["repeats"] == 0 and bad["ratio_vs_torch"] is None
    assert rows["reference"]["status"] == "ok" and rows["reference"]["ratio_vs_ort"] is None


@needs_ort
def test_ort_session_uses_the_case_threads_without_spinning():
    so = (
        workload.Workload(Case("gru", "inference", 4, 2, 8, 8, threads=2)).module_for(ORT).session.get_session_options()
    )
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (2, 1)
    for entry in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert so.get_session_config_entry(entry) == "0"


@needs_ort
def test_ort_export_once_per_layer_weights_and_shape(monkeypatch):
    calls = []
    real_export = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: calls.append(a[2]) or real_export(*a, **k))
    case = Case("lstm", "inference", 4, 2, 11, 11, threads=1)  # a shape no other test exports
    wl = workload.Workload(case)
    a, b = wl.module_for(ORT), wl.module_for(ORT)
    assert len(calls) == 1 and a.path == b.path
    workload.Workload(dataclasses.replace(case, mode="streaming")).module_for(ORT)  # x [1, B, I]: another graph
    workload.Workload(case, seed=1).module_for(ORT)  # other weights
    assert len(calls) == 3 and len(set(calls)) == 3


def _run_argv(*extra: str) -> list[str]:
    """TINY without its --peers none."""
    i = TINY.index("--peers")
    return ["run", *TINY[:i], *TINY[i + 2 :], *extra]


def test_peers_without_onnxruntime(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ModuleNotFoundError
    for argv in (_run_argv("--peers", "onnxruntime"), ["run", "--preset", "ort", "--no-progress"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [
            f"fastrnn-bench: error: peer 'onnxruntime' cannot run here: onnxruntime is not installed: "
            f"{peers.INSTALL_HINT}"
        ]
    # the quick preset (whose grid the flags shrink) simply leaves the peer out
    out = tmp_path / "r.json"
    assert cli.main(_run_argv("--out", str(out))) == 0
    assert {r["backend"] for r in results.load(out)["rows"]} == {YARDSTICK, "reference"}


def test_unknown_peer_is_one_line(capsys):
    assert "unknown peer 'tvm'; expected one of onnxruntime (or none)" in _errors_cleanly(
        capsys, _run_argv("--peers", "tvm")
    )


@pytest.fixture(scope="module")
def ort_run(tmp_path_factory) -> Path:
    """The quick preset's peer on a tiny grid: onnxruntime on the inference and streaming rows, not training."""
    if not peers.available()[0]:
        pytest.skip("onnx / onnxruntime not installed")
    out = tmp_path_factory.mktemp("bench") / "ort.json"
    assert cli.main(_run_argv("--modes", "inference,streaming,training", "--out", str(out))) == 0
    return out


def test_ort_rows_and_tables(ort_run, capsys):
    data = results.load(ort_run)
    rows = {(r["backend"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {(b, m) for b in (YARDSTICK, "reference") for m in ("inference", "streaming", "training")} | {
        (ORT, "inference"),
        (ORT, "streaming"),
    }
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert data["versions"]["onnxruntime"] and ORT in data["backends"]
    ref = rows[("reference", "inference")]
    assert ref["ratio_vs_ort"] > 0 and rows[("reference", "training")]["ratio_vs_ort"] is None
    # the end-of-run table: the peer's own row (ratio vs torch.nn) and a "vs ORT" column for fastrnn's rows
    table = report.results_table(data)
    header, _, *lines = table.splitlines()
    assert "vs ORT" in header.split("  ")
    ort_line = next(line for line in lines if line.startswith("lstm inference") and f" {ORT} " in line)
    assert f"{rows[(ORT, 'inference')]['ratio_vs_torch']:.2f}x" in ort_line
    ref_line = next(line for line in lines if line.startswith("lstm inference") and " reference " in line)
    assert f" {ref['ratio_vs_ort']:.2f}x " in ref_line
    summary = report.summary(data)
    assert f"vs {ORT} geomean {ref['ratio_vs_ort']:.2f}x min {ref['ratio_vs_ort']:.2f}x over 1 shapes" in summary
    # readme-table: the peer's columns, the table against it, and "vs ORT" in every shape's line
    assert cli.main(["readme-table", str(ort_run)]) == 0
    md = capsys.readouterr().out
    assert f"| cell | reference inference | reference streaming | reference training | {ORT} inference | {ORT} " in md
    assert "Against ONNX Runtime" in md
    vs = {m: f"{rows[('reference', m)]['ratio_vs_ort']:.2f}x" for m in ("inference", "streaming")}
    inf, stream = vs["inference"], vs["streaming"]
    assert f"| lstm | {inf} ({inf}) [n=1] | {stream} ({stream}) [n=1] |" in md
    assert "| ratio | vs ORT | GFLOP/s |" in md
    shape_line = next(
        line for line in md.splitlines() if line.startswith("| lstm | inference | 2 | 1 | 8 | 1 | reference")
    )
    assert shape_line.split(" | ")[-2] == vs["inference"]


def test_ort_rows_are_not_gated(ort_run, tmp_path, capsys):
    """A baseline that holds onnxruntime rows: compare and gate judge only fastrnn's rows, and the gate does not
    time the peer (it runs the baseline's implementations without peers)."""
    base = results.load(ort_run)
    assert [v.key[1] for v in report.compare(base, base)] == [
        r["backend"] for r in base["rows"] if r["backend"] not in (YARDSTICK, ORT)
    ]
    slower_peer = copy.deepcopy(base)  # the peer got 4x slower: not fastrnn's regression
    for r in slower_peer["rows"]:
        if r["backend"] == ORT:
            r.update(ratio_vs_torch=r["ratio_vs_torch"] / 4, ratio_q25=r["ratio_q25"] / 4, ratio_q75=r["ratio_q75"] / 4)
    assert all(not v.fails for v in report.compare(base, slower_peer))
    out = tmp_path / "gate.json"
    # the verdict on fastrnn's own rows depends on this machine's load (two repeats of tiny shapes): not checked
    rc = cli.main(["gate", "--baseline", str(ort_run), "--backends", "reference", "--no-progress", "--out", str(out)])
    assert rc in (0, 1)
    verdicts = [line for line in capsys.readouterr().out.splitlines() if "thr=" in line]
    assert verdicts and not any(ORT in line for line in verdicts)
    assert ORT not in {r["backend"] for r in results.load(out)["rows"]}


def test_streaming_carries_the_state():
    """Streaming (one call per step, the state carried) computes what one call on the whole sequence does."""
    for cell in configs.CELLS:
        whole = workload.Workload(Case(cell, "inference", 6, 3, 8, 8, threads=1))
        stream = workload.Workload(Case(cell, "streaming", 6, 3, 8, 8, threads=1))
        a = correctness.outputs(whole, YARDSTICK, whole.module_for(YARDSTICK))
        b = correctness.outputs(stream, YARDSTICK, stream.module_for(YARDSTICK))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6)


def test_ort_preset_is_the_issue_grid():
    p = configs.PRESETS["ort"]
    cases = configs.grid(p.cells, p.modes, p.T, p.B, p.H, p.dtypes, p.threads, stream_Bs=p.stream_B)
    lstm_gru = configs.layer_cells("LSTM") + configs.layer_cells("GRU")
    want = {
        (c, "inference", T, B, H) for c in lstm_gru for T in (32, 128) for B in (1, 16, 64) for H in (256, 512, 1024)
    }
    want |= {(c, "streaming", T, 1, H) for c in lstm_gru for T in (32, 128) for H in (256, 512, 1024)}
    assert {(k.cell, k.mode, k.T, k.B, k.H) for k in cases} == want and len(cases) == len(want)
    assert all(k.threads == 2 and k.dtype == "float32" and k.I == k.H for k in cases)
    assert p.peers == (ORT,) and p.peers_required


def test_merged_runs_pool_the_ratio_against_ort():
    def run(ort_ms: list[float], cpp_ms: list[float]) -> list[dict]:
        t = dict(_row(1.0, 0.0, backend=YARDSTICK), samples_ms=[2.0] * len(cpp_ms), flops=1, max_err=0.0)
        o = dict(_row(1.0, 0.0, backend=ORT), samples_ms=ort_ms, flops=1, max_err=0.0)
        c = dict(_row(1.0, 0.0, backend="cpp"), samples_ms=cpp_ms, flops=1, max_err=0.0, ratio_vs_ort=9.0)
        return [t, c, o]

    merged = _by_backend(timing.merge_runs([run([1.0] * 4, [1.0] * 4), run([3.0] * 4, [1.0] * 4)]))
    cpp = merged["cpp"]
    assert cpp["ratio_vs_ort_q25"] == pytest.approx(1.0) and cpp["ratio_vs_ort_q75"] == pytest.approx(3.0)
    assert cpp["ratio_vs_ort"] == pytest.approx(2.0) and cpp["ort_median_ms"] == pytest.approx(2.0)


@pytest.mark.parametrize("cell", fastrnn.cells.NORM_CELLS)
def test_normalised_cells_time_against_the_eager_loop(cell, monkeypatch):
    """The normalised cells' yardstick is the plain-PyTorch loop (torch.nn has none): the fastrnn rows pass the
    correctness gate against it, and a wrong norm-parameter gradient is FAILING."""
    case = Case(cell, "training", 3, 2, 8, 8, threads=1)
    rows = {r["backend"]: r for r in runner.measure_case(case, ["reference", "auto"], QUICK, None)}
    assert rows[YARDSTICK]["status"] == "ok" and rows["reference"]["status"] == "ok" and rows["auto"]["status"] == "ok"
    from fastrnn import ops

    real = ops.norm_grads
    monkeypatch.setattr(ops, "norm_grads", lambda *a: real(*a) * 1.01)
    bad = runner.measure_case(case, ["reference"], QUICK, None)[-1]
    assert bad["status"] == "FAILING" and "differs from torch.nn: grad_" in bad["note"]
