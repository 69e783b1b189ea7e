"""The op layer: the kernel contract as torch.library custom ops, the ONE place a backend is called.

    fastrnn::recurrence_fwd  (backend, cell, gx, h0, c0?, w_hh, b_hh?, w_hr?, norm?, zmask?, zkeep, batch_sizes?,
                              reverse, need_saved)
                             -> out [T,B,P], h_n [B,P], c_n [B,H] (empty unless lstm), gates, extra
    fastrnn::recurrence_bwd  (backend, cell, d_out, d_h_n, d_c_n?, h0, c0?, w_hh, b_hh?, w_hr?, norm?, zmask?, zkeep,
                              batch_sizes?, reverse, out, gates, extra) -> d_gx, d_h0, d_c0, d_w_hh, d_b_hh, d_w_hr,
                                                                          d_norm
norm, zmask, zkeep are cells.Norm (params, mask, keep): normalised cells only (cells.py, "Normalised cells").

Absent optional outputs are empty tensors (custom ops cannot return None). The backend name is an argument
so torch.compile sees one opaque, traceable op whatever runs under it; fake implementations give shapes from
the cell table. Eager double backward reruns the reference maths under autograd (`_differentiable_grads`);
under torch.compile a second derivative raises.

Eager calls take a torch.autograd.Function with the same forward, backward and saved state instead of the
dispatcher's custom-op path, which costs about 20 us a call: at small shapes that is a tenth of the whole
recurrence. Under torch.compile the custom op is what gets traced.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrnn import backends, cells
from fastrnn.backends.reference import norm_grads


def _c(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _opt(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _norm(norm: Tensor | None, zmask: Tensor | None, zkeep: float) -> cells.Norm | None:
    if norm is None:
        return None
    return cells.Norm(norm.contiguous(), _c(zmask), float(zkeep))


def _forward_impl(backend, cell, gx, h0, c0, w_hh, b_hh, w_hr, norm, zmask, zkeep, batch_sizes, reverse, need_saved):
    spec = cells.spec(cell)
    if gx.numel() == 0:  # no steps, rows or hidden units (torch.nn accepts each): nothing for a kernel to run
        backend = "reference"
    if spec.has_cell_state and c0 is None:
        c0 = gx.new_zeros(gx.shape[1], w_hh.shape[0] // spec.G)
    state0 = cells.State(h0.contiguous(), _c(c0))
    nm = None if norm is None else _norm(norm, zmask, zkeep)
    weights = cells.Weights(w_hh.contiguous(), _c(b_hh), _c(w_hr), nm)
    out, state_n, saved = backends.get(backend).forward(
        spec, gx.contiguous(), state0, weights, batch_sizes, reverse, need_saved
    )
    return out, state_n.h, _opt(state_n.c, gx), saved.gates, saved.extra


def _backward_impl(backend, cell, d_out, d_h_n, d_c_n, h0, c0, w_hh, b_hh, w_hr, norm, zmask, zkeep, batch_sizes,
                   reverse, out, gates, extra):  # fmt: skip
    spec = cells.spec(cell)
    if out.numel() == 0:
        backend = "reference"
    c0_given = c0 is not None
    if spec.has_cell_state:
        H = w_hh.shape[0] // spec.G
        c0 = out.new_zeros(out.shape[1], H) if c0 is None else c0.contiguous()
        d_c_n = out.new_zeros(out.shape[1], H) if d_c_n is None else d_c_n.contiguous()
    g = backends.get(backend).backward(
        spec, d_out.contiguous(), cells.State(d_h_n.contiguous(), d_c_n), cells.State(h0.contiguous(), c0),
        cells.Weights(w_hh.contiguous(), _c(b_hh), _c(w_hr), None if norm is None else _norm(norm, zmask, zkeep)),
        batch_sizes, reverse,
        out.contiguous(), cells.Saved(gates.contiguous(), extra.contiguous()),
    )  # fmt: skip
    d_c0 = g.d_state0.c if c0_given else None
    d_norm = None
    if norm is not None:  # the backend's own reduction where it has one (Grads.d_norm), else the reference's
        d_norm = (g.d_norm if g.d_norm is not None else norm_grads(spec, g.d_gx, g.d_extra, extra)).to(norm.dtype)
    return tuple(_opt(t, out) for t in (g.d_gx, g.d_state0.h, d_c0, *g.d_weights[:3], d_norm))


# The schemas spelled out once here (the impls are the plain functions above; Tensor? is an optional tensor).
_FWD_SCHEMA = (
    "(str backend, str cell, Tensor gx, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, "
    "Tensor? norm, Tensor? zmask, float zkeep, Tensor? batch_sizes, bool reverse, bool need_saved) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(str backend, str cell, Tensor d_out, Tensor d_h_n, Tensor? d_c_n, Tensor h0, Tensor? c0, Tensor w_hh, "
    "Tensor? b_hh, Tensor? w_hr, Tensor? norm, Tensor? zmask, float zkeep, Tensor? batch_sizes, bool reverse, "
    "Tensor out, Tensor gates, Tensor extra) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
recurrence_fwd = torch.library.custom_op("fastrnn::recurrence_fwd", _forward_impl, mutates_args=(), schema=_FWD_SCHEMA)
recurrence_bwd = torch.library.custom_op("fastrnn::recurrence_bwd", _backward_impl, mutates_args=(), schema=_BWD_SCHEMA)


@recurrence_fwd.register_fake
def _(backend, cell, gx, h0, c0, w_hh, b_hh, w_hr, norm, zmask, zkeep, batch_sizes, reverse, need_saved):
    spec = cells.spec(cell)
    T, B = gx.shape[0], gx.shape[1]
    H = w_hh.shape[0] // spec.G
    P = h0.shape[1]
    acc = cells.saved_dtype(gx.dtype)
    gs, es = spec.saved_shapes(T, B, H) if need_saved else ((0,), (0,))
    c_n = gx.new_empty(B, H) if spec.has_cell_state else gx.new_empty(0)
    return (gx.new_empty(T, B, P), gx.new_empty(B, P), c_n, gx.new_empty(gs, dtype=acc), gx.new_empty(es, dtype=acc))


@recurrence_bwd.register_fake
def _(backend, cell, d_out, d_h_n, d_c_n, h0, c0, w_hh, b_hh, w_hr, norm, zmask, zkeep, batch_sizes, reverse, out,
      gates, extra):  # fmt: skip
    spec = cells.spec(cell)
    T, B = out.shape[0], out.shape[1]
    e = out.new_empty(0)
    return (
        out.new_empty(T, B, w_hh.shape[0]),
        torch.empty_like(h0),
        torch.empty_like(c0) if c0 is not None and spec.has_cell_state else e.clone(),
        torch.empty_like(w_hh),
        torch.empty_like(b_hh) if b_hh is not None else e.clone(),
        torch.empty_like(w_hr) if w_hr is not None else e.clone(),
        torch.empty_like(norm) if norm is not None else e.clone(),
    )


def _setup_context(ctx, inputs, output, keep_gx=False):
    backend, cell, gx, h0, c0, w_hh, b_hh, w_hr, norm, zmask, zkeep, batch_sizes, reverse, need_saved = inputs
    out, _, _, gates, extra = output
    ctx.backend, ctx.cell, ctx.reverse, ctx.need_saved, ctx.zkeep = backend, cell, reverse, need_saved, zkeep
    ctx.save_for_backward(
        h0, c0, w_hh, b_hh, w_hr, norm, zmask, batch_sizes, out, gates, extra, gx if keep_gx else None
    )


def _grads(ctx, d_out, d_h_n, d_c_n, bwd):
    """Gradients of recurrence_fwd's inputs, in its argument order, by `bwd` (the custom op when traced)."""
    h0, c0, w_hh, b_hh, w_hr, norm, zmask, batch_sizes, out, gates, extra, _ = ctx.saved_tensors
    if not ctx.need_saved:
        raise RuntimeError(
            "fastrnn: backward through a recurrence that was run with need_saved=False "
            "(the forward ran without grad mode but its inputs require grad)"
        )
    d_c_n = d_c_n if cells.spec(ctx.cell).has_cell_state else None
    d_gx, d_h0, d_c0, d_w_hh, d_b_hh, d_w_hr, d_norm = bwd(
        ctx.backend, ctx.cell, d_out, d_h_n, d_c_n, h0, c0, w_hh, b_hh, w_hr, norm, zmask, ctx.zkeep, batch_sizes,
        ctx.reverse, out, gates, extra,
    )  # fmt: skip
    return (
        None,
        None,
        d_gx,
        d_h0,
        d_c0 if c0 is not None else None,
        d_w_hh,
        d_b_hh if b_hh is not None else None,
        d_w_hr if w_hr is not None else None,
        d_norm if norm is not None else None,
        None,
        None,
        None,
        None,
        None,
    )


