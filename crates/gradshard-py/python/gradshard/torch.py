"""Per-sample gradients of any PyTorch causal language model, streamed into a store.

>>> from gradshard.torch import collect
>>> report = collect(model, tasks={"math": math_ids, "general": general_ids},
...                  store="runs/store", params="attn", dtype="bf16",
...                  representation="auto", batch_size=8)

:func:`collect` registers forward hooks on the attention (and, with
``params="attn,mlp"``, MLP) ``nn.Linear`` / GPT-2 ``Conv1D`` modules of a Hugging
Face causal LM, runs padded batches, takes g as the gradient of each sample's
token-*summed* cross-entropy (T = its predicted positions, the Hugging Face label
shift), and hands each sample's factors (backprop, activation) -- or, with
``representation="full"``, its gradients -- to :func:`gradshard.create`'s writer
on a thread of its own, while the next batch runs. The store crate does the rest
(frames, statistics, representation choice, crash safety). Needs ``torch``;
``import gradshard`` does not import it.
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from ._writer import Writer, _params, create

__all__ = ["collect", "mlp_tensors", "attention_modules", "sample_factors"]


def _is_projection(mod: torch.nn.Module) -> bool:
    return isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"


def mlp_tensors(model: torch.nn.Module) -> Dict[str, List[int]]:
    """``{weight name: shape}`` of the MLP projections (``nn.Linear`` or ``Conv1D``
    modules inside a module named ``mlp``), shapes as the checkpoint holds them."""
    out = {}
    for name, mod in model.named_modules():
        if _is_projection(mod) and "mlp" in name.split(".")[:-1]:
            out[name + ".weight"] = list(mod.weight.shape)
    return out


def attention_modules(model: torch.nn.Module, writer: Writer) -> Dict[str, torch.nn.Module]:
    """``{weight name: module}`` of every tensor the writer's store holds, checked
    against the module's kind (Linear or Conv1D) and weight shape."""
    mods = dict(model.named_modules())
    out = {}
    for name, shape, kind, _attn in writer.tensors:
        mname = name[: -len(".weight")] if name.endswith(".weight") else name
        mod = mods.get(mname)
        if mod is None or not _is_projection(mod):
            raise ValueError(
                f"the store holds tensor `{name}` but the model has no Linear/Conv1D module `{mname}`"
            )
        is_conv = type(mod).__name__ == "Conv1D"
        if is_conv != (kind == "conv1d") or list(mod.weight.shape) != list(shape):
            raise ValueError(
                f"module `{mname}` is a {type(mod).__name__} with weight {list(mod.weight.shape)}; "
                f"the store expects a {kind} weight {list(shape)}"
            )
        out[name] = mod
    return out


def _sample(item: Any, pos: int, task: str) -> Tuple[Any, List[int]]:
    """(id, token ids) of one sample: a sequence of ints, or a dict with
    ``input_ids`` and optionally ``id`` (else the position)."""
    sid: Any = pos
    ids = item
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"task `{task}` sample at position {pos}: a dict sample needs \"input_ids\"")
        ids = item["input_ids"]
        if item.get("id") is not None:
            sid = item["id"]
            if isinstance(sid, bool) or not isinstance(sid, (int, str)):
                raise ValueError(f"task `{task}` sample at position {pos}: id {sid!r} is not an int or a str")
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    try:
        ids = [int(x) for x in ids]
    except (TypeError, ValueError) as e:
        raise ValueError(f"task `{task}` sample {sid}: input_ids is not a sequence of ints ({e})") from e
    return sid, ids


