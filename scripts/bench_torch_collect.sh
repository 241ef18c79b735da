#!/usr/bin/env bash
# The cost of storing: `gradshard.torch.collect` against the bare PyTorch hooks loop
# it wraps (issue 27), same checkpoint, samples and batch, f32 factored.
#
#   scripts/bench_torch_collect.sh [DIR] [SAMPLES_PER_TASK] [SEQ]   (default target/bench-torch, 16, 128)
#
# Environment: PY (a python with torch, transformers and the gradshard package, e.g.
# after `maturin develop --release` in crates/gradshard-py; default python3),
# GRADSHARD_BIN (default target/release/gradshard; only `make-model` is used),
# THREADS (default 2), BATCH (default 8), ROUNDS (default 3).
#
# The checkpoint is bench_peers.sh's (`make-model --preset small --vocab 8000 --dtype
# f32`), loaded with transformers in f32 on the CPU. Rows, each round running both
# once (the best round counts, the range is printed):
#   - bare: the hooks pass of gradshard.torch.sample_factors per batch (forward with
#     padding masked out, token-summed cross-entropy, autograd.grad to every attention
#     projection's output), then every sample's (backprop, activation) rows cut and
#     copied to host memory -- what a hooks loop that keeps per-sample factors does;
#   - gradshard: gradshard.torch.collect(..., dtype="f32", representation="factored",
#     batch_size=BATCH) into a fresh store, timed whole: writer open, the same hooks
#     pass, the store's sink and pipeline on a second thread, close (commit, seal,
#     stats/ rebuilt).
# Overhead = gradshard / bare - 1 in wall time (target: <= 15 %); the process's CPU time
# (all threads) is printed beside it, which a loaded machine disturbs less.
set -euo pipefail
{
cd "$(dirname "$0")/.."
DIR=${1:-target/bench-torch}
N=${2:-16}
SEQ=${3:-128}
THREADS=${THREADS:-2}
BATCH=${BATCH:-8}
ROUNDS=${ROUNDS:-3}
PY=${PY:-python3}
BIN=${GRADSHARD_BIN:-target/release/gradshard}
mkdir -p "$DIR"
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

if [ ! -x "$BIN" ]; then
  echo "== building $BIN"
  cargo build --release -p gradshard-cli
fi
"$PY" -c "import torch, transformers, gradshard.torch" || {
  echo "error: $PY lacks torch, transformers or the gradshard package (maturin develop --release in crates/gradshard-py)" >&2
  exit 1
}
MODEL="$DIR/model"
if [ ! -f "$MODEL/model.safetensors" ]; then
  rm -rf "$MODEL"
  "$BIN" make-model --out "$MODEL" --preset small --vocab 8000 --dtype f32 \
    --seq "$SEQ" --samples "$N" --tasks a,b >/dev/null
fi

echo "== machine"
lscpu | grep -E "Model name|^CPU\(s\)|Thread|MHz" || true
echo "threads: $THREADS, batch: $BATCH, samples: 2 x $N of $SEQ tokens, rounds: $ROUNDS"

"$PY" - "$MODEL" "$DIR" "$THREADS" "$BATCH" "$ROUNDS" <<'EOF'
import json, shutil, sys, time
from pathlib import Path

import torch
import transformers

import gradshard
from gradshard.torch import collect, sample_factors

model_dir, out, threads, batch, rounds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
tasks = {t: [json.loads(l) for l in open(f"{model_dir}/{t}.jsonl") if l.strip()] for t in ("a", "b")}
n_samples = sum(len(v) for v in tasks.values())
# The attention projections, as the store names them (a throwaway writer says which).
probe = out / "probe-store"
shutil.rmtree(probe, ignore_errors=True)
w = gradshard.create(probe, config=model.config.to_dict(), dtype="f32",
                     names=[n for n, _ in model.named_parameters()])
wanted = [n for n, *_ in w.tensors]
w.close()
shutil.rmtree(probe)
mods = dict(model.named_modules())
modules = {n: mods[n[: -len(".weight")]] for n in wanted}


def bare():
    c0, t0 = time.process_time(), time.perf_counter()
    kept = 0
    for t, samples in tasks.items():
        ids = [s["input_ids"] for s in samples]
        for i in range(0, len(ids), batch):
            chunk = ids[i : i + batch]
            per, fac = sample_factors(model, modules, chunk)
            per = per.tolist()
            for b, x in enumerate(chunk):
                n = len(x)
                host = {k: (bp[b, :n].contiguous().cpu().numpy(), a[b, :n].contiguous().cpu().numpy())
                        for k, (bp, a) in fac.items()}
                kept += len(host)
    return time.perf_counter() - t0, time.process_time() - c0


def ours():
    store = out / "store"
    shutil.rmtree(store, ignore_errors=True)
    c0, t0 = time.process_time(), time.perf_counter()
    r = collect(model, tasks, store, dtype="f32", representation="factored", batch_size=batch, progress=False)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    assert r["stored"] == n_samples and r["factored_samples"] == n_samples, r
    return (dt, dc), r


bare()  # warm-up (allocator, first-call costs) for both rows
res_b, res_g, reps = [], [], []
for k in range(rounds):
    res_b.append(bare())
    t, r = ours()
    res_g.append(t)
    reps.append(r)
b, g = min(x[0] for x in res_b), min(x[0] for x in res_g)
cb, cg = min(x[1] for x in res_b), min(x[1] for x in res_g)
r = reps[[x[0] for x in res_g].index(g)]
rounds_s = lambda xs: ", ".join(f"{x[0]:.2f}" for x in xs)
print(f"bare hooks loop      : {n_samples / b:7.2f} samples/s  (best {b:.2f} s wall, {cb:.2f} s CPU; rounds {rounds_s(res_b)})")
print(f"gradshard.torch      : {n_samples / g:7.2f} samples/s  (best {g:.2f} s wall, {cg:.2f} s CPU; rounds {rounds_s(res_g)})")
print(f"overhead             : {100 * (g / b - 1):+.1f} % wall, {100 * (cg / cb - 1):+.1f} % CPU time (target <= 15 % wall)")
print(f"  gradshard's split: model {r['model_seconds']:.2f} s, main thread waited on the writer "
      f"{r['waited_on_writer_seconds']:.2f} s, sink {r['prepare_seconds']:.2f} s, compression "
      f"{r['compress_seconds']:.2f} s, write+fsync {r['io_seconds']:.2f} s; "
      f"{r['raw_bytes'] / 1e6:.1f} MB raw -> {r['stored_bytes'] / 1e6:.1f} MB on disk")
EOF
}
