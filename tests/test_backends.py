"""The backend registry: availability, explicit choice (argument, context manager, env var), automatic
choice, and errors that say what is missing."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

import fastrnn
from fastrnn import backends, cpuinfo
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


def _pin_cpu(monkeypatch, cpu: str) -> None:
    """Auto's rules as they hold on CPU class `cpu` (fastrnn.cpuinfo.cpu_class), whatever this machine is."""
    monkeypatch.setattr(backends, "_RULE_INDEX", backends._rule_index(backends._AUTO_RULES, cpu))


@pytest.fixture
def intel_amx(monkeypatch):
    """The rules of the Xeon with AMX on which results-grid-2threads.md and results-bf16-2threads.md were made."""
    _pin_cpu(monkeypatch, "intel-amx")


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
def test_auto_rules_lstm_cpu_float32(fake_cpp, intel_amx, batch, hidden, grad, want):
    assert _auto("lstm", batch, hidden, grad) == want


BF16 = torch.bfloat16


@pytest.fixture
def cpp_f32_bf16(monkeypatch):
    """A cpp backend that runs float32 and bfloat16, so auto's order gives cpp whether or not it is built."""
    yes = types.SimpleNamespace(available=lambda: (True, ""), supports=lambda c, d, dev: (d in (F32, BF16), ""))
    monkeypatch.setitem(backends._modules, "cpp", yes)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


@pytest.mark.parametrize(
    "dtype,cell,batch,hidden,grad,want",
    [
        (F32, "lstm", 1, 64, False, "cpp"),  # results-grid-2threads-amd-epyc-zen5.md: 1.87x, 1.80x
        (F32, "lstm", 1, 512, False, "cpp"),  # 1.31x, 1.08x
        (F32, "lstm", 1, 1024, False, "torch"),  # 1.10x, 0.90x
        (F32, "lstm", 4, 1024, False, "cpp"),  # between B=1 (loses) and B=16 (wins): not measured
        (F32, "lstm", 4, 256, False, "cpp"),  # between B=1 (wins) and B=16 (loses): not measured
        (F32, "lstm", 16, 64, False, "cpp"),  # 1.18x, 1.37x
        (F32, "lstm", 16, 256, False, "torch"),  # 0.89x, 0.90x
        (F32, "lstm", 64, 512, False, "torch"),  # 0.89x, 0.91x
        (F32, "lstm", 64, 64, False, "cpp"),  # 1.14x, 1.14x
        (F32, "lstm", 16, 1024, False, "cpp"),  # 1.20x, 1.25x
        (F32, "lstm", 64, 1024, False, "cpp"),  # 1.01x, 1.02x
        (F32, "lstm", 16, 64, True, "cpp"),  # training 1.16x, 1.34x
        (F32, "lstm", 16, 256, True, "torch"),  # 0.96x, 0.94x
        (F32, "lstm", 16, 1024, True, "torch"),  # 1.07x, 1.02x
        (F32, "lstm", 64, 64, True, "cpp"),  # 1.08x, 1.06x
        (F32, "lstm", 64, 256, True, "torch"),  # 0.95x, 1.02x
        (F32, "lstm", 64, 1024, True, "torch"),  # 1.02x, 0.91x
        (F32, "lstm", 1, 256, True, "cpp"),  # 1.25x, 1.12x
        (F32, "lstm", 1, 1024, True, "cpp"),  # 1.48x, 1.18x
        (F32, "gru", 16, 1024, False, "cpp"),  # 2.96x, 2.90x
        (F32, "gru", 64, 1024, True, "cpp"),
        (F32, "rnn_tanh", 64, 1024, False, "cpp"),
        (BF16, "lstm", 1, 1024, False, "cpp"),  # results-bf16-2threads-amd-epyc-zen5.md: 1.17x, 1.11x
        (BF16, "lstm", 16, 1024, False, "torch"),  # 0.95x, 0.97x
        (BF16, "lstm", 64, 256, False, "torch"),  # 0.96x, 0.96x
        (BF16, "lstm", 16, 1024, True, "cpp"),  # 3.30x, 2.87x
        (BF16, "lstm", 16, 256, True, "cpp"),  # 1.15x, 1.03x
        (BF16, "lstm", 64, 512, True, "torch"),  # 1.48x, 0.96x
        (BF16, "lstm", 64, 1024, True, "cpp"),  # 1.45x, 1.32x
        (BF16, "gru", 64, 256, True, "cpp"),  # 1.69x, 1.87x
        (BF16, "gru", 64, 1024, True, "cpp"),  # 1.09x, 1.07x
        (BF16, "rnn_tanh", 64, 512, True, "cpp"),  # 1.27x, 1.36x
        (BF16, "rnn_tanh", 64, 1024, True, "torch"),  # 1.05x, 0.99x
        (BF16, "rnn_relu", 64, 1024, True, "torch"),
        (BF16, "rnn_relu", 64, 512, True, "cpp"),
    ],
)
def test_auto_rules_cpu_amd_zen5(cpp_f32_bf16, monkeypatch, dtype, cell, batch, hidden, grad, want):
    _pin_cpu(monkeypatch, "amd-zen5")
    assert _auto(cell, batch, hidden, grad, dtype) == want
    # results-cells-bf16-2threads-amd-epyc-zen5.md: the one Cell-step rule is LSTMCell training at B >= 16, H >= 512
    step = _auto(cell, batch, hidden, grad, dtype, step=True)
    ruled = dtype == BF16 and cell == "lstm" and grad and batch >= 16 and hidden >= 512
    assert step == ("torch" if ruled else "cpp"), (dtype, cell, batch, hidden, grad, step)


