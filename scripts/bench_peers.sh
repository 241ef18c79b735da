#!/usr/bin/env bash
# gradshard next to PyTorch on the same machine, same checkpoint, same samples, same
# threads (issue 12): per-sample attention gradients (one backward per sample and
# batched, full and factored representation) and the QK-OV scoring pass.
#
#   scripts/bench_peers.sh [DIR] [SAMPLES_PER_TASK] [SEQ]   (default target/bench-peers, 16, 128)
#
# Environment: GRADSHARD_BIN (default target/release/gradshard, built if absent),
# PEERS_VENV (default target/peers-venv), THREADS (default 2), BATCH (default 8),
# ROUNDS (default 3).
#
# Never run in CI: the virtualenv takes several GB. When $PEERS_VENV lacks torch and
# transformers it is created and filled from PyPI. The CPU-only torch index
# (download.pytorch.org/whl/cpu, ~200 MB) is tried first with a short timeout; where it
# is unreachable (as on the machine this was written on) PyPI's torch is installed, which
# is the CUDA build: it pulls the CUDA runtime wheels (~5 GB in all) even for a CPU.
#
# Rows, measured in ROUNDS rounds (default 3): each round runs every gradshard row once,
# then every PyTorch row once, so that both tools see the same drift of this VM's speed
# (it moves by ±25 % within minutes); the best of the rounds counts for each side, and
# the range over the rounds is printed under the table. PyTorch gets one untimed warm-up
# sample per round, gradshard's timings include its first sample:
#   - collect: `gradshard collect --model-only --params attn --dtype f32 --batch 1|8
#     --representation full|factored`, samples / (model + frames/stats seconds), i.e.
#     without loading, as PyTorch is timed; against torch.autograd.grad in a loop (full,
#     batch 1), forward/backward hooks with activations x backprops (full, batch 8) and
#     the same hooks keeping the per-sample factors (factored, batch 1 and 8);
#   - score: the "slice pass" of `gradshard score` (unsigned, task-A Fisher, no
#     bootstrap or permutations, page cache warm: one untimed run first) on a
#     bf16 store collected as full slices and one collected as factors, against the same
#     per-slice computation vectorised in f32 by PyTorch from RAM (Fisher, X, Y, X·Yᵀ;
#     from per-sample slices, and from per-sample factors with one bmm per slice).
# Plus a parity check: torch's gradient of task A's first sample against `gradshard
# grads` of the same sample (relative Frobenius difference, must be <= 1e-4).
set -euo pipefail
# The body is one block, read whole before it runs (editing the file mid-run is safe).
{
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${1:-target/bench-peers}
N=${2:-16}
SEQ=${3:-128}
THREADS=${THREADS:-2}
BATCH=${BATCH:-8}
ROUNDS=${ROUNDS:-3}
BIN=${GRADSHARD_BIN:-target/release/gradshard}
VENV=${PEERS_VENV:-target/peers-venv}
mkdir -p "$DIR"
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

if [ ! -x "$BIN" ]; then
  echo "== building $BIN"
  cargo build --release -p gradshard-cli
fi
PY="$VENV/bin/python"
if ! [ -x "$PY" ] || ! "$PY" -c "import torch, transformers, safetensors, numpy" 2>/dev/null; then
  echo "== virtualenv $VENV: torch, transformers, safetensors, numpy (several GB; minutes)"
  python3 -m venv "$VENV"
  "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip
  if ! "$PY" -m pip install --quiet --disable-pip-version-check --retries 0 --timeout 5 \
    --index-url https://download.pytorch.org/whl/cpu torch 2>/dev/null; then
    echo "   the CPU-only torch index is unreachable: installing PyPI's torch (the CUDA build)"
    "$PY" -m pip install --quiet --disable-pip-version-check torch
  fi
  "$PY" -m pip install --quiet --disable-pip-version-check transformers safetensors numpy
  "$PY" -c "import torch, transformers, safetensors, numpy" || {
    echo "error: torch/transformers could not be installed into $VENV" >&2
    exit 1
  }
fi

MODEL="$DIR/model"
if [ ! -f "$MODEL/model.safetensors" ]; then
  rm -rf "$MODEL"
  "$BIN" make-model --out "$MODEL" --preset small --vocab 8000 --dtype f32 \
    --seq "$SEQ" --samples "$N" --tasks a,b >/dev/null
fi
TASKS=(--task "a=$MODEL/a.jsonl" --task "b=$MODEL/b.jsonl")

echo "== machine"
CPU=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
CORES=$(nproc)
FLAGS=$(grep -m1 '^flags' /proc/cpuinfo)
has() { case " $FLAGS " in *" $1 "*) echo yes ;; *) echo no ;; esac; }
MEM=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
MACHINE="$CPU, $CORES cores (avx512f $(has avx512f), amx $(has amx_tile)), $MEM"
echo "$MACHINE; $THREADS threads each"
# Other work on the machine skews both sides: the load average is printed at each stage.
load() { echo "   (load average $(cut -d' ' -f1-3 /proc/loadavg))"; }
load
echo "gradshard $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo '+dirty')"

