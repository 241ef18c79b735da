#!/usr/bin/env bash
# GPU benchmark (issue 6). Builds nothing: takes a prebuilt `gradshard` built with
# `--features cuda` (argument 1 or $GRADSHARD_BIN) and, optionally, the prebuilt
# `bench_grads` example (argument 2 or $BENCH_GRADS_BIN) for the models on the GPU.
#
#   scripts/bench_gpu.sh [GRADSHARD_BIN] [BENCH_GRADS_BIN]
#
# Environment: BENCH_DIR (default /tmp/gradshard-bench-gpu), SAMPLES per task
# (default: 4, or 2 when the disk has < 60 GB free), COLLECT_SAMPLES per task for the
# collect run (default 12; 0 skips it; COLLECT_PRESET / COLLECT_SEQ change its
# llama-0.9b / 512 for a dry run), FLAYERS (layers of that factored store scored on
# CPU and GPU, default 0,1), LAYERS (layers scored, default
# 0-7 of 32: a quarter of the store, to keep the run short), DEVICE (default cuda:0),
# CONFIG (a config.json to use instead of the llama-2-7b preset, e.g. fewer layers of
# the same 4096 x 4096 shape on a small disk; set LAYERS to match).
#
# Makes a 7B-shaped synthetic store (`synth --preset llama-2-7b --pool 32`: 4.3 GB
# of bf16 attention gradients per sample), then prints one table:
#   score throughput CPU vs GPU (exact f64 and f32/TF32 GEMM), store GB/s vs the disk's
#   raw read speed (dd, page cache dropped when allowed), tile compute vs tile I/O
#   time, host->device copy rate, and per-sample gradient throughput with the
#   models on the GPU vs PyTorch's 17.5 samples/s (docs/design.md §6).
set -euo pipefail
BIN=${1:-${GRADSHARD_BIN:-}}
GRADS_BIN=${2:-${BENCH_GRADS_BIN:-}}
[ -n "$BIN" ] && [ -x "$BIN" ] || { echo "usage: $0 GRADSHARD_BIN [BENCH_GRADS_BIN] (a binary built with --features cuda)" >&2; exit 2; }
DIR=${BENCH_DIR:-/tmp/gradshard-bench-gpu}
DEVICE=${DEVICE:-cuda:0}
LAYERS=${LAYERS:-0,1,2,3,4,5,6,7}
mkdir -p "$DIR"
FREE_GB=$(df -Pk "$DIR" | awk 'NR==2 {printf "%d", $4/1048576}')
N=${SAMPLES:-$([ "$FREE_GB" -ge 60 ] && echo 4 || echo 2)}
LOG="$DIR/log.txt"; : >"$LOG"

gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1 || echo "no nvidia-smi")
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'); GPU: $gpu; ${FREE_GB} GB free in $DIR"

calc() { awk "BEGIN { printf \"%.6f\", $1 }"; }
drop() { sync; if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then echo cold; else echo warm; fi; }

t0=$(date +%s.%N)
GEOM=(--preset llama-2-7b); [ -n "${CONFIG:-}" ] && GEOM=(--config "$CONFIG")
"$BIN" synth --store "$DIR/store" "${GEOM[@]}" --samples "$N" --pool 32 --shard-size 8GiB >>"$LOG" 2>&1
t1=$(date +%s.%N)
STORE_BYTES=$(du -sb "$DIR/store" | cut -f1)
printf "store: ${CONFIG:-llama-2-7b}, %s samples per task, %.2f GB on disk, written in %.1f s\n" "$N" "$(calc "$STORE_BYTES/1e9")" "$(calc "$t1-$t0")"

