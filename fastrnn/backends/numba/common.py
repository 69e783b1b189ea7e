"""What the numba kernels share on the host side: the jit decorator (cached, with a fallback where no cache
directory is writable), the thread plan, the block layouts of W_hh, BLAS threading, and the weight gradients
as large GEMMs.

Imported only once numba is known to be importable (fastrnn/backends/numba/__init__.py sees to that). No
njit function lives here: numba's cache is invalidated per source file, so a kernel calling a helper from
another file would keep running a stale compiled copy of it after an edit.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import warnings
from collections.abc import Callable, Iterator

import numba
import numpy as np
import torch
from torch import Tensor

# A step is split over threads only when its GEMM has at least this many multiply-adds: below it, waking the
# thread pool (tens of microseconds) costs more than the step.
PARALLEL_MIN_MACS = 1 << 20
THREADS_VAR = "FASTRNN_NUMBA_THREADS"
PARFOR_OFF = dict(
    comprehension=False,
    reduction=False,
    inplace_binop=False,
    setitem=False,
    numpy=False,
    stencil=False,
    fusion=False,
    prange=False,
)


def jit(parallel: bool = False, inline: str = "never") -> Callable[[Callable], Callable]:
    """numba.njit with the on-disk cache (next to the sources, else the user cache dir, or NUMBA_CACHE_DIR);
    where no location is writable the kernels still run, compiled once per process. inline="always" inlines the
    function into its callers in numba's IR (the per-cell steps into the walk)."""

    def deco(fn: Callable) -> Callable:
        # only explicit prange loops run in parallel: numba would otherwise turn every slice copy into a parfor
        par = dict(PARFOR_OFF, prange=True) if parallel else False
        opts = dict(parallel=par, error_model="numpy", nogil=True, inline=inline)
        try:
            return numba.njit(cache=True, **opts)(fn)
        except RuntimeError as e:  # numba: "cannot cache function ...: no locator available"
            warnings.warn(
                f"fastrnn numba backend: {e}; kernels compile on every start (set NUMBA_CACHE_DIR to a writable "
                "directory)",
                RuntimeWarning,
                stacklevel=2,
            )
            return numba.njit(cache=False, **opts)(fn)

    return deco


