"""What the CPU is, as far as speed depends on it: auto's rules (fastrnn.backends) and the bench's machine types
(fastrnn.bench.machine) key on it, because the same code's speed against torch.nn differs by CPU vendor and ISA
(MKL, behind the cpp backend's float32 GEMMs, runs AVX2 kernels on AMD where torch.nn's oneDNN runs AVX-512; the
bfloat16 GEMMs run AMX tiles only where the CPU has them)."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def field(name: str) -> str | None:
    """The first `name : value` of /proc/cpuinfo (Linux), else None."""
    for line in _cpuinfo().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def has_amx() -> bool:
    return "amx_bf16" in (field("flags") or "").split()


@functools.cache
def cpu_class() -> str:
    """The CPU class auto's rules key on: intel, amd or other (by vendor), plus -amx where the CPU has AMX-BF16."""
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(field("vendor_id") or "", "other")
    return vendor + ("-amx" if has_amx() else "")
