"""End-to-end benchmark: real training loops with torch.nn and with fastrnn, side by side.

    python benchmarks/e2e.py                  # quick: about a minute
    python benchmarks/e2e.py --full           # longer corpus, more epochs, larger models
    python benchmarks/e2e.py --backend numba --plot bench-results/e2e.png --json bench-results/e2e.json

Two tasks, each trained twice from the same initial weights (the fastrnn model is fastrnn.convert of a deep
copy of the torch.nn one) on the same batches in the same order:
    charlm     a character-level language model (Embedding -> LSTM -> Linear, Adam) on a generated corpus: a
               seeded toy grammar of English-like sentences, built in memory (nothing downloaded or shipped)
    forecast   one-step-ahead forecasting (GRU -> Linear, Adam, MSE) of generated series: sums of sines plus an
               AR(2) process with noise
Epochs of the two models alternate so that machine drift hits both. Printed per epoch: seconds for torch.nn and
fastrnn, the speed-up, and both losses; then the largest loss difference over every step. The losses must agree
to float32 tolerance (rounding differences grow over training steps): exit status 1 if they do not.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import fastrnn
from fastrnn import backends as fr_backends

# ------------------------------------------------------------------------------------------------- data


_SUBJECTS = [
    "the cat",
    "a dog",
    "my neighbour",
    "the old sailor",
    "every student",
    "a small robot",
    "the queen",
    "our teacher",
    "the river",
    "a tired baker",
    "the fastest runner",
    "nobody",
]
_VERBS = ["sees", "likes", "paints", "follows", "remembers", "builds", "carries", "ignores", "answers", "visits"]
_OBJECTS = [
    "the red house",
    "a quiet garden",
    "seven green apples",
    "the long letter",
    "a broken clock",
    "the northern lights",
    "an empty bottle",
    "the morning train",
    "two paper boats",
    "the last page",
]
_TAILS = [
    "",
    " today",
    " again",
    " in the rain",
    " before dinner",
    " without a word",
    " every monday",
    " at the harbour",
    " with great care",
    " for the first time",
]


def make_corpus(n_chars: int, seed: int = 0) -> str:
    """A deterministic English-like text from a toy grammar: enough structure for a char LM to learn quickly."""
    rng = random.Random(seed)
    parts, n = [], 0
    while n < n_chars:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}"
        if rng.random() < 0.3:
            s += f" and {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        s = s[0].upper() + s[1:] + (". " if rng.random() < 0.8 else "! ")
        if rng.random() < 0.1:
            s += "\n"
        parts.append(s)
        n += len(s)
    return "".join(parts)[:n_chars]


def make_series(n_series: int, length: int, seed: int = 0) -> Tensor:
    """[n_series, length] float32: two sines of random period and phase plus an AR(2) process with noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float64)
    period = 8 + 40 * torch.rand(n_series, 2, generator=g, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(n_series, 2, generator=g, dtype=torch.float64)
    x = torch.sin(2 * math.pi * t / period[:, :1] + phase[:, :1]) + 0.5 * torch.sin(
        2 * math.pi * t / period[:, 1:] + phase[:, 1:]
    )
    noise = 0.1 * torch.randn(n_series, length, generator=g, dtype=torch.float64)
    ar = torch.zeros(n_series, length, dtype=torch.float64)
    for i in range(2, length):
        ar[:, i] = 0.6 * ar[:, i - 1] - 0.2 * ar[:, i - 2] + noise[:, i]
    return (x + ar).float()


# ------------------------------------------------------------------------------------------------ tasks


class CharLM(nn.Module):
    def __init__(self, vocab: int, emb: int, hidden: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:  # x [T, B] int64 -> logits [T, B, vocab]
        return self.head(self.rnn(self.emb(x))[0])


class Forecaster(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.rnn = nn.GRU(1, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:  # x [T, B, 1] -> next-step prediction at every step [T, B, 1]
        return self.head(self.rnn(x)[0])


@dataclass
class Task:
    name: str
    model: nn.Module
    batches: list[tuple[Tensor, Tensor]]  # one epoch, in order
    loss: Callable[[Tensor, Tensor], Tensor]
    lr: float
    cell: str
    info: dict = field(default_factory=dict)


def charlm_task(full: bool) -> Task:
    text = make_corpus(400_000 if full else 120_000)
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.int64)
    T, B = 64, 32
    hidden = 256 if full else 128
    n = (ids.numel() - 1) // (T * B)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=g)
    batches = []
    for k in order.tolist():
        chunk = ids[k * T * B : k * T * B + T * B + 1]
        x, y = chunk[:-1].view(B, T).t(), chunk[1:].view(B, T).t()
        batches.append((x.contiguous(), y.contiguous()))
    torch.manual_seed(0)
    model = CharLM(len(chars), 32, hidden)
    ce = nn.CrossEntropyLoss()
    return Task(
        "charlm",
        model,
        batches,
        lambda out, y: ce(out.reshape(-1, out.shape[-1]), y.reshape(-1)),
        3e-3,
        "lstm",
        {"corpus_chars": len(text), "vocab": len(chars), "T": T, "B": B, "H": hidden},
    )


def forecast_task(full: bool) -> Task:
    T, B = 96, 32
    hidden = 128 if full else 64
    series = make_series(B * (48 if full else 16), T + 1)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(series.shape[0], generator=g)
    batches = []
    for k in range(series.shape[0] // B):
        s = series[perm[k * B : (k + 1) * B]].t()  # [T+1, B]
        batches.append((s[:-1].unsqueeze(-1).contiguous(), s[1:].unsqueeze(-1).contiguous()))
    torch.manual_seed(1)
    model = Forecaster(hidden)
    mse = nn.MSELoss()
    return Task("forecast", model, batches, mse, 3e-3, "gru", {"series": series.shape[0], "T": T, "B": B, "H": hidden})


# ------------------------------------------------------------------------------------------------ train


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, task: Task) -> tuple[float, list[float]]:
    losses = []
    t0 = time.perf_counter()
    for x, y in task.batches:
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    return time.perf_counter() - t0, losses


def run_task(task: Task, epochs: int, backend: str | None) -> dict:
    ref = task.model
    fast = fastrnn.convert(copy.deepcopy(ref), backend=backend)
    chosen = fr_backends.select(task.cell, torch.float32, torch.device("cpu"), backend)
    opts = {
        "torch": torch.optim.Adam(ref.parameters(), lr=task.lr),
        "fastrnn": torch.optim.Adam(fast.parameters(), lr=task.lr),
    }
    models = {"torch": ref, "fastrnn": fast}
    times: dict[str, list[float]] = {"torch": [], "fastrnn": []}
    losses: dict[str, list[float]] = {"torch": [], "fastrnn": []}
    print(f"\n{task.name}: {task.info}, {len(task.batches)} batches/epoch, fastrnn backend {chosen}")
    print(f"{'epoch':>5} {'torch.nn s':>11} {'fastrnn s':>10} {'speed-up':>9} {'torch loss':>11} {'fastrnn loss':>13}")
    for e in range(epochs):
        for name in ("torch", "fastrnn") if e % 2 == 0 else ("fastrnn", "torch"):
            dt, ls = train_epoch(models[name], opts[name], task)
            times[name].append(dt)
            losses[name] += ls
        n = len(task.batches)
        print(
            f"{e + 1:>5} {times['torch'][-1]:>11.3f} {times['fastrnn'][-1]:>10.3f} "
            f"{times['torch'][-1] / times['fastrnn'][-1]:>8.2f}x {sum(losses['torch'][-n:]) / n:>11.5f} "
            f"{sum(losses['fastrnn'][-n:]) / n:>13.5f}"
        )
    diffs = [abs(a - b) for a, b in zip(losses["torch"], losses["fastrnn"], strict=True)]
    rel = [d / max(abs(a), 1e-12) for d, a in zip(diffs, losses["torch"], strict=True)]
    # Adam steps amplify float32 rounding differences a little every step: allow 2e-6 relative per step.
    tol = 2e-6 * len(diffs)
    ok = max(rel) <= tol
    # Epoch 1 includes one-time costs (JIT compilation); the speed-up is over the later epochs when there are any.
    later = slice(1, None) if epochs > 1 else slice(None)
    speedup = sum(times["torch"][later]) / sum(times["fastrnn"][later])
    print(
        f"max |loss difference| {max(diffs):.3e} (relative {max(rel):.3e}, tolerance {tol:.1e}): "
        f"{'agree' if ok else 'DISAGREE'};  speed-up over epochs {2 if epochs > 1 else 1}..{epochs}: "
        f"{speedup:.2f}x"
    )
    return {
        "task": task.name,
        "info": task.info,
        "backend": chosen,
        "epoch_s": times,
        "losses": losses,
        "max_loss_diff": max(diffs),
        "max_rel_loss_diff": max(rel),
        "tolerance": tol,
        "agree": ok,
        "speedup": speedup,
    }


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        for name, style in (("torch", "-"), ("fastrnn", "--")):
            ax.plot(r["losses"][name], style, label=f"{name} ({sum(r['epoch_s'][name]):.1f} s)")
        ax.set_title(f"{r['task']} (fastrnn backend {r['backend']}, max diff {r['max_loss_diff']:.1e})")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="bigger corpus and models, more epochs")
    p.add_argument("--epochs", type=int, help="epochs per task (default 3 quick, 5 full)")
    p.add_argument("--backend", choices=fr_backends.BACKENDS, help="fastrnn backend (default: automatic)")
    p.add_argument("--tasks", default="charlm,forecast", help="comma list of charlm, forecast")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--plot", help="write the loss curves to this PNG")
    p.add_argument("--json", help="write epoch times and loss curves to this JSON")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in ("charlm", "forecast")]
    if unknown or not tasks:
        p.error(f"unknown task(s) {', '.join(unknown) or '(none)'}; expected charlm, forecast")
    if args.backend:
        ok, why = fr_backends.is_available(args.backend)
        if not ok:
            p.error(f"backend {args.backend!r} is not available here: {why}")
    epochs = args.epochs or (5 if args.full else 3)
    torch.set_num_threads(args.threads)
    builders = {"charlm": charlm_task, "forecast": forecast_task}
    results = [run_task(builders[t](args.full), epochs, args.backend) for t in tasks]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "results": results}, f)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot)
    return 0 if all(r["agree"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
