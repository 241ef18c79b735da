#!/usr/bin/env bash
# Phase 5 cost: `score --conflicts` against plain `score` on the same store, in one run,
# at n_A = n_B = 16 and 64 samples per task.
#
#   scripts/bench_conflicts.sh [DIR] [PRESET]
#
# Defaults: DIR=target/bench-conflicts, PRESET=small (a synthetic bf16 store from
# `gradshard synth`). Uses target/release/gradshard or $GRADSHARD_BIN. Each
# configuration is scored twice and the second (warm page cache) run is reported.
# The number compared is the wall time of the slice pass (the `slice pass` phase of
# the `wall` line); the statistics after it (permutations, bootstrap) are shown apart.
# Target: the slice pass with --conflicts at most 2x the pass without.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-target/bench-conflicts}
PRESET=${2:-small}
BIN=${GRADSHARD_BIN:-target/release/gradshard}
[ -x "$BIN" ] || cargo build --release -p gradshard-cli
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"

phase() { # $1 = score stdout, $2 = phase name: its seconds on the wall line
  grep '^wall ' <<<"$1" | tr '=+' '\n\n' | grep " $2 " | awk '{print $(NF-1)}' | head -1
}

echo
echo "| samples per task | run | slice pass s | statistics s | wall s |"
echo "|---|---|---|---|---|"
for N in 16 64; do
  STORE="$DIR/store-$PRESET-$N"
  [ -f "$STORE/manifest.json" ] || "$BIN" synth --store "$STORE" --preset "$PRESET" --samples "$N" --pool 32 >/dev/null
  for MODE in plain conflicts; do
    FLAG=()
    [ "$MODE" = conflicts ] && FLAG=(--conflicts)
    for rep in 1 2; do
      OUT=$("$BIN" score --store "$STORE" --task-a math --task-b general --out "$DIR/out-$N-$MODE" \
        --overwrite --no-pictures --min-samples 0 "${FLAG[@]}")
    done
    PASS=$(phase "$OUT" "slice pass")
    WALL=$(grep '^wall ' <<<"$OUT" | awk '{print $2}')
    STATS=$(python3 -c "import sys; print(round(float(sys.argv[1]) - float(sys.argv[2]), 3))" "$WALL" "$PASS")
    echo "| $N | $MODE | $PASS | $STATS | $WALL |"
  done
done
