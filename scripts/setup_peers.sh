#!/usr/bin/env bash
# Install the peers that benchmarks/ compares against, each in its own virtual environment:
#
#   bash scripts/setup_peers.sh            # TransformerLens 3.9 (HookedTransformer) and 4.3 (TransformerBridge)
#
# The environments live in benchmarks/.venvs/ (git-ignored). torch==2.13.0 goes in first in each (a local CPU
# wheel here; the peers' own range, torch>=2.6, then installs nothing more), so peer and hooked_attn run the same
# torch build and their timings compare like with like.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENVS=benchmarks/.venvs

make_venv() {  # name, transformer-lens version
    local dir="$VENVS/$1"
    if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "import transformer_lens" 2>/dev/null; then
        echo "$dir: ready"; return
    fi
    $PY -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --upgrade pip
    "$dir/bin/python" -m pip install --quiet "torch==2.13.0"
    "$dir/bin/python" -m pip install --quiet "transformer-lens==$2" "psutil"
    "$dir/bin/python" -c "import torch, transformer_lens, transformers; print('$dir:', 'torch', torch.__version__, \
'transformers', transformers.__version__)"
}

make_venv tl39 3.9.0
make_venv tl43 4.3.0
