"""gradshard.torch.collect on the fixture checkpoints, loaded with transformers in f32.

Every attention gradient read back with gradshard.open(...).tensor is checked
against the fixture's float64-derived reference gradients (1e-4 relative
Frobenius), T and loss_sum against their metadata, for representation full,
factored and auto; `gradshard verify` passes; the Rust collector and the torch
collector give the same slices and stats/; a SIGKILLed run resumes to every sample
exactly once. Needs torch, transformers and safetensors-free fixtures only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is not installed: the PyTorch collector's tests need torch and transformers"
)
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: the fixtures are loaded as Hugging Face models"
)

import gradshard  # noqa: E402
from gradshard.torch import collect  # noqa: E402
from conftest import FIXTURES, cli, read_safetensors  # noqa: E402

# Causal LMs among the fixtures (bert is an encoder with an LM head, not hooked here).
FAMILIES = ["llama-gqa", "gpt2", "neox", "phi3", "qwen3", "gemma3", "gemma2", "olmo2"]
TASKS = ("math", "general")


def load(family: str):
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_pretrained(
        FIXTURES / family / "model", dtype=torch.float32, attn_implementation="eager"
    )
    return m.eval()


def tasks_of(family: str):
    out = {}
    for t in TASKS:
        lines = (FIXTURES / family / "tasks" / f"{t}.jsonl").read_text().splitlines()
        out[t] = [json.loads(x) for x in lines if x.strip()]
    return out


def references(family: str):
    """{(task, id): (tensors, metadata)} of the reference gradient files present."""
    out = {}
    for t in TASKS:
        for p in sorted((FIXTURES / family / "grads" / t).glob("*.safetensors")):
            out[(t, int(p.stem))] = read_safetensors(p)
    return out


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("representation", ["full", "factored", "auto"])
def test_collect_matches_the_float64_references(tmp_path, family, representation):
    model = load(family)
    store = tmp_path / "store"
    rep = collect(model, tasks_of(family), store, params="attn", dtype="f32",
                  representation=representation, batch_size=3, progress=False)
    n = sum(len(v) for v in tasks_of(family).values())
    assert rep["stored"] == n and rep["resumed"] == 0 and rep["skipped"] == []
    assert rep["engine"] == "torch" and rep["representation"] == representation
    if representation == "factored":
        assert rep["factored_samples"] == n
    if representation == "full":
        assert rep["full_samples"] == n
    s = gradshard.open(store)
    attn = set(s.tensors)
    refs = references(family)
    assert refs, family
    worst = 0.0
    for (task, sid), (tensors, meta) in refs.items():
        rec = {r[0]: r for r in s.samples(task)}[sid]
        assert rec[1] == int(meta["tokens"])
        assert rec[2] == pytest.approx(float(meta["loss_sum"]), rel=1e-5)
        names = [k for k in tensors if k in attn]
        assert len(names) == len(attn), (family, sorted(attn - set(names)))
        for name in names:
            e = rel(s.tensor(task, sid, name), tensors[name])
            worst = max(worst, e)
            assert e <= 1e-4, f"{family} {representation} {task}/{sid} {name}: {e:.2e}"
    print(f"{family} {representation}: worst relative error {worst:.2e}")
    cli("verify", "--store", store)


def test_attn_mlp_and_bf16_model(tmp_path):
    """params="attn,mlp" stores the MLP weights too; a bf16 model collects (to bf16)."""
    model = load("llama-gqa")
    tasks = tasks_of("llama-gqa")
    store = tmp_path / "s"
    rep = collect(model, tasks, store, params="attn,mlp", dtype="f32", representation="factored",
                  batch_size=4, progress=False)
    assert rep["stored"] == 16
    # The keys of `gradshard collect --report-json`.
    cli_keys = {"stored", "resumed", "skipped", "samples_per_s", "model_only", "representation",
                "factored_samples", "full_samples", "values_stored", "gradient_bytes",
                "gradient_gb_per_s", "raw_bytes", "stored_bytes", "ratio", "seconds", "raw_gb_per_s",
                "disk_gb_per_s", "engine", "model_seconds", "prepare_seconds",
                "blocked_on_writer_seconds", "compress_seconds", "io_seconds", "peak_rss_bytes",
                "stats_files"}
    assert cli_keys <= set(rep), sorted(cli_keys - set(rep))
    assert rep["raw_bytes"] > 0 and rep["stored_bytes"] > 0 and len(rep["stats_files"]) == 2
    s = gradshard.open(store)
    refs = references("llama-gqa")
    for (task, sid), (tensors, _meta) in list(refs.items())[:4]:
        for name, g in tensors.items():
            assert rel(s.tensor(task, sid, name), g) <= 1e-4, name
    bf = load("llama-gqa").to(torch.bfloat16)
    store2 = tmp_path / "bf"
    rep = collect(bf, tasks, store2, dtype="bf16", batch_size=8, progress=False)
    assert rep["stored"] == 16
    s2 = gradshard.open(store2)
    (task, sid), (tensors, _m) = next(iter(refs.items()))
    name = "model.layers.1.self_attn.o_proj.weight"
    assert rel(s2.tensor(task, sid, name), tensors[name]) < 0.1  # a bf16 forward and backward
    cli("verify", "--store", store2)


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_rust_and_torch_collectors_agree(tmp_path, family):
    """The same samples through `gradshard collect` and gradshard.torch.collect: every
    slice within 1e-5 and every stats/ value within 1e-5 (relative)."""
    rust = tmp_path / "rust"
    args = ["collect", "--model", FIXTURES / family / "model", "--store", rust,
            "--dtype", "f32", "--params", "attn", "--representation", "full", "--quiet"]
    for t in TASKS:
        args += ["--task", f"{t}={FIXTURES / family / 'tasks' / (t + '.jsonl')}"]
    cli(*args)
    py = tmp_path / "py"
    collect(load(family), tasks_of(family), py, dtype="f32", representation="full",
            batch_size=8, progress=False)
    a, b = gradshard.open(rust), gradshard.open(py)
    assert a.geometry == b.geometry and a.tensors == b.tensors
    g = a.geometry
    for task in TASKS:
        assert [r[:2] for r in a.samples(task)] == [r[:2] for r in b.samples(task)]
        for blk in a.blocks:
            heads = g["kv_heads"] if blk in ("K", "V") else g["heads"]
            for layer in range(g["layers"]):
                for h in range(heads):
                    ta, tb = a.tile(task, layer, blk, h), b.tile(task, layer, blk, h)
                    for i in range(ta.shape[0]):
                        assert rel(tb[i], ta[i]) <= 1e-5, (task, blk, layer, h, i)
        sa = json.loads((rust / "stats" / f"{task}.json").read_text())
        sb = json.loads((py / "stats" / f"{task}.json").read_text())
        compare_stats(sa, sb, f"{family}/{task}")


def compare_stats(a, b, where):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            if k in ("created", "created_by", "checksum", "written_at", "source"):
                continue
            compare_stats(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        if a and all(isinstance(x, (int, float)) for x in a):
            assert rel(b, a) <= 1e-5 or np.allclose(a, b, rtol=1e-5, atol=1e-12), where
        else:
            for i, (x, y) in enumerate(zip(a, b)):
                compare_stats(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-12), where
    else:
        assert a == b, where


def test_resume_after_sigkill_stores_every_sample_once(tmp_path):
    store = tmp_path / "s"
    script = textwrap.dedent(
        f"""
        import json, sys, time, torch, transformers
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from gradshard.torch import collect
        m = transformers.AutoModelForCausalLM.from_pretrained({str(FIXTURES / 'llama-gqa' / 'model')!r},
                                                             dtype=torch.float32).eval()
        slow = len(sys.argv) > 1
        if slow:
            m.model.layers[0].register_forward_pre_hook(lambda *a: time.sleep(0.3))
        tasks = {{}}
        for t in ("math", "general"):
            p = {str(FIXTURES / 'llama-gqa' / 'tasks')!r} + "/" + t + ".jsonl"
            tasks[t] = [json.loads(l) for l in open(p) if l.strip()]
        r = collect(m, tasks, {str(store)!r}, dtype="f32", representation="factored",
                    batch_size=1, progress=True)
        print(json.dumps({{"stored": r["stored"], "resumed": r["resumed"]}}))
        """
    )
    env = dict(os.environ)
    p = subprocess.Popen([sys.executable, "-c", script, "slow"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    n = 0
    while time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
        if (store / "samples.log").exists():
            try:
                n = sum(len(gradshard.open(store).samples(t)) for t in TASKS)
            except gradshard.StoreError:
                n = 0
            if n >= 3:
                break
    assert p.poll() is None, f"the run ended before it was killed: {p.communicate()}"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert 3 <= n < 16
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    s = gradshard.open(store)
    counts = {t: [x[0] for x in s.samples(t)] for t in TASKS}
    assert counts == {t: list(range(8)) for t in TASKS}
    assert r["stored"] + r["resumed"] == 16 and r["resumed"] >= 3
    cli("verify", "--store", store)


def score_vs_oracle(family: str, store: Path, out: Path) -> float:
    """`gradshard score` (default setting) of math vs general against the fixture's
    float64 oracle: every pair score and heatmap cell; returns the worst relative error."""
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow reads the score tables")
    cfg = gradshard.open(store).geometry
    L, H, Hkv = cfg["layers"], cfg["heads"], cfg["kv_heads"]
    pairs = ",".join(f"{l}:{h}" for l in range(L) for h in range(H))
    cli("score", "--store", store, "--task-a", "math", "--task-b", "general", "--out", out,
        "--n-boot", "0", "--n-perm", "0", "--min-samples", "0", "--no-pictures", "--pairs-for", pairs)
    oracle = json.loads((FIXTURES / family / "oracle.json").read_text())
    p = pq.read_table(out / "pairs.parquet").to_pydict()
    got = {(b, int(l), int(h), int(a), int(c)): s for b, l, h, a, c, s in
           zip(p["block"], p["layer"], p["head"], p["sample_a"], p["sample_b"], p["score"])}
    c = pq.read_table(out / "heatmap.parquet").to_pydict()
    cells = {(b, int(l), int(h)): s for b, l, h, s in zip(c["block"], c["layer"], c["head"], c["score_mean"])}
    worst, n = 0.0, 0
    for blk in ("Q", "K", "V", "O"):
        ob = oracle["settings"]["default"]["math_vs_general"][blk]
        for i, row in enumerate(ob["scores"]):
            for j, lh in enumerate(row):
                for l, hs in enumerate(lh):
                    for h, want in enumerate(hs):
                        sh = h * Hkv // H if blk in ("K", "V") else h
                        v = got[(blk, l, sh, i, j)]
                        worst = max(worst, abs(v - want) / max(abs(want), 1e-30))
                        n += 1
        for l, hs in enumerate(ob["layer_head_avg"]):
            for h, want in enumerate(hs):
                v = cells[(blk, l, h)]
                worst = max(worst, abs(v - want) / max(abs(want), 1e-30))
                n += 1
    assert n == 4 * (64 * L * H + L * H)
    return worst


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2", "neox", "phi3", "qwen3", "gemma3"])
def test_score_of_a_torch_collected_store_matches_the_oracle(tmp_path, family):
    store = tmp_path / "s"
    collect(load(family), tasks_of(family), store, dtype="f32", representation="auto",
            batch_size=8, progress=False)
    worst = score_vs_oracle(family, store, tmp_path / "scores")
    print(f"{family}: score vs float64 oracle, worst relative error {worst:.2e}")
    assert worst <= 1e-4, f"{family}: {worst:.2e}"


def test_worker_shares_merge_into_the_single_run_store(tmp_path):
    """worker=(rank, world): each rank takes every world-th sample into its own store;
    `gradshard merge` of the ranks holds every sample once, slices as one run's."""
    model, tasks = load("gpt2"), tasks_of("gpt2")
    ranks = []
    for rank in range(3):
        st = tmp_path / f"rank{rank}"
        r = collect(model, tasks, st, dtype="f32", representation="factored", worker=(rank, 3),
                    batch_size=2, progress=False)
        assert r["stored"] == sum(len(range(rank, 8, 3)) for _ in TASKS)
        assert [x[0] for x in gradshard.open(st).samples("math")] == list(range(rank, 8, 3))
        ranks.append(st)
    merged = tmp_path / "merged"
    cli("merge", "--out", merged, *ranks)
    one = tmp_path / "one"
    collect(model, tasks, one, dtype="f32", representation="factored", batch_size=8, progress=False)
    a, b = gradshard.open(one), gradshard.open(merged)
    for task in TASKS:
        assert [x[:2] for x in a.samples(task)] == [x[:2] for x in b.samples(task)]
        for name in a.tensors:
            for sid in range(8):
                assert rel(b.tensor(task, sid, name), a.tensor(task, sid, name)) <= 1e-5
    cli("verify", "--store", merged)
