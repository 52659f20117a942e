#!/usr/bin/env bash
# docs/scale.md's torchrun command, run as the page says: its set-up block and its sweep.py block saved
# as one script and started by `torchrun --standalone --nproc-per-node 2` (gloo, 2 CPU processes).
# Prints "N passed, M failed".
set -euo pipefail
PY=${PY:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PYTHONPATH="$PWD" "$PY" - "$work/sweep.py" <<'PYEOF'
import sys
from pathlib import Path
from tests.test_docs import python_blocks

blocks = [code for _, code in python_blocks(Path("docs/scale.md"))]
sweep = [code for code in blocks if "init_distributed()" in code]
assert len(sweep) == 1, "docs/scale.md should hold one torchrun example (the block calling init_distributed())"
Path(sys.argv[1]).write_text(blocks[0] + sweep[0] + "print('rank done')\n")
PYEOF
status=0
log="$work/log"
PYTHONPATH="$PWD" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "$PY" -m torch.distributed.run --standalone \
  --nproc-per-node 2 "$work/sweep.py" >"$log" 2>&1 || status=$?
done_ranks=$(grep -o "rank done" "$log" | wc -l)
if [ "$status" -eq 0 ] && [ "$done_ranks" -eq 2 ]; then
  echo "torchrun docs/scale.md sweep.py on 2 gloo processes: 1 passed, 0 failed"
else
  grep -v "^\s*$" "$log" | tail -60
  echo "torchrun docs/scale.md sweep.py on 2 gloo processes: 0 passed, 1 failed"
  exit 1
fi
