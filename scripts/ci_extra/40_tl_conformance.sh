#!/usr/bin/env bash
# TransformerLens 3.9.0's own test suite against hooked_attn's compatibility layer (issue 13).
# Fails when fewer in-scope tests pass than the count recorded in scripts/ci_extra/tl_conformance_min_passed.txt.
set -euo pipefail
PY="${PY:-python}"
"$PY" -m pip install -q typeguard==4.4.4 fancy_einsum==0.0.3
OMP_NUM_THREADS=1 "$PY" scripts/tl_conformance.py --out "${TMPDIR:-/tmp}/transformerlens.md" \
    --min-passed-file scripts/ci_extra/tl_conformance_min_passed.txt
