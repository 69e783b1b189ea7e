"""Drop-in replacements for torch.nn.LSTM, GRU, RNN and the three Cell classes, and convert().

Each class subclasses its torch.nn twin, so the constructor, argument checks, parameter names, shapes,
registration order, initialisation (and so RNG consumption), state_dict, extra_repr, flatten_parameters,
pickling and `isinstance(m, torch.nn.LSTM)` are torch's own. Only forward changes: it keeps torch.nn's
input handling and errors and runs the recurrence through fastrnn's backends.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from fastrnn import _dynamo, backends, functional
from fastrnn import inspect as _inspect
from fastrnn.cells import MODE_TO_CELL, cell_for, spec


def _check_backend_arg(backend: str | None) -> str | None:
    if backend is not None and backend not in backends.BACKENDS:
        raise ValueError(f"unknown fastrnn backend {backend!r}; expected one of {', '.join(backends.BACKENDS)} or None")
    return backend


class _FastMixin:
    """What the six classes share: the `backend` attribute, its repr, and conversion from torch.nn."""

    backend: str | None
    _torch_class: type[nn.Module]

    def __init__(self, *args, backend: str | None = None, **kwargs):
        # torch.nn's constructor, arguments and checks, plus fastrnn's one keyword
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.backend = _check_backend_arg(backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()  # type: ignore[misc]
        return s if self.backend is None else f"{s}, backend={self.backend!r}"

    def __setstate__(self, d):
        super().__setstate__(d)  # type: ignore[misc]
        self.__dict__.setdefault("backend", None)

    @classmethod
    def from_torch(cls, module: nn.Module, backend: str | None = None):
        """A fastrnn module sharing `module`'s parameters (same objects: optimizers keep working), buffers,
        hooks, device, dtype and train/eval mode."""
        if not isinstance(module, cls._torch_class):
            raise TypeError(
                f"{cls.__name__}.from_torch expects a {cls._torch_class.__name__}, got {type(module).__name__}"
            )
        new = _rebind(cls, module)
        new.backend = _check_backend_arg(backend)
        return new

    def to_torch(self) -> nn.Module:
        """The torch.nn module this one stands in for, sharing its parameters (the same objects)."""
        new = _rebind(self._torch_class, self)
        new.__dict__.pop("backend", None)
        return new

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script asks every submodule for this first: scripting compiles torch.nn's own module
        # (same parameters), so a scripted model is exactly torch.nn's and needs no fastrnn to run.
        return self.to_torch()


def _rebind(cls: type, module: nn.Module) -> nn.Module:
    """A `cls` instance holding `module`'s state: its own dicts of the same parameters, buffers, hooks."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        new.__dict__[key] = dict(module.__dict__[key])
    if hasattr(new, "_init_flat_weights"):
        new._init_flat_weights()
    return new


