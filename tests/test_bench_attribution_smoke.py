"""benchmarks/bench_attribution.py run for one call per figure, so that it cannot rot unnoticed
(no time is asserted: only that every figure is measured and printed)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attribution.py"


def test_every_method_is_measured_for_both_presets(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_attribution_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    lines: list[str] = []
    rows = module.run(threads=1, repeats=1, print_fn=lines.append)
    assert lines[0].startswith("CPU: ") and "1 thread(s)" in lines[0]
    assert [(r["model"].split()[0], r["method"]) for r in rows] == [
        (arch, method)
        for arch in ("fashion", "lenet5")
        for method in ("gradcam", "saliency", "gradient-x-input", "occlusion")
    ]
    for r in rows:
        assert math.isfinite(r["median_ms"]) and 0 < r["fastest_ms"] <= r["median_ms"]
    assert sum("target < 20 ms" in line for line in lines) == 2
    assert sum("target < 200 ms" in line for line in lines) == 2
