#!/usr/bin/env bash
# asv: the suites import and are well formed, and every benchmark runs once
# (quick mode, results discarded) at the first point of its parameter grid
# (NUMBATTN_ASV_SMOKE, benchmarks/common.py), against the numbattn installed in
# this Python. A broken benchmark fails CI.
set -euo pipefail
cd "$(dirname "$0")/.."
asv machine --yes --machine ci >/dev/null
asv check -E existing:same
NUMBATTN_ASV_SMOKE=1 asv run -E existing:same --quick --dry-run --show-stderr --machine ci