class _RNNBaseMixin(_FastMixin):
    """torch.nn.RNNBase.forward (LSTM, GRU and RNN variants), ending in fastrnn.functional.rnn."""

    def _layer_weights(self) -> list[functional.LayerWeights]:
        out = []
        D = 2 if self.bidirectional else 1
        if hasattr(self, "_update_flat_weights"):
            # _flat_weights_names lists each layer and direction's weights in the order w_ih, w_hh, [b_ih, b_hh],
            # [w_hr]; they are read from _parameters as they are now (assignment, functional_call, .to() replace
            # them there), without torch's _update_flat_weights, whose getattr per weight costs about 4 us a call.
            p = self._parameters
            ws, bias, proj = [p[n] for n in self._flat_weights_names], self.bias, self.proj_size > 0
            n = 2 + 2 * bias + proj
            for k in range(self.num_layers * D):
                g = ws[k * n : (k + 1) * n]
                out.append((g[0], g[1], g[2] if bias else None, g[3] if bias else None, g[-1] if proj else None))
            return out
        for layer in range(self.num_layers):
            for d in range(D):
                sfx = f"_l{layer}{'_reverse' if d else ''}"
                g = lambda n: getattr(self, n + sfx, None)  # noqa: E731 - local shorthand
                out.append((g("weight_ih"), g("weight_hh"), g("bias_ih"), g("bias_hh"), g("weight_hr")))
        return out

    _cell: str | None = None  # the normalised layers' cell (the others run their mode's)

    def forward(self, input, hx=None):
        cell = self._cell or MODE_TO_CELL[self.mode]
        lstm = spec(cell).has_cell_state  # hx is an (h, c) pair
        D = 2 if self.bidirectional else 1
        P = self.proj_size if self.proj_size > 0 else self.hidden_size
        orig_input = input
        is_batched = True
        batch_dim = 0 if self.batch_first else 1
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                kind = self._torch_class.__name__
                tail = " tensor instead" if self._torch_class is nn.RNN else " instead"
                raise ValueError(f"{kind}: Expected input to be 2D or 3D, got {input.dim()}D{tail}")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if hx is not None:
                if lstm:
                    want = 3 if is_batched else 2
                    if hx[0].dim() != want or hx[1].dim() != want:
                        raise RuntimeError(
                            f"For {'batched 3-D' if is_batched else 'unbatched 2-D'} input, hx and cx should "
                            f"also be {want}-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                        )
                    if not is_batched:
                        hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
                else:
                    if not is_batched and hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor"
                        )
                    if is_batched and hx.dim() != 3:
                        raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
                    if not is_batched:
                        hx = hx.unsqueeze(1)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
        if hx is None:
            z = dict(dtype=input.dtype, device=input.device)
            h0 = torch.zeros(self.num_layers * D, max_batch_size, P, **z)
            hx = (h0, torch.zeros(self.num_layers * D, max_batch_size, self.hidden_size, **z)) if lstm else h0
        self.check_forward_args(input, hx, batch_sizes)
        if lstm:  # torch's _VF.lstm rejects these after the shape checks
            if isinstance(hx, Tensor):
                raise TypeError("lstm(): argument 'hx' must be tuple of Tensors, not Tensor")
            if len(hx) != 2:
                raise RuntimeError("lstm expects two hidden states")
        if batch_sizes is None and input.size(0 if not self.batch_first else 1) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        h0, c0 = hx if lstm else (hx, None)
        record = _inspect.recorder(self, cell, D, unsorted_indices) if _inspect.RECORDING else None
        output, h_n, c_n = functional.rnn(
            cell,
            input,
            h0,
            c0,
            self._layer_weights(),
            self.num_layers,
            self.bidirectional,
            float(self.dropout),
            self.training,
            self.batch_first,
            batch_sizes,
            self.backend,
            record,
            *(self._norm_args() if self._cell is not None else ()),
        )
        hidden = (h_n, c_n) if lstm else h_n
        if isinstance(orig_input, PackedSequence):
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), self.permute_hidden(
                hidden, unsorted_indices
            )
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1)) if lstm else hidden.squeeze(1)
        return output, self.permute_hidden(hidden, unsorted_indices)


class LSTM(_RNNBaseMixin, nn.LSTM):
    __doc__ = "fastrnn's drop-in torch.nn.LSTM (extra keyword: backend=None for automatic choice).\n\n" + (
        nn.LSTM.__doc__ or ""
    )
    _torch_class = nn.LSTM


class GRU(_RNNBaseMixin, nn.GRU):
    __doc__ = "fastrnn's drop-in torch.nn.GRU (extra keyword: backend=None for automatic choice).\n\n" + (
        nn.GRU.__doc__ or ""
    )
    _torch_class = nn.GRU


class RNN(_RNNBaseMixin, nn.RNN):
    __doc__ = "fastrnn's drop-in torch.nn.RNN (extra keyword: backend=None for automatic choice).\n\n" + (
        nn.RNN.__doc__ or ""
    )
    _torch_class = nn.RNN


