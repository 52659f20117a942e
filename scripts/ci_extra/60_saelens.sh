#!/usr/bin/env bash
# SAELens interop leg: a side venv with the real sae-lens (it pins transformer-lens<4, so it cannot share
# the main env). Two pytest processes (scripts/saelens_interop):
#  1. test_saelens_roundtrip.py: SAE folders round-trip both ways, SAELens over the real TransformerLens;
#  2. test_saelens_on_hooked_attn.py: hooked_attn.install_as_transformer_lens() before SAELens is imported,
#     then SAELens' HookedSAETransformer and training runner on SmolLM2 (the default model folder that
#     scripts/setup.sh prepared; the hub stays offline).
# Prints "saelens ...: N passed, M failed".
set -euo pipefail
SAELENS_VERSION=6.54.12
# A fresh side venv each run, as CI's main venv is (set SAELENS_VENV=DIR to keep and reuse one while developing).
if [ -n "${SAELENS_VENV:-}" ]; then VENV=$SAELENS_VENV; else VENV=$(mktemp -d)/saelens; trap 'rm -rf "$(dirname "$VENV")"' EXIT; fi
if ! "$VENV/bin/python" -c "import sae_lens, pytest, sys; sys.exit(sae_lens.__version__ != '$SAELENS_VERSION')" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0            # first: the local CPU wheel
  # exact pins, so the side venv is the same every run (datasets as in pyproject's test extra; it holds the training text)
  "$VENV/bin/pip" install -q "sae-lens==$SAELENS_VERSION" transformers==5.25.0 datasets==5.2.0 pytest==9.2.0
fi
log=$(mktemp)
status=0
for tests in scripts/saelens_interop/test_saelens_roundtrip.py scripts/saelens_interop/test_saelens_on_hooked_attn.py; do
  HF_HUB_OFFLINE=1 PYTHONPATH="$PWD" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" -m pytest -q \
    -p no:cacheprovider "$tests" 2>&1 | tee -a "$log" || status=$?
done
summary=$(grep -E ' in [0-9.]+s( \(.*\))?( =+)?$' "$log" || true)   # pytest's closing line of each run
passed=$({ grep -oE '[0-9]+ passed' <<<"$summary" || true; } | awk '{s+=$1} END {print s+0}')
failed=$({ grep -oE '[0-9]+ (failed|errors?)' <<<"$summary" || true; } | awk '{s+=$1} END {print s+0}')
echo "saelens $SAELENS_VERSION interop: $passed passed, $failed failed"
exit $status
