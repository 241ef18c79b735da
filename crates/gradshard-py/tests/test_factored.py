"""Factored (format v2) and full stores of the same samples give the same arrays:
`collect --representation factored` and `--representation full` (f32) on both fixture
models, read through Python, agree bit for bit, and both reproduce the fixtures'
PyTorch gradients to float32 accuracy."""

import numpy as np
import pytest

import gradshard
from conftest import MODELS, TASKS, expected_slices, fixture_grads


@pytest.mark.parametrize("model", MODELS)
def test_factored_and_full_stores_give_the_same_arrays(collected, model):
    full = gradshard.open(collected[(model, "full")])
    fact = gradshard.open(collected[(model, "factored")])
    assert fact.format_version == 3
    assert full.tasks == fact.tasks and full.geometry == fact.geometry
    assert sorted(full.tensors) == sorted(fact.tensors)
    g = full.geometry
    checked = 0
    for task in TASKS:
        assert full.samples(task) == fact.samples(task)
        ids = [i for i, _, _ in fact.samples(task)]
        assert {fact.representation(task, i) for i in ids} == {"factored"}
        assert {full.representation(task, i) for i in ids} == {"full"}
        for layer in range(g["layers"]):
            for block in "QKVO":
                for head in range(g["kv_heads"] if block in "KV" else g["heads"]):
                    a = full.tile(task, layer, block, head)
                    b = fact.tile(task, layer, block, head)
                    assert np.array_equal(a, b), f"{model} {task} layer {layer} {block} head {head}"
                    for k, sid in enumerate(ids):
                        assert np.array_equal(b[k], fact.slice(task, sid, layer, block, head))
                    checked += a.shape[0]
        for sid in ids:
            for name in fact.tensors:
                assert np.array_equal(full.tensor(task, sid, name), fact.tensor(task, sid, name)), name
    assert checked == 16 * g["layers"] * 2 * (g["heads"] + g["kv_heads"])


@pytest.mark.parametrize("model", MODELS)
def test_factored_slices_match_the_fixture_and_their_factors(collected, model):
    s = gradshard.open(collected[(model, "factored")])
    for task in TASKS:
        for sid, (tensors, meta) in fixture_grads(model, task).items():
            for (layer, block, head), want in expected_slices(model, tensors).items():
                got = s.slice(task, sid, layer, block, head)
                err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
                assert err <= 1e-5, f"{model} {task} {sid} layer {layer} {block} head {head}: {err:.2e}"
            p, f = s.factors(task, sid, 1, "O", 0)
            n = p.shape[0]
            assert p.shape == (n, s.geometry["head_dim"]) and f.shape == (n, s.geometry["hidden"])
            # The reader forms P^T S with its own f32 GEMM; numpy's sums in another order.
            np.testing.assert_allclose(p.T @ f, s.slice(task, sid, 1, "O", 0), rtol=1e-5, atol=1e-6)


def test_factors_of_a_full_sample_raise(collected):
    s = gradshard.open(collected[("llama-gqa", "full")])
    with pytest.raises(gradshard.StoreError, match="stored as full slices"):
        s.factors("math", 0, 0, "Q", 0)
