#!/usr/bin/env bash
# The like-for-like score comparison of docs/benchmarks.md: the same per-sample
# attention gradients, read by PyTorch from the files a PyTorch user saves (one bf16
# safetensors file per sample, safe_open, then the vectorised f32 QK-OV heatmap of
# scripts/peers.py) and by `gradshard score` from a store of exactly those samples
# (`gradshard ingest` of the same files), page cache warm and cold.
#
#   scripts/bench_score_files.sh [DIR] [SAMPLES_PER_TASK] [SEQ]   (default target/bench-score-files, 16, 128)
#
# Environment: GRADSHARD_BIN (default target/release/gradshard, built if absent),
# PEERS_VENV (default target/peers-venv, the virtualenv of scripts/bench_peers.sh: torch,
# safetensors, numpy; created by that script), THREADS (default 2), ROUNDS (default 3).
#
# Never run in CI (needs torch). What is timed, per round, interleaved (gradshard, then
# PyTorch, so both see the same drift of the machine's speed):
#   - gradshard: the wall time of one whole `gradshard score` process (start-up, store
#     open, slice pass, statistics, every output file; `--n-boot 0 --n-perm 0
#     --no-pictures`);
#   - PyTorch: inside one fresh Python process, from opening the first file to the last
#     slice's M (`scripts/score_files.py score`; Python start-up and `import torch` are
#     not counted);
#   - warm: after one untimed run of each; cold: the page cache dropped
#     (`echo 3 > /proc/sys/vm/drop_caches`, needs root) before each timed run. Without
#     root the cold rows are reported as not measured.
# Sizes: the store directory and the safetensors files, `du -sb`.
set -euo pipefail
# The body is one block, read whole before it runs (editing the file mid-run is safe).
{
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${1:-target/bench-score-files}
N=${2:-16}
SEQ=${3:-128}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
BIN=${GRADSHARD_BIN:-target/release/gradshard}
VENV=${PEERS_VENV:-target/peers-venv}
PY="$VENV/bin/python"
mkdir -p "$DIR"
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

if [ ! -x "$BIN" ]; then
  echo "== building $BIN"
  cargo build --release -p gradshard-cli
fi
if ! [ -x "$PY" ] || ! "$PY" -c "import torch, safetensors" 2>/dev/null; then
  echo "error: $PY cannot import torch and safetensors; run scripts/bench_peers.sh once" \
    "(it creates that virtualenv) or set PEERS_VENV" >&2
  exit 1
fi

can_drop=0
if sync && echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then can_drop=1; fi
drop() { sync; if [ "$can_drop" = 1 ]; then echo 3 >/proc/sys/vm/drop_caches; fi; }
now() { date +%s.%N; }
load() { echo "   (load average $(cut -d' ' -f1-3 /proc/loadavg))"; }

echo "== machine"
CPU=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
FLAGS=$(grep -m1 '^flags' /proc/cpuinfo)
has() { case " $FLAGS " in *" $1 "*) echo yes ;; *) echo no ;; esac; }
MEM=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
MACHINE="$CPU, $(nproc) cores (avx2 $(has avx2), fma $(has fma), avx512f $(has avx512f)), $MEM"
echo "$MACHINE; $THREADS threads each"
echo "gradshard $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo '+dirty')"

MODEL="$DIR/model"
if [ ! -f "$MODEL/model.safetensors" ]; then
  echo "== checkpoint: make-model --preset small --vocab 8000 --seq $SEQ, $N samples per task"
  rm -rf "$MODEL"
  "$BIN" make-model --out "$MODEL" --preset small --vocab 8000 --dtype f32 \
    --seq "$SEQ" --samples "$N" --tasks a,b >/dev/null
fi

echo "== per-sample gradients (gradshard grads, attention), as bf16 safetensors files"
rm -rf "$DIR/grads-f32" "$DIR/files"
for t in a b; do
  "$BIN" grads --model "$MODEL" --input "$MODEL/$t.jsonl" --out "$DIR/grads-f32/$t" \
    --params attn >/dev/null
done
"$PY" scripts/score_files.py convert "$DIR/grads-f32" "$DIR/files"
rm -rf "$DIR/grads-f32"

echo "== the store of the same samples (gradshard ingest of those files, bf16)"
rm -rf "$DIR/store" "$DIR/out"
"$BIN" ingest --model "$MODEL" --task "a=$DIR/files/a" --task "b=$DIR/files/b" \
  --store "$DIR/store" --dtype bf16 >/dev/null
STORE_B=$(du -sb "$DIR/store" | cut -f1)
FILES_B=$(du -sb "$DIR/files" | cut -f1)
echo "   store $STORE_B bytes, safetensors files $FILES_B bytes"

# One whole score process; prints its wall seconds.
gs_run() {
  local t0 t1
  t0=$(now)
  "$BIN" score --store "$DIR/store" --task-a a --task-b b --n-boot 0 --n-perm 0 \
    --no-pictures --overwrite --out "$DIR/out" >"$DIR/score.out" 2>"$DIR/score.err"
  t1=$(now)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
}
# One fresh PyTorch process; prints its in-process seconds (JSON kept in $DIR/torch.json).
pt_run() {
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$PY" scripts/score_files.py score \
    "$MODEL" "$DIR/files" a b --threads "$THREADS" >"$DIR/torch.json" 2>"$DIR/torch.err"
  "$PY" -c 'import json,sys; print("%.3f" % json.load(open(sys.argv[1]))["seconds"])' "$DIR/torch.json"
}

echo "== warm-up (untimed)"
gs_run >/dev/null
pt_run >/dev/null
: >"$DIR/gs-warm.txt"; : >"$DIR/pt-warm.txt"; : >"$DIR/gs-cold.txt"; : >"$DIR/pt-cold.txt"
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS"
  load
  g=$(gs_run); echo "$g" >>"$DIR/gs-warm.txt"
  p=$(pt_run); echo "$p" >>"$DIR/pt-warm.txt"
  printf '   warm: gradshard %s s, PyTorch %s s\n' "$g" "$p"
  if [ "$can_drop" = 1 ]; then
    drop; g=$(gs_run); echo "$g" >>"$DIR/gs-cold.txt"
    drop; p=$(pt_run); echo "$p" >>"$DIR/pt-cold.txt"
    printf '   cold: gradshard %s s, PyTorch %s s\n' "$g" "$p"
  fi
done
SLICES=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["slices"])' "$DIR/torch.json")
TORCH=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["torch"])' "$DIR/torch.json")

range() { sort -n "$1" | awk 'NR == 1 { lo = $1 } { hi = $1 } END { if (NR) printf "%s–%s s", lo, hi; else printf "not measured (no root to drop the page cache)" }'; }
mb() { awk -v b="$1" 'BEGIN { printf "%.0f MB", b / 1e6 }'; }
echo
echo "Machine: $MACHINE. $THREADS threads each; PyTorch $TORCH; 2 × $N samples of $SEQ tokens"
echo "(make-model --preset small --vocab 8000), attention, $SLICES slices; range over $ROUNDS rounds."
echo
echo "| page cache | gradshard score (whole process), store $(mb "$STORE_B") | PyTorch, safe_open + f32 heatmap (in-process), $(mb "$FILES_B") of bf16 safetensors |"
echo "|---|---|---|"
echo "| warm | $(range "$DIR/gs-warm.txt") | $(range "$DIR/pt-warm.txt") |"
echo "| cold | $(range "$DIR/gs-cold.txt") | $(range "$DIR/pt-cold.txt") |"
exit 0
}
