"""A bounded burst on the explorer over loopback: 500 predict requests, 32 at a time, against a
real ``cnn serve`` process. Every answer must be a 200 with the right probabilities for its
image (the model is shared by the server's threads), none may hang (a generous timeout only
catches that), and the server's memory must stay flat from one burst to the next.

Run with ``-s`` to see requests/s, p95 latency and memory (also in the test's properties).
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the explorer needs the 'serve' extra (fastapi)")
httpx = pytest.importorskip("httpx", reason="the load test needs httpx")

from classic_cnn import io as model_io  # noqa: E402
from classic_cnn import presets  # noqa: E402
from classic_cnn.data.batches import Preprocessing  # noqa: E402
from classic_cnn.data.dataset import Dataset  # noqa: E402

from .conftest import serving  # noqa: E402

N_REQUESTS = 500
CONCURRENCY = 32
TIMEOUT_S = 60  # only a hang takes this long: one request normally takes milliseconds


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path("/proc/self/status").exists():
        pytest.skip("the load test reads the server's memory from /proc (Linux)")
    folder = tmp_path_factory.mktemp("load")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    data = Dataset(images, np.arange(40) % 10, [f"class {i}" for i in range(10)])
    model = presets.build("lenet5", classes=10, seed=0)
    model.preprocessing = Preprocessing.from_dataset(data, model.input_shape)
    model.classes = data.classes
    path = model_io.save(model, folder / "lenet5.safetensors")
    with serving(["serve", path]) as (url, proc):
        yield url, proc, model


async def burst(url: str, bodies: list[dict], concurrency: int) -> tuple[list, list[float], float]:
    """POST every body to /api/predict, ``concurrency`` at a time; (responses or exceptions,
    latencies in seconds, wall time)."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S, limits=limits) as client:

        async def one(body):
            async with gate:
                start = time.perf_counter()
                try:
                    r = await client.post("api/predict", json=body)
                except httpx.HTTPError as exc:  # a timeout (a hang) or a dropped connection
                    return exc, time.perf_counter() - start
                return r, time.perf_counter() - start

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - t0
    return [r for r, _ in results], [dt for _, dt in results], wall


def test_a_burst_of_predictions(server, record_property):
    url, proc, model = server
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(8)]
    expected = [model.predict_proba(im[None, ..., None])[0] for im in images]
    bodies = [{"pixels": images[i % 8].tolist(), "invert": "no"} for i in range(N_REQUESTS)]

    asyncio.run(burst(url, bodies[:100], CONCURRENCY))  # warm up: threads, caches, allocator
    before = rss_bytes(proc.pid)
    responses, latencies, wall = asyncio.run(burst(url, bodies, CONCURRENCY))
    after = rss_bytes(proc.pid)
    again, _, _ = asyncio.run(burst(url, bodies, CONCURRENCY))
    after_again = rss_bytes(proc.pid)

    errors = [r for r in responses + again if not isinstance(r, httpx.Response)]
    assert not errors, f"{len(errors)} requests failed or hung, e.g. {errors[0]!r}"
    statuses = sorted({r.status_code for r in responses + again})
    assert statuses == [200], statuses
    for i, r in enumerate(responses):
        probs = np.array(r.json()["probabilities"], np.float32)
        assert np.array_equal(probs, expected[i % 8]), f"request {i}: wrong answer under load"

    rps = N_REQUESTS / wall
    p50, p95 = np.percentile(latencies, [50, 95])
    mb = 1024 * 1024
    report = (
        f"{N_REQUESTS} predict requests, {CONCURRENCY} at a time: {rps:.0f} requests/s, "
        f"p50 {1000 * p50:.1f} ms, p95 {1000 * p95:.1f} ms, max {1000 * max(latencies):.1f} ms; "
        f"server memory {before / mb:.1f} MB before, {after / mb:.1f} MB after, "
        f"{after_again / mb:.1f} MB after another {N_REQUESTS}"
    )
    print("\n" + report)
    for key, value in [("requests_per_s", rps), ("p95_ms", 1000 * p95), ("rss_before", before),
                       ("rss_after", after), ("rss_after_again", after_again)]:  # fmt: skip
        record_property(key, value)
    assert max(latencies) < TIMEOUT_S
    # memory flat: the burst may settle the allocator a little, but not grow per request
    assert after - before < 25 * mb, report
    assert after_again - after < 8 * mb, report
    assert proc.poll() is None  # the server is still up
