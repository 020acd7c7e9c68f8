"""The command line's thread policy: the idle cores, or SAELAB_THREADS."""

from __future__ import annotations

import os

import pytest
import torch

from saelab import threads


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_env_sets_the_thread_count(monkeypatch):
    monkeypatch.setenv(threads.ENV, "1")
    assert threads.set_threads() == 1 and torch.get_num_threads() == 1


def test_bad_env_is_refused(monkeypatch):
    monkeypatch.setenv(threads.ENV, "two")
    with pytest.raises(ValueError, match="SAELAB_THREADS"):
        threads.set_threads()


def test_busy_cores_are_left_out(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    for busy, idle in ((0.0, cores), (cores + 5.0, 1), (cores - 1.0, 1), (0.4, cores)):
        monkeypatch.setattr(threads, "busy_cores", lambda n, b=busy: b)
        assert threads.idle_cores() == idle


def test_busy_cores_from_proc_stat(monkeypatch):
    samples = iter([(100, 1000), (100 + 150, 1000 + 200)])  # 75% of all jiffies busy
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    assert threads.busy_cores(2) == 1.5


def test_busy_cores_falls_back_to_the_load_average(monkeypatch):
    monkeypatch.setattr(threads, "_cpu_times", lambda: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.7, 0.0, 0.0))
    assert threads.busy_cores(2) == 0.7
