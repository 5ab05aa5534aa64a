"""Every storage call is bounded: against a "black hole" endpoint (a server on 127.0.0.1 that
accepts connections and never answers), a pointer read fails with a typed StorageError after a
known number of attempts, within the documented deadline; backend options are validated."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from commitpoint import InvalidArgument, StorageError, open_storage
from commitpoint.storage.options import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DEADLINE,
    DEFAULT_READ_TIMEOUT,
)

S3_CREDENTIALS = {"key": "testing-key", "secret": "testing-secret"}


class BlackHole:
    """A TCP server on 127.0.0.1 that accepts every connection, reads what it is sent, and never
    answers. ``accepted`` counts connections (one per HTTP attempt that reaches it)."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="black-hole", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setblocking(False)
            self.accepted += 1
            self._held.append(conn)
            for held in self._held:  # drain requests so senders never block on a full buffer
                try:
                    while held.recv(1 << 16):
                        pass
                except OSError:
                    pass

    def settled(self, at_least: int, timeout: float = 10.0) -> int:
        """The connection count once the accept thread caught up with ``at_least`` (or gave
        up after ``timeout``), after a short pause in which no late attempt may arrive."""
        deadline = time.monotonic() + timeout
        while self.accepted < at_least and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        return self.accepted

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._held:
            conn.close()
        self._server.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    try:
        yield hole
    finally:
        hole.close()


def _s3(endpoint: str, **options: Any) -> Any:
    pytest.importorskip("commitpoint_s3")
    return open_storage("s3://bucket/run", endpoint_url=endpoint, **S3_CREDENTIALS, **options)


def _gcs(endpoint: str, **options: Any) -> Any:
    pytest.importorskip("commitpoint_gcs")
    return open_storage(
        "gs://bucket/run", endpoint_url=endpoint, token="anon", project="test", **options
    )


def test_s3_pointer_read_makes_exactly_retries_attempts(black_hole: BlackHole) -> None:
    """botocore's own retries are off: one logical call is ``retries`` HTTP attempts, not 25."""
    storage = _s3(black_hole.endpoint, retries=3, read_timeout=0.3, connect_timeout=0.3)
    with pytest.raises(StorageError) as info:
        storage.read_pointer("latest_state_dict_iteration.txt")
    assert black_hole.settled(3) == 3
    assert info.value.operation == "read pointer"
    assert "s3://bucket/run/latest_state_dict_iteration.txt" in str(info.value)


def test_s3_deadline_cuts_a_call_that_never_answers(black_hole: BlackHole) -> None:
    """read_timeout alone would wait 60 s per attempt, 5 times; the deadline ends it first."""
    storage = _s3(black_hole.endpoint, read_timeout=60, deadline=1.0)
    started = time.monotonic()
    with pytest.raises(StorageError, match="deadline"):
        storage.read_pointer("latest_checkpointed_iteration.txt")
    bound = 1.0 + 5.0  # the deadline, plus slack for a loaded machine; far below one read_timeout
    assert time.monotonic() - started < bound
    assert black_hole.settled(1) == 1


def test_s3_listing_and_reads_through_s3fs_are_bounded_too(black_hole: BlackHole) -> None:
    storage = _s3(black_hole.endpoint, read_timeout=60, deadline=1.0)
    started = time.monotonic()
    with pytest.raises(StorageError):
        storage.list_dirs("")
    with pytest.raises(StorageError):
        storage.read_bytes("global_step_1/model.pt")
    assert time.monotonic() - started < 2 * 1.0 + 8.0


def test_gcs_pointer_read_is_bounded_by_the_deadline(black_hole: BlackHole) -> None:
    """gcsfs retries six times with up to 31 s of backoff; the deadline bounds the whole call."""
    storage = _gcs(black_hole.endpoint, read_timeout=0.3, deadline=1.5)
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.read_pointer("latest_state_dict_iteration.txt")
    assert time.monotonic() - started < 1.5 + 5.0
    assert black_hole.settled(1) >= 1
    assert "gs://bucket/run/latest_state_dict_iteration.txt" in str(info.value)


def test_botocore_makes_one_attempt_per_call_and_timeouts_reach_it() -> None:
    storage = _s3("http://127.0.0.1:9", connect_timeout=2, read_timeout=7.5)
    config = storage.fs.config_kwargs
    assert config["retries"] == {"total_max_attempts": 1}
    assert (config["connect_timeout"], config["read_timeout"]) == (2.0, 7.5)
    defaults = _s3("http://127.0.0.1:9").fs.config_kwargs
    assert (defaults["connect_timeout"], defaults["read_timeout"]) == (
        DEFAULT_CONNECT_TIMEOUT,
        DEFAULT_READ_TIMEOUT,
    )
    assert DEFAULT_DEADLINE == 120.0


def test_gcs_timeouts_reach_its_requests() -> None:
    storage = _gcs("http://127.0.0.1:9", connect_timeout=3, read_timeout=4)
    timeout = storage.fs.requests_timeout
    assert (timeout.sock_connect, timeout.sock_read) == (3.0, 4.0)


@pytest.mark.parametrize("opener", [_s3, _gcs], ids=["s3", "gcs"])
@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("read_timout", 5, "unknown"),
        ("connect_timeout", "soon", "connect_timeout"),
        ("read_timeout", 0, "read_timeout"),
        ("deadline", -1, "deadline"),
        ("deadline", float("inf"), "deadline"),
        ("deadline", True, "deadline"),
        ("read_timeout", [5], "read_timeout"),
    ],
)
def test_bad_backend_options_raise_invalid_argument(
    opener: Any, option: str, value: object, match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match):
        opener("http://127.0.0.1:9", **{option: value})


@pytest.mark.parametrize(
    ("option", "value"),
    [("retries", 1.5), ("retries", 0), ("part_size", "big"), ("config_kwargs", "fast")],
)
def test_bad_s3_options_raise_invalid_argument(option: str, value: object) -> None:
    with pytest.raises(InvalidArgument, match=option):
        _s3("http://127.0.0.1:9", **{option: value})


def test_bad_gcs_chunk_size_raises_invalid_argument() -> None:
    for value in (0, 1000, "x", 2.5):
        with pytest.raises(InvalidArgument, match="chunk_size"):
            _gcs("http://127.0.0.1:9", chunk_size=value)
