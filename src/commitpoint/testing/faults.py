"""Storage fault injection: a backend wrapper that fails, delays, truncates or corrupts operations.

Open any root with ``storage_options={"faults": {...}}`` (or wrap a backend with
:class:`FaultyStorage`) and a chosen fraction of operations misbehave the way real stores do:

- ``fail``: the operation raises :class:`~commitpoint.errors.StorageError` before doing anything;
- ``fail_after``: a pointer write lands, then the caller sees an error (an ambiguous timeout);
- ``delay``: the operation sleeps ``delay_seconds`` first (a slow or throttled store);
- ``truncate``: a streaming write stops part-way and its close raises (a torn upload);
- ``lose_tail``: a write is acknowledged but the store keeps only part of it (a lying store);
- ``corrupt_read``: a read returns the bytes with one flipped (bit rot on the wire or disk).

The plan travels with the storage options, so the monitor, every coordinator and every Ray worker
that opens the same root injects faults the same way. ``python -m commitpoint.testing.faults`` runs
a long training loop under faults and counts what happened.
"""

from __future__ import annotations

import io
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, BinaryIO

from commitpoint.core.layout import safe_relpath
from commitpoint.errors import InvalidArgument, StorageError
from commitpoint.storage.protocol import (
    FileInfo,
    FileRecord,
    PointerState,
    StorageBackend,
    TrackedWriter,
)
from commitpoint.storage.wrapper import StorageWrapper

if TYPE_CHECKING:
    from types import TracebackType

OPERATIONS = frozenset(
    {"write", "read", "exists", "list", "delete", "read_pointer", "write_pointer"}
)
"""Operation names a plan may target."""


@dataclass(frozen=True)
class FaultPlan:
    """What fraction of operations misbehave, and how. Every rate is in [0, 1]."""

    fail: float = 0.0
    fail_after: float = 0.0
    delay: float = 0.0
    delay_seconds: float = 0.02
    truncate: float = 0.0
    lose_tail: float = 0.0
    corrupt_read: float = 0.0
    operations: frozenset[str] = OPERATIONS
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("fail", "fail_after", "delay", "truncate", "lose_tail", "corrupt_read"):
            rate = getattr(self, name)
            if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
                raise InvalidArgument(f"fault rate {name} must be a number in [0, 1], got {rate!r}")
        unknown = set(self.operations) - OPERATIONS
        if unknown:
            raise InvalidArgument(
                f"unknown operations {sorted(unknown)}; known: {sorted(OPERATIONS)}"
            )
        object.__setattr__(self, "operations", frozenset(self.operations))

    @classmethod
    def of(cls, value: FaultPlan | dict[str, Any]) -> FaultPlan:
        """A plan from itself or from a plain dict (as storage options carry it)."""
        if isinstance(value, FaultPlan):
            return value
        if not isinstance(value, dict):
            raise InvalidArgument(f"faults must be a FaultPlan or a dict, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise InvalidArgument(
                f"unknown fault options {sorted(unknown)}; known: {sorted(known)}"
            )
        options = dict(value)
        if "operations" in options:
            options["operations"] = frozenset(options["operations"])
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["operations"] = sorted(self.operations)
        return body


class InjectedFault(Exception):
    """The cause carried by every :class:`StorageError` this module raises on purpose."""


