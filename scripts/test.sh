#!/usr/bin/env bash
# Run the test suite the way CI does (after scripts/setup.sh). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
exec ${PYTHON:-python3} -m pytest -q "$@"