class _LayerNormMixin(_RNNBaseMixin):
    """Layer-normalised LSTM/GRU with zoneout (cells.py, "Normalised cells"): torch.nn.LSTM's or GRU's arguments,
    checks, parameters, initialisation and forward, plus ln_* parameters per layer and direction and `zoneout`."""

    _cell: str

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, zoneout=0.0, device=None, dtype=None, backend=None):  # fmt: skip
        if isinstance(zoneout, bool) or not isinstance(zoneout, (int, float)) or not 0 <= zoneout <= 1:
            raise ValueError(f"zoneout should be a number in range [0, 1] representing the probability of a unit "
                             f"keeping its previous state, got {zoneout!r}")  # fmt: skip
        c = spec(self._cell)
        nn.RNNBase.__init__(self, c.torch_base, input_size, hidden_size, num_layers, bias, batch_first,
                            float(dropout), bidirectional, device=device, dtype=dtype)  # fmt: skip
        self.backend = _check_backend_arg(backend)
        self.zoneout = float(zoneout)
        G, H, z = c.G, hidden_size, dict(device=device, dtype=dtype)
        for layer in range(num_layers):
            for d in range(2 if bidirectional else 1):
                sfx = f"_l{layer}{'_reverse' if d else ''}"
                for name in c.norm_param_names():
                    n = H if name.startswith("ln_c") else G * H
                    self.register_parameter(name + sfx, nn.Parameter(torch.empty(n, **z)))
        self._reset_norm()

    def _reset_norm(self) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("ln_"):
                    p.fill_(0.0 if name.startswith("ln_c_bias") else 1.0)

    def reset_parameters(self) -> None:
        nn.RNNBase.reset_parameters(self)  # torch.nn's init for the weights and biases (its RNG draws too)
        self._reset_norm()

    def _norm_args(self) -> tuple[list[tuple[Tensor, ...]], float]:
        """functional.rnn's norms and zoneout."""
        names = spec(self._cell).norm_param_names()
        D = 2 if self.bidirectional else 1
        sfx = [f"_l{k // D}{'_reverse' if k % D else ''}" for k in range(self.num_layers * D)]
        return [tuple(getattr(self, n + s) for n in names) for s in sfx], self.zoneout

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", zoneout={self.zoneout}" if self.zoneout else "")

    def __setstate__(self, d):
        super().__setstate__(d)
        self.__dict__.setdefault("zoneout", 0.0)

    @classmethod
    def from_torch(cls, module, backend=None):
        raise TypeError(f"{cls.__name__} has no torch.nn counterpart to convert from")

    def to_torch(self):
        raise TypeError(f"{type(self).__name__} has no torch.nn counterpart (torch.nn has no layer-normalised cells)")

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} cannot be scripted (torch.nn has no layer-normalised cell to script instead); "
            "use torch.export or torch.jit.trace"
        )


class LayerNormLSTM(_LayerNormMixin, nn.RNNBase):
    """Layer-normalised LSTM (Ba et al. 2016) with zoneout on h: nn.LSTM's arguments (no proj_size) plus
    zoneout=0.0 and backend=None. Per layer and direction, besides nn.LSTM's parameters: ln_ih_weight,
    ln_hh_weight [4H] (init 1), ln_c_weight [H] (1), ln_c_bias [H] (0). Maths: fastrnn/cells.py."""

    _cell = "ln_lstm"
    _torch_class = nn.LSTM  # whose argument checks and hx layout it shares
    check_forward_args = nn.LSTM.check_forward_args
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    permute_hidden = nn.LSTM.permute_hidden


class LayerNormGRU(_LayerNormMixin, nn.RNNBase):
    """Layer-normalised GRU with zoneout on h: nn.GRU's arguments plus zoneout=0.0 and backend=None. Per layer
    and direction, besides nn.GRU's parameters: ln_ih_weight, ln_hh_weight [3H] (init 1). Maths: fastrnn/cells.py."""

    _cell = "ln_gru"
    _torch_class = nn.GRU