# Raw disk read: one shard, O_DIRECT, cache dropped.
SHARD=$(ls -S "$DIR"/store/shards/* | head -1)
SB=$(stat -c %s "$SHARD")
state=$(drop); a=$(date +%s.%N)
dd if="$SHARD" of=/dev/null bs=16M iflag=direct status=none 2>/dev/null || dd if="$SHARD" of=/dev/null bs=16M status=none
b=$(date +%s.%N)
DD=$(calc "$SB/($b-$a)/1e9")

# One score pass; prints "label|cache|secs|GB|GB/s|read_s|h2d_s|compute_s|wait_s|post_s|h2d GB/s".
# tile I/O = read_s (disk -> host: read, checksum, decompress) + h2d_s (host -> device
# copies, done on the reader thread); tile compute = the compute thread's critical path;
# post_s = after-slice statistics (diagnostics, masks, bootstrap) on their own thread.
score() { # $1 label, rest: extra args
  local label=$1; shift
  local st; st=$(drop)
  local out
  out=$("$BIN" score --store "$DIR/store" --task-a math --task-b general --layers "$LAYERS" \
        --n-boot 0 --n-perm 0 --min-samples 0 --no-pictures --memory-budget 16GiB \
        --out "$DIR/out-$label" --overwrite "$@" 2>&1) || { echo "$out" >>"$LOG"; echo "FAILED"; return; }
  echo "== $label ($st)" >>"$LOG"; echo "$out" >>"$LOG"
  local line tline gline pline hline
  line=$(echo "$out" | grep '^score:')
  tline=$(echo "$out" | grep '^timing')
  gline=$(echo "$out" | grep '^gpu:' || true)
  pline=$(echo "$out" | grep '^after-slice statistics' || true)
  hline=$(echo "$out" | grep '^host->device copies on the reader thread' || true)
  local secs gb gbs rs cs ws h2d ps hs
  secs=$(echo "$line" | sed -E 's/.* in ([0-9.]+) s,.*/\1/')
  gb=$(echo "$line" | sed -E 's/.*\(([0-9.]+) GB\) read.*/\1/')
  gbs=$(echo "$line" | sed -E 's/.*, ([0-9.]+) GB\/s$/\1/')
  rs=$(echo "$tline" | sed -E 's/.*tile read ([0-9.]+) s.*/\1/')
  cs=$(echo "$tline" | sed -E 's/.*tile compute ([0-9.]+) s.*/\1/')
  ws=$(echo "$tline" | sed -E 's/.*waiting for reads ([0-9.]+) s.*/\1/')
  h2d=$(echo "$gline" | sed -nE 's/.*\(([0-9.]+) GB\/s host->device.*/\1/p')
  ps=$(echo "$pline" | sed -nE 's/^after-slice statistics: ([0-9.]+) s.*/\1/p')
  hs=$(echo "$hline" | sed -nE 's/.*reader thread: ([0-9.]+) s.*/\1/p')
  echo "$label|$st|$secs|$gb|$gbs|$rs|${hs:-0}|$cs|$ws|${ps:--}|${h2d:--}"
}

rows=()
rows+=("$(score cpu --device cpu)")
rows+=("$(score gpu-f64 --device "$DEVICE" --gpu-precision f64)")
rows+=("$(score gpu-f64-per-step --device "$DEVICE" --gpu-precision f64 --gpu-path per-step)")
rows+=("$(score gpu-f32 --device "$DEVICE" --gpu-precision f32)")

# Collect on the GPU at docs/design.md §6's PyTorch shape: a random 0.89 B LLaMA checkpoint
# (make-model --preset llama-0.9b, bf16), seq 512, attention gradients, bf16 store.
# Model only (gradients computed and copied to the host, nothing stored) and the
# full collect, samples/s each. The 7B store is removed first to make room.
CS=${COLLECT_SAMPLES:-12}
CR="-"
if [ "$CS" -gt 0 ]; then
  rm -rf "$DIR/store" "$DIR"/out-*
  rm -rf "$DIR/model09" "$DIR/cstore" "$DIR/cstore-none" "$DIR"/c-*.json
  "$BIN" make-model --out "$DIR/model09" --preset "${COLLECT_PRESET:-llama-0.9b}" --samples "$CS" --seq "${COLLECT_SEQ:-512}" >>"$LOG" 2>&1
  C=(--model "$DIR/model09" --task "math=$DIR/model09/math.jsonl" --task "general=$DIR/model09/general.jsonl"
     --params attn --dtype bf16 --device "$DEVICE" --quiet)
  cm=$("$BIN" collect "${C[@]}" --store "$DIR/cstore-none" --model-only --report-json "$DIR/c-m.json" 2>&1) || echo "$cm" >>"$LOG"
  cc=$("$BIN" collect "${C[@]}" --store "$DIR/cstore" --report-json "$DIR/c-x.json" 2>&1) || echo "$cc" >>"$LOG"
  sps() { [ -f "$1" ] && tr -d ' \n' <"$1" | sed -nE 's/.*"samples_per_s":([0-9.eE+-]+).*/\1/p' || echo FAILED; }
  CR="model only $(sps "$DIR/c-m.json") samples/s; collect bf16 $(sps "$DIR/c-x.json") samples/s"
  # The collected store is factored (auto at seq 512 on this shape): score it on the
  # CPU (factors multiplied out on the host) and on the GPU (factors uploaded and
  # multiplied out on the device), and compare the heatmaps.
  FS="$DIR/cstore"
  if [ -d "$FS" ]; then
    FI=$("$BIN" inspect --store "$FS" --json 2>>"$LOG" | python3 -c 'import json,sys; j=json.load(sys.stdin); print("%.3f GB in shards, %.3f GB as full slices (%.1fx), %d of %d samples factored" % (j["shard_bytes"]/1e9, j["equivalent_full_bytes"]/1e9*1.0, j["equivalent_full_bytes"]/max(j["shard_bytes"],1), j["representations"]["factored"]["samples"], j["samples"]))' 2>>"$LOG")
    for dev in cpu "$DEVICE"; do
      t0=$(date +%s.%N)
      "$BIN" score --store "$FS" --task-a math --task-b general --layers "${FLAYERS:-0,1}" --n-boot 0 --n-perm 0 --min-samples 0 \
        --no-pictures --out "$DIR/fout-${dev%%:*}" --overwrite --device "$dev" >>"$LOG" 2>&1 || echo "factored score on $dev FAILED" >>"$LOG"
      t1=$(date +%s.%N)
      FR="${FR:-}${dev}: $(calc "$t1-$t0") s; "
    done
    FD=$(python3 - "$DIR/fout-cpu/summary.json" "$DIR/fout-${DEVICE%%:*}/summary.json" <<'PY' 2>>"$LOG" || echo "compare failed"
import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:3])
def walk(x, y, acc):
    if isinstance(x, dict):
        for k in x:
            if k in y and k not in ("timing", "backend", "device", "reads", "options"):
                walk(x[k], y[k], acc)
    elif isinstance(x, list):
        for u, v in zip(x, y):
            walk(u, v, acc)
    elif isinstance(x, float) and isinstance(y, float) and x != 0:
        acc.append(abs(x - y) / abs(x))
