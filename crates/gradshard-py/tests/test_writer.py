"""gradshard.create: the Python writer over the store crate's per-sample sink.

Needs numpy only. Stores are written from the fixtures' reference gradients (or
from random factors) and read back through gradshard.open; `gradshard verify`
checks what was written.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import gradshard
from conftest import FIXTURES, cli, config, fixture_grads

LLAMA = FIXTURES / "llama-gqa" / "model"
GPT2 = FIXTURES / "gpt2" / "model"


def attention_only(tensors: dict, model: str) -> dict:
    marks = ("self_attn.", ".attn.")
    return {k: v for k, v in tensors.items() if any(m in k for m in marks)}


def mlp_only(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if ".mlp." in k}


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_full_gradients_round_trip_exactly_in_f32(tmp_path):
    store = tmp_path / "s"
    refs = fixture_grads("llama-gqa", "math")
    with gradshard.create(store, config=LLAMA, dtype="f32", representation="full") as w:
        assert w.representation == "full" and w.dtype == "f32"
        names = {n for n, *_ in w.tensors}
        for sid, (t, meta) in refs.items():
            grads = attention_only(t, "llama-gqa")
            assert set(grads) == names
            assert w.add("math", sid, grads, tokens=int(meta["tokens"]), loss_sum=float(meta["loss_sum"]))
    assert w.report["stored"] == len(refs) and w.report["full_samples"] == len(refs)
    assert any(str(p).endswith("math.json") for p in w.report["stats_files"])
    s = gradshard.open(store)
    got = {sid: (T, L) for sid, T, L in s.samples("math")}
    for sid, (t, meta) in refs.items():
        assert got[sid] == (int(meta["tokens"]), pytest.approx(float(meta["loss_sum"]), rel=0, abs=0))
        assert s.representation("math", sid) == "full"
        for name, g in attention_only(t, "llama-gqa").items():
            np.testing.assert_array_equal(s.tensor("math", sid, name), g)
    cli("verify", "--store", store)


@pytest.mark.parametrize("model", ["llama-gqa", "gpt2"])
@pytest.mark.parametrize("representation", ["factored", "full", "auto"])
def test_factors_are_oriented_and_cut_as_the_weights(tmp_path, model, representation):
    """Linear [out, in]: grad = bpᵀ @ act; GPT-2 Conv1D [in, out]: grad = actᵀ @ bp.
    Two samples, n = 3 and n = 80: `auto` stores the short one as factors and
    multiplies the long one out."""
    rng = np.random.default_rng(7)
    store = tmp_path / "s"
    want = {}
    with gradshard.create(store, config=FIXTURES / model / "model", dtype="f32",
                          representation=representation) as w:
        for sid, n in ((1, 3), (2, 80)):
            fac, shared = {}, {}
            for name, shape, kind, attn in w.tensors:
                assert attn
                out_f, in_f = (shape[1], shape[0]) if kind == "conv1d" else (shape[0], shape[1])
                bp = rng.standard_normal((n, out_f), dtype=np.float32)
                # q, k and v of a layer read the same input (one shared factor).
                key = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj")
                if key not in shared:
                    shared[key] = rng.standard_normal((n, in_f), dtype=np.float32)
                act = shared[key]
                fac[name] = (bp, act)
                g = act.T.astype(np.float64) @ bp if kind == "conv1d" else bp.T.astype(np.float64) @ act
                assert list(g.shape) == list(shape)
                want[(sid, name)] = g
            assert w.add_factors("general", sid, fac, tokens=n - 1, loss_sum=1.5 * n)
    s = gradshard.open(store)
    for sid, n in ((1, 3), (2, 80)):
        r = s.representation("general", sid)
        if representation == "auto":
            assert r == ("factored" if n == 3 else "full"), (sid, r)
        else:
            assert r == representation
    for (sid, name), g in want.items():
        assert rel(s.tensor("general", sid, name), g) < 1e-5, (sid, name)
    rep = w.report
    assert rep["factored_samples"] + rep["full_samples"] == 2
    cli("verify", "--store", store)


def test_mlp_tensors_and_resume(tmp_path):
    store = tmp_path / "s"
    refs = fixture_grads("llama-gqa", "general")
    first = next(iter(refs.values()))[0]
    mlp = {k: list(v.shape) for k, v in mlp_only(first).items()}
    assert len(mlp) == 6
    ids = sorted(refs)
    with gradshard.create(store, config=LLAMA, dtype="bf16", params="attn,mlp", mlp=mlp,
                          representation="full") as w:
        assert len(w.tensors) == 8 + 6
        for sid in ids[:3]:
            t, meta = refs[sid]
            w.add("general", sid, t, int(meta["tokens"]), float(meta["loss_sum"]))
    # Reopened: the committed ids are there to skip, and a new sample joins them.
    with gradshard.create(store, config=LLAMA, dtype="bf16", params="attn,mlp", mlp=mlp,
                          representation="full") as w:
        assert w.committed("general") == ids[:3]
        assert w.committed("math") == []
        for sid in ids:
            if w.is_committed("general", sid):
                continue
            t, meta = refs[sid]
            w.add("general", sid, t, int(meta["tokens"]), float(meta["loss_sum"]))
    s = gradshard.open(store)
    assert [r[0] for r in s.samples("general")] == ids
    name = "model.layers.1.mlp.down_proj.weight"
    got = s.tensor("general", ids[-1], name)
    assert rel(got, refs[ids[-1]][0][name]) < 1e-2  # bf16
    cli("verify", "--store", store)


def test_bad_samples_raise_naming_the_tensor_and_leave_nothing(tmp_path):
    store = tmp_path / "s"
    refs = fixture_grads("llama-gqa", "math")
    (sid, (t, meta)), (sid2, (t2, meta2)) = list(refs.items())[:2]
    good = attention_only(t, "llama-gqa")
    q = "model.layers.0.self_attn.q_proj.weight"
    T, L = int(meta["tokens"]), float(meta["loss_sum"])
    w = gradshard.create(store, config=LLAMA, dtype="f32", representation="auto")

    def bad(match, fn):
        with pytest.raises(ValueError, match=match) as e:
            fn()
        assert "task `math` sample 77" in str(e.value), str(e.value)

    unknown = dict(good)
    unknown["model.layers.0.self_attn.q_prj.weight"] = unknown.pop(q)
    bad("q_prj", lambda: w.add("math", 77, unknown, T, L))
    missing = dict(good)
    del missing[q]
    bad("q_proj.weight` is missing", lambda: w.add("math", 77, missing, T, L))
    shape = dict(good)
    shape[q] = good[q][:, :10]
    bad(r"q_proj.weight` has shape \[64, 10\]", lambda: w.add("math", 77, shape, T, L))
    ints = dict(good)
    ints[q] = good[q].astype(np.int32)
    bad("q_proj.weight.*dtype int32", lambda: w.add("math", 77, ints, T, L))
    nan = dict(good)
    nan[q] = good[q].copy()
    nan[q][3, 5] = np.nan
    bad("q_proj.weight.*non-finite", lambda: w.add("math", 77, nan, T, L))
    bad("tokens = 0", lambda: w.add("math", 77, good, 0, L))
    # Factors: a wrong width, different row counts, not a pair.
    n = 4
    fac = {}
    for name, shp, kind, _ in w.tensors:
        fac[name] = (np.ones((n, shp[0]), np.float32), np.ones((n, shp[1]), np.float32))
    f1 = dict(fac)
    f1[q] = (fac[q][0][:, :5], fac[q][1])
    bad(r"q_proj.weight`: backprop has shape \[4, 5\], expected \[n, 64\]", lambda: w.add_factors("math", 77, f1, 3, L))
    f2 = dict(fac)
    f2[q] = (fac[q][0], fac[q][1][:3])
    bad("q_proj.weight`: backprop has 4 rows and activation 3", lambda: w.add_factors("math", 77, f2, 3, L))
    f3 = dict(fac)
    f3[q] = fac[q][0]
    bad("q_proj.weight`: expected a \\(backprop, activation\\) pair", lambda: w.add_factors("math", 77, f3, 3, L))
    f4 = {k: (v[0].copy(), v[1].copy()) for k, v in fac.items()}
    f4[q][1][0, 0] = np.inf
    bad("q_proj.weight.*non-finite", lambda: w.add_factors("math", 77, f4, 3, L))
    # q/k/v of a layer read the same input: different activations are refused.
    f5 = {k: (v[0], v[1].copy()) for k, v in fac.items()}
    f5["model.layers.0.self_attn.k_proj.weight"][1][0, 0] = 2.0
    bad("share", lambda: w.add_factors("math", 77, f5, 3, L))
    # After all that the writer still works; a duplicate id is refused.
    assert w.add("math", sid, good, T, L)
    with pytest.raises(ValueError, match=f"task `math` sample {sid}: duplicate"):
        w.add("math", sid, good, T, L)
    with pytest.raises(ValueError, match=f"task `math` sample {sid}: duplicate"):
        w.add_factors("math", sid, fac, 3, L)
    w.add("math", sid2, attention_only(t2, "llama-gqa"), int(meta2["tokens"]), float(meta2["loss_sum"]))
    rep = w.close()
    assert rep["stored"] == 2 and rep["skipped"] == []
    with pytest.raises(gradshard.StoreError, match="closed"):
        w.add("math", 5, good, T, L)
    s = gradshard.open(store)
    assert sorted(r[0] for r in s.samples("math")) == sorted([sid, sid2])
    cli("verify", "--store", store)


def test_nan_policy_skip_reports_the_sample(tmp_path):
    refs = fixture_grads("llama-gqa", "math")
    sid, (t, meta) = next(iter(refs.items()))
    good = attention_only(t, "llama-gqa")
    nan = dict(good)
    k = "model.layers.1.self_attn.o_proj.weight"
    nan[k] = good[k].copy()
    nan[k][0, 0] = np.nan
    with gradshard.create(tmp_path / "s", config=LLAMA, dtype="f32", nan_policy="skip") as w:
        assert w.add("math", 1, nan, 3, 1.0) is False
        assert w.add("math", 2, good, 3, 1.0) is True
    assert w.report["stored"] == 1
    [sk] = w.report["skipped"]
    assert sk["task"] == "math" and sk["id"] == 1 and k in sk["why"]


def test_one_writer_at_a_time_and_a_store_must_match(tmp_path):
    store = tmp_path / "s"
    w = gradshard.create(store, config=LLAMA, dtype="f32")
    with pytest.raises(gradshard.StoreError, match="LOCK|lock|locked"):
        gradshard.create(store, config=LLAMA, dtype="f32")
    w.close()
    with pytest.raises(gradshard.StoreError):
        gradshard.create(store, config=LLAMA, dtype="bf16")
    with pytest.raises(gradshard.StoreError):
        gradshard.create(store, config=GPT2, dtype="f32")


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="dtype `f16`"):
        gradshard.create(tmp_path / "a", config=LLAMA, dtype="f16")
    with pytest.raises(ValueError, match="representation"):
        gradshard.create(tmp_path / "b", config=LLAMA, representation="sparse")
    with pytest.raises(ValueError, match="params"):
        gradshard.create(tmp_path / "c", config=LLAMA, params="mlp")
    with pytest.raises(ValueError, match="mlp="):
        gradshard.create(tmp_path / "d", config=LLAMA, params="attn,mlp")
    with pytest.raises(ValueError, match="config"):
        gradshard.create(tmp_path / "e", config=tmp_path / "nowhere.json")
    # A config as a dict works as well as a path.
    cfg = config("llama-gqa")
    with gradshard.create(tmp_path / "f", config=cfg, dtype="f32") as w:
        assert len(w.tensors) == 8
    assert json.loads((tmp_path / "f" / "manifest.json").read_text())
