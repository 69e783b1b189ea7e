"""Shared fixtures: the backends under test, and Triton's interpreter on machines without CUDA.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, before fastrnn is
imported, whenever no CUDA device is present. FASTRNN_POISON_OUTPUTS=1 makes backends fill their outputs
with NaN before kernels write them, so a value a kernel forgets to write cannot pass as a correct zero.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # torch.nn is the float32 oracle: exact float32, not cuDNN's TF32 default
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
os.environ.setdefault("FASTRNN_POISON_OUTPUTS", "1")
os.environ.pop("FASTRNN_BACKEND", None)  # the suite chooses backends itself

import pytest  # noqa: E402

from fastrnn import backends  # noqa: E402
from fastrnn.cells import spec  # noqa: E402


def backend_device(name: str) -> torch.device:
    """Where a backend is tested: triton on CUDA when there is one, everything else on the CPU."""
    if name == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def interpreted(name: str) -> bool:
    """Triton under the CPU interpreter: correct but slow, so it gets the small subset of cases."""
    return name == "triton" and backend_device(name).type == "cpu"


BACKENDS_UNDER_TEST = [n for n in backends.BACKENDS if backends.is_available(n)[0]]
# the backends that implement the per-direction kernel contract (all but torch.nn's own whole-call kernels)
KERNEL_BACKENDS = [n for n in BACKENDS_UNDER_TEST if n in backends.KERNEL_BACKENDS]


def skip_unless_supported(name: str, cell: str, dtype: torch.dtype) -> torch.device:
    device = backend_device(name)
    ok, why = backends.get(name).supports(spec(cell), dtype, device)
    if not ok:
        pytest.skip(f"{name}: {why}")
    return device


@pytest.fixture(params=BACKENDS_UNDER_TEST)
def backend(request) -> str:
    return request.param


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request) -> str:
    return request.param
