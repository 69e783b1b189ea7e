"""torch.nn.RNN (tanh and relu) against fastrnn's backends on the preset's shapes (see conftest.py)."""

BENCH_CELLS = ("rnn_tanh", "rnn_relu")


def test_rnn(bench_rnn, case, backend):
    bench_rnn(case, backend)
