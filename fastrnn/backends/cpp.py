"""The cpp backend: the kernel contract on the compiled extension fastrnn._C (csrc/), whole time walk in C++.

One entry point pair serves every cell: `recurrence_forward` / `recurrence_backward` take the cell's kernel_id
(cells.py), the C++ kernel table does the rest.

Every tensor argument is contiguous and of one dtype and device (ops.py sees to that); the C++ entry points check
shapes, dtypes, devices and contiguity again before touching memory. Outputs are allocated in C++.

The kernels are float64, float32 and bfloat16. bfloat16 keeps torch's bf16 recipe: its step GEMMs take bfloat16
operands (h_{t-1} rounded to bfloat16, as torch's own bf16 RNNs feed it) with float32 accumulation, on AMX or
AVX512-BF16 where the CPU has them; the state (c, the running h of the pointwise pass, the running gradients) and the
saved activations are float32 (cells.saved_dtype); gx, out, the states and the gradients are bfloat16. float16 runs
the float32 kernels on inputs widened once per call and rounds the results back (the reference's recipe).

The normalised cells (ln_lstm, ln_gru: cells.Norm travels as norm, zmask, zkeep) have float64 and float32 kernels only:
their layer norms reduce over whole rows, which the bfloat16 kernels' per-unit-block tasks never see, so bfloat16
runs them as float16 does, on the float32 kernels with widened inputs (float32 GEMMs, whatever
FASTRNN_CPP_FP32_BF16_GEMM says).

FASTRNN_CPP_FP32_BF16_GEMM=1 (read at every call, off by default) lets float32 calls run their step GEMMs on
bfloat16 operands as well, as torch's oneDNN float32 matmul precision "bf16" does: tensors, state and weight
gradients stay float32, each step's h_{t-1} (and d_gates in backward) and W_hh are rounded to bfloat16.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrnn.backends import getenv, optional_import
from fastrnn.cells import Cell, Grads, Norm, Saved, State, Weights

NAME = "cpp"
KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
WIDENED_DTYPES = (torch.float16,)  # computed by the float32 kernels
FP32_BF16_GEMM_ENV = "FASTRNN_CPP_FP32_BF16_GEMM"
CELL_STEP_DTYPES = (torch.float32, torch.float64, torch.bfloat16)  # what cell_step runs (float16: the op layer)

_NOT_BUILT = "the C++ extension fastrnn._C is not built: run `pip install --no-build-isolation -e .` in the source tree"


_module = None


def _ext():
    global _module
    if _module is None:
        _module, _ = optional_import("fastrnn._C")
    return _module


def _cast(ts: State | Weights | Norm, dtype: torch.dtype) -> State | Weights | Norm:
    """The same named tuple with every tensor converted to dtype, a nested Norm's too (None and Norm.keep stay)."""

    def conv(t):
        if isinstance(t, Norm):
            return _cast(t, dtype)
        return t.to(dtype) if isinstance(t, Tensor) else t

    return type(ts)(*(conv(t) for t in ts))


def _widened(cell: Cell, dtype: torch.dtype) -> bool:
    """Whether a call of this dtype runs on the float32 kernels (inputs widened, results rounded back)."""
    return dtype in WIDENED_DTYPES or (cell.norm and dtype == torch.bfloat16)


def _norm_args(weights: Weights) -> tuple:
    """cells.Norm as the extension takes it: norm, zmask, zkeep (plain cells pass nothing: the entry points'
    defaults, which spare the call three argument conversions)."""
    nm = weights.norm
    return nm.params, nm.mask, float(nm.keep)


def fp32_bf16_gemm() -> bool:
    """Whether float32 calls run their step GEMMs on bfloat16 operands (FASTRNN_CPP_FP32_BF16_GEMM=1)."""
    return getenv(FP32_BF16_GEMM_ENV) == "1"


def available() -> tuple[bool, str]:
    if _ext() is None:
        return False, _NOT_BUILT
    return True, ""


_DTYPES = KERNEL_DTYPES + WIDENED_DTYPES


