"""Timing: interleaved rounds against torch.nn, the clock (process CPU time or wall time), and the statistics of
the samples (medians, quartiles, per-round ratios), also for several runs pooled into one.

Definitions (they are what the JSON fields mean):
    median_ms, q25_ms, q75_ms, min_ms, max_ms   quantiles of per-call time over the timed samples (samples_ms);
                                                a sample is `number` back-to-back calls divided by `number`
    clock             what was timed: 'cpu' = the process's CPU time (single-threaded CPU cases: immune to
                      neighbours holding the core), 'wall' = wall time (several threads, CUDA; synchronised)
    ratio_vs_torch    median over rounds of torch_i / backend_i, where round i times torch.nn and this backend
                      back to back (samples interleaved round by round, so drift and neighbours' load hit both);
                      > 1: faster than torch.nn. (torch_median_ms / median_ms is the plain ratio of medians.)
    ratio_q25/q75     quartiles of those per-round ratios: the ratio's own noise, what compare reads
    ratio_vs_ort      where the onnxruntime peer is timed on the case: median over rounds of onnxruntime ms /
                      this implementation's ms in the same round (> 1: faster than ONNX Runtime);
                      ratio_vs_ort_q25/q75 its quartiles, ort_median_ms the peer's median

Plain Python: torch is imported only to synchronise a CUDA device.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fastrnn.bench.results import BAD_STATUSES, CASE_FIELDS, ORT, YARDSTICK

CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


@dataclass(frozen=True)
class Settings:
    """How each case is timed."""

    warmup: int = 2  # untimed calls per implementation (JIT compilation, allocator warm-up)
    repeats: int = 15  # timed samples per implementation, interleaved with torch.nn
    min_repeats: int = 5  # never fewer samples than this, whatever max_seconds says
    max_seconds: float = 4.0  # stop repeating an implementation once it has spent this long on one case
    min_sample_ms: float = 2.0  # calls per sample are batched until one sample lasts at least this long
    clock: str = "auto"  # auto: process CPU time for one-thread CPU cases, else wall time (clock_name)


def clock_name(device: str, threads: int, setting: str = "auto") -> str:
    """'cpu' (the process's CPU time) for single-threaded CPU work, else 'wall'. One thread's CPU time excludes
    the time a neighbour holds the core, which on a shared machine is most of the noise; with more threads it
    would count spin-waiting workers, and on CUDA it would miss the device, so those use wall time."""
    if setting != "auto":
        return setting
    return "cpu" if device == "cpu" and threads == 1 else "wall"


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:300]


# ---------------------------------------------------------------------------------------------- statistics


def quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def paired_ratios(torch_ms: Sequence[float], backend_ms: Sequence[float]) -> list[float]:
    """torch.nn / backend, round by round."""
    return [a / b for a, b in zip(torch_ms, backend_ms, strict=False) if b > 0]


def summarize(samples_ms: Sequence[float], ratios: Sequence[float], torch_ms: Sequence[float]) -> dict:
    """The row fields of one implementation's samples (ms), its per-round ratios and torch.nn's samples."""
    s = list(samples_ms)
    return {
        "median_ms": statistics.median(s),
        "q25_ms": quantile(s, 0.25),
        "q75_ms": quantile(s, 0.75),
        "min_ms": min(s),
        "max_ms": max(s),
        "repeats": len(s),
        "torch_median_ms": statistics.median(torch_ms) if torch_ms else None,
        "ratio_vs_torch": statistics.median(ratios) if ratios else None,
        "ratio_q25": quantile(ratios, 0.25) if ratios else None,
        "ratio_q75": quantile(ratios, 0.75) if ratios else None,
    }


VS_ORT_FIELDS = ("ort_median_ms", "ratio_vs_ort", "ratio_vs_ort_q25", "ratio_vs_ort_q75")


def vs_ort(ort_ms: Sequence[float], ratios: Sequence[float]) -> dict:
    """The vs-ORT row fields from the peer's samples and the per-round ratios onnxruntime ms / backend ms."""
    if not ratios or not ort_ms:
        return dict.fromkeys(VS_ORT_FIELDS)
    return {
        "ort_median_ms": statistics.median(ort_ms),
        "ratio_vs_ort": statistics.median(ratios),
        "ratio_vs_ort_q25": quantile(ratios, 0.25),
        "ratio_vs_ort_q75": quantile(ratios, 0.75),
    }


def merge_runs(runs: Sequence[Sequence[dict]]) -> list[dict]:
    """Rows of several runs of the same grid pooled into one row per configuration: samples are concatenated,
    and the per-round ratios of every run are pooled, so the ratio's quartiles cover the drift BETWEEN runs as
    well as within one (what a baseline needs: a lucky run must not set the bar). A configuration that failed
    or errored in any run keeps that row. The ratios against the onnxruntime peer are pooled the same way."""
    order: list[tuple] = []
    by_key: dict[tuple, list[dict]] = {}
    for rows in runs:
        for r in rows:
            k = (*(r[f] for f in CASE_FIELDS), r["backend"])
            if k not in by_key:
                order.append(k)
                by_key[k] = []
            by_key[k].append(r)
    torch_runs = {k[:-1]: [r.get("samples_ms") or [] for r in by_key[k]] for k in order if k[-1] == YARDSTICK}
    ort_runs = {k[:-1]: by_key[k] for k in order if k[-1] == ORT}
    merged = []
    for k in order:
        rs = by_key[k]
        bad = [r for r in rs if r["status"] != "ok"]
        if bad or len(rs) == 1:
            merged.append(dict(bad[0] if bad else rs[0], runs=sum(r.get("runs", 1) for r in rs)))
            continue
        ts = torch_runs.get(k[:-1], [])
        s = [x for r in rs for x in r["samples_ms"]]
        ratios = [x for t, r in zip(ts, rs, strict=False) for x in paired_ratios(t, r["samples_ms"])]
        n_runs = sum(r.get("runs", 1) for r in rs)
        row = dict(rs[0], **summarize(s, ratios, [x for t in ts for x in t]), samples_ms=s, runs=n_runs)
        row["gflops"] = row["flops"] / (row["median_ms"] * 1e-3) / 1e9
        row["max_err"] = max(r.get("max_err") or 0.0 for r in rs)
        ort = ort_runs.get(k[:-1], [])
        if k[-1] != ORT and ort:
            row.update(dict.fromkeys(VS_ORT_FIELDS))  # unless the peer was timed in every run
            if len(ort) == len(rs) and all(o["status"] == "ok" for o in ort):
                pairs = [(o["samples_ms"], r["samples_ms"]) for o, r in zip(ort, rs, strict=True)]
                ort_ms = [x for o, _ in pairs for x in o]
                row.update(vs_ort(ort_ms, [x for o, b in pairs for x in paired_ratios(o, b)]))
        merged.append(row)
    return merged


def failed(rows: Sequence[dict]) -> bool:
    return any(r["status"] in BAD_STATUSES for r in rows)


# ------------------------------------------------------------------------------------------ interleaving


@dataclass
class Timer:
    """One implementation's timed call and what timing it produced."""

    name: str
    call: Callable[[], None]
    number: int = 1  # calls per sample
    spent: float = 0.0  # wall seconds spent sampling
    samples: list[float] = field(default_factory=list)  # seconds per call
    error: str = ""

    def sample(self, device: str, clock: Callable[[], float]) -> float:
        sync(device)
        w0, t0 = time.perf_counter(), clock()
        for _ in range(self.number):
            self.call()
        sync(device)
        dt = clock() - t0
        self.spent += time.perf_counter() - w0
        return dt / self.number


def time_interleaved(timers: list[Timer], settings: Settings, device: str, clock: str = "wall") -> None:
    """Round-robin over the implementations, one sample each per round (rotating who goes first) so that
    machine drift and neighbours' load hit every implementation alike. torch.nn (timers[0]) is sampled for as
    long as any other implementation is, so every sample of a backend has a torch.nn partner from its round."""
    now = CLOCKS[clock]
    for tm in timers:
        tm.samples = []
        try:
            tm.call()  # first call apart: one-time costs (JIT, allocator) would skew the calibration
            sync(device)
            t0 = now()
            for _ in range(max(1, settings.warmup)):
                tm.call()
                sync(device)
            per_call = (now() - t0) / max(1, settings.warmup)
            tm.number = max(1, math.ceil(settings.min_sample_ms / 1e3 / max(per_call, 1e-9)))
        except Exception as e:  # a backend's crash is a result (ERROR row), not the end of the run
            tm.error = one_line(e)

    def done(tm: Timer) -> bool:
        n = len(tm.samples)
        enough = n >= settings.min_repeats and tm.spent > settings.max_seconds
        return bool(tm.error) or n >= settings.repeats or enough

    r = 0
    while True:
        live = [tm for tm in timers[1:] if not done(tm)]
        if not live and (done(timers[0]) or len(timers) > 1):
            break
        group = [timers[0], *live]
        k = r % len(group)
        for tm in group[k:] + group[:k]:
            try:
                tm.samples.append(tm.sample(device, now))
            except Exception as e:
                tm.error = one_line(e)
        r += 1
        if timers[0].error:
            break
