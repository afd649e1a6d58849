"""Scale-out's bad input: one clear line, before any cluster starts (Ray not needed here)."""

from __future__ import annotations

import sys

import pytest

import classic_cnn as cc
from classic_cnn.distributed import WorkerGroup, cluster, predict_folder

from .test_train import bars, small_model


def test_without_ray_the_message_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    train, val = bars(60).stratified_split(20, seed=0)
    with pytest.raises(RuntimeError, match=r"needs Ray.*pip install 'classic-cnn\[ray\]'"):
        cc.fit(small_model(), train, val, epochs=1, workers=2)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"workers": 0}, "workers must be a positive int. Received: workers=0"),
        ({"workers": 2.0}, "workers must be a positive int. Received: workers=2.0"),
        ({"workers": 2, "threads": 0}, "threads must be a positive int. Received: threads=0"),
        ({"workers": 2, "step_timeout": 0}, "Received: step_timeout=0"),
        ({"workers": 2, "max_restarts": -1}, "Received: max_restarts=-1"),
    ],
)
def test_worker_group_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorkerGroup(**kwargs)


def test_a_cluster_address_nobody_listens_at_fails_at_once():
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'classic-cnn[ray]')")
    with pytest.raises(ValueError, match="expected a Ray address HOST:PORT"):
        with cluster("nonsense"):
            pass
    # loopback port 1: refused at once, instead of Ray's minutes of retries
    refused = r"could not connect to the Ray cluster at 127\.0\.0\.1:1: "
    with pytest.raises(RuntimeError, match=refused):
        with cluster("127.0.0.1:1"):
            pass


def test_batch_prediction_refuses_bad_input_before_starting_anything(tmp_path):
    model = small_model()
    bare = tmp_path / "bare.safetensors"
    cc.save(model, bare)
    train, _ = bars(60).stratified_split(20, seed=0)
    cc.fit(model, train, epochs=1, console=None, progress=False)
    good = tmp_path / "model.safetensors"
    cc.save(model, good)
    (tmp_path / "empty").mkdir()
    cases = [
        (good, tmp_path / "empty", "p.txt", "expected an output file ending in .csv or .parquet"),
        (good, tmp_path / "missing", "p.csv", "expected a folder of images"),
        (good, tmp_path / "empty", "p.csv", "expected image files"),
        (bare, tmp_path / "empty", "p.csv", "records no preprocessing"),
    ]
    for model_path, folder, out, message in cases:
        with pytest.raises(ValueError, match=message):
            predict_folder(model_path, folder, tmp_path / out)
        assert not (tmp_path / out).exists()
