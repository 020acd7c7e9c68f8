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
    monkeypatch.delenv(threads.ENV, raising=False)
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert threads.idle_cores() == cores
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 5.0, 0.0, 0.0))
    assert threads.idle_cores() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (cores - 1.0, 0.0, 0.0))
    assert threads.idle_cores() == 1
