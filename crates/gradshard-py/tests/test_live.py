"""Readers alongside a writer and alongside each other: a store being written shows
its committed samples (refresh() shows later ones), and threads share one Store."""

import subprocess
import threading
import time

import numpy as np

import gradshard
from conftest import gradshard_bin


def test_a_store_being_written_shows_its_committed_samples(tmp_path):
    store = tmp_path / "live"
    total = 40
    w = subprocess.Popen(
        [gradshard_bin(), "synth", "--store", str(store), "--preset", "small",
         "--tasks", "a", "--samples", str(total), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        log = store / "samples.log"
        deadline = time.monotonic() + 60
        # Wait for the first committed record (the log header is 16 bytes).
        while not (log.exists() and log.stat().st_size > 16):
            assert w.poll() is None or log.exists(), w.stderr.read()
            assert time.monotonic() < deadline, "no sample committed within 60 s"
            time.sleep(0.01)
        s = gradshard.open(store)  # the writer holds LOCK; readers do not need it
        seen = [i for i, _, _ in s.samples("a")]
        assert 1 <= len(seen) <= total
        g = s.geometry
        t = s.tile("a", g["layers"] - 1, "O", g["heads"] - 1)
        assert t.shape[0] == len(seen) and np.isfinite(t).all()
        running = w.poll() is None
    finally:
        assert w.wait(timeout=120) == 0, w.stderr.read()
    # The open reader keeps its snapshot until refreshed.
    assert [i for i, _, _ in s.samples("a")] == seen
    s.refresh()
    assert len(s.samples("a")) == total
    first = s.tile("a", 0, "Q", 0, ids=seen)
    assert np.array_equal(first, gradshard.open(store).tile("a", 0, "Q", 0, ids=seen))
    print(f"reader opened with {len(seen)}/{total} samples committed, writer still running: {running}")


def test_threads_share_one_store(ingested):
    s = gradshard.open(ingested[("gpt2", "bf16")])
    want = {h: s.tile("math", 1, "Q", h) for h in range(4)}
    errors = []

    def work(h):
        try:
            for _ in range(20):
                assert np.array_equal(s.tile("math", 1, "Q", h), want[h])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(h,)) for h in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
