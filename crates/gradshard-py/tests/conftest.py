"""Shared helpers for the gradshard Python tests.

The tests build their stores with the `gradshard` CLI (GRADSHARD_BIN, else the
workspace's target/debug/gradshard or target/release/gradshard, else `gradshard` on
PATH) from the fixtures in tests/fixtures/, and check what the package reads against
the fixtures' own safetensors files, parsed here with numpy alone.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / "tests" / "fixtures"
MODELS = ("llama-gqa", "gpt2")
TASKS = ("math", "general")


def gradshard_bin() -> str:
    env = os.environ.get("GRADSHARD_BIN")
    if env:
        return env
    for profile in ("debug", "release"):
        p = REPO / "target" / profile / "gradshard"
        if p.exists():
            return str(p)
    found = shutil.which("gradshard")
    if found:
        return found
    pytest.exit(
        "no gradshard binary: build it (cargo build -p gradshard-cli) or set GRADSHARD_BIN",
        returncode=2,
    )


def cli(*args, check=True) -> subprocess.CompletedProcess:
    """Runs the gradshard CLI; fails the test with its output when it fails."""
    r = subprocess.run(
        [gradshard_bin(), *map(str, args)], capture_output=True, text=True
    )
    if check and r.returncode != 0:
        raise AssertionError(
            f"gradshard {' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        )
    return r


def read_safetensors(path: Path):
    """(tensors as float32 numpy arrays, metadata) of a safetensors file."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, t in header.items():
        assert t["dtype"] == "F32", (path, name, t["dtype"])
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(raw[base + a : base + b], dtype="<f4").reshape(
            t["shape"]
        )
    return out, meta


def fixture_grads(model: str, task: str):
    """{id: (tensors, metadata)} of a fixture task, ids as ints (the file stems)."""
    d = FIXTURES / model / "grads" / task
    return {int(p.stem): read_safetensors(p) for p in sorted(d.glob("*.safetensors"))}


def config(model: str) -> dict:
    return json.loads((FIXTURES / model / "model" / "config.json").read_text())


def expected_slices(model: str, tensors: dict):
    """{(layer, block, head): (d, D) float32} cut from a sample's HF tensors, written
    independently of the Rust geometry: LLaMA's split Linear [out, in] weights (Q/K/V
    heads own rows, O heads own columns) and GPT-2's Conv1D [in, out] weights (c_attn
    heads own columns, c_proj heads own rows)."""
    c = config(model)
    out = {}
    if model == "llama-gqa":
        H, Hkv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        for layer in range(c["num_hidden_layers"]):
            p = f"model.layers.{layer}.self_attn."
            for blk, name, heads in (("Q", "q_proj", H), ("K", "k_proj", Hkv), ("V", "v_proj", Hkv)):
                w = tensors[p + name + ".weight"]
                for h in range(heads):
                    out[(layer, blk, h)] = w[h * d : (h + 1) * d, :]
            w = tensors[p + "o_proj.weight"]
            for h in range(H):
                out[(layer, "O", h)] = w[:, h * d : (h + 1) * d].T
    elif model == "gpt2":
        D, H = c["n_embd"], c["n_head"]
        d = D // H
        for layer in range(c["n_layer"]):
            p = f"transformer.h.{layer}.attn."
            w = tensors[p + "c_attn.weight"]  # [D, 3D]
            for i, blk in enumerate("QKV"):
                for h in range(H):
                    out[(layer, blk, h)] = w[:, i * D + h * d : i * D + (h + 1) * d].T
            w = tensors[p + "c_proj.weight"]  # [D, D], [in, out]
            for h in range(H):
                out[(layer, "O", h)] = w[h * d : (h + 1) * d, :]
    else:
        raise ValueError(model)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def bf16_rne(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest, ties to even), as float32."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return (r << 16).astype(np.uint32).view(np.float32).reshape(x.shape)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def ingest(model: str, store: Path, dtype: str, tasks=TASKS, grads_dir=None):
    g = grads_dir or (FIXTURES / model / "grads")
    args = ["ingest", "--model", FIXTURES / model / "model", "--store", store, "--dtype", dtype]
    for t in tasks:
        args += ["--task", f"{t}={g / t}"]
    cli(*args)
    return store


def collect(model: str, store: Path, representation: str, dtype: str = "f32"):
    args = ["collect", "--model", FIXTURES / model / "model", "--store", store]
    for t in TASKS:
        args += ["--task", f"{t}={FIXTURES / model / 'tasks' / (t + '.jsonl')}"]
    args += ["--dtype", dtype, "--params", "attn,mlp", "--representation", representation, "--quiet"]
    cli(*args)
    return store


@pytest.fixture(scope="session")
def ingested(tmp_path_factory):
    """{(model, dtype): store path} of both fixtures ingested as f32 and bf16."""
    root = tmp_path_factory.mktemp("ingested")
    return {
        (m, dt): ingest(m, root / f"{m}-{dt}", dt) for m in MODELS for dt in ("f32", "bf16")
    }


@pytest.fixture(scope="session")
def collected(tmp_path_factory):
    """{(model, representation): store path} of `collect --dtype f32 --params attn,mlp`."""
    root = tmp_path_factory.mktemp("collected")
    return {
        (m, r): collect(m, root / f"{m}-{r}", r) for m in MODELS for r in ("full", "factored")
    }
