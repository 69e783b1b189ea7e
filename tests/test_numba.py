"""The numba backend against the reference backend (the contract itself: outputs, saved gates/extra on the
rows a step touches, every backward gradient), and float64 gradcheck through the drop-in modules."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba")

from fastrnn.backends import get  # noqa: E402
from fastrnn.backends.numba.common import THREADS_VAR  # noqa: E402
from tests.helpers import assert_close, assert_contract_matches_reference, contract_inputs  # noqa: E402

if not get("numba").available()[0]:
    pytest.skip(get("numba").available()[1], allow_module_level=True)

numba_be, ref = get("numba"), get("reference")


CASES = [
    pytest.param("lstm", 7, 5, 33, 33, None, False, True, 1, id="lstm-T7-H33"),
    pytest.param("lstm", 7, 5, 33, 17, None, False, True, 1, id="lstm-proj"),
    pytest.param("lstm", 5, 5, 16, 16, [5, 5, 3, 2, 1], False, True, 1, id="lstm-packed"),
    pytest.param("lstm", 5, 5, 16, 16, [5, 5, 3, 2, 1], True, True, 1, id="lstm-packed-reverse"),
    pytest.param("lstm", 5, 5, 16, 9, [5, 5, 3, 2, 1], True, False, 1, id="lstm-proj-packed-reverse-nobias"),
    pytest.param("lstm", 1, 1, 8, 8, None, False, True, 1, id="lstm-T1-B1"),
    pytest.param("gru", 7, 5, 33, 33, None, False, True, 1, id="gru-T7-H33"),
    pytest.param("gru", 5, 5, 16, 16, [5, 5, 3, 2, 1], False, True, 1, id="gru-packed"),
    pytest.param("gru", 5, 5, 16, 16, [5, 5, 3, 2, 1], True, False, 1, id="gru-packed-reverse-nobias"),
    pytest.param("gru", 1, 1, 8, 8, None, True, True, 1, id="gru-T1-B1-reverse"),
    pytest.param("rnn_tanh", 7, 5, 33, 33, None, True, True, 1, id="rnn_tanh-T7-H33-reverse"),
    pytest.param("rnn_tanh", 5, 5, 16, 16, [5, 5, 3, 2, 1], True, True, 1, id="rnn_tanh-packed-reverse"),
    pytest.param("rnn_relu", 7, 5, 33, 33, None, False, False, 1, id="rnn_relu-T7-H33-nobias"),
    pytest.param("rnn_relu", 5, 5, 16, 16, [5, 5, 3, 2, 1], False, True, 1, id="rnn_relu-packed"),
    # large enough (common.PARALLEL_MIN_MACS) that with 2 threads a step is split into blocks of hidden units
    pytest.param("lstm", 3, 16, 260, 130, [16, 9, 4], True, True, 2, id="lstm-proj-blocked-packed-reverse"),
    pytest.param("gru", 3, 16, 300, 300, [16, 9, 4], False, True, 2, id="gru-blocked-packed"),
    pytest.param("rnn_tanh", 3, 16, 520, 520, None, False, True, 2, id="rnn_tanh-blocked"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell,T,B,H,P,bs,reverse,bias,threads", CASES)
def test_contract_matches_reference(cell, T, B, H, P, bs, reverse, bias, threads, dtype, monkeypatch):
    monkeypatch.setenv(THREADS_VAR, str(threads))
    assert_contract_matches_reference(numba_be, cell, T, B, H, P, bs, reverse, bias, dtype)


def test_supports():
    ok, _ = numba_be.supports("gru", torch.float32, torch.device("cpu"))
    assert ok
    ok, why = numba_be.supports("gru", torch.float16, torch.device("cpu"))
    assert not ok and "float16" in why
    ok, why = numba_be.supports("lstm", torch.float32, torch.device("meta"))
    assert not ok and "CPU" in why


def test_no_saved_when_not_needed():
    gx, h0, c0, w_hh, b_hh, _ = contract_inputs("lstm", 3, 2, 8, 8, torch.float64, True)
    out, h_n, c_n, gates, extra = numba_be.forward("lstm", gx, h0, c0, w_hh, b_hh, None, None, False, False)
    assert gates.numel() == 0 and extra.numel() == 0
    exp = ref.forward("lstm", gx, h0, c0, w_hh, b_hh, None, None, False, False)
    assert_close(out, exp[0], torch.float64, 3, "out")


def test_jit_runs_uncached_where_no_cache_dir_is_writable(monkeypatch):
    from numba.core.caching import CacheImpl

    from fastrnn.backends.numba.common import jit

    monkeypatch.setattr(CacheImpl, "_locator_classes", [])  # no writable location anywhere
    with pytest.warns(RuntimeWarning, match="NUMBA_CACHE_DIR"):
        twice = jit()(lambda x: 2 * x)
    assert twice(21) == 42
