"""Quick numbers for the numba backend (#5): first-call time of each cell, and sanity timings against torch.nn.

    python scripts/numba_timings.py first-call   # cold (empty NUMBA_CACHE_DIR) and warm first forward+backward
    python scripts/numba_timings.py speed [N]    # median of 5, torch.set_num_threads(N) (default 2), vs torch.nn, cpp

Only the benchmark suite (fastrnn-bench) claims speed; these are sanity checks while developing.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time


def _layer(cell: str) -> tuple[str, dict]:
    """The torch.nn layer class name that runs `cell` and the keyword arguments that select it."""
    from fastrnn.cells import spec

    c = spec(cell)
    return c.layer, ({"nonlinearity": c.nonlinearity} if c.nonlinearity else {})


def _one_call(cell: str) -> float:
    """Seconds for the first forward+backward of one float32 layer in this (fresh) process."""
    import torch

    import fastrnn

    cls, kw = _layer(cell)
    m = getattr(fastrnn, cls)(16, 32, backend="numba", **kw)
    x = torch.randn(8, 4, 16, requires_grad=True)
    t0 = time.perf_counter()
    out, _ = m(x)
    out.sum().backward()
    return time.perf_counter() - t0


def first_call() -> None:
    """Each cell in fresh processes with its own empty cache (each cell compiles its own copy of the walk)."""
    from fastrnn.cells import CELLS

    print(f"{'cell':10} {'cold s':>8} {'warm s':>8}   (first forward+backward, float32, NUMBA_CACHE_DIR=<empty tmp>)")
    for cell in CELLS:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            cmd = [sys.executable, __file__, "_one", cell]
            runs = [
                float(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout) for _ in range(2)
            ]
        print(f"{cell:10} {runs[0]:8.2f} {runs[1]:8.2f}")


def _time(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def speed(threads: int) -> None:
    """Backends interleaved repetition by repetition, so load from other processes hits them alike."""
    import torch

    import fastrnn
    from fastrnn.backends import is_available
    from fastrnn.cells import CELLS

    torch.set_num_threads(threads)
    names = ["torch", "numba"] + (["cpp"] if is_available("cpp")[0] else [])
    shapes = [(32, 1, 64), (32, 16, 256), (128, 16, 256), (32, 64, 512), (32, 1, 1024), (32, 64, 1024)]
    numba_threads = os.environ.get("FASTRNN_NUMBA_THREADS", "unset (as torch)")
    print(f"torch threads={threads}, FASTRNN_NUMBA_THREADS={numba_threads}; median (min) of 5 in ms")
    print(
        f"{'cell':9} {'T':>4} {'B':>3} {'H':>5} {'mode':6} "
        + " ".join(f"{n:>17}" for n in names)
        + "  numba/torch"
        + ("  numba/cpp" if "cpp" in names else "")
    )
    for cell in CELLS:
        cls, kw = _layer(cell)
        for T, B, H in shapes:
            x = torch.randn(T, B, H)
            ref = getattr(torch.nn, cls)(H, H, **kw)
            mods = {"torch": ref}
            for n in names[1:]:
                mods[n] = getattr(fastrnn, cls)(H, H, backend=n, **kw)
                mods[n].load_state_dict(ref.state_dict())
            for mode in ("fwd", "train"):
                fns = {}
                for n, m in mods.items():
                    if mode == "fwd":

                        def f(m=m):
                            with torch.no_grad():
                                m(x)
                    else:
                        xg = x.clone().requires_grad_()

                        def f(m=m, xg=xg):
                            out, _ = m(xg)
                            out.sum().backward()

                    f()
                    fns[n] = f
                ts = {n: [] for n in names}
                for _ in range(5):
                    for n in names:
                        ts[n].append(_time(fns[n]) * 1e3)
                med = {n: statistics.median(v) for n, v in ts.items()}
                line = f"{cell:9} {T:4} {B:3} {H:5} {mode:6} "
                line += " ".join(f"{med[n]:9.2f} ({min(ts[n]):5.2f})" for n in names)
                line += f"  {med['numba'] / med['torch']:11.2f}"
                if "cpp" in med:
                    line += f"  {med['numba'] / med['cpp']:9.2f}"
                print(line, flush=True)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "first-call"
    if what == "_one":
        print(_one_call(sys.argv[2]))
    elif what == "first-call":
        first_call()
    elif what == "speed":
        speed(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    else:
        sys.exit(__doc__)
