"""Let torch.compile trace fastrnn's layers although they subclass torch.nn.RNN / GRU / LSTM.

Dynamo refuses to trace any instance of torch.nn.RNN, GRU or LSTM unless `torch._dynamo.config.allow_rnn`
is set, because torch's own RNN kernels do not trace. fastrnn's layers are such instances (so that
`isinstance(m, nn.LSTM)` keeps working) but run through traceable custom ops. Setting allow_rnn globally
would make torch.compile fail on torch's own LSTMs elsewhere in the program, so instead the module-wrapping
step of dynamo is given allow_rnn=True for fastrnn instances only. dynamo is imported lazily by torch
(about two seconds), so the rule is installed when dynamo's builder module is first imported, not before.
If a future torch moves that hook, compiling still works, with a graph break at each fastrnn layer.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_TARGET = "torch._dynamo.variables.builder"


def _patch(builder, classes: tuple[type, ...]) -> None:
    cls = getattr(builder, "VariableBuilder", None)
    orig = getattr(cls, "wrap_module", None)
    if orig is None or getattr(orig, "_fastrnn", False):
        return
    from torch._dynamo import config

    def wrap_module(self, value):
        if isinstance(value, classes):
            with config.patch(allow_rnn=True):
                return orig(self, value)
        return orig(self, value)

    wrap_module._fastrnn = True  # type: ignore[attr-defined]
    cls.wrap_module = wrap_module


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds dynamo's builder module with the other finders and patches it right after it executes."""

    def __init__(self, classes: tuple[type, ...]):
        self.classes = classes
        self.spec = None

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return None
        self.inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _patch(module, self.classes)


def install(classes: tuple[type, ...]) -> None:
    if _TARGET in sys.modules:
        _patch(sys.modules[_TARGET], classes)
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(classes))
