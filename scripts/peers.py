#!/usr/bin/env python3
"""PyTorch side of scripts/bench_peers.sh: the same checkpoint, samples and threads as
the gradshard rows, timed the way a PyTorch user would write each job.

    peers.py MODEL_DIR TASK_A TASK_B [--threads 2] [--batch 8] [--reps 2]
             [--grads-a DIR]   # gradshard `grads` output of TASK_A, for the parity check

MODEL_DIR is `gradshard make-model` output (config.json, model.safetensors and
<task>.jsonl files with "input_ids"). Prints one JSON object on stdout:

  loop_full / loop_factored / batched_full / batched_factored: samples per second
      (after loading, one untimed warm-up sample; best of --reps);
  score_full_s / score_factored_s: seconds of the QK-OV slice loop (unsigned variant,
      task-A Fisher) over every (layer, block, head) slice, vectorised f32 from RAM:
      from full per-sample slices, and from the per-sample factors (P^T S per slice);
  parity: relative Frobenius difference of every attention-weight gradient of
      TASK_A's first sample between torch (loop) and gradshard `grads`.

Loss: token-summed cross-entropy of ids[1:] given ids[:-1] (gradshard's g).
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

BLOCKS = ("q_proj", "k_proj", "v_proj", "o_proj")


def load_samples(model_dir, task):
    out = []
    with open(os.path.join(model_dir, f"{task}.jsonl")) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(torch.tensor(json.loads(line)["input_ids"], dtype=torch.long))
    return out


def attn_modules(model):
    """[(layer, block name, nn.Linear)] in layer order."""
    mods = []
    for i, layer in enumerate(model.model.layers):
        for b in BLOCKS:
            mods.append((i, b, getattr(layer.self_attn, b)))
    return mods


def token_loss(model, ids):
    """Token-summed next-token cross-entropy of a [b, t] batch."""
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits
    v = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, v), ids[:, 1:].reshape(-1), reduction="sum")


def loop_full(model, mods, samples, keep):
    """One backward per sample, torch.autograd.grad of the attention weights."""
    weights = [m.weight for _, _, m in mods]
    kept = []
    for ids in samples:
        loss = token_loss(model, ids[None, :])
        gs = torch.autograd.grad(loss, weights)
        gs = [g.contiguous() for g in gs]
        if keep:
            kept.append(gs)
    return kept


class Taps:
    """Forward hooks on the attention projections saving inputs and output backprops
    (the standard per-sample-gradient trick: activations x backprops)."""

    def __init__(self, mods):
        self.x = {}
        self.d = {}
        self.handles = []
        for key, (_, _, m) in enumerate(mods):
            self.handles.append(m.register_forward_hook(self._hook(key)))

    def _hook(self, key):
        def hook(_m, inp, out):
            self.x[key] = inp[0].detach()

            def save(g):
                self.d[key] = g.detach()

            out.register_hook(save)

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def tapped(model, mods, samples, batch, full, keep):
    """Per-sample gradients from one backward per batch: full (einsum of backprops and
    activations per weight) or factors only (per-sample x and backprop rows)."""
    assert len({len(s) for s in samples}) == 1, "equal-length samples only"
    emb = model.model.embed_tokens
    h_emb = emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_())
    taps = Taps(mods)
    kept = []
    try:
        for s in range(0, len(samples), batch):
            ids = torch.stack(samples[s : s + batch])
            loss = token_loss(model, ids)
            loss.backward()
            for b in range(ids.shape[0]):
                per = []
                for key in range(len(mods)):
                    x, d = taps.x[key], taps.d[key]
                    if full:
                        per.append(torch.einsum("to,ti->oi", d[b], x[b]).contiguous())
                    else:
                        per.append((d[b].contiguous(), x[b].contiguous()))
                if keep:
                    kept.append(per)
    finally:
        taps.remove()
        h_emb.remove()
    return kept


def best_rate(fn, samples, reps):
    fn(samples[:1])  # warm-up (lazy initialisation), untimed
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(samples)
        best = max(best, len(samples) / (time.perf_counter() - t0))
    return best


def head_slices(cfg, layer_grads):
    """Per-sample gradients of one layer's q/k/v/o as gradshard's slices: (block, head)
    -> d x D (Q/K/V: the head's rows; O: the head's columns, transposed)."""
    d = cfg.head_dim
    q, k, v, o = layer_grads
    out = []
    for h in range(cfg.num_attention_heads):
        out.append(("Q", h, q[h * d : (h + 1) * d]))
    for h in range(cfg.num_key_value_heads):
        out.append(("K", h, k[h * d : (h + 1) * d]))
    for h in range(cfg.num_key_value_heads):
        out.append(("V", h, v[h * d : (h + 1) * d]))
    for h in range(cfg.num_attention_heads):
        out.append(("O", h, o[:, h * d : (h + 1) * d].t()))
    return out


def full_tiles(cfg, kept):
    """[slice] -> [n, d*D] f32 tiles (built before timing)."""
    tiles = None
    for per in kept:
        sl = []
        for layer in range(cfg.num_hidden_layers):
            sl.extend(head_slices(cfg, per[4 * layer : 4 * layer + 4]))
        if tiles is None:
            tiles = [[] for _ in sl]
        for i, (_, _, g) in enumerate(sl):
            tiles[i].append(g.reshape(-1))
    return [torch.stack(t) for t in tiles]


def factor_tiles(cfg, kept):
    """[slice] -> (P [n, t, d], S [n, t, D]) so that the slice of sample j is P_j^T S_j
    (Q/K/V head h: backprop columns of the head, layer input; O head h: attention output
    columns of the head, o_proj backprop)."""
    d = cfg.head_dim
    tiles = None
    for per in kept:
        sl = []
        for layer in range(cfg.num_hidden_layers):
            (dq, xq), (dk, xk), (dv, xv), (do, xo) = per[4 * layer : 4 * layer + 4]
            for h in range(cfg.num_attention_heads):
                sl.append((dq[:, h * d : (h + 1) * d], xq))
            for h in range(cfg.num_key_value_heads):
                sl.append((dk[:, h * d : (h + 1) * d], xk))
            for h in range(cfg.num_key_value_heads):
                sl.append((dv[:, h * d : (h + 1) * d], xv))
            for h in range(cfg.num_attention_heads):
                sl.append((xo[:, h * d : (h + 1) * d], do))
        if tiles is None:
            tiles = [([], []) for _ in sl]
        for i, (p, s) in enumerate(sl):
            tiles[i][0].append(p.contiguous())
            tiles[i][1].append(s)
    return [(torch.stack(p), torch.stack(s)) for p, s in tiles]


def score_slice(a, inv_t_a, b, eps=1e-10, lam=1e-8):
    """Unsigned QK-OV interference of one slice, task-A Fisher: M = X Y^T."""
    c = a * a * inv_t_a[:, None]
    den = c.mean(0).clamp_min(eps) + lam
    x = c / den
    y = b.abs()
    return x @ y.t()


def time_score(tiles_a, tiles_b, inv_t_a, reps, factored):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for ta, tb in zip(tiles_a, tiles_b):
            if factored:
                (pa, sa), (pb, sb) = ta, tb
                a = torch.bmm(pa.transpose(1, 2), sa).reshape(pa.shape[0], -1)
                b = torch.bmm(pb.transpose(1, 2), sb).reshape(pb.shape[0], -1)
            else:
                a, b = ta, tb
            score_slice(a, inv_t_a, b)
        best = min(best, time.perf_counter() - t0)
    return best


def parity(cfg, mods, torch_grads, grads_dir, sample_id):
    from safetensors.torch import load_file

    ref = load_file(os.path.join(grads_dir, f"{sample_id}.safetensors"))
    worst = 0.0
    for (layer, blk, _), g in zip(mods, torch_grads):
        r = ref[f"model.layers.{layer}.self_attn.{blk}.weight"].to(torch.float32)
        worst = max(worst, float((g - r).norm() / r.norm()))
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("task_a")
    ap.add_argument("task_b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--grads-a", default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    mods = attn_modules(model)
    sa = load_samples(args.model, args.task_a)
    sb = load_samples(args.model, args.task_b)
    samples = sa + sb
    res = {
        "torch": torch.__version__,
        "mkl": torch.backends.mkl.is_available(),
        "threads": torch.get_num_threads(),
        "samples": len(samples),
    }

    # Factors-only and batched rows: weights frozen, the embedding output carries grad.
    res["batched_full"] = best_rate(
        lambda s: tapped(model, mods, s, args.batch, True, False), samples, args.reps
    )
    res["batched_factored"] = best_rate(
        lambda s: tapped(model, mods, s, args.batch, False, False), samples, args.reps
    )
    res["loop_factored"] = best_rate(
        lambda s: tapped(model, mods, s, 1, False, False), samples, args.reps
    )
    for _, _, m in mods:
        m.weight.requires_grad_(True)
    res["loop_full"] = best_rate(lambda s: loop_full(model, mods, s, False), samples, args.reps)

    # Score from RAM: the per-sample gradients (and factors) of both tasks, untimed.
    ga = loop_full(model, mods, sa, True)
    gb = loop_full(model, mods, sb, True)
    for _, _, m in mods:
        m.weight.requires_grad_(False)
    inv_t_a = torch.tensor([1.0 / (len(s) - 1) for s in sa], dtype=torch.float32)
    fa, fb = full_tiles(cfg, ga), full_tiles(cfg, gb)
    res["slices"] = len(fa)
    res["score_full_s"] = time_score(fa, fb, inv_t_a, args.reps, False)
    pa = factor_tiles(cfg, tapped(model, mods, sa, 1, False, True))
    pb = factor_tiles(cfg, tapped(model, mods, sb, 1, False, True))
    res["score_factored_s"] = time_score(pa, pb, inv_t_a, args.reps, True)

    if args.grads_a:
        with open(os.path.join(args.model, f"{args.task_a}.jsonl")) as f:
            first_id = json.loads(f.readline())["id"]
        res["parity_sample"] = f"{args.task_a}/{first_id}"
        res["parity"] = parity(cfg, mods, ga[0], args.grads_a, first_id)
    json.dump(res, sys.stdout)
    print()


if __name__ == "__main__":
    main()
