#!/usr/bin/env bash
# gradshard next to PyTorch on the same machine, same checkpoint, same samples, same
# threads (issue 12): per-sample attention gradients (one backward per sample and
# batched, full and factored representation) and the QK-OV scoring pass.
#
#   scripts/bench_peers.sh [DIR] [SAMPLES_PER_TASK] [SEQ]   (default target/bench-peers, 16, 128)
#
# Environment: GRADSHARD_BIN (default target/release/gradshard, built if absent),
# PEERS_VENV (default target/peers-venv), THREADS (default 2), BATCH (default 8).
#
# Never run in CI: the virtualenv takes several GB. When $PEERS_VENV lacks torch and
# transformers it is created and filled from PyPI. The CPU-only torch index
# (download.pytorch.org/whl/cpu, ~200 MB) is tried first with a short timeout; where it
# is unreachable (as on the machine this was written on) PyPI's torch is installed, which
# is the CUDA build: it pulls the CUDA runtime wheels (~5 GB in all) even for a CPU.
#
# Rows (each measured twice, the better kept; PyTorch gets one untimed warm-up sample,
# gradshard's timings include its first sample):
#   - collect: `gradshard collect --model-only --params attn --dtype f32 --batch 1|8
#     --representation full|factored`, samples / (model + frames/stats seconds), i.e.
#     without loading, as PyTorch is timed; against torch.autograd.grad in a loop (full,
#     batch 1), forward/backward hooks with activations x backprops (full, batch 8) and
#     the same hooks keeping the per-sample factors (factored, batch 1 and 8);
#   - score: the "slice pass" of `gradshard score` (unsigned, task-A Fisher, no
#     bootstrap or permutations, page cache warm: the second of two runs counts) on a
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

# samples/s of one model-only collect row (better of two runs).
collect_rate() {
  local batch=$1 rep=$2 best=0 r
  for _ in 1 2; do
    rm -rf "$DIR/mo"
    "$BIN" collect --model "$MODEL" "${TASKS[@]}" --store "$DIR/mo" --model-only \
      --params attn --dtype f32 --batch "$batch" --representation "$rep" --quiet \
      --report-json "$DIR/mo.json" >/dev/null
    r=$("$PY" -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["stored"] / (j["model_seconds"] + j["prepare_seconds"]))' "$DIR/mo.json")
    best=$("$PY" -c "print(max($best, $r))")
  done
  echo "$best"
}

echo "== gradshard collect --model-only (twice each)"
declare -A GS
for row in "1 full loop_full" "1 factored loop_factored" "$BATCH full batched_full" "$BATCH factored batched_factored"; do
  set -- $row
  GS[$3]=$(collect_rate "$1" "$2")
  printf '  %-17s %8.2f samples/s\n' "$3" "${GS[$3]}"
done

load
echo "== gradshard score (bf16 stores, page cache warm)"
for rep in full factored; do
  # Always collected afresh: a store from an older binary may have another codec.
  rm -rf "$DIR/s-$rep"
  "$BIN" collect --model "$MODEL" "${TASKS[@]}" --store "$DIR/s-$rep" --params attn \
    --dtype bf16 --representation "$rep" --quiet >/dev/null
  echo "  store $rep: $(du -sb "$DIR/s-$rep" | cut -f1) bytes, codec $("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["codec"]["name"])' "$DIR/s-$rep/manifest.json")"
  best=
  for i in 1 2 3; do
    s=$("$BIN" score --store "$DIR/s-$rep" --task-a a --task-b b --n-boot 0 --n-perm 0 \
      --no-pictures --overwrite --out "$DIR/o-$rep" 2>"$DIR/score.err" | sed -n 's/.*slice pass \([0-9.]*\) s.*/\1/p')
    # The first run warms the page cache; the better of the other two counts.
    if [ "$i" -gt 1 ]; then best=$("$PY" -c "print(min(${best:-1e9}, $s))"); fi
  done
  GS[score_$rep]=$best
  printf '  %-17s %8.3f s slice pass\n' "score_$rep" "$best"
done

echo "== gradshard grads (parity reference: task a)"
rm -rf "$DIR/grads-a"
"$BIN" grads --model "$MODEL" --input "$MODEL/a.jsonl" --out "$DIR/grads-a" --params attn >/dev/null

load
echo "== PyTorch (scripts/peers.py)"
PT=$(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$PY" scripts/peers.py "$MODEL" a b \
  --threads "$THREADS" --batch "$BATCH" --reps 2 --grads-a "$DIR/grads-a" 2>"$DIR/torch.err")
echo "$PT" >"$DIR/torch.json"
echo "  $PT"
load

"$PY" - "$DIR/torch.json" "$MACHINE" "$THREADS" "$BATCH" "$N" "$SEQ" \
  "${GS[loop_full]}" "${GS[loop_factored]}" "${GS[batched_full]}" "${GS[batched_factored]}" \
  "${GS[score_full]}" "${GS[score_factored]}" <<'EOF'
import json, sys
t = json.load(open(sys.argv[1]))
machine, threads, batch, n, seq = sys.argv[2:7]
lf, lfa, bf, bfa, sf, sfa = map(float, sys.argv[7:13])
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
      f"{t['samples']} samples of {seq} tokens (LLaMA small: 4 layers, D 512, vocab 8000).")
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
