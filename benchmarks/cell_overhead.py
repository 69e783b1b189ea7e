"""Where a Cell call's microseconds go: torch.nn's Cell against fastrnn's, layer by layer of fastrnn's path.

    python benchmarks/cell_overhead.py [--threads 2] [--B 1] [--H 64] [--repeats 9]

Each row times one layer of the call on its own (no_grad, the same operands every call), median over repeats of
best-of-5 loops: the module call (nn.Module.__call__ + forward), functional.cell_step (backend selection, torch's
argument checks, the kernel call), and below it what the cpp backend runs. On a tree whose cpp backend has no
one-call step (before it existed) the kernel rows are F.linear, the op layer and the extension's
recurrence_forward instead. Layers nest, so a row minus the one under it is what that layer adds.
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import torch
import torch.nn.functional as F
from torch import nn

import fastrnn
from fastrnn import backends, functional
from fastrnn.cells import cell_for


def _time(fn, number: int, repeats: int) -> float:
    fn()
    return statistics.median(min(timeit.repeat(fn, number=number, repeat=5)) / number for _ in range(repeats)) * 1e6


def rows(kind: str, B: int, H: int, number: int, repeats: int) -> list[tuple[str, float]]:
    torch.manual_seed(0)
    theirs, ours, auto = (
        getattr(nn, kind)(H, H),
        getattr(fastrnn, kind)(H, H, backend="cpp"),
        getattr(fastrnn, kind)(H, H),
    )
    cell = cell_for(kind)
    x, h = torch.randn(B, H), torch.randn(B, H)
    c = torch.randn(B, H) if cell.has_cell_state else None
    hx = (h, c) if c is not None else h
    w = (ours.weight_ih, ours.weight_hh, ours.bias_ih, ours.bias_hh)
    cpp = backends.get("cpp")
    ext = cpp._ext()
    t = lambda fn: _time(fn, number, repeats)  # noqa: E731
    out = [
        ("torch.nn cell", t(lambda: theirs(x, hx))),
        ("fastrnn cell, auto backend", t(lambda: auto(x, hx))),
        ("fastrnn cell, backend='cpp'", t(lambda: ours(x, hx))),
        ("  functional.cell_step", t(lambda: functional.cell_step(cell.name, x, h, c, *w, "cpp"))),
        ("    backends.select", t(lambda: backends.select(cell.name, x.dtype, x.device, "cpp"))),
    ]
    if hasattr(cpp, "cell_step"):
        out += [
            ("    cpp.cell_step", t(lambda: cpp.cell_step(cell, x, h, c, *w))),
            ("      _C.cell_step (projection + walk)", t(lambda: ext.cell_step(cell.kernel_id, x, h, c, *w))),
        ]
    else:
        from fastrnn import ops

        gx = F.linear(x, w[0], w[2]).unsqueeze(0)
        out += [
            ("    F.linear", t(lambda: F.linear(x, w[0], w[2]))),
            (
                "    ops.recurrence",
                t(lambda: ops.recurrence("cpp", cell.name, gx, h, c, w[1], w[3], None, None, False)),
            ),
            (
                "      _C.recurrence_forward",
                t(lambda: ext.recurrence_forward(cell.kernel_id, gx, h, c, w[1], w[3], None, None, False, False)),
            ),
        ]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--number", type=int, default=2000)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# Cell call layers, B={args.B} H={args.H} I={args.H}, float32, {args.threads} threads, no_grad (us/call)")
    with torch.no_grad():
        for kind in ("LSTMCell", "GRUCell", "RNNCell"):
            print(f"\n{kind}")
            for name, us in rows(kind, args.B, args.H, args.number, args.repeats):
                print(f"  {name:42s} {us:8.2f}")


if __name__ == "__main__":
    main()
