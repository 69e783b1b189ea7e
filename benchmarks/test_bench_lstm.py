"""torch.nn.LSTM against fastrnn's backends on the preset's shapes (see conftest.py)."""

import fastrnn

BENCH_LAYER = fastrnn.LSTM


def test_lstm(bench_rnn, case, backend):
    bench_rnn(case, backend)
