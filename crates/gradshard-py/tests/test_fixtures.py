"""Every slice and tensor of both fixture models, read through Python, equals the
fixture gradient: bit for bit from an f32 store, the round-to-nearest-even bf16 value
of it from a bf16 store."""

import numpy as np
import pytest

import gradshard
from conftest import MODELS, TASKS, bf16_rne, bits, config, expected_slices, fixture_grads


def expect(x, dtype):
    return x if dtype == "f32" else bf16_rne(x)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("model", MODELS)
def test_every_slice_equals_the_fixture_gradient(ingested, model, dtype):
    s = gradshard.open(ingested[(model, dtype)])
    assert s.dtype == dtype
    g = s.geometry
    n = 0
    for task in TASKS:
        for sid, (tensors, _) in fixture_grads(model, task).items():
            want = expected_slices(model, tensors)
            assert len(want) == g["layers"] * (2 * g["heads"] + 2 * g["kv_heads"])
            for (layer, block, head), w in want.items():
                got = s.slice(task, sid, layer, block, head)
                assert got.dtype == np.float32 and got.shape == (g["head_dim"], g["hidden"])
                assert np.array_equal(bits(got), bits(expect(w, dtype))), (
                    f"{model} {dtype} {task} sample {sid} layer {layer} {block} head {head}"
                )
                n += 1
    assert n == 2 * 8 * len(want)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("model", MODELS)
def test_tensor_reproduces_the_fixture_safetensors(ingested, model, dtype):
    s = gradshard.open(ingested[(model, dtype)])
    for task in TASKS:
        for sid, (tensors, _) in fixture_grads(model, task).items():
            # Every 2-D gradient of the file (attention and MLP) is stored and rebuilt.
            assert sorted(s.tensors) == sorted(tensors)
            for name, w in tensors.items():
                got = s.tensor(task, sid, name)
                assert got.shape == w.shape, name
                assert np.array_equal(bits(got), bits(expect(w, dtype))), (
                    f"{model} {dtype} {task} sample {sid} {name}"
                )


@pytest.mark.parametrize("model", MODELS)
def test_tiles_stack_the_slices_in_store_or_given_order(ingested, model):
    s = gradshard.open(ingested[(model, "bf16")])
    g = s.geometry
    for task in TASKS:
        ids = [i for i, _, _ in s.samples(task)]
        for layer in range(g["layers"]):
            for block in "QKVO":
                heads = g["kv_heads"] if block in "KV" else g["heads"]
                for head in range(heads):
                    t = s.tile(task, layer, block, head)
                    assert t.shape == (len(ids), g["head_dim"], g["hidden"])
                    assert t.dtype == np.float32 and t.flags["C_CONTIGUOUS"]
                    for k, sid in enumerate(ids):
                        assert np.array_equal(t[k], s.slice(task, sid, layer, block, head))
        pick = [ids[5], ids[0], ids[5]]
        t = s.tile(task, 1, "K", 1, ids=pick)
        assert t.shape[0] == 3
        for k, sid in enumerate(pick):
            assert np.array_equal(t[k], s.slice(task, sid, 1, "K", 1))
        assert s.tile(task, 0, "Q", 0, ids=[]).shape == (0, g["head_dim"], g["hidden"])


@pytest.mark.parametrize("model", MODELS)
def test_store_describes_the_model_and_its_samples(ingested, model):
    s = gradshard.open(ingested[(model, "f32")])
    c = config(model)
    g = s.geometry
    if model == "gpt2":
        assert (g["layers"], g["heads"], g["kv_heads"], g["hidden"]) == (
            c["n_layer"], c["n_head"], c["n_head"], c["n_embd"],
        )
        assert g["layout"] == "gpt2_conv1d"
    else:
        assert (g["layers"], g["heads"], g["kv_heads"], g["hidden"], g["head_dim"]) == (
            c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"],
            c["hidden_size"], c["head_dim"],
        )
        assert g["layout"] == "split_linear"
    assert g["model_type"] == c["model_type"]
    assert s.tasks == sorted(TASKS)
    assert s.blocks == ["Q", "K", "V", "O"]
    assert s.format_version in (1, 2, 3)
    for task in TASKS:
        want = fixture_grads(model, task)
        got = s.samples(task)
        assert [i for i, _, _ in got] == sorted(want)
        for sid, tokens, loss_sum in got:
            meta = want[sid][1]
            assert type(sid) is int
            assert tokens == int(meta["tokens"])
            assert loss_sum == float(meta["loss_sum"])
        assert all(s.representation(task, i) == "full" for i, _, _ in got)
    assert "samples in 2 tasks" in repr(s)


def test_tile_reads_into_a_given_buffer(ingested):
    s = gradshard.open(ingested[("llama-gqa", "bf16")])
    g = s.geometry
    buf = np.full((8, g["head_dim"], g["hidden"]), np.nan, dtype=np.float32)
    for head in range(g["heads"]):
        got = s.tile("math", 1, "O", head, out=buf)
        assert got is buf
        assert np.array_equal(buf, s.tile("math", 1, "O", head))
    with pytest.raises(ValueError, match="out has shape"):
        s.tile("math", 1, "O", 0, ids=[0, 1], out=buf)
    with pytest.raises(ValueError, match="C-contiguous"):
        s.tile("math", 1, "O", 0, out=np.zeros((g["hidden"], g["head_dim"], 8), np.float32).T)
    with pytest.raises(TypeError):
        s.tile("math", 1, "O", 0, out=np.zeros((8, g["head_dim"], g["hidden"]), np.float64))
