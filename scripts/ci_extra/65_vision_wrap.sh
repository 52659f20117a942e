#!/usr/bin/env bash
# torchvision/timm leg: wrap() on torchvision's vit_b_16 and a timm ViT (scripts/vision_wrap), in a side venv.
# Not in the main env: the registry's torchvision build for torch 2.13 (0.28.0+cu130) cannot load its
# compiled ops with the CPU torch, and once installed, `import torchvision` (and with it transformers'
# vision models, such as ViTModel) fails there; scripts/vision_wrap/conftest.py says how the tests get
# past that. The side venv holds only torchvision and timm and reads everything else (torch 2.13.0,
# transformers, pytest, ...) from the main env $PY, through a .pth file. Prints "N passed, M failed".
set -euo pipefail
PY=${PY:-python3}
# A fresh side venv each run, as CI's main venv is (set VISION_VENV=DIR to keep and reuse one while developing).
if [ -n "${VISION_VENV:-}" ]; then VENV=$VISION_VENV; else VENV=$(mktemp -d)/vision; trap 'rm -rf "$(dirname "$VENV")"' EXIT; fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  own=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  main=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "import site; site.addsitedir('$main')" > "$own/main_env.pth"
fi
# --no-deps: their dependencies (torch 2.13.0, huggingface_hub, pyyaml, safetensors, numpy, pillow) come
# from the main env, so nothing here can move torch.
"$VENV/bin/pip" install -q --no-deps torchvision==0.28.0 timm==1.0.31
"$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')"
log=$(mktemp)
status=0
PYTHONPATH="$PWD" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q \
  -p no:cacheprovider scripts/vision_wrap 2>&1 | tee "$log" || status=$?
passed=$({ grep -oE '[0-9]+ passed' "$log" || echo 0; } | tail -1 | grep -oE '[0-9]+')
failed=$({ grep -oE '[0-9]+ (failed|errors?)' "$log" || true; } | awk '{s+=$1} END {print s+0}')
echo "vision wrap (torchvision 0.28.0, timm 1.0.31): $passed passed, $failed failed"
exit $status