# samples/s of one model-only collect run.
collect_rate() {
  local batch=$1 rep=$2
  rm -rf "$DIR/mo"
  "$BIN" collect --model "$MODEL" "${TASKS[@]}" --store "$DIR/mo" --model-only \
    --params attn --dtype f32 --batch "$batch" --representation "$rep" --quiet \
    --report-json "$DIR/mo.json" >/dev/null
  "$PY" -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["stored"] / (j["model_seconds"] + j["prepare_seconds"]))' "$DIR/mo.json"
}

# Seconds of the slice pass of one score run.
score_pass() {
  "$BIN" score --store "$DIR/s-$1" --task-a a --task-b b --n-boot 0 --n-perm 0 \
    --no-pictures --overwrite --out "$DIR/o-$1" 2>"$DIR/score.err" | sed -n 's/.*slice pass \([0-9.]*\) s.*/\1/p'
}

echo "== bf16 stores for score, and gradshard grads (parity reference: task a)"
for rep in full factored; do
  # Always collected afresh: a store from an older binary may have another codec.
  rm -rf "$DIR/s-$rep"
  "$BIN" collect --model "$MODEL" "${TASKS[@]}" --store "$DIR/s-$rep" --params attn \
    --dtype bf16 --representation "$rep" --quiet >/dev/null
  echo "  store $rep: $(du -sb "$DIR/s-$rep" | cut -f1) bytes, codec $("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["codec"]["name"])' "$DIR/s-$rep/manifest.json")"
  score_pass "$rep" >/dev/null # warms the page cache, untimed
done
rm -rf "$DIR/grads-a"
"$BIN" grads --model "$MODEL" --input "$MODEL/a.jsonl" --out "$DIR/grads-a" --params attn >/dev/null

ROWS=(loop_full loop_factored batched_full batched_factored score_full score_factored)
for row in "${ROWS[@]}"; do : >"$DIR/gs-$row.txt"; done
rm -f "$DIR"/torch-*.json
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS: gradshard"
  load
  for row in "1 full loop_full" "1 factored loop_factored" "$BATCH full batched_full" "$BATCH factored batched_factored"; do
    set -- $row
    v=$(collect_rate "$1" "$2")
    echo "$v" >>"$DIR/gs-$3.txt"
    printf '  %-17s %8.2f samples/s\n' "$3" "$v"
  done
  for rep in full factored; do
    v=$(score_pass "$rep")
    echo "$v" >>"$DIR/gs-score_$rep.txt"
    printf '  %-17s %8.3f s slice pass\n' "score_$rep" "$v"
  done
  echo "== round $round of $ROUNDS: PyTorch (scripts/peers.py)"
  load
  PARITY=()
  [ "$round" = 1 ] && PARITY=(--grads-a "$DIR/grads-a")
  PT=$(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$PY" scripts/peers.py "$MODEL" a b \
    --threads "$THREADS" --batch "$BATCH" --reps 1 "${PARITY[@]}" 2>"$DIR/torch.err")
  echo "$PT" >"$DIR/torch-$round.json"
  echo "  $PT"
done
load

"$PY" - "$DIR" "$MACHINE" "$THREADS" "$BATCH" "$N" "$SEQ" "$ROUNDS" <<'EOF'
import glob, json, os, sys
d = sys.argv[1]
machine, threads, batch, n, seq, rounds = sys.argv[2:8]
runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(d, "torch-*.json")))]
gsv = {}
for row in ("loop_full", "loop_factored", "batched_full", "batched_factored",
            "score_full", "score_factored"):
    with open(os.path.join(d, f"gs-{row}.txt")) as f:
        gsv[row] = [float(x) for x in f.read().split()]
