"""benchmarks/bench_handoff.py run with a few calls per figure, so that it cannot rot unnoticed
(no time is asserted: only that every figure is measured, printed, and that the compiled
worker computes the same halves and stops when asked)."""

from __future__ import annotations

import importlib.util
import math
import sys
import threading
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_handoff.py"


def test_every_way_is_measured_and_the_worker_stops(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_handoff_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    lines: list[str] = []
    rows = module.run(sizes=(0, 100), repeats=5, print_fn=lines.append)
    assert lines[0].startswith("CPU: ")
    assert [(r["size"], r["way"]) for r in rows] == [
        (n, way) for n in (0, 100) for way in ("one thread", "executor", "compiled")
    ]
    for r in rows:
        assert math.isfinite(r["median_us"]) and 0 < r["median_us"] <= r["p90_us"] * 1.0001
    assert len(lines) == 1 + len(rows)
    # the compiled worker's half is the same number as the caller computing it itself
    x = np.random.default_rng(1).random(101)
    out, ctl = np.zeros(2), np.zeros(8, np.int64)
    worker = threading.Thread(target=module.serve, args=(ctl, x, out), daemon=True)
    worker.start()
    module.post_run_wait(ctl, 1, x, out, 0, 50, 50, 101)
    assert out[0] == module.work(x, 0, 50) and out[1] == module.work(x, 50, 101)
    module._stop(ctl, worker)
    assert not worker.is_alive()
