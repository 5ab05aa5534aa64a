"""Verification of a committed step against its manifest.

:func:`verify_step` re-reads every file the manifest lists and reports each problem (missing file,
size mismatch, checksum mismatch) rather than stopping at the first, so one run tells the whole
story. :func:`verify_file` checks a single file, which is what a reader's load does.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

from commitpoint.core.checksum import Checksum, available_algorithms, checksum_stream
from commitpoint.core.layout import Kind, step_dir
from commitpoint.core.manifest import Manifest, read_manifest_for
from commitpoint.errors import CorruptCheckpoint, NotFound, UnreadableFile
from commitpoint.storage.protocol import FileRecord, StorageBackend


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a committed file."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of verifying one step: every problem found, empty when the step is sound."""

    step: int
    kind: Kind
    files: int
    bytes: int
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self, url: str) -> None:
        if self.problems:
            raise CorruptCheckpoint(
                url,
                f"step {self.step} failed verification: " + "; ".join(map(str, self.problems)),
                [str(p) for p in self.problems],
            )


def check_record(storage: StorageBackend, record: FileRecord) -> Problem | None:
    """Compare one file on storage with its manifest record."""
    if not storage.exists(record.path):
        return Problem(record.path, "missing")
    if record.checksum is None or record.algorithm is None:
        with storage.open_read(record.path) as stream:
            size = stream.seek(0, io.SEEK_END)
        return (
            None
            if size == record.size
            else Problem(record.path, f"size {size} != manifest size {record.size}")
        )
    if record.algorithm not in available_algorithms():
        return Problem(record.path, f"checksum algorithm {record.algorithm!r} is not available")
    try:
        with storage.open_read(record.path) as stream:
            size, checksum = checksum_stream(stream, record.algorithm)
    except UnreadableFile as exc:
        return Problem(record.path, exc.reason)
    return _compare(record, size, checksum)


def check_bytes(record: FileRecord, data: bytes) -> Problem | None:
    """Compare bytes already read (one read for a check and a load) with their record."""
    if record.checksum is None or record.algorithm is None:
        return _compare(record, len(data), None)
    if record.algorithm not in available_algorithms():
        return Problem(record.path, f"checksum algorithm {record.algorithm!r} is not available")
    checksum = Checksum(record.algorithm)
    checksum.update(data)
    return _compare(record, len(data), checksum.hexdigest())


def _compare(record: FileRecord, size: int, checksum: str | None) -> Problem | None:
    if size != record.size:
        return Problem(record.path, f"size {size} != manifest size {record.size}")
    if checksum is not None and checksum != record.checksum:
        return Problem(record.path, f"{record.algorithm} {checksum} != manifest {record.checksum}")
    return None


def load_manifest(storage: StorageBackend, step: int, kind: Kind) -> Manifest:
    """The manifest covering ``step`` for ``kind``.

    A step that does not exist at all (no folder, and no pointer names it) raises
    :class:`NotFound`, saying what is committed; a step with files but no manifest of ``kind``
    raises :class:`CorruptCheckpoint`.
    """
    manifest = read_manifest_for(storage, step, kind)
    if manifest is not None:
        return manifest
    where = storage.url_for(step_dir(step))
    if not storage.list_files(step_dir(step)):
        named = {k: storage.read_pointer(k.pointer).value for k in Kind}
        if step not in named.values():
            committed = ", ".join(
                f"{k.value} {'-' if v is None else v}" for k, v in named.items()
            )
            raise NotFound(
                f"step {step} does not exist under {storage.url} (latest committed: {committed})"
            )
        raise CorruptCheckpoint(
            where, f"step {step} has no {kind.value} manifest: a pointer names it, but its folder "
            "is empty or gone"
        )
    raise CorruptCheckpoint(where, f"step {step} has no {kind.value} manifest")


def verify_step(
    storage: StorageBackend,
    step: int,
    kind: Kind = Kind.STATE_DICT,
    *,
    progress: Callable[[FileRecord], None] | None = None,
) -> VerifyReport:
    """Check every file of ``step``'s manifest; a missing manifest raises CorruptCheckpoint.

    ``progress`` is called with each record once it has been checked (the CLI's progress bar).
    """
    manifest = load_manifest(storage, step, kind)
    problems = []
    for record in manifest.files:
        problem = check_record(storage, record)
        if problem is not None:
            problems.append(problem)
        if progress is not None:
            progress(record)
    return VerifyReport(step, kind, len(manifest.files), manifest.total_bytes, tuple(problems))


def record_of(storage: StorageBackend, step: int, relpath: str, kind: Kind) -> FileRecord:
    """``relpath``'s record in ``step``'s manifest (:class:`CorruptCheckpoint` if unlisted)."""
    manifest = load_manifest(storage, step, kind)
    record = next((r for r in manifest.files if r.path == relpath), None)
    if record is None:
        raise CorruptCheckpoint(storage.url_for(relpath), f"not listed in step {step}'s manifest")
    return record


def verify_file(storage: StorageBackend, step: int, relpath: str, kind: Kind) -> None:
    """Raise :class:`CorruptCheckpoint` unless ``relpath`` matches ``step``'s manifest."""
    record = record_of(storage, step, relpath, kind)
    problem = check_record(storage, record)
    if problem is not None:
        raise CorruptCheckpoint(storage.url_for(relpath), problem.reason)
