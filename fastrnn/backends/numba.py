"""The numba backend (not implemented yet: issue #5). Registered so that asking for it says why it is missing."""

from __future__ import annotations

import torch

NAME = "numba"


def available() -> tuple[bool, str]:
    return False, "the numba backend is not implemented yet (issue #5)"


def supports(cell: str, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    return available()
