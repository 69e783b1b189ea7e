"""torch.nn.GRU against fastrnn's backends on the preset's shapes (see conftest.py)."""

import fastrnn

BENCH_LAYER = fastrnn.GRU


def test_gru(bench_rnn, case, backend):
    bench_rnn(case, backend)
