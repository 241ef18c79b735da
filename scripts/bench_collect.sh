#!/usr/bin/env bash
# Collect throughput (model -> frames -> compressed store) next to the disk's raw
# write speed and the model-only speed (gradients, frames and Fisher sums
# computed, nothing stored), all measured in one run, with peak RSS.
#
#   scripts/bench_collect.sh [DIR] [SAMPLES_PER_TASK] [D] [LAYERS] [SEQ]
#
# DIR defaults to target/bench-collect (the disk under test); SAMPLES_PER_TASK
# to 64; the model is a random LLaMA checkpoint written here (D = 256, 4
# layers, 4 heads, 2 kv heads, FF = 704, vocab 512: the `small` shape of
# gradshard-models' bench_grads) and two tasks of random token sequences of SEQ
# (default 64) tokens. Params attn,mlp; bf16 store (zstd-1 + shuffle) and f32.
# Uses target/release/gradshard (or $GRADSHARD_BIN), building it if absent.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-target/bench-collect}
N=${2:-64}
D=${3:-256}
LAYERS=${4:-4}
SEQ=${5:-64}
BIN=${GRADSHARD_BIN:-target/release/gradshard}
[ -x "$BIN" ] || cargo build --release -p gradshard-cli
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
trap 'rm -rf "$DIR"/store-* "$DIR"/dd.bin "$DIR"/r-*.json' EXIT

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
echo "disk:    $(df -h "$DIR" | awk 'NR==2 {print $1, $2 " total"}') at $DIR"

# A random LLaMA checkpoint and two task files (no network, seeded).
python3 - "$DIR" "$N" "$D" "$LAYERS" "$SEQ" <<'PY'
import json, os, random, struct, sys
from array import array
out, n, d, layers, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
heads, kv, ff, vocab = 4, 2, (d * 11 // 4) // 8 * 8, 512
hd = d // heads
m = os.path.join(out, "model"); os.makedirs(m, exist_ok=True)
json.dump({"model_type": "llama", "hidden_size": d, "intermediate_size": ff, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd, "vocab_size": vocab,
           "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
           "max_position_embeddings": 4096}, open(os.path.join(m, "config.json"), "w"))
shapes = [("model.embed_tokens.weight", [vocab, d]), ("model.norm.weight", [d]), ("lm_head.weight", [vocab, d])]
for l in range(layers):
    p = f"model.layers.{l}"
    shapes += [(f"{p}.input_layernorm.weight", [d]), (f"{p}.post_attention_layernorm.weight", [d]),
               (f"{p}.self_attn.q_proj.weight", [heads * hd, d]), (f"{p}.self_attn.k_proj.weight", [kv * hd, d]),
               (f"{p}.self_attn.v_proj.weight", [kv * hd, d]), (f"{p}.self_attn.o_proj.weight", [d, heads * hd]),
               (f"{p}.mlp.gate_proj.weight", [ff, d]), (f"{p}.mlp.up_proj.weight", [ff, d]),
               (f"{p}.mlp.down_proj.weight", [d, ff])]
rng = random.Random(0)
header, blobs, off = {}, [], 0
for name, shape in shapes:
    k = 1
    for s in shape: k *= s
    if len(shape) == 1:
        a = array("f", [1.0] * k)
    else:
        sc = 1.0 / shape[1] ** 0.5
        a = array("f", [rng.uniform(-sc, sc) for _ in range(k)])
    b = a.tobytes()
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(b)]}
    blobs.append(b); off += len(b)
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
with open(os.path.join(m, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(h))); f.write(h)
    for b in blobs: f.write(b)
for t in ("math", "general"):
    with open(os.path.join(out, f"{t}.jsonl"), "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "input_ids": [rng.randrange(vocab) for _ in range(seq)]}) + "\n")
PY

# Raw sequential write of the same disk: 1 GiB of incompressible bytes, fdatasync'd.
head -c $((64 << 20)) /dev/urandom > "$DIR/rand.bin"
sync
t0=$(date +%s.%N)
for _ in $(seq 16); do cat "$DIR/rand.bin"; done | dd of="$DIR/dd.bin" bs=16M iflag=fullblock conv=fdatasync status=none
t1=$(date +%s.%N)
rm -f "$DIR/rand.bin" "$DIR/dd.bin"
RAW=$(echo "1.073741824 / ($t1 - $t0)" | bc -l)
printf "model:   random LLaMA D=%s, %s layers, 4 heads / 2 kv, seq %s, params attn,mlp; %s samples per task x 2 tasks\n" "$D" "$LAYERS" "$SEQ" "$N"
printf "raw disk write (1 GiB, fdatasync): %.3f GB/s\n\n" "$RAW"

COMMON=(--model "$DIR/model" --task "math=$DIR/math.jsonl" --task "general=$DIR/general.jsonl" --params attn,mlp --quiet)
printf "| run | samples/s | gradients GB/s (raw in) | to disk GB/s | ratio | model s | waited on writer s | compression s | write+fsync s | peak RSS MiB |\n"
printf "|---|---|---|---|---|---|---|---|---|---|\n"
row() {
  python3 - "$1" "$2" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
if r.get("model_only"):
    print(f"| {sys.argv[1]} | {r['samples_per_s']:.2f} | {r['gradient_gb_per_s']:.3f} | - | - | {r['model_seconds']:.2f} | - | - | - | {r['peak_rss_bytes']/2**20:.0f} |")
else:
    print(f"| {sys.argv[1]} | {r['samples_per_s']:.2f} | {r['raw_gb_per_s']:.3f} | {r['disk_gb_per_s']:.3f} | {r['ratio']:.3f} | {r['model_seconds']:.2f} | {r['blocked_on_writer_seconds']:.2f} | {r['compress_seconds']:.2f} | {r['io_seconds']:.2f} | {r['peak_rss_bytes']/2**20:.0f} |")
PY
}
for dtype in bf16 f32; do
  "$BIN" collect "${COMMON[@]}" --store "$DIR/store-none" --model-only --dtype $dtype --report-json "$DIR/r-m.json" >/dev/null
  row "model only ($dtype)" "$DIR/r-m.json"
  rm -rf "$DIR/store-x"
  "$BIN" collect "${COMMON[@]}" --store "$DIR/store-x" --dtype $dtype --report-json "$DIR/r-x.json" >/dev/null
  row "collect $dtype" "$DIR/r-x.json"
done
