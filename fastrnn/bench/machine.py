"""Machine facts: CPU model, cores, versions, git commit, thread counts, the measured GEMM rate, and the header
every results file starts with."""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

import fastrnn
from fastrnn import cpuinfo
from fastrnn.bench.results import SCHEMA, YARDSTICK
from fastrnn.bench.timing import CLOCKS, Settings, clock_name, sync


def _cpu_model() -> str:
    return cpuinfo.field("model name") or platform.processor() or platform.machine()


def cpu_slug(model: str, flags: str = "", uarch: str | None = None) -> str:
    """The CPU part of a machine type's name: the model's first four words without trademarks, clock or core
    count, plus the core generation where fastrnn.cpuinfo.microarch knows it (AMD: a virtual machine's model name
    is often just "AMD EPYC", on Zen 4 and on Zen 5 alike) and `amx` where the CPU has AMX-BF16 (the bfloat16
    kernels differ there), e.g. "Intel(R) Xeon(R) Processor" with amx_bf16 -> intel-xeon-amx, "AMD EPYC 9B45
    96-Core Processor" on Zen 5 -> amd-epyc-9b45-zen5."""
    text = re.sub(r"\((r|tm)\)|@.*$|\b\d+-core\b", " ", model.lower())
    words = [w for w in re.split(r"[^a-z0-9]+", text) if w and w not in ("processor", "cpu")]
    slug = "-".join(words[:4]) or "unknown"
    return slug + (f"-{uarch}" if uarch else "") + ("-amx" if "amx_bf16" in flags.split() else "")


def machine_info(device: str = "cpu") -> dict:
    info = {
        "cpu_model": _cpu_model(),
        "cpu_microarch": cpuinfo.microarch(),
        "cores": os.cpu_count() or 1,
        "arch": platform.machine(),
        "system": platform.system(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_name(device: str = "cpu") -> str:
    """The baseline file stem for this machine type, e.g. cpu-2core-x86_64-intel-xeon-amx or cuda-nvidia-h100.
    The CPU model is part of it: the same code's ratios against torch.nn differ by vendor (MKL, which the cpp
    backend's float32 GEMMs call, runs AVX2 kernels on AMD where torch.nn's oneDNN runs AVX-512) and by core
    generation (cpp's RNN at B=16 H=256, 1 thread: 2.7x on Zen 5, 1.5x on Zen 4), so a baseline gates only runs on
    its own machine type."""
    if device == "cuda" and torch.cuda.is_available():
        return "cuda-" + "-".join(torch.cuda.get_device_name().lower().replace("_", " ").split()[:3])
    slug = cpu_slug(_cpu_model(), cpuinfo.field("flags") or "", cpuinfo.microarch())
    return f"cpu-{os.cpu_count() or 1}core-{platform.machine()}-{slug}"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": _version("numba"),
        "triton": _version("triton"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "fastrnn": fastrnn.__version__,
    }


def source_root() -> Path:
    """The source tree fastrnn runs from (its git checkout when installed in editable mode)."""
    return Path(fastrnn.__file__).resolve().parent.parent


def git_info() -> dict:
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=source_root(), capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def set_threads(n: int) -> None:
    """One thread count for torch and, when it is loaded, numba (cpp runs on torch's pool)."""
    torch.set_num_threads(n)
    numba = sys.modules.get("numba")
    if numba is not None:
        try:
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        except (ValueError, AttributeError):
            pass


def gemm_rate(
    n: int, dtype: torch.dtype = torch.float32, device: str = "cpu", seconds: float = 0.5, clock: str = "wall"
) -> float:
    """GFLOP/s of an n x n x n GEMM (best of the samples taken in `seconds`): the machine's attainable matmul
    rate, the roof the recurrences' GFLOP/s are read against; timed on the same clock as the cases."""
    now = CLOCKS[clock]
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    torch.mm(a, b, out=c)
    sync(device)
    best = math.inf
    t_end = time.perf_counter() + seconds
    k = 0
    while k < 3 or time.perf_counter() < t_end:
        t0 = now()
        torch.mm(a, b, out=c)
        sync(device)
        best = min(best, now() - t0)
        k += 1
    return 2 * n**3 / max(best, 1e-9) / 1e9


def layer_gemm_ms(case, clock: str, repeats: int = 5) -> float:
    """Median ms of one call's matrix products alone (case.gemms()), each a torch.mm of its shape in the case's
    dtype, run back to back on the case's threads: the measured GEMM time of the same shapes, against which a
    row's time gives its GEMM efficiency (runner.py's docstring)."""
    dt = getattr(torch, case.dtype)
    ops = []
    for M, K, N, count in case.gemms():
        a = torch.randn(M, K, device=case.device).to(dt)
        b = torch.randn(K, N, device=case.device).to(dt)
        ops.append((a, b, torch.empty(M, N, dtype=dt, device=case.device), count))

    def run() -> None:
        for a, b, c, count in ops:
            for _ in range(count):
                torch.mm(a, b, out=c)

    now = CLOCKS[clock]
    run()
    sync(case.device)
    samples = []
    for _ in range(repeats):
        t0 = now()
        run()
        sync(case.device)
        samples.append(now() - t0)
    return sorted(samples)[len(samples) // 2] * 1e3


def measure_gemm(
    threads: Sequence[int], H: Sequence[int], device: str, clock: str = "auto"
) -> tuple[int, dict[int, float]]:
    """The sgemm rate at each thread count, for a square GEMM as large as the run's largest weight matrix."""
    n = min(max(max(H), 256), 1024)
    rates = {}
    for th in threads:
        set_threads(th)
        rates[th] = gemm_rate(n, device=device, clock=clock_name(device, th, clock))
    return n, rates


def header(
    device: str,
    preset: str | None,
    settings: Settings,
    gemm_n: int,
    gemm_gflops: float,
    threads: int,
    command: str | None = None,
) -> dict:
    """The run's provenance; `command` is the exact command line that made the file (tables quote it)."""
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": {**machine_info(device), "name": machine_name(device), "threads": threads},
        "versions": versions(),
        "git": git_info(),
        "preset": preset,
        "settings": {
            "warmup": settings.warmup,
            "repeats": settings.repeats,
            "min_repeats": settings.min_repeats,
            "max_seconds": settings.max_seconds,
            "min_sample_ms": settings.min_sample_ms,
            "clock": settings.clock,
        },
        "gemm": {"n": gemm_n, "dtype": "float32", "threads": threads, "gflops": gemm_gflops},
        "definitions": {
            "ratio_vs_torch": "median of per-round torch.nn ms / backend ms, rounds interleaved (>1 = faster)",
            "ratio_vs_ort": "median of per-round onnxruntime ms / backend ms where the onnxruntime peer is timed "
            "(>1 = faster than ONNX Runtime)",
            "streaming": "mode: no_grad, the layer called once per step on [1, B, I], the state carried; T calls",
            "flops": "2*T*B*G*H*(I+H) per forward (input projection + recurrence GEMMs); training = 3x forward",
            "peak_mem_bytes": "cpu: bytes saved for backward by one forward; cuda: max_memory_allocated delta",
            "clock": "cpu = process CPU time (one-thread CPU cases), wall = wall time (more threads, CUDA)",
            "backend": f"{YARDSTICK} = torch.nn itself (the yardstick); compile = torch.compile of a plain-torch step "
            "loop; auto = a fastrnn module with backend=None; onnxruntime = ONNX Runtime running torch.nn's ONNX "
            "export (a peer); any other name = a fastrnn module with that backend",
        },
    }
