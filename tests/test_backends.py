"""The backend registry: availability, explicit choice (argument, context manager, env var), automatic
choice, and errors that say what is missing."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

import fastrnn
from fastrnn import backends
from fastrnn.cells import spec

CPU = torch.device("cpu")


def test_available_backends_lists_reference_first():
    names = fastrnn.available_backends()
    assert names[0] == "reference"
    assert set(names) <= set(backends.BACKENDS)


def test_use_backend_context_and_nesting():
    assert backends.requested() is None
    with fastrnn.use_backend("reference"):
        assert backends.requested() == "reference"
        with fastrnn.use_backend(None):
            assert backends.requested() is None
        assert backends.select("gru", torch.float32, CPU) == "reference"
    assert backends.requested() is None
    with pytest.raises(ValueError, match="unknown fastrnn backend"):
        with fastrnn.use_backend("fast"):
            pass


def test_env_var(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "reference")
    assert backends.requested() == "reference"
    assert backends.requested("reference") == "reference"
    monkeypatch.setenv("FASTRNN_BACKEND", "auto")
    assert backends.requested() is None
    monkeypatch.setenv("FASTRNN_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTRNN_BACKEND"):
        backends.requested()


def test_precedence_argument_over_context_over_env(monkeypatch):
    fake = types.SimpleNamespace(
        available=lambda: (False, "fake is not installed: pip install fake"),
        supports=lambda *a: (True, ""),
    )
    monkeypatch.setitem(backends._modules, "numba", fake)
    monkeypatch.setenv("FASTRNN_BACKEND", "numba")
    with pytest.raises(backends.BackendUnavailableError, match="pip install fake"):
        backends.select("lstm", torch.float32, CPU)
    with fastrnn.use_backend("reference"):
        assert backends.select("lstm", torch.float32, CPU) == "reference"
        with pytest.raises(backends.BackendUnavailableError, match="numba"):
            backends.select("lstm", torch.float32, CPU, "numba")


def test_explicit_backend_is_never_replaced(monkeypatch):
    fake = types.SimpleNamespace(available=lambda: (True, ""), supports=lambda *a: (False, "no float16 here"))
    monkeypatch.setitem(backends._modules, "numba", fake)
    m = fastrnn.GRU(3, 4, backend="numba")
    with pytest.raises(backends.BackendUnavailableError, match="no float16 here"):
        m(torch.randn(2, 1, 3))


def test_auto_order_and_one_time_warning(monkeypatch):
    no = types.SimpleNamespace(available=lambda: (False, "not built"), supports=lambda *a: (True, ""))
    monkeypatch.setitem(backends._modules, "cpp", no)
    monkeypatch.setitem(backends._modules, "numba", no)
    monkeypatch.setattr(backends, "_warned_slow_cpu", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.select("lstm", torch.float32, CPU) == "reference"
        assert backends.select("gru", torch.float32, CPU) == "reference"
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "pip install --no-build-isolation -e ." in msgs[0]
    yes = types.SimpleNamespace(
        available=lambda: (True, ""), supports=lambda c, d, dev: (d == torch.float32, "f32 only")
    )
    monkeypatch.setitem(backends._modules, "cpp", yes)
    assert backends.select("lstm", torch.float32, CPU) == "cpp"
    assert backends.select("lstm", torch.float64, CPU) == "reference"  # cpp declines; auto moves on


def test_optional_import_only_hides_missing_modules(monkeypatch, tmp_path):
    mod, why = backends.optional_import("fastrnn_no_such_dependency")
    assert mod is None and "not installed" in why
    (tmp_path / "fastrnn_broken_dep.py").write_text("import fastrnn_missing_inner_dep\n")
    (tmp_path / "fastrnn_raising_dep.py").write_text("raise ImportError('undefined symbol: _ZN3c10')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="fastrnn_missing_inner_dep"):
        backends.optional_import("fastrnn_broken_dep")
    with pytest.raises(ImportError, match="undefined symbol"):
        backends.optional_import("fastrnn_raising_dep")
    sys.modules.pop("fastrnn_broken_dep", None)
    sys.modules.pop("fastrnn_raising_dep", None)


def test_every_backend_reports_a_reason():
    for name in backends.BACKENDS:
        ok, why = backends.is_available(name)
        assert ok or why, f"{name} is unavailable without saying why"


def test_auto_on_cuda_is_torch_until_triton_is_measured():
    """No gpu_check measurement is recorded in the repo, so CUDA tensors get torch.nn's (cuDNN) kernels."""
    assert backends.select("lstm", torch.float32, torch.device("cuda")) == "torch"


