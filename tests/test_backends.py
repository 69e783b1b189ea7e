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
