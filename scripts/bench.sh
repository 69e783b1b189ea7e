#!/usr/bin/env bash
# The README's benchmark command: set up .venv (scripts/setup.sh), then run the quick preset and print the
# table. Arguments replace the default `--quick` and go to `fastrnn-bench run` (e.g. --full, --cells lstm,
# --out bench-results/mine.json); results land in bench-results/ unless --out says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then
  set -- --quick
fi
exec .venv/bin/fastrnn-bench run "$@"
