"""fastrnn: fused LSTM/GRU/RNN kernels behind drop-in torch.nn modules."""

from fastrnn.backends import BackendUnavailableError, available_backends, use_backend
from fastrnn.modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, convert

__version__ = "0.1.0"

__all__ = [
    "LSTM",
    "GRU",
    "RNN",
    "LSTMCell",
    "GRUCell",
    "RNNCell",
    "convert",
    "available_backends",
    "use_backend",
    "BackendUnavailableError",
    "__version__",
]
