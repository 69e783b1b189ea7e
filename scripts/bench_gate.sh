#!/usr/bin/env bash
# Performance-regression gate, run by .ci/run after the tests (about a minute here; at most a few more when
# something needs re-measuring). It re-runs the configurations of the stored baseline for this machine type,
# benchmarks/baselines/<machine>.json, compares each backend's speed-up over torch.nn, re-measures the
# configurations that look regressed with 3x the repeats, and exits 1 only if a regression past the threshold
# (default 10%) and past the measured noise is confirmed, or a backend fails its correctness check.
# Extra arguments go to `fastrnn-bench gate` (e.g. --threshold 15%, --baseline PATH).
# Regenerate the baseline (after a deliberate speed change, or on a new machine type): bash scripts/bench_baseline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
exec "$PY" -m fastrnn.bench gate --no-progress "$@"
