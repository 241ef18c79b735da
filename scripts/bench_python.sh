#!/usr/bin/env bash
# Reading one (layer, block, head) tile from Python, next to the Rust reader of the
# CLI on the same tile and to numpy.fromfile of an uncompressed f32 copy of it.
#
#   scripts/bench_python.sh [DIR] [SAMPLES]      (default /tmp/gradshard-bench-python, 12)
#
# Makes (or resumes) `gradshard synth --preset llama-0.9b` with SAMPLES samples in each
# of two tasks (bf16, zstd-1, byte-shuffle: the defaults; 16 layers, D 2048, d 128, so
# one slice is 512 KiB of bf16, one sample about 0.4 GB on disk: 9 GB for the default), then times the tile
# (LAYER, BLOCK, HEAD) of both tasks:
#   - python : gradshard.Store.tile() -> numpy float32, parallel decode, GIL released
#              (a new array per call, and warm only: into reused buffers, out=);
#   - cli    : the reader thread of `gradshard score` restricted to that one slice
#              (`--layers/--heads/--blocks`), its "tile read" time;
#   - numpy  : numpy.fromfile of the same tiles written uncompressed as f32.
# Each is timed cold (page cache dropped first, where root may) and warm (median of 5).
# GB/s counts the f32 values delivered (2 tiles x SAMPLES x d x D x 4 bytes).
#
# Needs target/release/gradshard (GRADSHARD_BIN overrides; built if absent) and a
# Python with the package and pyarrow (PYTHON overrides; else a virtualenv in DIR gets
# `pip install ./crates/gradshard-py[arrow]`; the byte counts come from Store.index()).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/gradshard-bench-python}
N=${2:-12}
LAYER=${LAYER:-7}
BLOCK=${BLOCK:-O}
HEAD=${HEAD:-5}
BIN=${GRADSHARD_BIN:-target/release/gradshard}
mkdir -p "$DIR"

if [ ! -x "$BIN" ]; then
  echo "== building $BIN"
  cargo build --release -p gradshard-cli
fi
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ ! -x "$DIR/venv/bin/python" ]; then
    echo "== virtualenv with the gradshard package ($DIR/venv)"
    python3 -m venv "$DIR/venv"
    "$DIR/venv/bin/python" -m pip install --quiet --disable-pip-version-check "./crates/gradshard-py[arrow]"
  fi
  PY="$DIR/venv/bin/python"
fi

echo "== store: synth --preset llama-0.9b, $N samples x 2 tasks (resumes)"
"$BIN" synth --store "$DIR/store" --preset llama-0.9b --samples "$N" --tasks math,general --pool 32 >/dev/null

can_drop=0
if sync && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then can_drop=1; fi
drop() { sync; if [ "$can_drop" = 1 ]; then echo 3 > /proc/sys/vm/drop_caches; fi; }

cli_read() {
  "$BIN" score --store "$DIR/store" --task-a math --task-b general \
    --layers "$LAYER" --heads "$HEAD" --blocks "$BLOCK" --n-boot 0 --n-perm 0 \
    --no-pictures --overwrite --out "$DIR/scores" |
    sed -n 's/.*tile read \([0-9.]*\) s.*/\1/p'
}
echo "== cli (gradshard score, reader thread, layer $LAYER block $BLOCK head $HEAD)"
drop
CLI_COLD=$(cli_read)
CLI_WARM=$(for _ in 1 2 3 4 5; do cli_read; done | sort -g | sed -n 3p)

echo "== python and numpy.fromfile"
drop
CAN_DROP=$can_drop CLI_COLD=$CLI_COLD CLI_WARM=$CLI_WARM "$PY" - "$DIR" "$LAYER" "$BLOCK" "$HEAD" "$BIN" <<'EOF'
import os, platform, statistics, subprocess, sys, time
import numpy as np
import gradshard

d, layer, block, head, binary = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
can_drop = os.environ["CAN_DROP"] == "1"

def drop():
    os.sync()
    if can_drop:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")

def timed(fn):
    t = time.perf_counter(); out = fn(); return time.perf_counter() - t, out

s = gradshard.open(os.path.join(d, "store"))
tasks = ["math", "general"]
read = lambda: [s.tile(t, layer, block, head) for t in tasks]
# Cold: the caller dropped the page cache just before this process started.
py_cold, tiles = timed(read)
py_warm = statistics.median(timed(read)[0] for _ in range(5))
bufs = [np.empty_like(t) for t in tiles]
read_into = lambda: [s.tile(t, layer, block, head, out=b) for t, b in zip(tasks, bufs)]
read_into()
py_into = statistics.median(timed(read_into)[0] for _ in range(5))
n = sum(t.shape[0] for t in tiles)
out_bytes = sum(t.nbytes for t in tiles)
import pyarrow.compute as pc
ix = s.index()
m = pc.and_(pc.and_(pc.equal(ix["layer"], layer), pc.equal(ix["block"], block)), pc.equal(ix["head"], head))
stored = pc.sum(ix.filter(m)["length"]).as_py()

raw = [os.path.join(d, f"tile-{t}.f32") for t in tasks]
for p, t in zip(raw, tiles):
    t.tofile(p)
shape = tiles[0].shape[1:]
fromfile = lambda: [np.fromfile(p, dtype=np.float32).reshape(-1, *shape) for p in raw]
drop()
np_cold, back = timed(fromfile)
np_warm = statistics.median(timed(fromfile)[0] for _ in range(5))
assert all(np.array_equal(a, b) for a, b in zip(back, tiles))

cli_cold, cli_warm = float(os.environ["CLI_COLD"]), float(os.environ["CLI_WARM"])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"\nmachine: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, page cache "
      f"{'dropped before each cold read' if can_drop else 'NOT dropped (not root): cold = warm'}")
print(f"tile: layer {layer} block {block} head {head} of 2 tasks, {n} samples of {shape[0]} x {shape[1]}: "
      f"{out_bytes / 1e6:.1f} MB as f32, {stored / 1e6:.1f} MB stored (bf16, zstd-1, shuffle)\n")
print("| source | bytes read | cold s | cold GB/s | warm s | warm GB/s |")
print("|---|---|---|---|---|---|")
for name, b, c, w in [
    ("gradshard.Store.tile (Python, numpy f32)", stored, py_cold, py_warm),
    ("same, into reused buffers (out=)", stored, float("nan"), py_into),
    ("gradshard score reader thread (CLI, Rust)", stored, cli_cold, cli_warm),
    ("numpy.fromfile, uncompressed f32 copy", out_bytes, np_cold, np_warm),
]:
    cold = "" if c != c else f"{c:.4f} | {out_bytes / c / 1e9:.3f}"
    print(f"| {name} | {b / 1e6:.1f} MB | {cold or ' | '} | {w:.4f} | {out_bytes / w / 1e9:.3f} |")
EOF