@pytest.mark.parametrize(
    "dtype,cell,batch,hidden,grad,want",
    [
        (F32, "lstm", 1, 64, False, "cpp"),  # results-grid-2threads-amd-epyc-zen4.md: 1.92x, 1.82x
        (F32, "lstm", 1, 1024, False, "torch"),  # 1.20x, 0.92x (0.84x rerun alone)
        (F32, "lstm", 16, 256, False, "torch"),  # 0.92x, 0.95x
        (F32, "lstm", 16, 1024, False, "cpp"),  # 1.17x, 1.13x
        (F32, "lstm", 64, 1024, False, "torch"),  # 0.97x, 0.98x (Zen 5: 1.01x, 1.02x -> cpp)
        (F32, "lstm", 64, 64, False, "cpp"),  # 1.11x, 1.02x
        (F32, "lstm", 64, 64, True, "torch"),  # training 1.00x, 0.92x (Zen 5: 1.08x, 1.06x -> cpp)
        (F32, "lstm", 64, 512, True, "torch"),  # 1.01x, 0.84x
        (F32, "lstm", 16, 256, True, "torch"),  # 0.97x, 0.86x
        (F32, "lstm", 16, 1024, True, "cpp"),  # 1.22x, 1.27x (Zen 5: 1.07x, 1.02x -> torch)
        (F32, "lstm", 1, 1024, True, "cpp"),  # 1.93x, 0.91x in the grid, 2.05x, 1.10x rerun alone
        (F32, "gru", 64, 1024, True, "cpp"),
        (F32, "rnn_relu", 64, 1024, False, "cpp"),
        (BF16, "lstm", 1, 256, False, "torch"),  # results-bf16-2threads-amd-epyc-zen4.md: 1.01x, 0.95x
        (BF16, "lstm", 64, 512, False, "torch"),  # 0.92x, 0.94x
        (BF16, "lstm", 1, 1024, False, "cpp"),  # 1.28x, 1.24x
        (BF16, "lstm", 16, 1024, False, "cpp"),  # 1.06x, 1.06x (Zen 5: 0.95x, 0.97x -> torch)
        (BF16, "lstm", 16, 256, True, "torch"),  # 0.98x, 0.94x (Zen 5: 1.15x, 1.03x -> cpp)
        (BF16, "lstm", 16, 512, True, "cpp"),  # 1.09x, 1.21x
        (BF16, "lstm", 64, 512, True, "torch"),  # 1.29x, 0.90x
        (BF16, "lstm", 64, 1024, True, "cpp"),  # 1.26x, 1.02x
        (BF16, "rnn_tanh", 64, 1024, True, "torch"),  # 1.07x, 1.00x
        (BF16, "gru", 64, 1024, True, "cpp"),  # 1.14x, 1.09x
    ],
)
def test_auto_rules_cpu_amd_zen4(cpp_f32_bf16, monkeypatch, dtype, cell, batch, hidden, grad, want):
    _pin_cpu(monkeypatch, "amd-zen4")
    assert _auto(cell, batch, hidden, grad, dtype) == want


def test_amd_rules_of_one_generation_do_not_hold_on_an_unmeasured_one(cpp_f32_bf16, monkeypatch):
    """A Zen 5-only or Zen 4-only rule stays on its generation; a rule both share ("amd") holds on every AMD CPU."""
    _pin_cpu(monkeypatch, "amd-zen3")
    assert _auto("lstm", 64, 1024, False) == _auto("lstm", 16, 1024, True) == "cpp"  # one generation's rules
    assert _auto("lstm", 16, 256, False) == "torch"  # both generations' rule


def test_bfloat16_cell_steps_tell_auto_their_class(monkeypatch):
    """functional.cell_step works out a bfloat16 step's class (batch, hidden, training) for auto's Cell-step rules:
    on Zen 5, LSTMCell training at B=16 H=512 runs torch's cell, inference and B=1 stay with cpp."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    _pin_cpu(monkeypatch, "amd-zen5")
    calls = _torch_calls(monkeypatch, "cell")
    cell = fastrnn.LSTMCell(8, 512).to(torch.bfloat16)
    x = torch.randn(16, 8, dtype=torch.bfloat16)
    cell(x)  # training (the parameters require grad)
    assert len(calls) == 1
    with torch.no_grad():
        cell(x)
    cell(x[:1])
    assert len(calls) == 1


def test_auto_rules_touch_only_what_was_measured(fake_cpp, intel_amx):
    """Other cells, Cell steps, other dtypes, autocast and calls that do not give their shape keep auto's order."""
    for cell in ("gru", "rnn_tanh", "rnn_relu"):
        assert _auto(cell, 64, 64, False) == "cpp"
    assert _auto("lstm", 64, 64, False, step=True) == "cpp"  # no Cell-step rule
    for dtype in (torch.float64, torch.float16):
        assert _auto("lstm", 64, 64, False, dtype) == backends.select("lstm", dtype, CPU) != "torch"
    assert _auto("lstm", 64, 64, None) == _auto("lstm", None, 64, False) == _auto("lstm", 64, None, False) == "cpp"
    with torch.autocast("cpu", torch.bfloat16):
        assert _auto("lstm", 64, 64, False) == "cpp"
    assert backends.select("lstm", F32, torch.device("cuda"), None, 64, 64, False) == "torch"  # CUDA: its own order