def supports(cell: Cell, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    # (on every call's path: a torch.device is taken as it is, not rebuilt)
    if (device if isinstance(device, torch.device) else torch.device(device)).type != "cpu":
        return False, f"the cpp backend runs on CPU tensors only, got device {device}"
    if dtype not in _DTYPES:
        return False, f"the cpp backend supports float32, float64, bfloat16 and float16, got {dtype}"
    return True, ""


def forward(
    cell: Cell, gx: Tensor, state0: State, weights: Weights, batch_sizes: Tensor | None, reverse: bool, need_saved: bool
) -> tuple[Tensor, State, Saved]:
    """gx [T,B,G*H], state0 h [B,P] (c [B,H]), weights w_hh [G*H,P], b_hh [G*H]?, w_hr [P,H]?
    -> out [T,B,P], state_n, saved (cells.py layout)."""
    dt = gx.dtype
    if _widened(cell, dt):
        f32 = torch.float32
        out, st, saved = forward(
            cell, gx.float(), _cast(state0, f32), _cast(weights, f32), batch_sizes, reverse, need_saved
        )
        return out.to(dt), _cast(st, dt), saved
    bf16_gemm = dt == torch.float32 and fp32_bf16_gemm() and not cell.norm
    out, h_n, c_n, gates, extra = _ext().recurrence_forward(
        cell.kernel_id, gx, state0.h, state0.c, *weights[:3], batch_sizes, reverse, need_saved, bf16_gemm,
        *(() if weights.norm is None else _norm_args(weights)),
    )  # fmt: skip
    return out, State(h_n, c_n), Saved(gates, extra)


def backward(cell, d_out, d_state_n, state0, weights, batch_sizes, reverse, out, saved) -> Grads:
    """-> d_gx [T,B,G*H], d_state0 (d_h0 [B,P], d_c0 [B,H]), d_weights (None where the weight was None), d_extra
    [T,B,H] and d_norm [norm_width*H] (normalised cells, else None)."""
    dt = out.dtype
    if _widened(cell, dt):
        f32 = torch.float32
        g = backward(
            cell, d_out.float(), _cast(d_state_n, f32), _cast(state0, f32), _cast(weights, f32), batch_sizes, reverse,
            out.float(), saved,
        )  # fmt: skip
        d_extra, d_norm = (None if t is None else t.to(dt) for t in (g.d_extra, g.d_norm))
        return Grads(g.d_gx.to(dt), _cast(g.d_state0, dt), _cast(g.d_weights, dt), d_extra, d_norm)
    bf16_gemm = dt == torch.float32 and fp32_bf16_gemm() and not cell.norm
    d_gx, d_h0, d_c0, d_w_hh, d_b_hh, d_w_hr, d_extra, d_norm = _ext().recurrence_backward(
        cell.kernel_id, d_out, d_state_n.h, d_state_n.c, state0.h, state0.c, *weights[:3], batch_sizes, reverse, out,
        saved.gates, saved.extra, bf16_gemm, *(() if weights.norm is None else _norm_args(weights)),
    )  # fmt: skip
    return Grads(d_gx, State(d_h0, d_c0), Weights(d_w_hh, d_b_hh, d_w_hr), d_extra, d_norm)


def layer_forward(
    cell: Cell, x: Tensor, w_ih: Tensor, b_ih: Tensor | None, h0: Tensor, c0: Tensor | None, w_hh: Tensor,
    b_hh: Tensor | None, reverse: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """An unpacked layer in inference (plain cells, no projection, KERNEL_DTYPES): x [T, B, I] -> out, h_n, c_n, the
    input projection made by the extension as the walk goes (csrc/fastrnn.h layer_forward: chunks of steps once gx
    would pass 16 MB). Outside the kernel contract, like cell_step: functional.rnn takes it for the calls autograd
    does not record."""
    bf16_gemm = x.dtype == torch.float32 and fp32_bf16_gemm()
    # torch.nn takes strided operands (a transposed or tied weight, a state sliced from a wider one); the extension
    # reads dense memory and refuses anything else (.contiguous() is free where they are dense already)
    out, h_n, c_n = _ext().layer_forward(
        cell.kernel_id, *(None if t is None else t.contiguous() for t in (x, w_ih, b_ih, h0, c0, w_hh, b_hh)),
        reverse, bf16_gemm,
    )  # fmt: skip
    return out, h_n, c_n


def own_projection(x: Tensor) -> bool:
    """Whether a recorded layer's input projection x W_ih^T + b_ih should run on the extension (`linear`) rather than
    F.linear: float32 on the CPU where the extension's own GEMM runs (csrc/fastrnn.h own_gemm_enabled: CPUs that are
    not Intel's, where MKL takes its AVX2 kernels; LSTM T=32 B=64 H=1024 training spends a third of its time in
    those three GEMMs). Never under torch.compile (which traces F.linear and the op layer) or CPU autocast (F.linear
    autocasts); tracing and export never get here (backends.deploying picks torch.nn's kernels)."""
    if torch.compiler.is_compiling() or x.dtype != torch.float32 or x.device.type != "cpu":  # (dynamo: no _C calls)
        return False
    ext = _ext()
    return ext is not None and not torch.is_autocast_enabled("cpu") and ext.own_gemm_enabled()


def linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """F.linear(x, w, b) for x [..., I] on the extension's GEMMs (forward, d x and d W), differentiable; a double
    backward runs ATen's."""
    return _ext().linear(x.reshape(-1, x.shape[-1]), w, b).view(*x.shape[:-1], w.shape[0])


def cell_step(cell: Cell, x: Tensor, h: Tensor, c: Tensor | None, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
              b_hh: Tensor | None) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """One step of a Cell class (lstm, gru, rnn_tanh, rnn_relu) in one call to the extension (csrc/cell_step.cpp):
    x [B, I], h [B, H] (c [B, H]) -> h' (and c'), with a C++ autograd node when autograd records. Outside the
    kernel contract: functional.cell_step takes it for eager, unrecorded CELL_STEP_DTYPES calls without autocast,
    because a Cell is called once per step and the layer path's per-call work (F.linear, the op layer, the Python
    autograd.Function) costs more than the step itself at small shapes."""
    bf16_gemm = x.dtype == torch.float32 and fp32_bf16_gemm()
    r = _ext().cell_step(cell.kernel_id, x, h, c, w_ih, w_hh, b_ih, b_hh, bf16_gemm)
    return r[0], (r[1] if cell.has_cell_state else None)
