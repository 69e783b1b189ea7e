"""Property-based: hypothesis draws a layer (cell, sizes, layers, directions, bias, proj_size, batch_first,
packed lengths sorted or not, dtype) and every CPU kernel backend must equal torch.nn on outputs, final states
and every gradient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn.cells import CELLS, spec
from tests.conftest import KERNEL_BACKENDS
from tests.helpers import assert_close, flat

CPU_BACKENDS = [b for b in KERNEL_BACKENDS if b != "triton"]


@st.composite
def layers(draw):
    c = spec(draw(st.sampled_from(CELLS)))
    H = draw(st.integers(1, 9))
    kw = dict(
        input_size=draw(st.integers(1, 7)),
        hidden_size=H,
        num_layers=draw(st.integers(1, 3)),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bidirectional=draw(st.booleans()),
    )
    if c.nonlinearity:
        kw["nonlinearity"] = c.nonlinearity
    if c.projection and H > 1 and draw(st.booleans()):
        kw["proj_size"] = draw(st.integers(1, H - 1))
    T, B = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    packing = draw(st.sampled_from(["padded", "sorted", "unsorted"]))
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    if packing == "sorted":
        lengths = sorted(lengths, reverse=True)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return c, kw, T, B, packing, lengths, dtype, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(case=layers())
def test_layer_matches_torch(backend, case):
    c, kw, T, B, packing, lengths, dtype, seed = case
    torch.manual_seed(seed)
    ref = getattr(nn, c.layer)(**kw).to(dtype)
    fast = getattr(fastrnn, c.layer)(**kw, backend=backend).to(dtype)
    fast.load_state_dict(ref.state_dict())
    shape = (B, T, kw["input_size"]) if kw["batch_first"] else (T, B, kw["input_size"])
    x = torch.randn(*shape, dtype=dtype)

    def run(m):
        xi = x.clone().requires_grad_()
        inp = xi
        if packing != "padded":
            inp = pack_padded_sequence(xi, lengths, batch_first=kw["batch_first"], enforce_sorted=packing == "sorted")
        outs = flat(m(inp))
        return xi, outs

    xr, want = run(ref)
    xf, got = run(fast)
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        assert_close(a, e, dtype, T, f"output {i}")
    cots = [torch.randn_like(e) for e in want]
    gw = torch.autograd.grad(want, [xr, *ref.parameters()], cots)
    gg = torch.autograd.grad(got, [xf, *fast.parameters()], cots)
    names = ["input"] + [n for n, _ in fast.named_parameters()]
    for n, a, e in zip(names, gg, gw, strict=True):
        assert_close(a, e, dtype, T * B, f"grad {n}")