class _Progress:
    """A bar on a terminal, a line every tenth (or 10 s) otherwise; as the CLI."""

    def __init__(self, total: int, mode: Optional[bool]):
        self.total = max(total, 0)
        self.on = mode is not False
        self.tty = sys.stderr.isatty() if mode is None else bool(mode) and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.next_line = max(1, self.total // 10)

    def update(self, done: int):
        if not self.on:
            return
        now = time.perf_counter()
        el = max(now - self.t0, 1e-9)
        rate = done / el
        if self.tty:
            if now - self.last < 0.1 and done < self.total:
                return
            self.last = now
            w = 30
            fill = int(w * done / self.total) if self.total else w
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            eta_s = f"{eta:.0f}s" if math.isfinite(eta) else "?"
            sys.stderr.write(
                f"\rcollect [{'#' * fill}{'.' * (w - fill)}] {done}/{self.total} {rate:.2f} samples/s ETA {eta_s} "
            )
            sys.stderr.flush()
        elif done >= self.next_line or done == self.total or now - self.last >= 10:
            self.last = now
            while self.next_line <= done:
                self.next_line += max(1, self.total // 10)
            sys.stderr.write(f"collect: {done}/{self.total} samples ({rate:.2f} samples/s)\n")
            sys.stderr.flush()

    def finish(self):
        if self.on and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def sample_factors(
    model: torch.nn.Module,
    modules: Mapping[str, torch.nn.Module],
    batch: List[List[int]],
    pad_id: int = 0,
):
    """The bare hooks pass over one batch: forward with padding masked out, the
    token-summed cross-entropy of each sample, and the gradient of their sum with
    respect to every hooked module's output. Returns ``(per-sample loss sums
    (float64 tensor), {name: (backprop [B, L, out], activation [B, L, in])})``.
    Samples of a batch are independent (causal attention, right padding), so row b
    of each pair is sample b's own backprop and activation."""
    dev = next(model.parameters()).device
    L = max(len(x) for x in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    for b, x in enumerate(batch):
        ids[b, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[b, : len(x)] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    acts: Dict[str, torch.Tensor] = {}
    outs: Dict[str, torch.Tensor] = {}

    def hook(name):
        def f(_mod, inp, out):
            acts[name] = inp[0].detach()
            outs[name] = out

        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            V = logits.shape[-1]
            ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none"
            ).view(len(batch), L - 1)
            per = (ce * mask[:, 1:].to(ce.dtype)).sum(dim=1)
            names = list(modules)
            missing = [n for n in names if n not in outs]
            if missing:
                raise ValueError(f"the forward pass did not run module(s) {missing[:3]}")
            grads = torch.autograd.grad(per.sum(), [outs[n] for n in names])
    finally:
        for h in handles:
            h.remove()
    return per.detach().double(), {n: (g.detach(), acts[n]) for n, g in zip(names, grads)}


def collect(
    model: torch.nn.Module,
    tasks: Mapping[str, Iterable[Any]],
    store,
    params: str = "attn",
    dtype: str = "bf16",
    representation: str = "auto",
    batch_size: int = 8,
    worker: Tuple[int, int] = (0, 1),
    max_tokens: Optional[int] = None,
    nan_policy: str = "error",
    progress: Optional[bool] = None,
    memory_budget: Optional[int] = None,
    pad_id: int = 0,
) -> Dict[str, Any]:
    """Collects every sample of ``tasks`` (``{name: samples}``) into the store at
    ``store`` and returns the report ``gradshard collect --report-json`` writes.

    ``samples``: token-id lists, or dicts with ``input_ids`` and optionally ``id``
    (else the sample's 0-based position is its id). ``worker=(rank, world)`` takes
    the samples whose position is ≡ rank (mod world): one store per rank, combined
    by ``gradshard merge``. Samples already in the store are skipped (a killed run
    resumes); samples of fewer than 2 tokens are skipped and reported. The model
    runs where it is (CPU or CUDA), in its own dtype, in eval mode (restored
    after); gradients are taken with respect to the hooked modules' outputs only
    (no ``.grad`` is written). ``progress``: None (a bar on a terminal, lines
    otherwise), False (quiet) or True.
    """
    t_start = time.perf_counter()
    rank, world = (int(worker[0]), int(worker[1]))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"worker=({rank}, {world}): need 0 <= rank < world")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError("max_tokens must be >= 2 (one input and one label)")
    params = _params(params)
    if not tasks:
        raise ValueError("tasks: at least one task is needed")
    cfg = model.config.to_dict()
    names = [n for n, _ in model.named_parameters()]
    w = create(
        store,
        cfg,
        dtype=dtype,
        representation=representation,
        params=params,
        mlp=mlp_tensors(model) if params == "attn,mlp" else None,
        names=names,
        nan_policy=nan_policy,
        memory_budget=memory_budget,
        source={"kind": "torch", "model": type(model).__name__, "params": params,
                "device": str(next(model.parameters()).device)},
    )
    skipped: List[Dict[str, Any]] = []
    resumed = 0
    try:
        modules = attention_modules(model, w)
        kinds = {n: k for n, _s, k, _a in w.tensors}
        values = sum(int(s[0]) * int(s[1]) for _n, s, _k, _a in w.tensors)
        dbytes = 2 if w.dtype == "bf16" else 4
        full = w.representation == "full"
        plan: List[Tuple[str, Any, List[int]]] = []
        for task, samples in tasks.items():
            seen = set()
            for pos, item in enumerate(samples):
                if pos % world != rank:
                    continue
                sid, ids = _sample(item, pos, task)
                if sid in seen:
                    raise ValueError(f"task `{task}` sample {sid}: duplicate id in the task's samples")
                seen.add(sid)
                if max_tokens is not None:
                    ids = ids[:max_tokens]
                if w.is_committed(task, sid):
                    resumed += 1
                    continue
                if len(ids) < 2:
                    skipped.append({"task": task, "id": sid,
                                    "why": f"{len(ids)} token(s): needs at least 2 (one input, one label)"})
                    continue
                plan.append((task, sid, ids))
        report = _run(model, w, modules, kinds, full, plan, batch_size, progress, pad_id, resumed)
    except BaseException as first:
        # Samples handed over in full still commit; the first error is the one raised,
        # with the writer's own failure (if any) attached to it.
        if not w.closed:
            try:
                w.close()
            except Exception as e:  # noqa: BLE001 - reported on the first error
                if hasattr(first, "add_note"):
                    first.add_note(f"closing the store writer also failed: {e}")
        raise
    report["skipped"] = skipped + report["skipped"]
    report["resumed"] = resumed
    secs = max(time.perf_counter() - t_start, 1e-9)
    _finish_report(report, values * dbytes, representation, secs)
    return report


def _run(model, w, modules, kinds, full, plan, batch_size, progress, pad_id, resumed):
    was_training = model.training
    flags = {n: m.weight.requires_grad for n, m in modules.items()}
    q: "queue.Queue" = queue.Queue(maxsize=2 * batch_size)
    err: List[BaseException] = []
    done = [0]
    bar = _Progress(len(plan), progress)

    def feed():
        while True:
            item = q.get()
            if item is None:
                return
            if err:
                continue
            task, sid, payload, tokens, loss = item
            try:
                if full:
                    w.add(task, sid, payload, tokens, loss)
                else:
                    w.add_factors(task, sid, payload, tokens, loss)
                done[0] += 1
            except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                err.append(e)

    th = threading.Thread(target=feed, name="gradshard-writer", daemon=True)
    th.start()
    model_s = 0.0
    waited = 0.0
    try:
        model.eval()
        for m in modules.values():
            m.weight.requires_grad_(True)
        for i in range(0, len(plan), batch_size):
            chunk = plan[i : i + batch_size]
            t0 = time.perf_counter()
            per, fac = sample_factors(model, modules, [ids for _, _, ids in chunk], pad_id)
            per = per.cpu().tolist()
            items = []
            for b, (task, sid, ids) in enumerate(chunk):
                n = len(ids)
                if full:
                    payload = {}
                    for name, (bp, act) in fac.items():
                        g, a = bp[b, :n].float(), act[b, :n].float()
                        payload[name] = a.T @ g if kinds[name] == "conv1d" else g.T @ a
                else:
                    payload = {name: (bp[b, :n], act[b, :n]) for name, (bp, act) in fac.items()}
                items.append((task, sid, payload, n - 1, per[b]))
            model_s += time.perf_counter() - t0
            for it in items:
                if err:
                    break
                t1 = time.perf_counter()
                q.put(it)
                waited += time.perf_counter() - t1
            if err:
                break
            bar.update(done[0])
    finally:
        q.put(None)
        th.join()
        model.train(was_training)
        for n, m in modules.items():
            m.weight.requires_grad_(flags[n])
    bar.update(done[0])
    bar.finish()
    if err:
        raise err[0]
    rep = w.close()
    rep["model_seconds"] = model_s
    rep["waited_on_writer_seconds"] = waited
    return rep


def _peak_rss() -> Optional[int]:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:  # noqa: BLE001 - not every platform has it
        return None


def _finish_report(r: Dict[str, Any], sample_bytes: int, representation: str, secs: float) -> None:
    """The keys of ``gradshard collect --report-json``."""
    grad_bytes = r["stored"] * sample_bytes
    raw, disk = r["raw_bytes"], r["stored_bytes"]
    r.update(
        {
            "samples_per_s": r["stored"] / secs,
            "model_only": False,
            "representation": representation,
            "gradient_bytes": grad_bytes,
            "gradient_gb_per_s": grad_bytes / secs / 1e9,
            "ratio": raw / disk if disk else 0.0,
            "seconds": secs,
            "raw_gb_per_s": raw / secs / 1e9,
            "disk_gb_per_s": disk / secs / 1e9,
            "engine": "torch",
            "peak_rss_bytes": _peak_rss(),
        }
    )

