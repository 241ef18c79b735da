#!/usr/bin/env python3
"""PyTorch side of scripts/bench_score_files.sh: the QK-OV heatmap computed the way a
PyTorch user would from the per-sample gradient files they saved (one bf16 safetensors
file per sample), against `gradshard score` on a store of the same samples.

    score_files.py convert SRC_DIR DST_DIR
        every SRC_DIR/<task>/<id>.safetensors (f32, as `gradshard grads` writes them) to
        DST_DIR/<task>/<id>.safetensors in bf16 (round to nearest even), metadata kept
        (`tokens`, `loss_sum`: what `gradshard ingest` reads).

    score_files.py score MODEL_DIR FILES_DIR TASK_A TASK_B [--threads 2]
        opens every FILES_DIR/<task>/*.safetensors with safe_open, reads the attention
        weights' gradients, widens them to f32 and cuts gradshard's head slices, then runs
        the same vectorised f32 slice loop as scripts/peers.py (unsigned variant, task-A
        Fisher: X = (g_A^2 / T) / den, Y = |g_B|, M = X Y^T per slice). Prints one JSON
        object: seconds (open to last slice, measured inside this process: Python start-up
        and `import torch` are not counted), read_s, loop_s, samples, slices, bytes (of
        the files read) and cell_sum (the sum of every slice's mean M, so the work cannot
        be skipped).

MODEL_DIR holds the checkpoint's config.json (layers, heads, kv heads, head_dim).
"""

import argparse
import glob
import json
import os
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

BLOCKS = ("q_proj", "k_proj", "v_proj", "o_proj")


def convert(src, dst):
    n = 0
    for task_dir in sorted(glob.glob(os.path.join(src, "*"))):
        if not os.path.isdir(task_dir):
            continue
        out_dir = os.path.join(dst, os.path.basename(task_dir))
        os.makedirs(out_dir, exist_ok=True)
        for path in sorted(glob.glob(os.path.join(task_dir, "*.safetensors"))):
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k).to(torch.bfloat16).contiguous() for k in f.keys()}
            save_file(tensors, os.path.join(out_dir, os.path.basename(path)), metadata=meta)
            n += 1
    if n == 0:
        sys.exit(f"convert: no <task>/<id>.safetensors files under {src}")
    print(f"converted {n} files to bf16 under {dst}")


def geometry(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    layers = cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    d = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return layers, heads, kv, d


def head_slices(q, k, v, o, heads, kv, d):
    """gradshard's slices of one layer, in its block order: Q, K, V heads are rows of
    their projection, O heads columns of o_proj (transposed), each d x D."""
    out = [q[h * d : (h + 1) * d] for h in range(heads)]
    out += [k[h * d : (h + 1) * d] for h in range(kv)]
    out += [v[h * d : (h + 1) * d] for h in range(kv)]
    out += [o[:, h * d : (h + 1) * d].t() for h in range(heads)]
    return out


def read_task(files_dir, task, geo):
    """[slice] -> [n, d*D] f32 tiles and the samples' 1/T, from one file per sample."""
    layers, heads, kv, d = geo
    paths = sorted(glob.glob(os.path.join(files_dir, task, "*.safetensors")))
    if not paths:
        sys.exit(f"score: no {task}/*.safetensors files under {files_dir}")
    per_slice = None
    inv_t = []
    nbytes = 0
    for path in paths:
        nbytes += os.path.getsize(path)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if "tokens" not in meta:
                sys.exit(f"score: {path}: no `tokens` in the safetensors metadata")
            inv_t.append(1.0 / float(meta["tokens"]))
            sl = []
            for layer in range(layers):
                ws = [
                    f.get_tensor(f"model.layers.{layer}.self_attn.{b}.weight").to(torch.float32)
                    for b in BLOCKS
                ]
                sl.extend(head_slices(*ws, heads, kv, d))
        if per_slice is None:
            per_slice = [[] for _ in sl]
        for i, g in enumerate(sl):
            per_slice[i].append(g.reshape(-1))
    tiles = [torch.stack(t) for t in per_slice]
    return tiles, torch.tensor(inv_t, dtype=torch.float32), nbytes, len(paths)


def score_slice(a, inv_t_a, b, eps=1e-10, lam=1e-8):
    """Unsigned QK-OV interference of one slice, task-A Fisher (as scripts/peers.py)."""
    c = a * a * inv_t_a[:, None]
    den = c.mean(0).clamp_min(eps) + lam
    x = c / den
    y = b.abs()
    return x @ y.t()


def score(args):
    torch.set_num_threads(args.threads)
    geo = geometry(args.model)
    t0 = time.perf_counter()
    ta, inv_t_a, bytes_a, na = read_task(args.files, args.task_a, geo)
    tb, _, bytes_b, nb = read_task(args.files, args.task_b, geo)
    t1 = time.perf_counter()
    cell_sum = 0.0
    for a, b in zip(ta, tb):
        cell_sum += float(score_slice(a, inv_t_a, b).mean())
    t2 = time.perf_counter()
    json.dump(
        {
            "seconds": t2 - t0,
            "read_s": t1 - t0,
            "loop_s": t2 - t1,
            "samples": na + nb,
            "slices": len(ta),
            "bytes": bytes_a + bytes_b,
            "cell_sum": cell_sum,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        sys.stdout,
    )
    print()


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("src")
    c.add_argument("dst")
    s = sub.add_parser("score")
    s.add_argument("model")
    s.add_argument("files")
    s.add_argument("task_a")
    s.add_argument("task_b")
    s.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.cmd == "convert":
        convert(args.src, args.dst)
    else:
        score(args)


if __name__ == "__main__":
    main()