def _backward(ctx, d_out, d_h_n, d_c_n, _d_gates, _d_extra):
    return _grads(ctx, d_out, d_h_n, d_c_n, recurrence_bwd)


recurrence_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerRecurrence(torch.autograd.Function):
    """recurrence_fwd and its autograd formula without the dispatcher (eager mode only)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output, keep_gx=True)  # gx: for double backward (see backward)
        ctx.mark_non_differentiable(output[3], output[4])
        # Unused outputs' gradients stay None instead of zeros: autograd would otherwise fill a zero tensor the
        # size of the saved gates and extra ([T, B, W*H]) every backward, about 8% of an LSTM training call at
        # B=64 H=64. backward makes the state cotangents it needs.
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, d_out, d_h_n, d_c_n, _d_gates, _d_extra):
        if d_out is None or d_h_n is None:
            h0, out = ctx.saved_tensors[0], ctx.saved_tensors[8]
            d_out = torch.zeros_like(out) if d_out is None else d_out
            d_h_n = torch.zeros_like(h0) if d_h_n is None else d_h_n
        if d_c_n is None and cells.spec(ctx.cell).has_cell_state:
            h0, w_hh = ctx.saved_tensors[0], ctx.saved_tensors[2]
            d_c_n = h0.new_zeros(h0.shape[0], w_hh.shape[0] // cells.spec(ctx.cell).G)
        if torch.is_grad_enabled():  # create_graph: the gradients must themselves be differentiable
            return _differentiable_grads(ctx, d_out, d_h_n, d_c_n)
        return _grads(ctx, d_out, d_h_n, d_c_n, _backward_impl)


def _differentiable_grads(ctx, d_out, d_h_n, d_c_n):
    """The gradients as a differentiable function of the inputs and cotangents, for double backward
    (gradient penalties, gradgradcheck): the reference maths rerun under autograd on the saved inputs and
    differentiated with create_graph. Slow, like every second derivative of a recurrence, but exact."""
    h0, c0, w_hh, b_hh, w_hr, norm, zmask, batch_sizes, _, _, _, gx = ctx.saved_tensors
    spec = cells.spec(ctx.cell)
    args = (gx, h0, c0, w_hh, b_hh, w_hr, norm)
    wrt = [i for i, t in enumerate(args) if t is not None and t.requires_grad]
    c0_ = c0 if c0 is not None or not spec.has_cell_state else gx.new_zeros(gx.shape[1], w_hh.shape[0] // spec.G)
    with torch.enable_grad():
        out, state_n, _ = backends.get("reference").forward(
            spec,
            gx,
            cells.State(h0, c0_),
            cells.Weights(w_hh, b_hh, w_hr, _norm(norm, zmask, ctx.zkeep)),
            batch_sizes,
            ctx.reverse,
            False,
        )
    outs, cots = [out, state_n.h], [d_out, d_h_n]
    if spec.has_cell_state:
        outs.append(state_n.c)
        cots.append(d_c_n)
    got = torch.autograd.grad(outs, [args[i] for i in wrt], cots, create_graph=True, allow_unused=True)
    grads: list[Tensor | None] = [None] * len(args)
    for i, g in zip(wrt, got):
        grads[i] = torch.zeros_like(args[i]) if g is None else g
    return (None, None, *grads, None, None, None, None, None)


def recurrence(backend, cell, gx, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse, save=False, norm=None):
    """One layer, one direction -> out, h_n, c_n (None without a cell state). Saves for backward only when
    autograd will need it; `save` (fastrnn.record) makes the kernel save in any case and appends the saved
    tensors, cells.Saved(gates, extra) in the cells.py layout, to what is returned. norm: a cells.Norm
    (normalised cells)."""
    if norm is None:
        params = zmask = None
        zkeep = 1.0
    else:
        params, zmask, zkeep = norm
    need = torch.is_grad_enabled() and (
        gx.requires_grad or h0.requires_grad or w_hh.requires_grad
        or any(t is not None and t.requires_grad for t in (c0, b_hh, w_hr, params))
    )  # fmt: skip
    args = (backend, cell, gx, h0, c0, w_hh, b_hh, w_hr, params, zmask, zkeep, batch_sizes, reverse, need or save)
    if torch.compiler.is_compiling():
        out, h_n, c_n, gates, extra = recurrence_fwd(*args)
    elif need:
        out, h_n, c_n, gates, extra = _EagerRecurrence.apply(*args)
    else:
        out, h_n, c_n, gates, extra = _forward_impl(*args)
    c_n = c_n if cells.spec(cell).has_cell_state else None
    return (out, h_n, c_n, cells.Saved(gates, extra)) if save else (out, h_n, c_n)
