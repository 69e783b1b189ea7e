"""Layers x directions on top of the one-layer contract: PackedSequence / hx plumbing, the input projection
for all steps as one GEMM, inter-layer dropout. Plain torch with autograd; the recurrence itself is ops.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrnn import backends, ops
from fastrnn.backends import cpp
from fastrnn.backends.cpp import CELL_STEP_DTYPES as CPP_CELL_DTYPES
from fastrnn.backends.cpp import KERNEL_DTYPES as CPP_LAYER_DTYPES
from fastrnn.cells import Norm, Saved, spec

# (w_ih [G*H, I], w_hh [G*H, P], b_ih [G*H] | None, b_hh [G*H] | None, w_hr [P, H] | None)
# Cells whose pre-activations are gx + gh + b_hh with b_ih inside gx: the two biases can be added once ahead.
_SUMMED_BIASES = ("lstm", "rnn_tanh", "rnn_relu")
_HALF = (torch.bfloat16, torch.float16)
LayerWeights = tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]
# fastrnn.record's hook: record(layers, batch_sizes) with layers[layer * D + d] = (out [T,B,P], Saved), time-major,
# rows in the kernel's order (sorted by length for packed input, batch_sizes [T] as the kernel saw it)
Recorder = Callable[[list[tuple[Tensor, Saved]], "Tensor | None"], None]


def _check_state(name: str, state: Tensor, input: Tensor) -> None:
    if state.dtype != input.dtype:
        raise RuntimeError(f"{name} dtype {state.dtype} does not match input dtype {input.dtype}")
    if state.device != input.device:
        raise RuntimeError(f"{name} is on {state.device} but input is on {input.device}; expected both on one device")


def _autocast_dtype(cell: str, input: Tensor, layer: bool) -> torch.dtype | None:
    """The dtype to compute in under autocast (None when autocast is off): the dtype of torch.nn's output
    there. On CUDA every RNN runs in the autocast dtype. On CPU torch's LSTM layer, RNN layer and RNNCell
    come out in it, while GRU, GRUCell and LSTMCell return float32 (only their GEMMs are lowered, and the
    float32 state promotes the result): fastrnn runs those wholly in float32, the same dtype, closer to exact."""
    dev = input.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return None
    if dev == "cuda" or not spec(cell).autocast_fp32(layer):
        return torch.get_autocast_dtype(dev)
    return input.dtype


def _without_autocast(fn, dtype: torch.dtype, device_type: str, *args):
    """fn(*args) with every floating-point tensor among args (weights nested in lists and tuples too) cast to
    dtype and autocast off: how torch.nn runs a recurrence under autocast."""

    def cast(a):
        if isinstance(a, Tensor) and a.is_floating_point():
            return a.to(dtype)
        if isinstance(a, (list, tuple)):
            return type(a)(cast(v) for v in a)
        return a

    with torch.autocast(device_type, enabled=False):
        return fn(*(cast(a) for a in args))


def packed_index(batch_sizes: Tensor, T: int, B: int, device: torch.device) -> Tensor:
    """Flat positions t*B + b of the packed rows, in packed order (step by step, rows by rank)."""
    active = torch.arange(B)[None, :] < batch_sizes[:, None]  # [T, B]
    return active.reshape(-1).nonzero().squeeze(1).to(device)


def rnn(
    cell: str,
    input: Tensor,
    hx: Tensor,
    cx: Tensor | None,
    weights: list[LayerWeights],
    num_layers: int,
    bidirectional: bool,
    dropout: float,
    training: bool,
    batch_first: bool,
    batch_sizes: Tensor | None = None,
    backend: str | None = None,
    record: Recorder | None = None,
    norms: list[tuple[Tensor, ...]] | None = None,
    zoneout: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """torch's _VF.lstm / gru / rnn_* on the fastrnn contract.

    input: [T, B, I] ([B, T, I] if batch_first) or packed data [N, I] with batch_sizes [T] (int64, CPU)
    hx [L*D, B, P], cx [L*D, B, H] (lstm)  ->  output like input with P*D features, h_n, c_n (lstm)
    record: fastrnn.record's hook, handed every layer and direction's out and saved tensors
    norms, zoneout: normalised cells only: per layer and direction the parameters of Cell.norm_param_names,
    and the zoneout rate
    """
    if batch_sizes is not None or weights[0][4] is not None or torch.compiler.is_compiling():
        # auto's shape rules measured neither packed input nor proj_size; under torch.compile the sizes may be
        # symbolic, and torch's kernels do not trace: the shape-blind choice
        name = backends.select(cell, input.dtype, input.device, backend)
    else:
        B, H = input.shape[0 if batch_first else 1], weights[0][1].shape[1]
        name = backends.select(cell, input.dtype, input.device, backend, B, H, _records(input, hx, cx, weights))
    if name == "torch":  # torch.nn's own kernels, called as torch.nn calls them (autocast included)
        redraw = record is not None and dropout > 0 and training and num_layers > 1
        rng = _rng_state(input.device) if redraw else None
        result = backends.get(name).rnn(
            spec(cell), input, hx, cx, weights, num_layers, bidirectional, dropout, training, batch_first, batch_sizes
        )
        if record is not None:
            args = (cell, input, hx, cx, weights, num_layers, bidirectional, dropout, training, batch_first)
            again = _rerun_backend(cell, input)
            _record_by_rerun(lambda rec: rnn(*args, batch_sizes, again, rec), record, result[0], rng)
        return result
    dt = _autocast_dtype(cell, input, True)
    if dt is not None:  # run as torch.nn does under autocast: every operand in one dtype, autocast off inside
        args = (input, hx, cx, weights, num_layers, bidirectional, dropout, training, batch_first, batch_sizes)
        return _without_autocast(rnn, dt, input.device.type, cell, *args, backend, record)
    _check_state("hx", hx, input)
    if cx is not None:
        _check_state("cx", cx, input)
    D = 2 if bidirectional else 1
    if (
        name == "cpp" and record is None and batch_sizes is None and norms is None and weights[0][4] is None
        and input.shape[1 if batch_first else 0] == 1 and input.dtype in CPP_CELL_DTYPES
        and (dropout == 0 or not training or num_layers == 1) and not torch.compiler.is_compiling()
    ):  # fmt: skip
        return _one_step(cell, input, hx, cx, weights, num_layers, D, batch_first)
    if batch_sizes is not None:
        T, B = batch_sizes.numel(), int(batch_sizes[0])
        idx = packed_index(batch_sizes, T, B, input.device)
        x = input.new_zeros(T * B, input.shape[1]).index_copy(0, idx, input).view(T, B, -1)
    else:
        x = input.transpose(0, 1) if batch_first else input
    h_n, c_n = [], []
    recorded: list[tuple[Tensor, Saved]] = []
    # an unrecorded cpp call of plain, unpacked layers: the extension makes each layer's input projection as its walk
    # goes (cpp.layer_forward), without F.linear or the op layer
    chunked = (
        name == "cpp" and record is None and batch_sizes is None and norms is None and weights[0][4] is None
        and input.dtype in CPP_LAYER_DTYPES and not _records(input, hx, cx, weights)
        and not torch.compiler.is_compiling()
    )  # fmt: skip
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
            norm = None
            if chunked:
                c0 = None if cx is None else cx[k]
                out, h, c = backends.get(name).layer_forward(spec(cell), x, w_ih, b_ih, hx[k], c0, w_hh, b_hh, d == 1)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
                continue
            if norms is not None:  # normalised cell: gx = ln_ih ⊙ N(x W_ih^T) + b_ih, b_hh goes into Norm
                gx, norm = _norm_inputs(cell, x, w_ih, b_ih, b_hh, norms[k], zoneout, training)
                b_hh = None
            elif b_ih is not None and cell in _SUMMED_BIASES and x.dtype in _HALF:
                # [T, B, G*H]: every step's input projection as one GEMM. Its gates only ever add gx and gh, so b_ih
                # joins b_hh in the step's bias instead: a half-precision addmm first copies b_ih into all T*B rows
                # of its output, 20-25% of the projection (bfloat16 [2048, 256] x [256, 1024]: 0.45 -> 0.35 ms;
                # bfloat16 LSTM inference, T=32 B {16, 64} H {256, 512}: 0.95x -> 1.00x torch.nn). Autograd hands
                # both biases d b. In float32 the copy is 3-5% of the projection and the fold measured no gain.
                gx, b_hh = F.linear(x, w_ih), b_hh + b_ih
            elif name == "cpp" and cpp.own_projection(x):
                gx = cpp.linear(x, w_ih, b_ih)
            else:
                gx = F.linear(x, w_ih, b_ih)  # GRU: b_in stays outside r * (h W_hn^T + b_hn)
            out, h, c, *saved = ops.recurrence(
                name, cell, gx, hx[k], None if cx is None else cx[k], w_hh, b_hh, w_hr, batch_sizes, d == 1,
                save=record is not None, norm=norm,
            )  # fmt: skip
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
            if record is not None:
                recorded.append((out, saved[0]))
        x = outs[0] if D == 1 else torch.cat(outs, 2)
        if dropout > 0 and training and layer < num_layers - 1:
            if batch_sizes is None:
                x = F.dropout(x, dropout, True)
            else:  # as torch.nn: the packed rows are dropped out (so the masks drawn are torch's), not the padding
                rows = F.dropout(x.reshape(T * B, -1).index_select(0, idx), dropout, True)
                x = x.new_zeros(T * B, x.shape[2]).index_copy(0, idx, rows).view(T, B, -1)
    if record is not None:
        record(recorded, batch_sizes)
    if batch_sizes is not None:
        output = x.reshape(T * B, -1).index_select(0, idx)
    else:
        output = x.transpose(0, 1) if batch_first else x
    stack = (lambda xs: xs[0].unsqueeze(0)) if len(h_n) == 1 else torch.stack  # one layer: a view, no copy
    return output, stack(h_n), (stack(c_n) if spec(cell).has_cell_state else None)


def _one_step(cell, input, hx, cx, weights, num_layers, D, batch_first):
    """A layer call of one step (T = 1: streaming, one call per step carrying the state) on the cpp backend's
    one-call Cell step, layer by layer: a single step is the same in both directions, so each direction is that step
    from its own initial state. It spares a call the op layer's per-call work (F.linear, the op layer, a Python
    autograd.Function), which at B = 1 costs more than the step."""
    step = backends.get("cpp").cell_step
    c = spec(cell)
    x = input[:, 0] if batch_first else input[0]  # [B, I]
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            w_ih, w_hh, b_ih, b_hh, _ = weights[k]
            h, cc = step(c, x, hx[k], None if cx is None else cx[k], w_ih, w_hh, b_ih, b_hh)
            outs.append(h)
            h_n.append(h)
            c_n.append(cc)
        x = outs[0] if D == 1 else torch.cat(outs, 1)
    output = x.unsqueeze(1) if batch_first else x.unsqueeze(0)
    stack = (lambda xs: xs[0].unsqueeze(0)) if len(h_n) == 1 else torch.stack  # one layer: a view, no copy
    return output, stack(h_n), (stack(c_n) if c.has_cell_state else None)


def _norm_inputs(cell, x, w_ih, b_ih, b_hh, norm, zoneout, training):
    """A normalised cell's gx [T, B, G*H] and cells.Norm: the input projection normalised, b_ih added after it;
    ln_hh, b_hh (zeros without bias) and ln_c packed into Norm.params; zoneout's mask (training) or keep (eval)."""
    GH = w_ih.shape[0]
    H = GH // spec(cell).G
    gx = F.layer_norm(F.linear(x, w_ih), (GH,), norm[0], b_ih, 1e-5)
    params = torch.cat([norm[1], b_hh if b_hh is not None else norm[1].new_zeros(GH), *norm[2:]])
    if training and zoneout > 0:
        mask = torch.bernoulli(x.new_full((x.shape[0], x.shape[1], H), 1 - zoneout))
        return gx, Norm(params, mask, 1.0)
    return gx, Norm(params, None, 1.0 - zoneout)


