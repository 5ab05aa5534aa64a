"""watch / awatch: every commit seen once, nothing uncommitted, corrupt steps skipped."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from commitpoint import (
    CheckpointCoordinator,
    CheckpointMonitor,
    InvalidArgument,
    Kind,
    StorageError,
)
from commitpoint.core.pointer import rewind_pointer
from commitpoint.read.watch import awatch, watch
from commitpoint.storage.protocol import PointerState, StorageBackend
from commitpoint.testing import CheckpointRoot, commit_step

FAST: dict[str, Any] = {"interval": 0.01, "max_interval": 0.05}


@pytest.fixture
def root(any_checkpoint_root: CheckpointRoot) -> CheckpointRoot:
    return any_checkpoint_root


@pytest.fixture
def coordinator(root: CheckpointRoot) -> Iterator[CheckpointCoordinator]:
    monitor = CheckpointMonitor(root.url, root.storage_options)
    yield CheckpointCoordinator(monitor)
    monitor.close()


def commit(coordinator: CheckpointCoordinator, step: int) -> None:
    commit_step(coordinator, step)


def _committing_thread(
    coordinator: CheckpointCoordinator, steps: range, go: threading.Event
) -> threading.Thread:
    def run() -> None:
        go.wait()
        for step in steps:
            commit(coordinator, step)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_every_commit_is_seen_exactly_once_and_nothing_uncommitted(
    root: CheckpointRoot, coordinator: CheckpointCoordinator
) -> None:
    reader = root.reader()
    go = threading.Event()
    committer = _committing_thread(coordinator, range(1, 21), go)
    seen: list[int] = []
    uncommitted: list[int] = []
    try:
        stream = reader.watch(every_step=True, timeout=60, **FAST)
        go.set()
        for step in stream:
            latest = reader.latest_state_dict_step()
            if latest is None or latest < step or not reader.verify(step).ok:
                uncommitted.append(step)
            seen.append(step)
            if step == 20:
                break
    finally:
        go.set()
        committer.join()
    assert uncommitted == []
    assert seen == list(range(1, 21))


def test_newest_only_mode_yields_increasing_committed_steps(
    root: CheckpointRoot, coordinator: CheckpointCoordinator
) -> None:
    commit(coordinator, 1)
    go = threading.Event()
    committer = _committing_thread(coordinator, range(2, 16), go)
    seen: list[int] = []
    try:
        for step in watch(root.open(), timeout=60, **FAST):
            seen.append(step)
            go.set()  # commits start once the current step was handed out
            if step == 15:
                break
    finally:
        go.set()
        committer.join()
    assert seen[0] == 1 and seen[-1] == 15
    assert seen == sorted(set(seen))  # each once, in order
    assert set(seen) <= set(range(1, 16))


def test_starting_points(root: CheckpointRoot, coordinator: CheckpointCoordinator) -> None:
    for step in (1, 2, 3):
        commit(coordinator, step)
    storage = root.open()
    assert list(watch(storage, timeout=0.1, **FAST)) == [3]
    assert list(watch(storage, include_current=False, timeout=0.1, **FAST)) == []
    assert list(watch(storage, after=1, every_step=True, timeout=0.1, **FAST)) == [2, 3]
    assert list(watch(storage, after=1, timeout=0.1, **FAST)) == [3]
    assert list(watch(storage, after=3, timeout=0.1, **FAST)) == []


def test_waits_for_a_first_commit(root: CheckpointRoot, coordinator: CheckpointCoordinator) -> None:
    storage = root.open()
    assert list(watch(storage, timeout=0.1, **FAST)) == []
    stream = watch(storage, include_current=False, timeout=30, **FAST)
    assert list(watch(storage, include_current=False, timeout=0.05, **FAST)) == []
    commit(coordinator, 4)
    assert next(stream) == 4


def test_a_step_that_fails_verification_is_skipped(
    root: CheckpointRoot, coordinator: CheckpointCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    commit(coordinator, 1)
    commit(coordinator, 2)
    storage = root.open()
    storage.write_bytes("global_step_2/model.pt", b"damaged", track=False)
    with caplog.at_level(logging.WARNING, logger="commitpoint.read.watch"):
        assert list(watch(storage, after=1, timeout=0.1, **FAST)) == []
    assert "step 2" in caplog.text and "failed verification" in caplog.text
    assert caplog.text.count("failed verification") == 1  # warned once, not at every poll

    stream = watch(storage, after=1, every_step=True, timeout=30, **FAST)
    commit(coordinator, 3)
    assert next(stream) == 3


class _Flaky:
    """The real backend, but the first ``failures`` pointer reads raise a storage error."""

    def __init__(self, inner: StorageBackend, failures: int) -> None:
        self._inner = inner
        self.failures = failures
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def read_pointer(self, name: str) -> PointerState:
        self.calls += 1
        if self.calls <= self.failures:
            raise StorageError("read pointer", self._inner.url_for(name), "connection reset")
        return self._inner.read_pointer(name)


def test_transient_errors_are_logged_and_retried(
    root: CheckpointRoot, coordinator: CheckpointCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    commit(coordinator, 7)
    flaky: Any = _Flaky(root.open(), failures=3)
    with caplog.at_level(logging.WARNING, logger="commitpoint.read.watch"):
        stream = watch(flaky, interval=0.001, max_interval=0.004, timeout=30)
        assert next(stream) == 7
    assert flaky.calls == 4
    assert caplog.text.count("connection reset") == 3


def test_a_rewind_is_followed(root: CheckpointRoot, coordinator: CheckpointCoordinator) -> None:
    for step in (1, 2, 3):
        commit(coordinator, step)
    storage = root.open()
    stream = watch(storage, timeout=30, **FAST)
    assert next(stream) == 3
    rewind_pointer(storage, Kind.STATE_DICT.pointer, 1, expected=3)
    assert list(watch(storage, after=3, timeout=0.1, **FAST)) == []  # "above 3": nothing
    follower = watch(storage, include_current=False, timeout=30, **FAST)
    fresh = CheckpointCoordinator(CheckpointMonitor(root.url, root.storage_options))
    commit(fresh, 2)  # the retrained step 2 is a new commit
    assert next(stream) == 2  # seen 3, now 2: a rewind, followed
    assert next(follower) == 2  # started at 1: a plain new commit
    rewind_pointer(storage, Kind.STATE_DICT.pointer, 1, expected=2)
    assert next(stream) == 1  # the rewound-to weights are yielded


def test_stop_event_ends_the_watch(root: CheckpointRoot) -> None:
    stop = threading.Event()
    stop.set()
    assert list(watch(root.open(), stop=stop, **FAST)) == []


def test_bad_options_are_refused(root: CheckpointRoot) -> None:
    with pytest.raises(InvalidArgument):
        next(watch(root.open(), interval=0))
    with pytest.raises(InvalidArgument):
        next(watch(root.open(), interval=1, max_interval=0.5))


def test_awatch_sees_every_commit_once(
    root: CheckpointRoot, coordinator: CheckpointCoordinator
) -> None:
    go = threading.Event()
    committer = _committing_thread(coordinator, range(1, 11), go)

    async def collect() -> list[int]:
        stop = asyncio.Event()
        seen: list[int] = []
        stream = awatch(root.open(), every_step=True, stop=stop, timeout=60, **FAST)
        go.set()
        async for step in stream:
            seen.append(step)
            if step == 10:
                stop.set()
        return seen

    try:
        seen = asyncio.run(collect())
    finally:
        committer.join()
    assert seen == list(range(1, 11))


def test_reader_awatch_delegates(root: CheckpointRoot, coordinator: CheckpointCoordinator) -> None:
    commit(coordinator, 5)

    async def first() -> list[int]:
        return [s async for s in root.reader().awatch(timeout=0.1, **FAST)]

    assert asyncio.run(first()) == [5]
