"""Bad input gets what torch.nn gives: the same exception type, and a message naming the problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn

r = torch.randn


def _packed(x, lengths):
    return pack_padded_sequence(x, torch.tensor(lengths))


# Each case builds a module from a namespace (torch.nn or fastrnn) and calls it; both must raise alike.
CASES = {
    # constructor arguments
    "hidden_size<=0": lambda ns: ns.LSTM(4, 0),
    "hidden_size-negative": lambda ns: ns.GRU(4, -1),
    "input_size<=0": lambda ns: ns.RNN(0, 3),
    "num_layers<=0": lambda ns: ns.LSTM(4, 3, num_layers=0),
    "num_layers-float": lambda ns: ns.GRU(4, 3, num_layers=1.5),
    "dropout>1": lambda ns: ns.LSTM(4, 3, dropout=1.5),
    "dropout<0": lambda ns: ns.GRU(4, 3, dropout=-0.1),
    "dropout-bool": lambda ns: ns.RNN(4, 3, dropout=True),
    "proj_size>=hidden": lambda ns: ns.LSTM(4, 3, proj_size=3),
    "proj_size<0": lambda ns: ns.LSTM(4, 3, proj_size=-1),
    "proj_size-on-gru": lambda ns: ns.GRU(4, 3, proj_size=2),
    "unknown-nonlinearity": lambda ns: ns.RNN(4, 3, nonlinearity="sigmoid"),
    "bias-not-bool": lambda ns: ns.LSTM(4, 3, bias=1),
    "hidden_size-float": lambda ns: ns.LSTM(4, 3.0),
    "cell-unknown-nonlinearity": lambda ns: ns.RNNCell(4, 3, nonlinearity="gelu")(r(2, 4)),
    "unexpected-kwarg": lambda ns: ns.LSTM(4, 3, colour="red"),
    # forward: input
    "wrong-feature-size": lambda ns: ns.LSTM(4, 3)(r(5, 2, 6)),
    "wrong-rank-4d": lambda ns: ns.LSTM(4, 3)(r(5, 2, 4, 1)),
    "wrong-rank-1d-gru": lambda ns: ns.GRU(4, 3)(r(4)),
    "wrong-rank-4d-rnn": lambda ns: ns.RNN(4, 3)(r(1, 5, 2, 4)),
    "dtype-mismatch": lambda ns: ns.GRU(4, 3)(r(5, 2, 4, dtype=torch.float64)),
    "seq-len-0": lambda ns: ns.GRU(4, 3)(r(0, 2, 4)),
    "packed-wrong-feature": lambda ns: ns.LSTM(4, 3)(_packed(r(3, 2, 5), [3, 2])),
    # forward: hx
    "hx-wrong-batch": lambda ns: ns.GRU(4, 3)(r(5, 2, 4), r(1, 3, 3)),
    "hx-wrong-hidden": lambda ns: ns.RNN(4, 3)(r(5, 2, 4), r(1, 2, 5)),
    "hx-wrong-layers": lambda ns: ns.GRU(4, 3, num_layers=2)(r(5, 2, 4), r(1, 2, 3)),
    "hx-2d-for-batched": lambda ns: ns.GRU(4, 3)(r(5, 2, 4), r(2, 3)),
    "hx-3d-for-unbatched": lambda ns: ns.RNN(4, 3)(r(5, 4), r(1, 1, 3)),
    "lstm-hx-not-tuple": lambda ns: ns.LSTM(4, 3)(r(5, 2, 4), r(1, 2, 3)),
    "lstm-cx-wrong-shape": lambda ns: ns.LSTM(4, 3)(r(5, 2, 4), (r(1, 2, 3), r(1, 2, 4))),
    "lstm-proj-hx-wrong": lambda ns: ns.LSTM(4, 3, proj_size=2)(r(5, 2, 4), (r(1, 2, 3), r(1, 2, 3))),
    "lstm-hx-rank": lambda ns: ns.LSTM(4, 3)(r(5, 2, 4), (r(2, 3), r(2, 3))),
    "lstm-unbatched-hx-rank": lambda ns: ns.LSTM(4, 3)(r(5, 4), (r(1, 2, 3), r(1, 2, 3))),
    "packed-hx-wrong-batch": lambda ns: ns.GRU(4, 3)(_packed(r(3, 2, 4), [3, 2]), r(1, 3, 3)),
    "lstm-hx-three-states": lambda ns: ns.LSTM(4, 3)(r(5, 2, 4), (r(1, 2, 3), r(1, 2, 3), r(1, 2, 3))),
    "lstm-hx-stacked-tensor": lambda ns: ns.LSTM(4, 3)(r(5, 2, 4), r(2, 1, 2, 3)),
    "rnn-hx-tuple": lambda ns: ns.RNN(4, 3)(r(5, 2, 4), (r(1, 2, 3),)),
    "int-input": lambda ns: ns.LSTM(4, 3)(torch.zeros(5, 2, 4, dtype=torch.long)),
    "hx-int-dtype": lambda ns: ns.GRU(4, 3)(r(5, 2, 4), torch.zeros(1, 2, 3, dtype=torch.long)),
    "input-none": lambda ns: ns.GRU(4, 3)(None),
    "seq-len-0-batch-first": lambda ns: ns.GRU(4, 3, batch_first=True)(r(2, 0, 4)),
    # cells
    "lstmcell-hx-tensor": lambda ns: ns.LSTMCell(4, 3)(r(2, 4), r(2, 3)),
    "lstmcell-hx-one-state": lambda ns: ns.LSTMCell(4, 3)(r(2, 4), (r(2, 3),)),
    "cell-input-0d": lambda ns: ns.RNNCell(4, 3)(torch.tensor(1.0)),
    "cell-wrong-feature": lambda ns: ns.LSTMCell(4, 3)(r(2, 5)),
    "cell-wrong-rank": lambda ns: ns.GRUCell(4, 3)(r(2, 2, 4)),
    "cell-hx-rank": lambda ns: ns.RNNCell(4, 3)(r(2, 4), r(1, 2, 3)),
    "cell-hx-batch": lambda ns: ns.GRUCell(4, 3)(r(2, 4), r(3, 3)),
    "cell-hx-hidden": lambda ns: ns.RNNCell(4, 3)(r(2, 4), r(2, 5)),
    "lstmcell-cx-hidden": lambda ns: ns.LSTMCell(4, 3)(r(2, 4), (r(2, 3), r(2, 4))),
    "lstmcell-hx-rank": lambda ns: ns.LSTMCell(4, 3)(r(2, 4), (r(2, 3), r(1, 2, 3))),
    "cell-dtype-mismatch": lambda ns: ns.GRUCell(4, 3)(r(2, 4, dtype=torch.float64)),
    "cell-unbatched-hx-batched": lambda ns: ns.GRUCell(4, 3)(r(4), r(2, 3)),
}


def _outcome(fn, ns):
    try:
        fn(ns)
    except Exception as e:  # noqa: BLE001 - the point is to capture whatever is raised
        return type(e), str(e)
    return None, ""


@pytest.mark.parametrize("case", list(CASES))
def test_same_exception_as_torch(case):
    want_type, want_msg = _outcome(CASES[case], nn)
    got_type, got_msg = _outcome(CASES[case], fastrnn)
    assert want_type is not None, f"{case}: torch.nn accepts this; the case is wrong"
    assert got_type is want_type, (
        f"{case}: torch raised {want_type.__name__}({want_msg!r}), fastrnn {got_type} {got_msg!r}"
    )
    assert got_msg, f"{case}: empty error message"


@pytest.mark.parametrize(
    "case",
    # torch's own wording for these comes from deep inside its kernels (a GEMM shape or dtype complaint, an
    # IndexError on hx[1]); fastrnn raises the same type with a message naming the argument instead.
    [
        c
        for c in CASES
        if not c.startswith(
            (
                "cell-dtype",
                "dtype",
                "lstm-hx-not-tuple",
                "cell-unbatched-hx-batched",
                "packed-wrong-feature",
                "hx-int-dtype",
                "lstm-hx-stacked-tensor",
            )
        )
    ],
)
def test_same_message_as_torch(case):
    """Where torch's message comes from its Python layer or a shape check, fastrnn's is word for word."""
    want_type, want_msg = _outcome(CASES[case], nn)
    got_type, got_msg = _outcome(CASES[case], fastrnn)
    assert got_msg == want_msg


def test_dtype_mismatch_names_the_problem():
    with pytest.raises(ValueError, match="dtype"):
        fastrnn.GRU(4, 3)(r(5, 2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="dtype"):
        fastrnn.GRU(4, 3)(r(5, 2, 4), r(1, 2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="dtype"):
        fastrnn.LSTMCell(4, 3)(r(2, 4), (r(2, 3, dtype=torch.float64), r(2, 3)))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown fastrnn backend 'cuda'"):
        fastrnn.LSTM(4, 3, backend="cuda")
