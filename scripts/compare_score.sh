#!/usr/bin/env bash
# Scorer A/B benchmark: two prebuilt `gradshard` binaries (e.g. before and after a
# change) score the same 7B-shaped synthetic store in alternating rounds, page cache
# dropped before each pass when allowed, and the outputs are checked to be identical.
#
#   scripts/compare_score.sh BIN_A BIN_B [extra score args...]
#
# Environment: BENCH_DIR (default /tmp/gradshard-compare), SAMPLES per task (4),
# LAYERS of the synthetic model (4; each layer is 128 slices of 4096 x 128 values,
# the LLaMA-2-7B attention shape), ROUNDS (2), DEVICE (cpu).
# Builds nothing. Prints one table row per pass and the median per binary.
set -euo pipefail
A=${1:?usage: $0 BIN_A BIN_B [score args...]}
B=${2:?usage: $0 BIN_A BIN_B [score args...]}
shift 2
DIR=${BENCH_DIR:-/tmp/gradshard-compare}
N=${SAMPLES:-4}
L=${LAYERS:-4}
ROUNDS=${ROUNDS:-2}
DEVICE=${DEVICE:-cpu}
mkdir -p "$DIR"
LOG="$DIR/log.txt"; : >"$LOG"
cat >"$DIR/config.json" <<EOF
{"model_type":"llama","hidden_size":4096,"num_attention_heads":32,"num_key_value_heads":32,"num_hidden_layers":$L,"intermediate_size":11008,"head_dim":128,"vocab_size":32000}
EOF
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
"$A" synth --store "$DIR/store" --config "$DIR/config.json" --samples "$N" --pool 32 >>"$LOG" 2>&1
echo "store: $L layers of the LLaMA-2-7B attention shape, $N samples per task, $(du -sh "$DIR/store" | cut -f1) on disk"
drop() { sync; if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then echo cold; else echo warm; fi; }

echo "| binary | round | page cache | wall s | tile read s | tile compute s | statistics s |"
echo "|---|---|---|---|---|---|---|"
for r in $(seq 1 "$ROUNDS"); do
  for which in A B; do
    bin=$A; [ "$which" = B ] && bin=$B
    st=$(drop)
    out=$("$bin" score --store "$DIR/store" --task-a math --task-b general --device "$DEVICE" \
          --n-boot 0 --n-perm 0 --min-samples 0 --no-pictures --out "$DIR/out-$which" --overwrite "$@" 2>&1) \
      || { echo "$out" >>"$LOG"; echo "| $which | $r | FAILED (see $LOG) |"; continue; }
    echo "== $which round $r" >>"$LOG"; echo "$out" >>"$LOG"
    secs=$(echo "$out" | sed -nE 's/^score:.* in ([0-9.]+) s,.*/\1/p')
    rs=$(echo "$out" | sed -nE 's/^timing.*tile read ([0-9.]+) s.*/\1/p')
    cs=$(echo "$out" | sed -nE 's/^timing.*tile compute ([0-9.]+) s.*/\1/p')
    ps=$(echo "$out" | sed -nE 's/^after-slice statistics: ([0-9.]+) s.*/\1/p')
    echo "| $which | $r | $st | $secs | $rs | $cs | ${ps:-(in compute)} |"
    echo "$which $secs" >>"$DIR/walls"
  done
done
for which in A B; do
  med=$(awk -v w="$which" '$1 == w {print $2}' "$DIR/walls" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  echo "median wall $which: $med s"
done
rm -f "$DIR/walls"
if python3 -c 'import pyarrow' 2>/dev/null; then
  python3 - "$DIR" <<'EOF'
import sys, pyarrow.parquet as pq
d = sys.argv[1]
for f in ["heatmap", "diagnostics", "group_fisher", "masks", "overlap", "top_pairs"]:
    a, b = pq.read_table(f"{d}/out-A/{f}.parquet"), pq.read_table(f"{d}/out-B/{f}.parquet")
    print(f"{f}.parquet: {'identical' if a.equals(b) else 'DIFFERENT'}")
EOF
else
  echo "(pyarrow not installed: outputs not compared)"
fi
