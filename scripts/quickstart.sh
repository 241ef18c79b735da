#!/usr/bin/env bash
# The main job on the bundled default: ingest the bundled LLaMA-GQA reference
# gradients (two tasks, 8 samples each) into a bf16 store, verify it, score
# math vs general, and print where the Parquet tables and heatmaps are.
#
#   scripts/quickstart.sh [OUT_DIR]      (default: ./gradshard-quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gradshard-quickstart}
FIX=tests/fixtures/llama-gqa
cargo build --release -q -p gradshard-cli
B=target/release/gradshard
rm -rf "$OUT"
mkdir -p "$OUT"
$B ingest --model $FIX/model --task math=$FIX/grads/math --task general=$FIX/grads/general --store "$OUT/store"
$B verify --store "$OUT/store"
$B inspect --store "$OUT/store"
$B score --store "$OUT/store" --task-a math --task-b general --out "$OUT/scores"
echo
echo "Parquet tables, summary.json and PNG/SVG heatmaps: $OUT/scores"
