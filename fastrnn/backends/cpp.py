"""The cpp backend (not implemented yet: issue #4). Registered so that asking for it says why it is missing."""

from __future__ import annotations

import torch

NAME = "cpp"


def available() -> tuple[bool, str]:
    return False, "the cpp backend is not implemented yet (issue #4)"


def supports(cell: str, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    return available()
