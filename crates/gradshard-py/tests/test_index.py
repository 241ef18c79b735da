"""Store.index() is the table `gradshard inspect --index-parquet` writes, with the
schema of schemas/store/index.arrow.json."""

import json

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import gradshard  # noqa: E402
from conftest import REPO, cli  # noqa: E402


def test_schema_is_the_one_in_schemas():
    spec = json.loads((REPO / "schemas" / "store" / "index.arrow.json").read_text())
    want = [(f["name"], f["type"], f["nullable"]) for f in spec["fields"]]
    assert gradshard.INDEX_FIELDS == want
    schema = gradshard.index_schema()
    assert [(f.name, str(f.type), f.nullable) for f in schema] == want


@pytest.mark.parametrize(
    "which", [("ingested", ("gpt2", "bf16")), ("collected", ("llama-gqa", "factored"))]
)
def test_index_equals_the_cli_export(ingested, collected, tmp_path, which):
    store = (ingested if which[0] == "ingested" else collected)[which[1]]
    out = tmp_path / "index.parquet"
    cli("inspect", "--store", store, "--index-parquet", out)
    want = pq.read_table(out)
    got = gradshard.open(store).index()
    assert got.schema.equals(want.schema, check_metadata=False)
    assert got.num_rows == want.num_rows > 0
    assert got.equals(want)


def test_factored_store_counts_every_frame_once(collected):
    """inspect, verify and Store.index() count the same frames (shared factors
    included), and the index's bytes are the bytes of the samples' frames."""
    store = collected[("llama-gqa", "factored")]
    t = gradshard.open(store).index()
    kinds = set(t.column("frame_kind").to_pylist())
    assert "shared" in kinds and "factor" in kinds, kinds
    info = json.loads(cli("inspect", "--store", store, "--json").stdout)
    assert t.num_rows == info["frames"]
    reprs = info["representations"]
    frame_bytes = reprs["full"]["frame_bytes"] + reprs["factored"]["frame_bytes"]
    assert sum(t.column("length").to_pylist()) == frame_bytes
    line = cli("verify", "--store", store).stdout
    assert f", {info['frames']} frames (" in line, line
