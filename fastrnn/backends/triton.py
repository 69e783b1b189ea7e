"""The triton backend (not implemented yet: issue #6). Registered so that asking for it says why it is missing."""

from __future__ import annotations

import torch

NAME = "triton"


def available() -> tuple[bool, str]:
    return False, "the triton backend is not implemented yet (issue #6)"


def supports(cell: str, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    return available()