acc = []
walk(a, b, acc)
print(f"summary.json numbers CPU vs GPU: worst relative difference {max(acc):.2e} over {len(acc)} values")
PY
)
    FR="${FR}store: $FI; $FD"
  fi
  rm -rf "$DIR/cstore" "$DIR/cstore-none"
fi

# Per-sample gradients with the models on the GPU (burn, bf16 weights, random LLaMA shape).
GR="-"
if [ -n "$GRADS_BIN" ] && [ -x "$GRADS_BIN" ]; then
  timeout "${GRADS_TIMEOUT:-180}" "$GRADS_BIN" --shape large --device "$DEVICE" >"$DIR/grads.txt" 2>&1 || true
  cat "$DIR/grads.txt" >>"$LOG"
  GR=$(grep -iE 'samples/s' "$DIR/grads.txt" | tr '\n' ';' || true)
fi

echo
echo "| pass | page cache | wall s | store GB read | store GB/s | tile read s | host->device s | tile compute s | compute / tile I/O | waiting for reads s | statistics thread s | host->device GB/s |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
for r in "${rows[@]}"; do
  IFS='|' read -r l st secs gb gbs rs hs cs ws ps h2d <<<"$r"
  if [ "$l" = FAILED ] || [ -z "$cs" ]; then echo "| $r | FAILED (see $LOG) |"; continue; fi
  pct=$(calc "100*$cs/($rs+$hs+1e-12)")
  printf "| %s | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.1f%% | %.2f | %s | %s |\n" "$l" "$st" "$secs" "$gb" "$gbs" "$rs" "$hs" "$cs" "$pct" "$ws" "$ps" "$h2d"
done
echo "(goal, issue 6: tile compute < 10% of tile I/O on the GPU rows)"
printf "\nraw disk read (dd, O_DIRECT, %s): %.2f GB/s\n" "$state" "$DD"
echo "per-sample gradients, models on $DEVICE (bench_grads --shape large: D 1024, 8 layers, seq <= 256): $GR"
echo "collect on $DEVICE, random ${COLLECT_PRESET:-llama-0.9b} LLaMA checkpoint (make-model), seq ${COLLECT_SEQ:-512}, attention gradients, $CS samples per task: $CR"
echo "factored store (the collect above), score layers ${FLAYERS:-0,1}, CPU vs $DEVICE: ${FR:--}"
echo "PyTorch reference (docs/design.md §6, 0.89 B LLaMA shape, seq 512, bf16, H100): 17.5 samples/s fwd+bwd; 14.2 with pinned copies of attention grads; 9.0 with pageable copies"
echo "full log: $LOG"