# Best of the rounds: the highest rate, the shortest time.
def best(vals, unit):
    return max(vals) if unit == "samples/s" else min(vals)
t = dict(runs[0])
spread = {}
for key, unit in (("loop_full", "samples/s"), ("loop_factored", "samples/s"),
                  ("batched_full", "samples/s"), ("batched_factored", "samples/s"),
                  ("score_full_s", "s"), ("score_factored_s", "s")):
    vals = [r[key] for r in runs]
    t[key] = best(vals, unit)
    spread[key] = (min(vals), max(vals))
lf, lfa, bf, bfa = (best(gsv[k], "samples/s") for k in
                    ("loop_full", "loop_factored", "batched_full", "batched_factored"))
sf, sfa = (best(gsv[k], "s") for k in ("score_full", "score_factored"))
gkey = {"loop_full": "loop_full", "loop_factored": "loop_factored",
        "batched_full": "batched_full", "batched_factored": "batched_factored",
        "score_full_s": "score_full", "score_factored_s": "score_factored"}
rows = [
    ("per-sample gradients, one backward per sample, full",
     "`collect --model-only --batch 1 --representation full`", lf,
     "autograd.grad loop", t["loop_full"], "samples/s"),
    ("per-sample gradients, one backward per sample, factored",
     "`--batch 1 --representation factored`", lfa,
     "hooks, factors only, batch 1", t["loop_factored"], "samples/s"),
    ("per-sample gradients, batched, full",
     f"`--batch {batch} --representation full`", bf,
     f"hooks, activations × backprops, batch {batch}", t["batched_full"], "samples/s"),
    ("per-sample gradients, batched, factored",
     f"`--batch {batch} --representation factored`", bfa,
     f"hooks, factors only, batch {batch}", t["batched_factored"], "samples/s"),
    (f"QK-OV heatmap ({t['slices']} slices), full bf16 store",
     "score, slice pass (page cache warm)", sf,
     "vectorised f32 from RAM", t["score_full_s"], "s"),
    (f"QK-OV heatmap ({t['slices']} slices), factored bf16 store",
     "score, slice pass (page cache warm)", sfa,
     "vectorised f32 from factors in RAM (bmm PᵀS per slice)", t["score_factored_s"], "s"),
]
print()
print(f"Machine: {machine}. {threads} threads each (RAYON_NUM_THREADS, torch.set_num_threads); "
      f"PyTorch {t['torch']} (MKL {'yes' if t['mkl'] else 'no'}); "
      f"{t['samples']} samples of {seq} tokens (LLaMA small: 4 layers, D 512, vocab 8000); "
      f"best of {len(runs)} interleaved rounds for each side.")
print()
print("| work | gradshard | PyTorch | ratio |")
print("|---|---|---|---|")
below = []
for work, gdesc, g, pdesc, p, unit in rows:
    ratio = g / p if unit == "samples/s" else p / g
    if unit == "s":
        gs, ps = f"{g:.3f} s", f"{p:.3f} s"
    else:
        gs, ps = f"{g:.2f} samples/s", f"{p:.2f} samples/s"
    print(f"| {work} | {gdesc}: {gs} | {pdesc}: {ps} | {ratio:.2f}× |")
    if ratio < 1.0:
        below.append(work)
print()
print("Range over the rounds (gradshard | PyTorch):")
for key, (lo, hi) in spread.items():
    g = gsv[gkey[key]]
    fmt = "{:.3f}" if key.endswith("_s") else "{:.2f}"
    print(f"  {gkey[key]}: {fmt.format(min(g))}–{fmt.format(max(g))} | "
          f"{fmt.format(lo)}–{fmt.format(hi)}")
print()
print("Ratio = gradshard speed / PyTorch speed (time ratio inverted for score). gradshard does "
      "more in every collect row (slice cuts, per-slice Σg²/T statistics).")
if below:
    print(f"Below 1.0: {'; '.join(below)}.")
par = t.get("parity")
if par is not None:
    verdict = "ok" if par <= 1e-4 else "FAILED"
    print(f"Gradient parity ({t['parity_sample']}, every attention weight): worst relative "
          f"Frobenius difference torch vs gradshard {par:.2e} (limit 1e-4): {verdict}")
    if par > 1e-4:
        sys.exit(1)
EOF
exit 0
}
