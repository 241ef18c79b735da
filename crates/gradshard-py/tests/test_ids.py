"""Sample ids come back as stored: integers stay int, strings stay str ("007" is not 7)."""

import shutil

import numpy as np
import pytest

import gradshard
from conftest import FIXTURES, ingest


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("ids")
    src = FIXTURES / "llama-gqa" / "grads" / "math"
    d = root / "grads" / "t"
    d.mkdir(parents=True)
    for stem, name in [("3", 0), ("007", 1), ("alpha", 2), ("-5", 3)]:
        shutil.copy(src / f"{name}.safetensors", d / f"{stem}.safetensors")
    return ingest("llama-gqa", root / "store", "f32", tasks=["t"], grads_dir=root / "grads")


def test_samples_keep_int_and_string_ids(mixed):
    s = gradshard.open(mixed)
    ids = [i for i, _, _ in s.samples("t")]
    # Store order: integer ids ascending, then string ids ascending.
    assert ids == [-5, 3, "007", "alpha"]
    assert [type(i) for i in ids] == [int, int, str, str]
    a = s.slice("t", "007", 0, "Q", 0)
    assert np.array_equal(s.tile("t", 0, "Q", 0, ids=["007"])[0], a)
    # "007" is the string id; the integer 7 and the string "3" are other (absent) ids.
    with pytest.raises(gradshard.StoreError, match="task `t` has no sample 7"):
        s.slice("t", 7, 0, "Q", 0)
    with pytest.raises(gradshard.StoreError, match='has no sample "3"'):
        s.slice("t", "3", 0, "Q", 0)
    assert s.slice("t", np.int64(3), 0, "Q", 0).shape == a.shape  # numpy ints are ints
    with pytest.raises(TypeError):
        s.slice("t", 3.0, 0, "Q", 0)
    with pytest.raises(TypeError):
        s.slice("t", True, 0, "Q", 0)
    kinds = {(r["sample_id"], r["sample_id_kind"]) for r in s.index().select(["sample_id", "sample_id_kind"]).to_pylist()}
    assert kinds == {("-5", "int"), ("3", "int"), ("007", "str"), ("alpha", "str")}
