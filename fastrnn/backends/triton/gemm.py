"""One step's small GEMM over the active rows: the LSTM projection (h = hbar W_hr^T) forward, and
d_h = d_gates W_hh, d_hbar = d_h W_hr backward.

    c[:n] (+)= a[:n] @ b      a [B, K] (any float; cast to b's dtype for tl.dot), b [K, N] given by strides,
                              c [B, N] fp32; optionally also written, cast, to out [B, N]
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fastrnn.backends.triton.common import block_k, dot, dot_f32, tiles


@triton.jit(do_not_specialize=["n"])  # one compile for every row count
def _step_gemm(
    a_ptr, b_ptr, c_ptr, out_ptr,
    n, N, K, lda, sbk, sbn, ldc, ldo,
    ACCUMULATE: tl.constexpr, WRITE_OUT: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    cmask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        a = tl.load(a_ptr + rows[:, None] * lda + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + kk[:, None] * sbk + cols[None, :] * sbn, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += dot(a, b, PRECISION, DOT_F32)
    m2 = rmask[:, None] & cmask[None, :]
    c_offs = rows[:, None] * ldc + cols[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptr + c_offs, mask=m2, other=0.0)
    tl.store(c_ptr + c_offs, acc, mask=m2)
    if WRITE_OUT:
        tl.store(out_ptr + rows[:, None] * ldo + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=m2)


def step_gemm(
    a: Tensor, b: Tensor, c: Tensor, n: int, precision: str, *, transpose_b: bool = False,
    accumulate: bool = False, out: Tensor | None = None,
) -> None:  # fmt: skip
    """c[:n] (+)= a[:n] @ (b^T if transpose_b else b); also out[:n] = c[:n] cast when out is given.
    a [B, K], b [K, N] (or [N, K] with transpose_b), c [B, N] fp32; all row-major contiguous rows."""
    if n == 0:
        return
    K = a.shape[1]
    N = c.shape[1]
    sbk, sbn = (b.stride(1), b.stride(0)) if transpose_b else (b.stride(0), b.stride(1))
    BM, BN = tiles(n, N)
    BK = block_k(K)
    grid = (triton.cdiv(n, BM), triton.cdiv(N, BN))
    _step_gemm[grid](
        a, b, c, c if out is None else out,
        n, N, K, a.stride(0), sbk, sbn, c.stride(0), c.stride(0) if out is None else out.stride(0),
        ACCUMULATE=accumulate, WRITE_OUT=out is not None, PRECISION=precision, DOT_F32=dot_f32(b.dtype),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
    )  # fmt: skip
