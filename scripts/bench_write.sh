#!/usr/bin/env bash
# Writer throughput and compression ratio of gradshard stores, next to the raw
# write speed of the same disk, all measured in one run.
#
#   scripts/bench_write.sh [DIR] [SAMPLES_PER_TASK] [PRESET]
#
# DIR defaults to a fresh directory under ./target/bench-write (the disk under
# test); SAMPLES_PER_TASK to 40; PRESET to `small` (4 layers, D = 512, 6 MiB of
# bf16 gradients per sample). Uses target/release/gradshard (or $GRADSHARD_BIN),
# building it if absent. Values come from `gradshard synth --pool 32`, which
# draws pre-generated heavy-tailed frames so the writer, not the RNG, is timed.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-target/bench-write}
N=${2:-40}
PRESET=${3:-small}
BIN=${GRADSHARD_BIN:-target/release/gradshard}
[ -x "$BIN" ] || cargo build --release -p gradshard-cli
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
trap 'rm -rf "$DIR"/store-* "$DIR"/dd.bin "$DIR"/r-*.json' EXIT

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
echo "disk:    $(df -h "$DIR" | awk 'NR==2 {print $1, $2 " total"}') at $DIR"

# Raw sequential write of the same disk: 1 GiB of incompressible bytes, fdatasync'd.
head -c $((64 << 20)) /dev/urandom > "$DIR/rand.bin"
sync
t0=$(date +%s.%N)
for _ in $(seq 16); do cat "$DIR/rand.bin"; done | dd of="$DIR/dd.bin" bs=16M iflag=fullblock conv=fdatasync status=none
t1=$(date +%s.%N)
rm -f "$DIR/rand.bin"
RAW=$(echo "1.073741824 / ($t1 - $t0)" | bc -l)
printf "raw disk write (1 GiB, fdatasync): %.3f GB/s\n\n" "$RAW"

printf "| dtype | shuffle | zstd | raw in GB/s | to disk GB/s | ratio | peak RSS MiB |\n"
printf "|---|---|---|---|---|---|---|\n"
for dtype in bf16 f32; do
  for shuffle in on off; do
    for level in 1 3; do
      flag=""; [ "$shuffle" = off ] && flag="--no-shuffle"
      rm -rf "$DIR/store-x"
      "$BIN" synth --store "$DIR/store-x" --preset "$PRESET" --samples "$N" --pool 32 \
        --dtype $dtype --zstd-level $level $flag --report-json "$DIR/r-x.json" >/dev/null 2>&1
      python3 - "$DIR/r-x.json" "$dtype" "$shuffle" "$level" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"| {sys.argv[2]} | {sys.argv[3]} | {sys.argv[4]} | {r['raw_gb_per_s']:.3f} | {r['disk_gb_per_s']:.3f} | {r['ratio']:.3f} | {r['peak_rss_bytes']/2**20:.0f} |")
PY
    done
  done
done