class _CellMixin(_FastMixin):
    """torch.nn.*Cell.forward input handling, ending in fastrnn.functional.cell_step. A Cell runs once per step, so
    its forward is written for the per-call cost: parameters read from _parameters (not nn.Module.__getattr__), the
    cell's name a class attribute, the messages built only when a check fails."""

    _cell_name: str  # the cell table's name (RNNCell: from its nonlinearity, see _cell)
    _lstm = False  # hx is an (h, c) pair

    def _cell(self) -> str:
        return self._cell_name

    def forward(self, input: Tensor, hx=None):
        cell = self._cell()
        lstm = self._lstm
        if input.dim() not in (1, 2):
            raise ValueError(f"{self._torch_class.__name__}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for i, v in enumerate(hx if lstm else (hx,)):
                if v.dim() not in (1, 2):
                    what = f"hx[{i}]" if lstm else "hidden"
                    raise ValueError(
                        f"{self._torch_class.__name__}: Expected {what} to be 1D or 2D, got {v.dim()}D instead"
                    )
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            h0, c0 = (zeros, zeros) if lstm else (zeros, None)
        else:
            if lstm:  # what torch's _VF.lstm_cell says
                if isinstance(hx, Tensor):
                    raise TypeError("lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, not Tensor")
                if len(hx) != 2:
                    raise RuntimeError("lstm_cell expects two hidden states")
                h0, c0 = hx
            else:
                h0, c0 = hx, None
            if not is_batched:
                h0 = h0.unsqueeze(0)
                c0 = None if c0 is None else c0.unsqueeze(0)
        record = _inspect.recorder(self, cell, step=True) if _inspect.RECORDING else None
        p = self._parameters
        h, c = functional.cell_step(
            cell, input, h0, c0, p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"], self.backend, record
        )
        if not is_batched:
            h = h.squeeze(0)
            c = None if c is None else c.squeeze(0)
        return (h, c) if lstm else h


class LSTMCell(_CellMixin, nn.LSTMCell):
    __doc__ = "fastrnn's drop-in torch.nn.LSTMCell (extra keyword: backend=None).\n\n" + (nn.LSTMCell.__doc__ or "")
    _torch_class = nn.LSTMCell
    _cell_name = cell_for("LSTMCell").name
    _lstm = cell_for("LSTMCell").has_cell_state


class GRUCell(_CellMixin, nn.GRUCell):
    __doc__ = "fastrnn's drop-in torch.nn.GRUCell (extra keyword: backend=None).\n\n" + (nn.GRUCell.__doc__ or "")
    _torch_class = nn.GRUCell
    _cell_name = cell_for("GRUCell").name


class RNNCell(_CellMixin, nn.RNNCell):
    __doc__ = "fastrnn's drop-in torch.nn.RNNCell (extra keyword: backend=None).\n\n" + (nn.RNNCell.__doc__ or "")
    _torch_class = nn.RNNCell

    def _cell(self) -> str:
        nl = self.nonlinearity  # (an attribute a user may change after construction)
        if nl == "tanh":
            return self._tanh
        if nl == "relu":
            return self._relu
        raise RuntimeError(f"Unknown nonlinearity: {nl}")

    _tanh, _relu = cell_for("RNNCell", "tanh").name, cell_for("RNNCell", "relu").name


# torch.nn class -> fastrnn class, for convert(); exact types only, so user subclasses with their own
# forward are left alone.
_CONVERT = {c._torch_class: c for c in (LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell)}
FASTRNN_CLASSES = (*_CONVERT.values(), LayerNormLSTM, LayerNormGRU)


def convert(module: nn.Module, backend: str | None = None) -> nn.Module:
    """Replace every torch.nn RNN/LSTM/GRU and Cell inside `module` (and `module` itself) by fastrnn's,
    keeping the very same parameter objects, device, dtype and train/eval mode. Children are replaced in
    place; the (possibly new) top module is returned. fastrnn modules already there get `backend` set
    when one is given."""
    _check_backend_arg(backend)

    def swap(m: nn.Module) -> nn.Module:
        if isinstance(m, FASTRNN_CLASSES):
            if backend is not None:
                m.backend = backend
            return m
        cls = _CONVERT.get(type(m))
        return cls.from_torch(m, backend) if cls is not None else m

    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None:
                new = swap(child)
                if new is not child:
                    parent._modules[name] = new
    return swap(module)


# Registered with torch whenever this module is imported (by `import fastrnn`, or by an unpickler that finds a
# fastrnn class): a whole pickled model made of fastrnn layers loads with torch.load's default weights_only=True,
# as fastrnn's classes hold nothing but torch.nn state; and dynamo traces fastrnn's classes (not torch's own).
torch.serialization.add_safe_globals(list(FASTRNN_CLASSES))
_dynamo.install(FASTRNN_CLASSES)
