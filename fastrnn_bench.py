"""The `fastrnn-bench` command. Its verbs that only read results files (compare, plot, readme-table) run with
fastrnn imported lazily (FASTRNN_LAZY_IMPORT=1), so that comparing two JSON files never loads torch."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

READ_ONLY_VERBS = ("compare", "plot", "readme-table")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in READ_ONLY_VERBS:
        os.environ.setdefault("FASTRNN_LAZY_IMPORT", "1")
    from fastrnn.bench.cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