# ------------------------------------------------------------------------------------------ auto's shape rules

F32 = torch.float32


@pytest.fixture
def fake_cpp(monkeypatch):
    """A cpp backend that runs float32 only, so auto's order gives cpp whether or not the extension is built."""
    yes = types.SimpleNamespace(available=lambda: (True, ""), supports=lambda c, d, dev: (d == F32, "f32 only"))
    monkeypatch.setitem(backends._modules, "cpp", yes)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def _auto(cell, batch, hidden, grad, dtype=F32, step=False, explicit=None):
    return backends.select(cell, dtype, CPU, explicit, batch, hidden, grad, step)


@pytest.mark.parametrize(
    "batch,hidden,grad,want",
    [
        (64, 64, False, "torch"),  # results-grid-2threads.md: 0.97x, 0.97x
        (64, 256, False, "torch"),  # 0.96x, 0.85x
        (64, 512, False, "torch"),  # 0.99x, 0.89x
        (256, 128, False, "torch"),  # the class reaches up in B
        (64, 1024, False, "cpp"),  # 1.09x, 1.00x
        (64, 64, True, "torch"),  # training 0.95x, 0.94x
        (64, 256, True, "cpp"),  # training 1.03x, 0.99x: cpp keeps it
        (16, 256, False, "torch"),  # 0.95x, 1.00x
        (32, 256, False, "torch"),
        (16, 256, True, "cpp"),  # training 1.05x, 1.00x
        (16, 64, False, "cpp"),  # 1.09x, 1.03x
        (16, 512, False, "cpp"),  # 1.13x, 1.18x
        (32, 64, False, "cpp"),  # between B=16 (cpp wins) and B=64: not measured, auto's order
        (1, 256, False, "cpp"),  # 1.09x, 0.96x: left to cpp
        (1, 64, True, "cpp"),
    ],
)
def test_auto_rules_lstm_cpu_float32(fake_cpp, batch, hidden, grad, want):
    assert _auto("lstm", batch, hidden, grad) == want


def test_auto_rules_touch_only_what_was_measured(fake_cpp):
    """Other cells, Cell steps, other dtypes, autocast and calls that do not give their shape keep auto's order."""
    for cell in ("gru", "rnn_tanh", "rnn_relu"):
        assert _auto(cell, 64, 64, False) == "cpp"
    assert _auto("lstm", 64, 64, False, step=True) == "cpp"  # no Cell-step rule
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        assert _auto("lstm", 64, 64, False, dtype) == backends.select("lstm", dtype, CPU) != "torch"
    assert _auto("lstm", 64, 64, None) == _auto("lstm", None, 64, False) == _auto("lstm", 64, None, False) == "cpp"
    with torch.autocast("cpu", torch.bfloat16):
        assert _auto("lstm", 64, 64, False) == "cpp"
    assert backends.select("lstm", F32, torch.device("cuda"), None, 64, 64, False) == "torch"  # CUDA: its own order


def test_auto_rules_never_override_an_explicit_backend(fake_cpp, monkeypatch):
    assert _auto("lstm", 64, 64, False, explicit="cpp") == "cpp"
    with fastrnn.use_backend("reference"):
        assert _auto("lstm", 64, 64, False) == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "cpp")
    assert _auto("lstm", 64, 256, False) == "cpp"
    monkeypatch.setenv(backends.ENV_VAR, "auto")
    assert _auto("lstm", 64, 256, False) == "torch"


