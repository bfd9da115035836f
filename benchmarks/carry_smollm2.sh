#!/usr/bin/env bash
# Carry an edited SmolLM2-135M forward, undo a round and see the edit (README "Continuing, undoing
# and seeing edits"; docs/algorithms.md §11). Six of the packaged example edits, 2 per round,
# MEMIT + BLUE (configs/quickstart.yaml, 10 target steps):
#   one     = edit all 6 in one run (3 rounds)
#   first   = edit the first 4 (2 rounds);  second = edit `first` with the last 2 (sitting 2)
#   one-reverted = `one` with its last round reverted
# then checks second == one and one-reverted == first (every tensor), and writes the
# before/after generations of `one`. Run from the repository root:
#   flock /work/heavy.lock nice -n 5 bash benchmarks/carry_smollm2.sh [WORKDIR]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
STARTED=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)
COMMAND="bash benchmarks/carry_smollm2.sh $*"
WORK=${1:-$(mktemp -d)}
OUT=$REPO/benchmarks/results/carry_smollm2
PY=${PYTHON:-python}
mkdir -p "$WORK" "$OUT"
cd "$WORK"
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
$PY -c "
import json; r = json.load(open('$REPO/src/blueedit/data/examples/example_edits.json'))
json.dump(r[:6], open('all.json', 'w')); json.dump(r[:4], open('first.json', 'w')); json.dump(r[4:6], open('second.json', 'w'))"
common="--config $REPO/configs/quickstart.yaml --data.edits_per_round=2 --model.evaluate=false --trainer.logger=false
 --trainer.enable_progress_bar=false --trainer.accelerator=cpu --model.editing.target.v_num_grad_steps=10"
t() { /usr/bin/time -f "%e s wall, %U+%S s CPU" "$@"; }
{
  echo "## edit all 6 (one run)";           t $PY -m blueedit edit $common --edits all.json --output one 2>&1 | grep -E "editor state|CPU"
  echo "## edit the first 4 (sitting 1)";   t $PY -m blueedit edit $common --edits first.json --output first 2>&1 | grep -E "editor state|CPU"
  echo "## edit first + the last 2 (sitting 2)"
  t $PY -m blueedit edit $common --model.model.name_or_path="$WORK/first" --edits second.json --output second 2>&1 | grep -E "editor state|CPU"
  rm -rf one-reverted && cp -r one one-reverted
  echo "## revert the last round of one";   t $PY -m blueedit revert one-reverted --rounds 1 2>&1 | grep -E "reverted|CPU"
  echo "## comparisons"
  $PY - <<'PY'
import torch
from safetensors.torch import load_file
from blueedit import carry
for a, b in (("second", "one"), ("one-reverted", "first")):
    ta, tb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    print(f"{a} vs {b}: max |diff| over all tensors {max(carry.max_diff(ta[k], tb[k]) for k in ta)}, "
          f"bit-identical: {all(torch.equal(ta[k], tb[k]) for k in ta)}")
PY
  echo "## sizes"; du -sh one/editor_state.safetensors one/model.safetensors
} | tee "$OUT/log.txt"
t $PY -m blueedit generate one --max_new_tokens 12 --output_dir "$OUT" 2>&1 | grep -E "CPU" | tee -a "$OUT/log.txt"
$PY -m blueedit.bench.harness record "$OUT" --command "$COMMAND" --started "$STARTED"