class FaultyStorage(StorageWrapper):
    """A :class:`~commitpoint.storage.wrapper.StorageWrapper` that injects faults into another
    backend; every operation it does not perturb is delegated unchanged.

    ``injected`` counts what was injected, by ``"<fault>:<operation>"``.
    """

    option = "faults"

    def __init__(self, inner: StorageBackend, plan: FaultPlan | dict[str, Any]) -> None:
        super().__init__(inner)
        self.plan = FaultPlan.of(plan)
        self._random = random.Random(self.plan.seed)
        self._lock = threading.Lock()
        self.injected: Counter[str] = Counter()

    def wrapper_option(self) -> object:
        return self.plan.to_dict()

    # -- the dice ---------------------------------------------------------------------------
    def _roll(self, fault: str, operation: str) -> bool:
        rate: float = getattr(self.plan, fault)
        if rate <= 0 or operation not in self.plan.operations:
            return False
        with self._lock:
            hit = self._random.random() < rate
            if hit:
                self.injected[f"{fault}:{operation}"] += 1
        return hit

    def _before(self, operation: str, relpath: str) -> None:
        if self._roll("delay", operation):
            time.sleep(self.plan.delay_seconds)
        if self._roll("fail", operation):
            raise StorageError(
                operation, self._where(relpath), InjectedFault(f"injected failure of {operation}")
            )

    def _where(self, relpath: str) -> str:
        return self.url_for(relpath) if relpath else self.url

    # -- the perturbed operations -----------------------------------------------------------
    def open_write(self, relpath: str, *, track: bool = True) -> TrackedWriter:
        relpath = safe_relpath(relpath)
        self._before("write", relpath)
        writer = self._inner.open_write(relpath, track=track)
        return _FaultyWriter(
            self,
            writer,
            truncate=self._roll("truncate", "write"),
            lose_tail=self._roll("lose_tail", "write"),
        )

    def open_read(self, relpath: str) -> BinaryIO:
        self._before("read", relpath)
        stream = self._inner.open_read(relpath)
        if not self._roll("corrupt_read", "read"):
            return stream
        with stream:
            data = bytearray(stream.read())
        _flip_one_byte(data, self._random)
        return io.BytesIO(bytes(data))

    def read_bytes(self, relpath: str) -> bytes:
        self._before("read", relpath)
        data = self._inner.read_bytes(relpath)
        if self._roll("corrupt_read", "read"):
            flipped = bytearray(data)
            _flip_one_byte(flipped, self._random)
            return bytes(flipped)
        return data

    def read_small(self, relpath: str, limit: int) -> bytes:
        self._before("read", relpath)
        data = self._inner.read_small(relpath, limit)
        if self._roll("corrupt_read", "read"):
            flipped = bytearray(data)
            _flip_one_byte(flipped, self._random)
            return bytes(flipped)
        return data

    def exists(self, relpath: str) -> bool:
        self._before("exists", relpath)
        return self._inner.exists(relpath)

    def list_files(self, prefix: str = "") -> list[FileInfo]:
        self._before("list", prefix)
        return self._inner.list_files(prefix)

    def list_dirs(self, prefix: str = "") -> list[str]:
        self._before("list", prefix)
        return self._inner.list_dirs(prefix)

    def delete(self, relpath: str, *, recursive: bool = False) -> None:
        self._before("delete", relpath)
        self._inner.delete(relpath, recursive=recursive)

    def read_pointer(self, name: str) -> PointerState:
        self._before("read_pointer", name)
        return self._inner.read_pointer(name)

    def write_pointer_if(self, name: str, value: int, token: str | None) -> str:
        self._before("write_pointer", name)
        new_token = self._inner.write_pointer_if(name, value, token)
        if self._roll("fail_after", "write_pointer"):
            raise StorageError(
                "commit pointer",
                self._where(name),
                InjectedFault("injected timeout after the pointer write landed"),
            )
        return new_token


class _FaultyWriter:
    """A tracked writer that may stop part-way (loudly) or lose its tail after a clean close."""

    def __init__(
        self, storage: FaultyStorage, inner: TrackedWriter, *, truncate: bool, lose_tail: bool
    ) -> None:
        self.path = inner.path
        self._storage = storage
        self._inner = inner
        self._truncate = truncate
        self._lose_tail = lose_tail
        self._written = 0
        self.failure: Exception | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._truncate and self._written > 0:
            self._inner.abort()
            self.failure = self._reset()
            raise self.failure
        try:
            written = self._inner.write(data)
        except Exception as exc:
            self.failure = exc
            raise
        self._written += written
        return written

    def _reset(self) -> StorageError:
        return StorageError(
            "write",
            self._storage.url_for(self.path),
            InjectedFault(f"injected connection reset after {self._written} bytes"),
        )

    def flush(self) -> None:
        self._inner.flush()

    def tell(self) -> int:
        return self._written

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._inner.closed

    @property
    def record(self) -> FileRecord | None:
        return self._inner.record

    def close(self) -> None:
        if self._inner.closed:
            return
        if self._truncate:
            self._inner.abort()
            raise self._reset()
        self._inner.close()
        if self._lose_tail and self._written > 0:
            # The store acknowledged the write but keeps only part of it, behind the writer's
            # back: the writer's record still claims every byte.
            inner = self._storage.inner
            kept = inner.read_bytes(self.path)[: self._written // 2]
            inner.write_bytes(self.path, kept, track=False)

    def abort(self) -> None:
        self._inner.abort()

    def __enter__(self) -> _FaultyWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _flip_one_byte(data: bytearray, rng: random.Random) -> None:
    if data:
        data[rng.randrange(len(data))] ^= 0xFF


def wrap_with_faults(storage: StorageBackend, plan: FaultPlan | dict[str, Any]) -> FaultyStorage:
    """``storage`` with ``plan``'s faults injected (what ``storage_options["faults"]`` does)."""
    return FaultyStorage(storage, plan)


__all__ = ["FaultPlan", "FaultyStorage", "InjectedFault", "wrap_with_faults"]
