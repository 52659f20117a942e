#!/usr/bin/env bash
# torchvision/timm leg: wrap() on torchvision's vit_b_16 and a timm ViT (scripts/vision_wrap), in a side venv.
# Not in the main env: the registry's torchvision build for torch 2.13 (0.28.0+cu130) cannot load its
# compiled ops with the CPU torch, and once installed, `import torchvision` (and with it transformers'
# vision models, such as ViTModel) fails there; scripts/vision_wrap/conftest.py says how the tests get
# past that. Prints "N passed, M failed".
set -euo pipefail
# A fresh side venv each run, as CI's main venv is (set VISION_VENV=DIR to keep and reuse one while developing).
if [ -n "${VISION_VENV:-}" ]; then VENV=$VISION_VENV; else VENV=$(mktemp -d)/vision; trap 'rm -rf "$(dirname "$VENV")"' EXIT; fi
if ! "$VENV/bin/python" -c "import torchvision.version as v, timm, pytest, beartype, hooked_attn, sys; \
sys.exit(not (v.__version__.startswith('0.28.0') and timm.__version__ == '1.0.31'))" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0            # first: the local CPU wheel
  "$VENV/bin/pip" install -q torch==2.13.0 -e ".[vision]" pytest==9.2.0 beartype==0.23.1
fi
log=$(mktemp)
status=0
PYTHONPATH="$PWD" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q \
  -p no:cacheprovider scripts/vision_wrap 2>&1 | tee "$log" || status=$?
passed=$({ grep -oE '[0-9]+ passed' "$log" || echo 0; } | tail -1 | grep -oE '[0-9]+')
failed=$({ grep -oE '[0-9]+ (failed|errors?)' "$log" || true; } | awk '{s+=$1} END {print s+0}')
echo "vision wrap (torchvision 0.28.0, timm 1.0.31): $passed passed, $failed failed"
exit $status
