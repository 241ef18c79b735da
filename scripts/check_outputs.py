#!/usr/bin/env python3
"""Checks a gradshard score output directory against schemas/*.arrow.json.

Usage: python3 scripts/check_outputs.py <out_dir> [--schemas DIR]

For every schema file: opens <out_dir>/<table>.parquet with pyarrow, compares
field names, order, types (str(pyarrow type)) and nullability; then checks that
every heatmap_<block>.png named by summary.json's files is a PNG whose IHDR size
matches the size rule of gradshard_export::picture_size (layers and heads from
summary.json's geometry). Exits non-zero with a message on the first mismatch.
"""
import argparse
import json
import pathlib
import struct
import sys

import pyarrow.parquet as pq


def fail(msg):
    print(f"check_outputs: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def picture_size(layers, heads):
    # Mirror of gradshard_export::picture_size (keep in sync).
    bar_panel = 140
    footer = 96
    cell = max(8, min(48, 560 // max(layers, heads, 1)))
    w = 90 + heads * cell + 40 + bar_panel
    h = 80 + layers * cell + 70 + footer
    return max(w, 600), max(h, 360 + footer)


def png_size(path):
    b = path.read_bytes()
    if b[:8] != b"\x89PNG\r\n\x1a\n":
        fail(f"{path}: not a PNG (bad signature)")
    if b[12:16] != b"IHDR":
        fail(f"{path}: first chunk is not IHDR")
    return struct.unpack(">II", b[16:24])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument(
        "--schemas",
        default=str(pathlib.Path(__file__).resolve().parent.parent / "schemas"),
    )
    a = ap.parse_args()
    out = pathlib.Path(a.out_dir)
    schemas = sorted(pathlib.Path(a.schemas).glob("*.arrow.json"))
    if not schemas:
        fail(f"no schemas in {a.schemas}")
    summary = json.loads((out / "summary.json").read_text())
    # Phase 5 tables are written only by `score --conflicts` (summary.json then has a
    # "conflicts" section); without it they must be absent.
    conflict_tables = {"conflicts", "conflict_pairs", "sample_conflicts"}
    with_conflicts = "conflicts" in summary
    for sp in schemas:
        doc = json.loads(sp.read_text())
        path = out / doc["file"]
        if doc["table"] in conflict_tables and not with_conflicts:
            if path.exists():
                fail(f"{path} present but summary.json has no conflicts section")
            print(f"--  {doc['file']}: not a --conflicts run")
            continue
        if not path.exists():
            fail(f"{path} missing")
        schema = pq.read_schema(path)
        want = doc["fields"]
        if len(schema) != len(want):
            fail(f"{path}: {len(schema)} fields, schema {sp.name} has {len(want)}")
        for field, w in zip(schema, want):
            got = (field.name, str(field.type), field.nullable)
            exp = (w["name"], w["type"], w["nullable"])
            if got != exp:
                fail(f"{path}: field {got} != {exp} ({sp.name})")
        rows = pq.read_metadata(path).num_rows
        print(f"ok  {doc['file']}: {len(want)} fields, {rows} rows")
    geo = summary["geometry"]
    want = picture_size(geo["layers"], geo["heads"])
    pngs = [f for f in summary["files"] if f.endswith(".png")]
    if not pngs:
        fail("summary.json lists no PNG heatmap")
    for f in pngs:
        size = png_size(out / f)
        if tuple(size) != want:
            fail(f"{f}: size {size}, expected {want}")
        print(f"ok  {f}: {size[0]}x{size[1]}")
    print("check_outputs: all outputs match")


if __name__ == "__main__":
    main()
