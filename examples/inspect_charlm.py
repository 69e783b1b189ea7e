"""Look inside a character language model: train a small LSTM, record every gate and state, find the units
that track whether the text is inside brackets or quotes, and write pictures and an LSTMVis project.

    python examples/inspect_charlm.py                            # about 40 s, on one CPU thread
    python examples/inspect_charlm.py --out docs/ --no-lstmvis   # the two pictures in docs/

Writes into --out (default /tmp/fastrnn-inspect):
    inspect_heatmap.png      the most bracket/quote-correlated units over a stretch of held-out text
    inspect_saturation.png   how often each gate is left/right saturated (Karpathy, Johnson, Fei-Fei 2015)
    lstmvis/charlm/          states.hdf5, train.hdf5, train.dict, lstm.yml: `python lstm_server.py -dir <out>/lstmvis`
                             in a clone of LSTMVis (needs h5py; skipped with a note without it)
and prints the units most correlated with being inside brackets or quotes, and with the position in the line.

The corpus is generated here: sentences from a toy grammar (the one benchmarks/e2e.py uses, with brackets and
quoted speech added) so that the model has something to keep track of across many characters.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import inspect as fi

SUBJECTS = ["the cat", "a dog", "my neighbour", "the old sailor", "every student", "a small robot", "the queen",
            "our teacher", "the river", "a tired baker", "nobody"]  # fmt: skip
VERBS = ["sees", "likes", "paints", "follows", "remembers", "builds", "carries", "ignores", "answers", "visits"]
OBJECTS = ["the red house", "a quiet garden", "seven green apples", "the long letter", "a broken clock",
           "the northern lights", "an empty bottle", "the morning train", "two paper boats",
           "the last page"]  # fmt: skip
TAILS = ["", " today", " again", " in the rain", " before dinner", " at the harbour", " with great care"]
SAYS = ["says", "whispers", "shouts", "writes"]


def clause(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"


def sentence(rng: random.Random) -> str:
    subject = rng.choice(SUBJECTS)
    if rng.random() < 0.35:  # a bracketed aside after the subject
        subject += f" ({rng.choice(['who', 'which'])} {rng.choice(VERBS)} {rng.choice(OBJECTS)})"
    if rng.random() < 0.35:  # quoted speech
        s = f'{subject} {rng.choice(SAYS)} "{clause(rng)}{rng.choice(TAILS)}"'
    else:
        s = f"{subject} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}"
    return s[0].upper() + s[1:] + rng.choice([".", ".", "!"])


def corpus(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    lines, n = [], 0
    while n < n_chars:
        line = " ".join(sentence(rng) for _ in range(rng.randint(1, 3)))
        lines.append(line)
        n += len(line) + 1
    return "\n".join(lines) + "\n"


def inside(text: str, opening: str, closing: str) -> list[float]:
    """1 for the characters between an opening mark and its closing one (the marks themselves: 0), else 0."""
    out, open_ = [], False
    for ch in text:
        if open_ and ch == closing:
            open_ = False
            out.append(0.0)
            continue
        out.append(float(open_))
        open_ = open_ or ch == opening
    return out


def line_position(text: str) -> list[float]:
    out, k = [], 0
    for ch in text:
        out.append(float(k))
        k = 0 if ch == "\n" else k + 1
    return out


class CharLM(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, 24)
        self.rnn = nn.LSTM(24, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:  # [T, B] ids -> [T, B, vocab] logits
        return self.head(self.rnn(self.emb(x))[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/fastrnn-inspect"))
    ap.add_argument("--steps", type=int, default=1500, help="training steps (Adam, batches of 32 x 96 characters)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--backend", default=None, help="fastrnn backend (default: automatic)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lstmvis", action=argparse.BooleanOptionalAction, default=True, help="write the LSTMVis project")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: steady where other processes share the cores; results depend "
                    "on it, as the order of floating-point sums does)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    text = corpus(300_000, args.seed)
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    torch.manual_seed(args.seed)
    model = fastrnn.convert(CharLM(len(chars), args.hidden), backend=args.backend)
    opt = torch.optim.Adam(model.parameters(), lr=4e-3)
    T, B = 96, 32
    g = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, ids.numel() - T - 1, (B,), generator=g)
        chunk = torch.stack([ids[s : s + T + 1] for s in starts.tolist()], 1)  # [T+1, B]
        loss = nn.functional.cross_entropy(model(chunk[:-1]).flatten(0, 1), chunk[1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.3f} nats/char  ({time.perf_counter() - t_start:.0f} s)")

    # held-out text, one line per row: rows of different lengths, run as one packed (unsorted) batch
    rows = [line + "\n" for line in corpus(6_000, args.seed + 1).splitlines()[:24]]
    lengths = [len(r) for r in rows]
    x = torch.zeros(max(lengths), len(rows), dtype=torch.int64)
    for b, r in enumerate(rows):
        x[: len(r), b] = torch.tensor([chars.index(c) for c in r])
    model.eval()
    with torch.no_grad(), fastrnn.record() as rec:
        model.rnn(pack_padded_sequence(model.emb(x), lengths, enforce_sorted=False))
    s = rec[model.rnn]  # [1, 1, T, 24, H], rows in our order, zeros past each row's length

    signals = {
        "inside brackets": [inside(r, "(", ")") for r in rows],
        "inside quotes": [inside(r, '"', '"') for r in rows],
        "position in the line": [line_position(r) for r in rows],
    }
    print("units most correlated (Pearson r over every recorded step) with")
    best = None
    for what, sig in signals.items():
        for state in ("h", "c"):
            rank = fi.rank_units(s, sig, state=state)
            top = ", ".join(f"{u} ({r:+.2f})" for u, r in zip(rank.units[:5].tolist(), rank.r[:5].tolist()))
            print(f"  {what:21s} {state}: {top}")
            if what.startswith("inside") and (best is None or abs(rank.r[0]) > abs(best[2].r[0])):
                best = (what, state, rank)

    what, state, rank = best
    row = max(range(len(rows)), key=lambda b: rows[b].count("(") + rows[b].count('"'))  # a row with both marks
    units = rank.units[:6].tolist()
    fi.heatmap(s, args.out / "inspect_heatmap.png", units=units, state=state, row=row, tokens=list(rows[row]),
               steps=(0, 110), per_unit=True, title=f"{state} of the 6 units most correlated with being {what} "
               f"(r = {', '.join(f'{r:+.2f}' for r in rank.r[:6].tolist())})")  # fmt: skip
    fi.plot_saturation(s, args.out / "inspect_saturation.png")
    print(f"wrote {args.out / 'inspect_heatmap.png'} and {args.out / 'inspect_saturation.png'}")
    try:
        if args.lstmvis:
            where = fi.to_lstmvis(s, args.out / "lstmvis" / "charlm", [list(r) for r in rows], name="fastrnn char LM")
            print(f"wrote an LSTMVis project to {where} (serve it with: python lstm_server.py -dir {where.parent})")
    except ImportError as e:
        print(f"no LSTMVis project: {e}")
    print(f"done in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
