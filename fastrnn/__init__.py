"""fastrnn: fused LSTM/GRU/RNN kernels behind drop-in torch.nn modules."""

import torch

from fastrnn import _dynamo
from fastrnn.backends import BackendUnavailableError, available_backends, use_backend
from fastrnn.inspect import States, record
from fastrnn.modules import FASTRNN_CLASSES, GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, convert

__version__ = "0.1.0"

# A whole pickled model made of fastrnn layers loads with torch.load's default weights_only=True, as
# fastrnn's classes hold nothing but torch.nn state.
torch.serialization.add_safe_globals(list(FASTRNN_CLASSES))
_dynamo.install(FASTRNN_CLASSES)

__all__ = [
    "LSTM",
    "GRU",
    "RNN",
    "LSTMCell",
    "GRUCell",
    "RNNCell",
    "convert",
    "record",
    "States",
    "available_backends",
    "use_backend",
    "BackendUnavailableError",
    "__version__",
]
