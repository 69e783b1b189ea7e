"""torch.nn.RNN (every nonlinearity of fastrnn's cell table) against fastrnn's backends on the preset's shapes
(see conftest.py)."""

import fastrnn

BENCH_LAYER = fastrnn.RNN


def test_rnn(bench_rnn, case, backend):
    bench_rnn(case, backend)