def test_auto_rules_hold_only_on_the_cpu_class_measured(fake_cpp, monkeypatch):
    """A rule holds on the CPU class it was measured on ("intel": every Intel CPU, "intel-amx": those with AMX);
    a class nothing was measured on keeps auto's order."""
    rule = backends.AutoRule("cpu", False, "lstm", (F32,), None, (1, None), (1, None), "torch", cpu="intel")
    amx = rule._replace(cpu="intel-amx")
    assert [backends.rule_holds_on(rule, c) for c in ("intel", "intel-amx", "amd", "other")] == [1, 1, 0, 0]
    assert [backends.rule_holds_on(amx, c) for c in ("intel", "intel-amx", "amd", "amd-amx")] == [0, 1, 0, 0]
    assert backends.rule_holds_on(rule._replace(cpu=None), "amd")
    amd, zen5 = rule._replace(cpu="amd"), rule._replace(cpu="amd-zen5")
    assert [backends.rule_holds_on(amd, c) for c in ("amd-zen4", "amd-zen5", "amd", "intel")] == [1, 1, 1, 0]
    assert [backends.rule_holds_on(zen5, c) for c in ("amd-zen4", "amd-zen5", "amd", "amd-zen50")] == [0, 1, 0, 0]
    _pin_cpu(monkeypatch, "other")
    assert _auto("lstm", 64, 256, False) == _auto("lstm", 64, 256, True) == "cpp"
    assert cpuinfo.cpu_class().split("-")[0] in ("intel", "amd", "other")


def test_auto_rules_lstm_cpu_bfloat16_intel_amx(intel_amx, monkeypatch):
    """results-bf16-2threads.md (Xeon, AMX): inference B >= 16 at H=256 (0.89x, 0.91x; 0.87x, 0.85x) -> torch;
    H=512 (1.36x, 1.27x; 1.01x, 1.15x), B=1 and training stay with cpp."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    bf = torch.bfloat16
    assert _auto("lstm", 16, 256, False, bf) == _auto("lstm", 64, 128, False, bf) == "torch"
    for b, h, g in ((16, 512, False), (64, 512, False), (1, 256, False), (64, 256, True)):
        assert _auto("lstm", b, h, g, bf) == "cpp", (b, h, g)


def test_auto_rules_never_override_an_explicit_backend(fake_cpp, monkeypatch):
    assert _auto("lstm", 64, 64, False, explicit="cpp") == "cpp"
    with fastrnn.use_backend("reference"):
        assert _auto("lstm", 64, 64, False) == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "cpp")
    assert _auto("lstm", 64, 256, False) == "cpp"
    monkeypatch.setenv(backends.ENV_VAR, "auto")
    assert _auto("lstm", 64, 256, False) == "torch"


def test_auto_rule_table_is_well_formed(fake_cpp, monkeypatch):
    """Every rule names a known cell, device, mode and a backend that runs it, with sane inclusive ranges, and
    selects its backend at the corners of its own class (no earlier rule shadows it)."""
    from fastrnn.cells import CELLS

    assert backends._AUTO_RULES, "the CPU grid has losing rows: the table should not be empty"
    assert backends._RULE_INDEX == backends._rule_index(backends._AUTO_RULES, cpuinfo.cpu_class())
    for r in backends._AUTO_RULES:
        assert isinstance(r, backends.AutoRule)
        assert (r.cpu in ("intel", "intel-amx", "amd", "amd-zen4", "amd-zen5")) == (r.device == "cpu"), r
        if r.cpu is not None:
            monkeypatch.setattr(backends, "_RULE_INDEX", backends._rule_index(backends._AUTO_RULES, r.cpu))
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


def _torch_calls(monkeypatch, entry: str = "rnn") -> list:
    """Counts the calls that reach the torch backend's whole-layer entry point (or its Cell step, entry="cell")."""
    from fastrnn.backends import torch_nn

    calls, real = [], getattr(torch_nn, entry)
    monkeypatch.setattr(torch_nn, entry, lambda *a: calls.append(1) or real(*a))
    return calls


def test_layer_calls_pass_their_shape_to_auto(monkeypatch, intel_amx):
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


def test_record_works_when_auto_resolves_to_torch(monkeypatch, intel_amx):
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
