#!/usr/bin/env bash
# Regenerate the stored benchmark baseline for this machine type (what scripts/bench_gate.sh compares against)
# and benchmarks/baselines/<machine>.md, its tables (summary and every shape, each headed by the two commands below): three
# pooled quick runs (about 2 minutes on 2 cores), so the baseline's spread includes run-to-run drift. Run it
# after a deliberate change of speed (a backend landing or getting faster) on an otherwise idle machine, and
# commit both files.
# The ratios against torch.nn also move between machine instances of one type (20-40% at the tiny shapes, for
# unchanged code): to widen a baseline's spread with such a re-measurement of the SAME code, pool it with the
# stored one:  bash scripts/bench_baseline.sh --pool-with benchmarks/baselines/<machine>.json
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
NAME=$("$PY" -c "from fastrnn.bench.machine import machine_name; print(machine_name())")
"$PY" -m fastrnn.bench run --quick --runs 3 --no-progress --peers none --out "benchmarks/baselines/$NAME.json" "$@"
"$PY" -m fastrnn.bench readme-table "benchmarks/baselines/$NAME.json" --out "benchmarks/baselines/$NAME.md"
