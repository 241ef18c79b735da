"""`tensor()` rebuilds every gradient tensor of every fixture family in its own
Hugging Face layout (split, fused QKV, NeoX-interleaved, GPT-2 Conv1D, …): ingest
the fixture's gradients into an f32 store and read each tensor back bit for bit."""

import numpy as np
import pytest

import gradshard
from conftest import FIXTURES, bits, ingest, read_safetensors

FAMILIES = sorted(
    p.name
    for p in FIXTURES.iterdir()
    if (p / "model" / "config.json").exists() and (p / "grads").is_dir()
)


def test_the_fixture_families_are_found():
    assert {"llama-gqa", "gpt2"} <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_rebuilds_every_fixture_tensor(tmp_path, family):
    tasks = sorted(p.name for p in (FIXTURES / family / "grads").iterdir() if p.is_dir())
    s = gradshard.open(ingest(family, tmp_path / "store", "f32", tasks=tasks))
    n = 0
    for task in tasks:
        for f in sorted((FIXTURES / family / "grads" / task).glob("*.safetensors")):
            tensors, meta = read_safetensors(f)
            sid = int(f.stem)
            for name, want in tensors.items():
                if want.ndim != 2:
                    continue
                assert name in s.tensors, name
                got = s.tensor(task, sid, name)
                assert got.shape == want.shape, name
                assert np.array_equal(bits(got), bits(want)), f"{family} {task} {sid} {name}"
                n += 1
            # Every attention slice reads, in the canonical (d, D) shape.
            g = s.geometry
            for layer in range(g["layers"]):
                for block in s.blocks:
                    for head in range(g["kv_heads"] if block in "KV" else g["heads"]):
                        assert s.slice(task, sid, layer, block, head).shape == (g["head_dim"], g["hidden"])
    assert n > 0
