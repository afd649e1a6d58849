"""The compiled loops' disk cache keeps one build per CPU target: a home folder shared by two
kinds of CPU (an AVX-512 Xeon and an AVX2-only EPYC, say) never loads a kernel built for the
other, it builds its own beside it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")

CALL = (
    "import numpy as np\n"
    "from classic_cnn import _kernels as k\n"
    "y = np.ones((4, 3), np.float32)\n"
    "k.bias_relu(y, np.zeros(3, np.float32), True)\n"
)


def _cache_events(folder, cpu: str) -> str:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(folder), "NUMBA_DEBUG_CACHE": "1"}
    env["NUMBA_CPU_NAME"] = cpu
    out = subprocess.run(
        [sys.executable, "-c", CALL], env=env, capture_output=True, text=True, check=True
    )
    lines = (out.stdout + out.stderr).splitlines()
    return " ".join(ln.split(" to ")[0].split(" from ")[0] for ln in lines if "[cache] data" in ln)


def test_a_kernel_built_for_one_cpu_is_not_loaded_for_another(tmp_path):
    assert _cache_events(tmp_path, "haswell") == "[cache] data saved"
    assert _cache_events(tmp_path, "haswell") == "[cache] data loaded"
    # another CPU target: built and saved beside the first, not loaded from it
    assert _cache_events(tmp_path, "x86-64") == "[cache] data saved"
    assert _cache_events(tmp_path, "haswell") == "[cache] data loaded"
    builds = [p for p in tmp_path.rglob("*bias_relu*.nbc")]
    assert len(builds) == 2, builds
