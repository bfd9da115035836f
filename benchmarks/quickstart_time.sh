#!/usr/bin/env bash
# Time the quickstart as a new user runs it right after installation: a fresh, empty cache (so the
# GGUF de-quantization, sampling C_0's texts from the model and collecting C_0 are all included),
# no data directory, offline. Writes the CPU and wall time, the machine and the printed result
# table to OUT (default benchmarks/results/quickstart.md).
#
#   bash benchmarks/quickstart_time.sh [OUT.md] [extra `blueedit fit` options]
#   BLUEEDIT="python -m blueedit" OMP_NUM_THREADS=1 bash benchmarks/quickstart_time.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/quickstart.md}
shift || true
blueedit=${BLUEEDIT:-.venv/bin/blueedit}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

start=$(date -u +"%Y-%m-%d %H:%M UTC")
env -u BLUEEDIT_DATA_DIR BLUEEDIT_CACHE="$work/cache" HF_HUB_OFFLINE=1 \
    /usr/bin/time -f "%e s wall, %U s user + %S s system CPU, peak RSS %M KB" -o "$work/time" \
    $blueedit fit --config configs/quickstart.yaml --trainer.default_root_dir="$work/run" "$@" \
    > "$work/stdout" 2> "$work/stderr"

{
    echo "# Quickstart time (fresh cache: conversion and C_0 included)"
    echo
    echo "- command: \`$blueedit fit --config configs/quickstart.yaml $*\`, measured by \`bash benchmarks/quickstart_time.sh\`"
    echo "- started: $start; torch threads: ${OMP_NUM_THREADS:-default}; $(nproc) CPUs visible"
    echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
    echo "- time: $(cat "$work/time")"
    echo
    echo '```'
    # the result table (the progress bars share stdout; keep the summary from its first line)
    tr '\r' '\n' < "$work/stdout" | sed -n '/ edits in .* rounds, /,/^metrics written/p' | sed "s#$work#<run dir>#"
    echo '```'
    echo
    echo "Warnings printed: $(grep -ci 'warning' "$work/stderr" || true)"
} > "$out"
cat "$out"
