"""fastrnn: fused LSTM/GRU/RNN kernels behind drop-in torch.nn modules.

Importing fastrnn imports torch and the modules (and registers fastrnn's classes with torch: safe globals for
torch.load, dynamo's module rule; see modules.py). With FASTRNN_LAZY_IMPORT=1 (what `fastrnn-bench`'s verbs that
only read results files set) nothing is imported until a name is first used, so those verbs never load torch.
"""

import importlib
import os

__version__ = "0.1.0"

_EXPORTS = {
    "LSTM": "fastrnn.modules",
    "GRU": "fastrnn.modules",
    "RNN": "fastrnn.modules",
    "LSTMCell": "fastrnn.modules",
    "GRUCell": "fastrnn.modules",
    "RNNCell": "fastrnn.modules",
    "LayerNormLSTM": "fastrnn.modules",
    "LayerNormGRU": "fastrnn.modules",
    "convert": "fastrnn.modules",
    "record": "fastrnn.inspect",
    "States": "fastrnn.inspect",
    "available_backends": "fastrnn.backends",
    "use_backend": "fastrnn.backends",
    "BackendUnavailableError": "fastrnn.backends",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastrnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if os.environ.get("FASTRNN_LAZY_IMPORT") != "1":
    from fastrnn.backends import BackendUnavailableError, available_backends, use_backend  # noqa: F401
    from fastrnn.inspect import States, record  # noqa: F401
    from fastrnn.modules import (  # noqa: F401
        GRU,
        LSTM,
        RNN,
        GRUCell,
        LayerNormGRU,
        LayerNormLSTM,
        LSTMCell,
        RNNCell,
        convert,
    )