def cell_step(
    cell: str,
    input: Tensor,
    hx: Tensor,
    cx: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    backend: str | None = None,
    record: Recorder | None = None,
) -> tuple[Tensor, Tensor | None]:
    """torch's _VF.*_cell: one step for input [B, I], hx [B, H] (cx [B, H]) -> h' (and c').
    record: fastrnn.record's hook, handed the step as a layer of T = 1."""
    # Auto's Cell-step rules are bfloat16's (cpp's float32 step beats torch's cells on the Cell grids), so only a
    # bfloat16 step pays for working out its class (batch, hidden size, whether autograd records).
    if input.dtype is torch.bfloat16 and input.dim() == 2 and w_hh.dim() == 2:
        grad = _records(input, hx, cx, ((w_ih, w_hh, b_ih, b_hh),))
        name = backends.select(cell, input.dtype, input.device, backend, input.shape[0], w_hh.shape[1], grad, True)
    else:
        name = backends.select(cell, input.dtype, input.device, backend)
    if name == "cpp" and record is None and input.dtype in CPP_CELL_DTYPES and not torch.is_autocast_enabled("cpu"):
        if not torch.compiler.is_compiling():  # (torch.compile traces the op layer below instead)
            # the extension runs _check_cell_args's checks itself, with its messages, before it touches memory
            return backends.get(name).cell_step(spec(cell), input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    if name == "torch":
        result = backends.get(name).cell(spec(cell), input, hx, cx, w_ih, w_hh, b_ih, b_hh)
        if record is not None:
            args = (cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh)
            again = _rerun_backend(cell, input)
            _record_by_rerun(lambda rec: cell_step(*args, again, rec), record, result[0], None)
        return result
    dt = _autocast_dtype(cell, input, False)
    if dt is not None:
        return _without_autocast(
            cell_step, dt, input.device.type, cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, backend, record
        )
    _check_cell_args(input, hx, cx, w_ih, w_hh)
    gx = F.linear(input, w_ih, b_ih).unsqueeze(0)  # [1, B, G*H]
    out, h, c, *saved = ops.recurrence(name, cell, gx, hx, cx, w_hh, b_hh, None, None, False, save=record is not None)
    if record is not None:
        record([(out, saved[0])], None)
    return h, c


def _check_cell_args(input: Tensor, hx: Tensor, cx: Tensor | None, w_ih: Tensor, w_hh: Tensor) -> None:
    """What torch's _VF.*_cell checks of a step's sizes, dtypes and devices, with its messages (the cpp one-call
    step checks the same in C++: csrc/cell_step.cpp check_torch_cell_args)."""
    H = w_hh.shape[1]
    if input.shape[1] != w_ih.shape[1]:
        raise RuntimeError(f"input has inconsistent input_size: got {input.shape[1]} expected {w_ih.shape[1]}")
    for i, s in enumerate((hx, cx)):
        if s is None:
            continue
        if s.shape[0] != input.shape[0]:
            raise RuntimeError(f"Input batch size {input.shape[0]} doesn't match hidden{i} batch size {s.shape[0]}")
        if s.shape[1] != H:
            raise RuntimeError(f"hidden{i} has inconsistent hidden_size: got {s.shape[1]}, expected {H}")
        _check_state(f"hidden{i}", s, input)


def _records(input: Tensor, hx: Tensor, cx: Tensor | None, weights) -> bool:
    """Will autograd record this call (grad mode on and an operand that requires grad)? Auto's rules tell
    inference from training by it."""
    if not torch.is_grad_enabled():
        return False
    if input.requires_grad or hx.requires_grad or (cx is not None and cx.requires_grad):
        return True
    return any(w is not None and w.requires_grad for ws in weights for w in ws)


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _rerun_backend(cell: str, input: Tensor) -> str:
    """The kernel backend that reruns a call of the torch backend for fastrnn.record: the automatic choice (a fused
    kernel where one runs here), else the reference backend."""
    try:
        name = backends.select(cell, input.dtype, input.device)
    except backends.BackendUnavailableError:
        return "reference"
    return name if name in backends.KERNEL_BACKENDS else "reference"


def _record_by_rerun(rerun: Callable[[Recorder], tuple], record: Recorder, output: Tensor, rng: Tensor | None) -> None:
    """Record a call that torch's kernels ran (they expose no gates) by running it again on a kernel backend,
    without autograd and leaving the random generator as torch's call left it. With inter-layer
    dropout (`rng`: the generator's state before torch's call) the rerun draws its masks from that state, and
    is recorded only if it reproduces torch's output: torch's CPU kernels draw the same masks as fastrnn (on the
    packed rows for packed input, as fastrnn does), while cuDNN draws from its own state."""
    got: list = []
    device = output.device
    with torch.no_grad(), torch.random.fork_rng([device] if device.type == "cuda" else [], enabled=rng is not None):
        if rng is not None and device.type == "cuda":
            torch.cuda.set_rng_state(rng, device)
        elif rng is not None:
            torch.set_rng_state(rng)
        again = rerun(lambda layers, batch_sizes: got.append((layers, batch_sizes)))[0]
    if rng is not None and (again.float() - output.float()).norm() > 1e-2 * output.float().norm():
        raise RuntimeError(
            "fastrnn.record: torch.nn's kernels drew dropout masks between layers that cannot be reproduced here "
            "(cuDNN), so the states of the layers above the first are unknown; record with a "
            "kernel backend (backend='cpp', 'triton', 'numba' or 'reference'), with dropout=0, or in eval mode"
        )
    record(*got[0])