def test_auto_rule_table_is_well_formed(fake_cpp):
    """Every rule names a known cell, device, mode and a backend that runs it, with sane inclusive ranges, and
    selects its backend at the corners of its own class (no earlier rule shadows it)."""
    from fastrnn.cells import CELLS

    assert backends._AUTO_RULES, "the CPU grid has losing rows: the table should not be empty"
    assert backends._RULE_INDEX == backends._rule_index(backends._AUTO_RULES)
    for r in backends._AUTO_RULES:
        assert isinstance(r, backends.AutoRule)
        assert r.device in backends._AUTO and isinstance(r.step, bool) and r.cell in CELLS
        assert r.mode in (None, "inference", "training")
        assert r.dtypes and all(isinstance(d, torch.dtype) for d in r.dtypes)
        assert r.backend in backends.BACKENDS
        for lo, hi in (r.batch, r.hidden):
            assert isinstance(lo, int) and lo >= 1 and (hi is None or (isinstance(hi, int) and hi >= lo))
        dev = torch.device(r.device)
        for d in r.dtypes:
            assert backends.get(r.backend).supports(spec(r.cell), d, dev)[0]
            if r.device != "cpu":
                continue
            for grad in (False, True) if r.mode is None else (r.mode == "training",):
                for b in {r.batch[0], r.batch[1] or 4096}:
                    for h in {r.hidden[0], r.hidden[1] or 4096}:
                        assert backends.select(r.cell, d, dev, None, b, h, grad, r.step) == r.backend, (r, b, h)


def _torch_calls(monkeypatch) -> list:
    """Counts the calls that reach the torch backend's whole-layer entry point."""
    from fastrnn.backends import torch_nn

    calls, real = [], torch_nn.rnn
    monkeypatch.setattr(torch_nn, "rnn", lambda *a: calls.append(1) or real(*a))
    return calls


def test_layer_calls_pass_their_shape_to_auto(monkeypatch):
    """functional.rnn hands select its batch, hidden size and whether autograd records: the module gets torch.nn's
    kernel (bit for bit) at a losing class and stays off it elsewhere; packed input and proj_size are not ruled."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    calls = _torch_calls(monkeypatch)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(8, 256)
    m = fastrnn.LSTM.from_torch(ref)
    x = torch.randn(2, 64, 8)
    with torch.no_grad():
        assert torch.equal(m(x)[0], ref(x)[0]) and len(calls) == 1  # inference B=64 H=256
    m(x)[0].sum().backward()
    assert len(calls) == 1  # training at H=256: not ruled
    for p in m.parameters():
        p.requires_grad_(False)
    m(x)  # grad mode on, nothing requires grad: autograd records nothing, so inference
    assert len(calls) == 2
    m(x.requires_grad_())
    assert len(calls) == 2  # the input requires grad: training
    with torch.no_grad():
        m(torch.randn(2, 4, 8))  # B=4
        m(torch.nn.utils.rnn.pack_sequence([torch.randn(2, 8)] * 64))
        fastrnn.LSTM(8, 256, proj_size=4)(x)
    assert len(calls) == 2
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    with torch.no_grad():
        m(x)
    assert len(calls) == 2


def test_record_works_when_auto_resolves_to_torch(monkeypatch):
    """fastrnn.record reruns a torch-backend call on a kernel backend: auto's rules must not send it back."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    calls = _torch_calls(monkeypatch)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(8, 64)
    m = fastrnn.LSTM.from_torch(ref)
    x = torch.randn(3, 64, 8)
    with torch.no_grad(), fastrnn.record() as rec:
        out = m(x)[0]
    assert len(calls) == 1
    assert torch.equal(out, ref(x)[0])
    torch.testing.assert_close(rec[m].h[0, 0], out, rtol=1e-4, atol=1e-5)
