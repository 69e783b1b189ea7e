"""What fastrnn.record() costs: the same forward with and without recording, interleaved, medians.

    python examples/record_overhead.py                          # cpp, LSTM T=128 B=16 H=256, eval + no_grad
    python examples/record_overhead.py --backend reference --cell GRU --train

Inside a block the kernel also writes the gates it would save for backward (under no_grad it otherwise saves
nothing) and the recording copies them into [L, D, T, B, H] per gate; outside a block a module pays one read of
fastrnn.inspect.RECORDING, timed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit

import torch

import fastrnn
from fastrnn import inspect as fi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="cpp")
    ap.add_argument("--cell", default="LSTM", choices=["LSTM", "GRU", "RNN"])
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--train", action="store_true", help="training mode with autograd (forward only is timed)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    m = getattr(fastrnn, args.cell)(args.H, args.H, num_layers=args.layers, backend=args.backend)
    m.train(args.train)
    x = torch.randn(args.T, args.B, args.H)

    def plain():
        return m(x)

    def recorded():
        with fastrnn.record() as rec:
            m(x)
        return rec

    times: dict[str, list[float]] = {"plain": [], "record": []}
    cpu: dict[str, list[float]] = {"plain": [], "record": []}  # process CPU time: less hit by other processes
    with torch.set_grad_enabled(args.train):
        for f in (plain, recorded, plain, recorded):  # warm-up
            f()
        for _ in range(args.repeats):  # interleaved, so that machine drift hits both alike
            for name, f in (("plain", plain), ("record", recorded)):
                t0, c0 = time.perf_counter(), time.process_time()
                f()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    lo = {k: min(v) * 1e3 for k, v in times.items()}
    cmed = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
    mode = "train" if args.train else "eval, no_grad"
    print(f"{args.backend} {args.cell} layers={args.layers} T={args.T} B={args.B} H={args.H} ({mode}), "
          f"{args.repeats} interleaved repeats, torch threads={torch.get_num_threads()}")  # fmt: skip
    for k in times:
        print(f"  {k:7s} wall median {med[k]:8.3f} ms  min {lo[k]:8.3f} ms   CPU median {cmed[k]:8.3f} ms")
    pct = lambda d: 100 * (d["record"] / d["plain"] - 1)  # noqa: E731 - local shorthand
    print(f"  overhead: wall median {pct(med):+.1f} %, wall min {pct(lo):+.1f} %, CPU median {pct(cmed):+.1f} %")
    n = 1_000_000
    check = timeit.timeit("if fi.RECORDING: pass", globals={"fi": fi}, number=n) / n * 1e9
    print(f"  outside a block: the check modules.py makes per call takes {check:.0f} ns")


if __name__ == "__main__":
    main()
