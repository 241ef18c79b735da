"""Store.verify(): the library's verify, stats/ included, from Python."""

import json
import shutil

import gradshard


def test_verify_passes_a_collected_store_and_names_a_tampered_stats_file(collected, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(collected[("llama-gqa", "factored")], store)
    rep = gradshard.open(store).verify()
    assert rep["ok"] and rep["problems"] == [], rep
    assert rep["samples"] > 0 and rep["frames"] > 0

    path = store / "stats" / "math.json"
    v = json.loads(path.read_text())
    v["groups"][3]["mean"] *= 10.0
    path.write_text(json.dumps(v, indent=2))
    rep = gradshard.open(store).verify()
    assert not rep["ok"]
    assert any("stats/math.json" in p and "checksum mismatch" in p for p in rep["problems"]), rep


def test_verify_names_a_damaged_side_log(collected, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(collected[("gpt2", "full")], store)
    side = store / "stats" / "samples.bin"
    b = bytearray(side.read_bytes())
    b[len(b) // 2] ^= 0x5A
    side.write_bytes(bytes(b))
    rep = gradshard.open(store).verify()
    assert not rep["ok"]
    assert any("stats/samples.bin" in p for p in rep["problems"]), rep