def threads() -> int:
    """Threads a step may be split over: FASTRNN_NUMBA_THREADS, else as many as torch uses, at most
    NUMBA_NUM_THREADS.

    numba's OpenMP threading layer is a second libgomp beside torch's, and by default its idle threads spin:
    once its pool has started, every torch operation in the process runs many times slower (measured on 2
    cores: a 1024x256 pad 0.06 ms -> 4 ms). So before numba's pool starts, its libgomp is asked to let idle
    threads sleep (OMP_WAIT_POLICY=PASSIVE unless the user set it; torch's libgomp has read it already)."""
    env = os.environ.get(THREADS_VAR, "").strip()
    n = max(1, min(int(env) if env else torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if n > 1:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return n


def n_blocks(macs_per_step: int, width: int) -> int:
    """How many column blocks (one thread each) a step's GEMM and fused pass are split into."""
    if macs_per_step < PARALLEL_MIN_MACS:
        return 1
    return max(1, min(threads(), width // 16))


def block_rows(w: Tensor, G: int, nblk: int) -> Tensor:
    """w [G*H, K] -> [nblk, G*hb, K]: block k holds rows g*H + k*hb + jj (g < G, jj < hb) in (g, jj) order, so
    one GEMM per block yields every gate of the hidden units k*hb .. (k+1)*hb. Rows past H are zero."""
    H = w.shape[0] // G
    hb = -(-H // nblk)
    K = w.shape[1] if w.dim() == 2 else 1
    v = w.reshape(G, H, K)
    if nblk == 1:
        return v.reshape(1, G * H, K)
    v = torch.nn.functional.pad(v, (0, 0, 0, nblk * hb - H))
    return v.reshape(G, nblk, hb, K).transpose(0, 1).reshape(nblk, G * hb, K).contiguous()


def block_bias(b: Tensor | None, G: int, H: int, nblk: int, like: Tensor) -> Tensor:
    """b_hh [G*H] (zeros when absent) in block_rows' layout: [nblk, G*hb]."""
    b = like.new_zeros(G * H) if b is None else b
    if nblk == 1:  # a view, the common case: spare the small calls the general layout costs
        return b.reshape(1, G * H)
    return block_rows(b.reshape(G * H, 1), G, nblk).reshape(nblk, -1)


def block_cols(w: Tensor, nblk: int) -> Tensor:
    """w [G*H, P] -> W^T split into nblk row blocks of pb rows, zero-padded: [nblk, pb, G*H], so that block k
    of d_h = d_gates @ W is one GEMM with a contiguous output."""
    P = w.shape[1]
    pb = -(-P // nblk)
    wt = torch.nn.functional.pad(w.t(), (0, 0, 0, nblk * pb - P))
    return wt.reshape(nblk, pb, w.shape[0]).contiguous()


_EMPTY: dict[tuple[int, torch.dtype], np.ndarray] = {}


def dummy(ndim: int, like: Tensor) -> np.ndarray:
    """An empty array standing in for an absent argument, so every call has one kernel signature. One per rank
    and dtype, made once: nothing can be written into it, and making it costs a microsecond a call."""
    key = (ndim, like.dtype)
    d = _EMPTY.get(key)
    if d is None:
        d = _EMPTY[key] = np.empty((0,) * ndim, dtype=arr(like.new_empty(0)).dtype)
    return d


def arr(t: Tensor) -> np.ndarray:
    """A numpy view (no copy) of a contiguous CPU tensor."""
    return t.detach().numpy()


def first_steps(bs: list[int], T: int, B: int, reverse: bool) -> Tensor:
    """The step at which each row starts from h0: 0 forward, the row's last step in reverse."""
    if not reverse:
        return torch.zeros(B, dtype=torch.long)
    lens = (torch.tensor(bs)[:, None] > torch.arange(B)[None, :]).sum(0)
    return lens - 1


def weight_grads(
    d_gh: Tensor, out: Tensor, h0: Tensor, bs: list[int], reverse: bool, has_bias: bool
) -> tuple[Tensor, Tensor | None]:
    """d_w_hh = sum_t d_gh[t]^T h_{t-1} and d_b_hh as whole-sequence GEMMs (torch, so MKL with torch's threads).

    d_gh [T,B,G*H] is zero on inactive rows and out [T,B,P] is zero where a row has ended, so h_{t-1} is out
    shifted by one step, plus h0 for each row at the step it starts (rows that start later than the first
    step in reverse direction meet a zero row of out there, and get their h0 term from the second GEMM).
    """
    T, B, GH = d_gh.shape
    P = out.shape[2]
    if T == 0:  # no step ran: nothing reached the weights
        return d_gh.new_zeros(GH, P), d_gh.new_zeros(GH) if has_bias else None
    if reverse:
        cur, prev = d_gh[:-1], out[1:]
    else:
        cur, prev = d_gh[1:], out[:-1]
    if not reverse or bs[-1] == B:  # every row starts at the same step: a view, no gather
        d_start = d_gh[T - 1 if reverse else 0]
    else:
        d_start = d_gh[first_steps(bs, T, B, reverse), torch.arange(B)]  # [B, G*H] each row's d_gh at its start
    d_w = d_start.t() @ h0
    if T > 1:  # explicit row counts: -1 is ambiguous when H or P is 0
        d_w.addmm_(cur.reshape((T - 1) * B, GH).t(), prev.reshape((T - 1) * B, P))
    d_b = d_gh.reshape(T * B, GH).sum(0) if has_bias else None
    return d_w, d_b


def _find_blas_threads() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """get/set of the OpenBLAS thread count behind scipy.linalg.cython_blas (the BLAS numba's np.dot calls)."""
    import scipy.linalg.cython_blas  # noqa: F401  (loads the library numba will use)

    names = (
        ("scipy_openblas_get_num_threads", "openblas_get_num_threads"),
        ("scipy_openblas_set_num_threads", "openblas_set_num_threads"),
    )
    paths = []
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and ln.rstrip().endswith(".so")})
    if not paths:
        import scipy

        paths = glob.glob(os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs", "*openblas*"))
    for p in paths:
        try:
            lib = ctypes.CDLL(p)
        except OSError:
            continue
        get = next((getattr(lib, n) for n in names[0] if hasattr(lib, n)), None)
        put = next((getattr(lib, n) for n in names[1] if hasattr(lib, n)), None)
        if get is not None and put is not None:
            get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
            return get, put
    return None


_BLAS_THREADS: tuple[Callable[[], int], Callable[[int], None]] | None | bool = False


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Each per-step GEMM call runs on one BLAS thread: the kernels split steps over numba threads themselves,
    and OpenBLAS's own workers would otherwise keep spinning after a call, stealing the cores from torch's
    next operation (and from each other)."""
    global _BLAS_THREADS
    if _BLAS_THREADS is False:
        _BLAS_THREADS = _find_blas_threads()
    if _BLAS_THREADS is None:
        yield
        return
    get, put = _BLAS_THREADS
    before = get()
    if before != 1:
        put(1)
    try:
        yield
    finally:
        if before != 1:
            put(before)
