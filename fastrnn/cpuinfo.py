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


# AMD's core generations by (cpu family, model range), as Linux's arch/x86 names them. A virtual machine's model
# name is often just "AMD EPYC", while Zen 4 and Zen 5 differ where speed is decided: Zen 4 runs a 512-bit FMA as
# two 256-bit halves, Zen 5 whole (its float32 GEMM peak per core is twice Zen 4's at one clock), so the same
# code's ratios against torch.nn differ between them (the cpp backend's RNN at B=16 H=256: 2.7x on Zen 5, 1.5x
# on Zen 4, 1 thread).
_AMD_ZEN = (
    (23, 0x00, 0x2F, "zen1"),
    (23, 0x30, 0xFF, "zen2"),
    (25, 0x00, 0x0F, "zen3"),
    (25, 0x10, 0x1F, "zen4"),
    (25, 0x20, 0x5F, "zen3"),
    (25, 0x60, 0xAF, "zen4"),
    (26, 0x00, 0x4F, "zen5"),
    (26, 0x60, 0x7F, "zen5"),
)


def _int_field(name: str) -> int | None:
    try:
        return int(field(name) or "")
    except ValueError:
        return None


def microarch(vendor_id: str | None = None, family: int | None = None, model: int | None = None) -> str | None:
    """The core generation where the vendor's model name may not say it: "zen4", "zen5", ... for AMD (by cpu family
    and model; an unlisted pair reads "f<family>m<model>"), None for other vendors. Arguments default to this CPU's
    /proc/cpuinfo."""
    if vendor_id is None:
        vendor_id, family, model = field("vendor_id"), _int_field("cpu family"), _int_field("model")
    if vendor_id != "AuthenticAMD" or family is None or model is None:
        return None
    for fam, lo, hi, name in _AMD_ZEN:
        if family == fam and lo <= model <= hi:
            return name
    return f"f{family}m{model}"


@functools.cache
def cpu_class() -> str:
    """The CPU class auto's rules key on: intel, amd or other (by vendor); then -<microarch> where known (AMD:
    -zen4, -zen5, ...) and -amx where the CPU has AMX-BF16. A rule measured on class "amd" holds on every AMD CPU,
    one on "amd-zen5" only there (fastrnn.backends.rule_holds_on)."""
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(field("vendor_id") or "", "other")
    uarch = microarch()
    return vendor + (f"-{uarch}" if uarch else "") + ("-amx" if has_amx() else "")
