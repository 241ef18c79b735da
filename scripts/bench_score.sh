#!/usr/bin/env bash
# Scoring throughput from a gradshard store, next to the same disk's raw read
# speed and next to a baseline that scores the same tiles from uncompressed,
# memory-mapped f32 arrays with the same engine and GEMM — all in one run.
#
#   scripts/bench_score.sh [DIR] [SAMPLES_PER_TASK] [PRESET]
#
# Defaults: DIR=target/bench-score, 11 samples per task of the `llama-0.9b`
# preset (16 layers, D = 2048, 16 heads: 537 MB of bf16 attention gradients per
# sample, so 22 samples make a store of about 8.4 GB on disk; the f32 baseline
# takes 2x the raw size again). Uses target/release/gradshard or $GRADSHARD_BIN.
# Page cache is dropped between measurements where the kernel allows it (root);
# otherwise the script says the reads may be warm.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-target/bench-score}
N=${2:-11}
PRESET=${3:-llama-0.9b}
BIN=${GRADSHARD_BIN:-target/release/gradshard}
[ -x "$BIN" ] || cargo build --release -p gradshard-cli
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

drop() { sync; if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then echo cold; else echo "warm (could not drop the page cache)"; fi; }

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
if [ ! -f "$DIR/store/manifest.json" ] || [ "$(du -sb "$DIR/store" | cut -f1)" -lt 8000000000 ]; then
  "$BIN" synth --store "$DIR/store" --preset "$PRESET" --samples "$N" --pool 32 --shard-size 2GiB >/dev/null
fi
STORE_BYTES=$(du -sb "$DIR/store" | cut -f1)
printf "store:   %.2f GB on disk (%s, %s samples per task)\n" "$(python3 -c "print($STORE_BYTES/1e9)")" "$PRESET" "$N"

# Build the f32 baseline once (not timed).
"$BIN" bench-score --store "$DIR/store" --raw "$DIR/raw" --only raw >/dev/null

SHARD=$(ls "$DIR"/store/shards/*.gss | head -1)
state=$(drop)
t0=$(date +%s.%N)
dd if="$SHARD" of=/dev/null bs=16M iflag=direct status=none
t1=$(date +%s.%N)
SB=$(stat -c %s "$SHARD")
RAWREAD=$(python3 -c "print($SB / ($t1 - $t0) / 1e9)")
printf "raw disk read (O_DIRECT, %s): %.3f GB/s\n" "$(basename "$SHARD")" "$RAWREAD"

state=$(drop)
S=$("$BIN" bench-score --store "$DIR/store" --raw "$DIR/raw" --only store | head -1)
state2=$(drop)
R=$("$BIN" bench-score --store "$DIR/store" --raw "$DIR/raw" --only raw | head -1)
A=$("$BIN" bench-score --store "$DIR/store" --raw "$DIR/raw" --only both | tail -1)

python3 - "$S" "$R" "$A" "$state" "$state2" "$RAWREAD" <<'PY'
import json, sys
s, r, a = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
print()
print("| source | page cache | seconds | GB read | GB/s of reads | peak RSS MiB |")
print("|---|---|---|---|---|---|")
print(f"| gradshard store (bf16, zstd-1, shuffle) | {sys.argv[4]} | {s['seconds']:.2f} | {s['bytes_read']/1e9:.2f} | {s['gb_per_s']:.3f} | {s['peak_rss_bytes']/2**20:.0f} |")
print(f"| uncompressed f32 mmap baseline | {sys.argv[5]} | {r['seconds']:.2f} | {r['bytes_read']/1e9:.2f} | {r['gb_per_s']:.3f} | {r['peak_rss_bytes']/2**20:.0f} |")
print(f"| raw disk read (dd, O_DIRECT) | cold | | | {float(sys.argv[6]):.3f} | |")
print()
print(f"store vs baseline wall time: {r['seconds']/s['seconds']:.2f}x (>1 means the store is faster); heatmaps agree: {a.get('agree')}")
PY
