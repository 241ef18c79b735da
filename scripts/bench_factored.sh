#!/usr/bin/env bash
# Factored vs full storage, one run on one disk: the same random checkpoint and
# tasks collected with --representation full and factored, in bf16 and f32:
# bytes on disk, collect samples/s, score seconds (same scores checked), and the
# LLaMA-2-7B projection from `gradshard plan` (2 x 768 samples at 512 and 128 tokens).
#
#   scripts/bench_factored.sh [DIR] [SAMPLES_PER_TASK] [SEQ] [PRESET] [LAYERS]
#
# Defaults: DIR target/bench-factored, 16 samples per task, 64 tokens, preset
# small (D 512, 8 heads, 4 kv heads, d 64), 4 layers; params attn,mlp; batch 8.
# Uses target/release/gradshard (or $GRADSHARD_BIN), building it if absent.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-target/bench-factored}
N=${2:-16}
SEQ=${3:-64}
PRESET=${4:-small}
LAYERS=${5:-4}
BIN=${GRADSHARD_BIN:-target/release/gradshard}
[ -x "$BIN" ] || cargo build --release -p gradshard-cli
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
trap 'rm -rf "$DIR"/store-* "$DIR"/scores-* "$DIR"/r-*.json' EXIT

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
echo "disk:    $(df -h "$DIR" | awk 'NR==2 {print $1, $2 " total"}') at $DIR"
rm -rf "$DIR/model"
"$BIN" make-model --out "$DIR/model" --preset "$PRESET" --layers "$LAYERS" --vocab 8000 \
  --dtype f32 --samples "$N" --seq "$SEQ" >/dev/null
echo "model:   make-model --preset $PRESET --layers $LAYERS, $N samples per task of $SEQ tokens, params attn,mlp, batch 8"
echo
printf '| representation | dtype | bytes on disk | vs full | collect samples/s | score s |\n|---|---|---|---|---|---|\n'
for dtype in bf16 f32; do
  full_bytes=""
  for repr in full factored; do
    s="$DIR/store-$dtype-$repr"
    rm -rf "$s" "$DIR/scores-$dtype-$repr"
    "$BIN" collect --model "$DIR/model" --task "math=$DIR/model/math.jsonl" \
      --task "general=$DIR/model/general.jsonl" --store "$s" --params attn,mlp \
      --dtype "$dtype" --representation "$repr" --batch 8 --quiet \
      --report-json "$DIR/r-collect.json" >/dev/null
    bytes=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['stored_bytes'])" "$DIR/r-collect.json")
    sps=$(python3 -c "import json,sys; print('%.2f' % json.load(open(sys.argv[1]))['samples_per_s'])" "$DIR/r-collect.json")
    t0=$(date +%s.%N)
    "$BIN" score --store "$s" --task-a math --task-b general --out "$DIR/scores-$dtype-$repr" \
      --n-boot 0 --n-perm 0 --no-pictures >/dev/null 2>&1
    t1=$(date +%s.%N)
    [ -n "$full_bytes" ] || full_bytes=$bytes
    printf '| %s | %s | %s | %.3fx | %s | %.2f |\n' "$repr" "$dtype" "$bytes" \
      "$(python3 -c "print($bytes / $full_bytes)")" "$sps" "$(python3 -c "print($t1 - $t0)")"
  done
  # Same scores from both representations (heatmap means, relative).
  python3 - "$DIR/scores-$dtype-full" "$DIR/scores-$dtype-factored" "$dtype" <<'PY'
import sys
import pyarrow.parquet as pq
def cells(d):
    t = pq.read_table(f"{d}/heatmap.parquet").to_pylist()
    return {(r["block"], r["layer"], r["head"]): r["score_mean"] for r in t}
ca, cb = cells(sys.argv[1]), cells(sys.argv[2])
worst = max((abs(ca[k] - cb[k]) / max(abs(ca[k]), 1e-300) for k in ca), default=float("nan"))
print(f"| | {sys.argv[3]}: heatmap cells full vs factored, worst relative difference {worst:.2e} over {len(ca)} cells | | | | |")
PY
done
echo
echo "LLaMA-2-7B projection (gradshard plan, attn,mlp and attn, bf16, 2 x 768 samples):"
mkdir -p "$DIR/llama-2-7b"
cat > "$DIR/llama-2-7b/config.json" <<'JSON'
{"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
 "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "vocab_size": 32000}
JSON
for params in attn attn,mlp; do
  for tok in 512 128; do
    "$BIN" plan --model "$DIR/llama-2-7b" --params "$params" --samples 1536 --tokens "$tok" \
      --dir "$DIR" --json > "$DIR/r-plan.json" || true
    python3 - "$DIR/r-plan.json" "$params" "$tok" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
tb = lambda b: f"{b / 1e12:.2f} TB"
print(f"  {sys.argv[2]:<9} {sys.argv[3]:>4} tokens: full {tb(p['full']['raw_bytes'])} raw, "
      f"factored {tb(p['factored']['raw_bytes'])} raw "
      f"({p['full']['raw_bytes'] / p['factored']['raw_bytes']:.1f}x fewer); auto stores "
      f"{p['auto']['factored_samples']} of {p['samples']} as factors; break-even n = {p['break_even_positions']}")
PY
  done
done
