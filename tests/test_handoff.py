"""The second thread of two-way splits (ops._Handoff): each part runs once, on its thread,
after the worker fell asleep too; a failure in either part reaches the caller and the next
split still works; concurrent callers each get their split done."""

from __future__ import annotations

import threading
import time

import pytest

from classic_cnn import ops


def _record():
    seen, lock = [], threading.Lock()

    def work(t):
        with lock:
            seen.append((t, threading.current_thread().name))

    return seen, work


def test_a_two_way_split_runs_each_part_once_on_its_thread_awake_or_asleep(monkeypatch):
    monkeypatch.setattr(ops, "HANDOFF_SPINS", 1000)  # the worker falls asleep between splits
    seen, work = _record()
    for pause in (0, 0, 0.06, 0, 0.2):
        time.sleep(pause)
        seen.clear()
        ops._run(work, 2)
        assert sorted(t for t, _ in seen) == [0, 1]
        names = dict(seen)
        assert names[0] == threading.current_thread().name
        assert names[1] == "classic-cnn-handoff"


def test_a_failure_in_either_part_reaches_the_caller_and_the_next_split_works():
    done = []

    def worker_fails(t):
        done.append(t)
        if t == 1:
            raise ValueError("part 1 failed")

    with pytest.raises(ValueError, match="part 1 failed"):
        ops._run(worker_fails, 2)
    assert sorted(done) == [0, 1]
    done.clear()

    def caller_fails(t):
        if t == 0:
            raise KeyError("part 0 failed")
        time.sleep(0.01)
        done.append(t)  # the caller still waits for this part before raising

    with pytest.raises(KeyError):
        ops._run(caller_fails, 2)
    assert done == [1]
    seen, work = _record()
    ops._run(work, 2)
    assert sorted(t for t, _ in seen) == [0, 1]


def test_concurrent_callers_each_get_their_split_done():
    results, errors = {}, []

    def caller(k):
        try:
            for _ in range(200):
                parts = []
                ops._run(lambda t, parts=parts: parts.append(t), 2)
                assert sorted(parts) == [0, 1], parts
            results[k] = True
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and results == {0: True, 1: True, 2: True}


def test_the_worker_leaves_its_compiled_wait_when_asked_and_a_new_one_starts():
    """At exit the worker is stopped (it must not be running compiled code while the
    interpreter tears it down); a stopped worker's place is taken by a new one."""
    seen, work = _record()
    ops._run(work, 2)
    h = ops._HANDOFF[0]
    h.stop()
    assert not h.thread.is_alive()
    seen.clear()
    ops._run(work, 2)
    assert sorted(t for t, _ in seen) == [0, 1]
    assert ops._HANDOFF[0] is not h and ops._HANDOFF[0].thread.is_alive()
