"""PNG charts from a results file (matplotlib, Agg backend: no display needed; no torch).

speedup_<mode>.png   ratio vs torch.nn against hidden size, one panel per cell, one line per backend x (T, B)
gflops_<mode>.png    achieved GFLOP/s against hidden size, same layout, with the measured sgemm rate as a
                     dashed line (the roof a recurrence of small per-step GEMMs approaches from below)
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from fastrnn.bench.results import YARDSTICK, BenchError


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise BenchError("plot needs matplotlib: pip install 'fastrnn[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(data: dict, out_dir: str | Path) -> list[Path]:
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"{out}: cannot create the output folder ({e.strerror})") from None
    rows = [r for r in data["rows"] if r["status"] == "ok"]
    if not rows:
        raise BenchError("the results file has no timed rows to plot")
    gemm = (data.get("gemm") or {}).get("gflops")
    written = []
    for mode in sorted({r["mode"] for r in rows}):
        cells = list(dict.fromkeys(r["cell"] for r in rows if r["mode"] == mode))  # the run's order
        hs = sorted({r["H"] for r in rows if r["mode"] == mode})
        for metric, ylabel, fname in (
            ("ratio_vs_torch", "speed-up vs torch.nn (x)", f"speedup_{mode}.png"),
            ("gflops", "GFLOP/s", f"gflops_{mode}.png"),
        ):
            fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.6), squeeze=False)
            for ax, cell in zip(axes[0], cells, strict=True):
                lines: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
                for r in rows:
                    if r["mode"] != mode or r["cell"] != cell or r.get(metric) is None:
                        continue
                    if metric == "ratio_vs_torch" and r["backend"] == YARDSTICK:
                        continue
                    lines[(r["backend"], r["T"], r["B"], r["threads"])].append((r["H"], r[metric]))
                for (backend, T, B, th), pts in sorted(lines.items()):
                    pts.sort()
                    ax.plot(
                        [p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{backend} T={T} B={B} thr={th}"
                    )
                if metric == "ratio_vs_torch":
                    ax.axhline(1.0, color="grey", lw=0.8)
                elif gemm:
                    ax.axhline(gemm, color="black", ls="--", lw=0.8, label=f"sgemm {gemm:.0f}")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xticks(hs, [str(h) for h in hs])
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(NullFormatter())
                ax.set_title(f"{cell} ({mode})")
                ax.set_xlabel("hidden size H")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
                if lines:
                    ax.legend(fontsize=6)
            commit = ((data.get("git") or {}).get("commit") or "")[:10]
            fig.suptitle(f"{(data.get('machine') or {}).get('cpu_model', '')}  {commit}", fontsize=8)
            fig.tight_layout()
            path = out / fname
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
