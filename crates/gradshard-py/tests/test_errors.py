"""Errors raise gradshard.StoreError with the CLI's message: a damaged frame names the
file, task, sample and slice; a missing store, task, sample or slice says which."""

import shutil
import struct

import numpy as np
import pytest

import gradshard
from conftest import cli


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def frame_row(s, task, sid, **key):
    for r in s.index().to_pylist():
        if r["task"] == task and r["sample_id"] == str(sid) and all(r[k] == v for k, v in key.items()):
            return r
    raise LookupError(key)


@pytest.mark.parametrize("which", [("llama-gqa", "f32", "ingested"), ("gpt2", "factored", "collected")])
def test_corrupted_bytes_raise_store_error_naming_the_slice(ingested, collected, tmp_path, which):
    model, kind, source = which
    src = (ingested if source == "ingested" else collected)[(model, kind)]
    store = tmp_path / "store"
    shutil.copytree(src, store)
    s = gradshard.open(store)
    good = s.slice("math", 3, 1, "V", 1)
    r = frame_row(s, "math", 3, layer=1, block="V", head=1)
    shard = store / "shards" / f"shard-{r['shard']:06d}.gss"
    flip(shard, r["offset"] + 24 + r["length"] // 3)  # inside the payload

    with pytest.raises(gradshard.StoreError) as e:
        s.slice("math", 3, 1, "V", 1)
    msg = str(e.value)
    assert str(shard) in msg
    assert "task `math` sample 3 layer 1 block V kv head 1" in msg
    assert "checksum mismatch" in msg
    # A tile holding that sample fails the same way; one without it reads fine.
    with pytest.raises(gradshard.StoreError, match="sample 3 layer 1 block V kv head 1"):
        s.tile("math", 1, "V", 1)
    others = [i for i, _, _ in s.samples("math") if i != 3]
    assert s.tile("math", 1, "V", 1, ids=others).shape[0] == 7
    with pytest.raises(gradshard.StoreError, match="layer 1 block V kv head 1"):
        v = {"llama-gqa": "model.layers.1.self_attn.v_proj.weight", "gpt2": "transformer.h.1.attn.c_attn.weight"}
        s.tensor("math", 3, v[model])
    # Other slices of the damaged sample are intact.
    assert s.slice("math", 3, 1, "Q", 1).shape == good.shape

    # The message is the one the CLI prints for the same damage.
    out = cli("score", "--store", store, "--task-a", "math", "--task-b", "general",
              "--out", tmp_path / "scores", "--no-pictures", check=False)
    assert out.returncode != 0
    assert msg in out.stderr, out.stderr


def test_a_damaged_shared_factor_names_the_slice_and_the_factor(collected, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(collected[("llama-gqa", "factored")], store)
    s = gradshard.open(store)
    q = frame_row(s, "general", 2, layer=0, block="Q", head=0)
    k = frame_row(s, "general", 2, layer=0, block="K", head=0)
    # Shared factor 0 of the sample (layer 0's attention input: the S of every Q, K
    # and V slice of layer 0), found through the sample table (docs/format.md), which
    # follows the sample's last frame and lists the shared factors after the frames.
    # The index lists the shared factors too (frame_kind "shared"); the table's
    # n_frames counts the per-slice frames only.
    rows = [
        r
        for r in s.index().to_pylist()
        if r["task"] == "general" and r["sample_id"] == "2" and r["frame_kind"] != "shared"
    ]
    shard = store / "shards" / f"shard-{q['shard']:06d}.gss"
    data = shard.read_bytes()
    f0 = next(r for r in rows if r["frame"] == 0)
    pos = data.find(b"GSSAMPLE", min(r["offset"] for r in rows))
    while struct.unpack_from("<IIQQ", data, pos + 8)[::3] != (len(rows), f0["offset"]):
        pos = data.find(b"GSSAMPLE", pos + 1)
        assert pos >= 0, "the sample table was not found"
    n_frames, n_shared = struct.unpack_from("<II", data, pos + 8)
    assert n_shared > 0
    s_offset, s_len = struct.unpack_from("<QI", data, pos + 24 + 24 * n_frames)
    flip(shard, s_offset + 24 + s_len // 2)
    s = gradshard.open(store)
    for blk, head in (("Q", 0), ("K", 0)):
        with pytest.raises(gradshard.StoreError) as e:
            s.slice("general", 2, 0, blk, head)
        assert "task `general` sample 2" in str(e.value)
        assert "layer 0 attention input factor" in str(e.value)
    assert k["frame"] != q["frame"]
    # Layer 1 uses other shared factors.
    assert np.isfinite(s.slice("general", 2, 1, "Q", 0)).all()


def test_missing_things_raise_store_error_with_the_cli_message(ingested, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(gradshard.StoreError) as e:
        gradshard.open(missing)
    cli_err = cli("inspect", "--store", missing, check=False).stderr.strip()
    assert cli_err == f"error: {e.value}"
    assert str(missing) in str(e.value)

    s = gradshard.open(ingested[("llama-gqa", "f32")])
    with pytest.raises(gradshard.StoreError, match=r"unknown task `nope` \(the store has: general, math\)"):
        s.samples("nope")
    with pytest.raises(gradshard.StoreError, match="task `math` has no sample 99"):
        s.slice("math", 99, 0, "Q", 0)
    with pytest.raises(gradshard.StoreError, match="task `math` has no sample 99"):
        s.tile("math", 0, "Q", 0, ids=[0, 99])
    with pytest.raises(gradshard.StoreError, match="holds no slice layer 7 block Q head 0"):
        s.slice("math", 0, 7, "Q", 0)
    with pytest.raises(gradshard.StoreError, match="holds no slice layer 0 block K head 2"):
        s.slice("math", 0, 0, "K", 2)  # 2 kv heads
    with pytest.raises(gradshard.StoreError, match="does not hold tensor `lm_head.weight`"):
        s.tensor("math", 0, "lm_head.weight")
    with pytest.raises(ValueError, match="unknown block `X`"):
        s.slice("math", 0, 0, "X", 0)
    with pytest.raises(ValueError, match="dtype `f16`"):
        s.slice("math", 0, 0, "Q", 0, dtype="f16")
    assert issubclass(gradshard.StoreError, Exception)
