"""Publish one locally committed step on the replica: upload, verify, manifest, pointer.

The order is the local commit's, so the replica keeps the same invariants:

1. every file the local manifest lists is streamed from the local tier into
   ``replica.open_write`` (no re-serialisation; files of a step in parallel, each file's own
   upload multipart/parallel as its backend does it), and the size and checksum the replica's
   writer recorded must equal the local manifest's record - a file that does not match is
   deleted again and the step fails;
2. the replica's step folder is listed: every file must be stored with its size;
3. the local manifest(s) are written to the replica unchanged (and read back);
4. the replica's pointer(s) move forward by compare-and-swap (a full checkpoint moves both).

A replica pointer therefore never names a step whose files are not all there and verified, and a
step that fails at any point before 4 is invisible (no manifest, or no pointer). Files already
on the replica under a manifest with the same record (the state dict of a step whose full
checkpoint follows, or a step a killed process had uploaded) are not uploaded again.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from commitpoint.core.checksum import CHUNK_SIZE, Checksum
from commitpoint.core.layout import Kind, is_temporary, step_dir
from commitpoint.core.manifest import Manifest, manifest_path, read_manifest, write_manifest
from commitpoint.core.pointer import Advance, advance_pointer
from commitpoint.errors import CommitpointError, CorruptCheckpoint, StepRegression
from commitpoint.storage.protocol import FileRecord, StorageBackend

logger = logging.getLogger(__name__)


class Outcome(str, enum.Enum):
    """How a step's publication ended."""

    PUBLISHED = "published"
    """Files verified, manifest written, pointer moved to the step."""
    SUPERSEDED = "superseded"
    """Files and manifest are there, but the replica pointer already names a later step."""
    ALREADY_THERE = "already there"
    """The replica already named this step with the same manifest (nothing uploaded)."""
    GONE = "gone locally"
    """The local tier no longer has the step (deleted by local retention): nothing to copy."""
    CONFLICT = "conflict"
    """The replica holds a different step of this number that a pointer covers: kept as is."""
    STOPPED = "stopped"
    """Abandoned between files because the replicator is closing; nothing was published."""


@dataclass(frozen=True)
class Published:
    """What :func:`publish_step` did for one step and kind."""

    step: int
    kind: Kind
    outcome: Outcome
    files: int = 0
    bytes_total: int = 0
    bytes_uploaded: int = 0
    seconds: float = 0.0
    committed_at: float | None = None
    """When the local tier wrote the step's manifest (the commit instant, for lag figures)."""


class Stopped(Exception):
    """Raised inside an upload when the replicator asked to stop (never leaves this package)."""


def local_manifests(local: StorageBackend, step: int, kind: Kind) -> list[Manifest]:
    """The local manifests publishing ``kind`` of ``step`` copies, in write order.

    A full checkpoint takes the state-dict manifest too when the step has one, so the replica
    mirrors the local step; a state dict without its own manifest is covered by the checkpoint's.
    """
    state_dict = read_manifest(local, step, Kind.STATE_DICT)
    checkpoint = read_manifest(local, step, Kind.CHECKPOINT)
    if kind is Kind.CHECKPOINT:
        return [m for m in (state_dict, checkpoint) if m is not None] if checkpoint else []
    chosen = state_dict or checkpoint
    return [chosen] if chosen is not None else []


def publish_step(
    local: StorageBackend,
    replica: StorageBackend,
    step: int,
    kind: Kind,
    *,
    pool: Executor,
    check_lease: Callable[[], None] = lambda: None,
    should_stop: Callable[[], bool] = lambda: False,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> Published:
    """Copy ``kind`` of ``step`` from ``local`` to ``replica`` and move the replica pointer(s).

    ``check_lease`` runs before the manifest write and inside each pointer compare-and-swap (the
    replicator's writer lease on the replica); ``should_stop`` is polled between chunks;
    ``on_bytes`` is told of every chunk uploaded (for lag figures).
    """
    began = time.perf_counter()
    manifests = local_manifests(local, step, kind)
    if not manifests:
        logger.warning(
            "step %d (%s) has no manifest on %s any more; not replicated",
            step,
            kind.value,
            local.url,
        )
        return Published(step, kind, Outcome.GONE)
    files = {r.path: r for m in manifests for r in m.files}
    total = sum(r.size for r in files.values())
    committed_at = max(m.created_at for m in manifests)
    pointers = [kind.pointer] + ([Kind.STATE_DICT.pointer] if kind is Kind.CHECKPOINT else [])

    # One listing tells what the replica already holds of the step; only when it holds a
    # manifest do its pointers matter (a finished or conflicting step).
    stored = {i.path: i.size for i in replica.list_files(step_dir(step))}
    existing = {m.kind: _stored_manifest(replica, stored, step, m.kind) for m in manifests}
    values: list[int | None] = [None] * len(pointers)
    if any(existing.values()):
        values = [replica.read_pointer(name).value for name in pointers]
    named = all(v is not None and v >= step for v in values)
    if named and all(_same_files(existing[m.kind], m) for m in manifests):
        return Published(
            step,
            kind,
            Outcome.ALREADY_THERE,
            len(files),
            total,
            0,
            time.perf_counter() - began,
            committed_at,
        )
    stale = [
        m.kind
        for m in manifests
        if existing[m.kind] is not None and not _same_files(existing[m.kind], m)
    ]
    if stale and any(v is not None and v >= step for v in values):
        # The replica holds another run's step of this number and a pointer covers it (the
        # local tier was rewound): committed data on the replica is never replaced.
        logger.warning(
            "step %d (%s) on the replica %s differs from the local one and a replica pointer "
            "names it or a later step; the replica copy is kept, the local one not replicated",
            step,
            kind.value,
            replica.url,
        )
        return Published(
            step,
            kind,
            Outcome.CONFLICT,
            len(files),
            total,
            0,
            time.perf_counter() - began,
            committed_at,
        )

    # Files a replica manifest of this step already vouches for need no second upload; a stale
    # replica manifest (never named) is removed first, so no reader can verify the step against
    # it while its files change.
    verified: set[str] = set()
    for manifest in manifests:
        there = existing[manifest.kind]
        if there is None:
            continue
        if manifest.kind in stale:
            logger.info("replacing a stale, unnamed manifest of step %d on %s", step, replica.url)
            replica.delete(manifest_path(step, manifest.kind))
            existing[manifest.kind] = None
        else:
            verified.update(r.path for r in there.files if stored.get(r.path) == r.size)
    for other in Kind:  # a manifest the local step no longer has (its state dict's) vouches too
        there = None if other in existing else _stored_manifest(replica, stored, step, other)
        for r in there.files if there is not None else ():
            mine = files.get(r.path)
            key = (r.size, r.checksum, r.algorithm)
            matches = mine is not None and (mine.size, mine.checksum, mine.algorithm) == key
            if matches and stored.get(r.path) == r.size:
                verified.add(r.path)
    todo = [r for path, r in sorted(files.items()) if path not in verified]
    uploaded = sum(r.size for r in todo)
    futures = [pool.submit(_copy_file, local, replica, r, should_stop, on_bytes) for r in todo]
    errors: list[BaseException] = []
    for future in futures:
        try:
            future.result()
        except BaseException as exc:  # keep waiting: no upload may outlive its step
            errors.append(exc)
    if errors:
        if any(isinstance(e, Stopped) for e in errors):
            return Published(step, kind, Outcome.STOPPED, len(files), total)
        raise errors[0]

    stored = {
        i.path: i.size for i in replica.list_files(step_dir(step)) if not is_temporary(i.path)
    }
    problems = [
        f"{r.path}: uploaded {r.size} bytes, replica holds "
        + ("nothing" if r.path not in stored else f"{stored[r.path]} bytes")
        for r in files.values()
        if stored.get(r.path) != r.size
    ]
    if problems:
        raise CorruptCheckpoint(
            replica.url_for(step_dir(step)),
            f"{len(problems)} uploaded file(s) are not stored whole; step not published",
            problems,
        )
    check_lease()
    for manifest in manifests:
        if existing[manifest.kind] is None:
            write_manifest(replica, manifest)
    moved = [_advance(replica, name, step, check_lease) for name in pointers]
    outcome = Outcome.PUBLISHED if moved[0] is not None else Outcome.SUPERSEDED
    return Published(
        step, kind, outcome, len(files), total, uploaded, time.perf_counter() - began, committed_at
    )


def _stored_manifest(
    replica: StorageBackend, stored: dict[str, int], step: int, kind: Kind
) -> Manifest | None:
    """The replica's manifest of ``step`` and ``kind`` if the listing ``stored`` shows one."""
    path = manifest_path(step, kind)
    if path not in stored:
        return None
    try:
        return Manifest.from_json(replica.read_bytes(path), replica.url_for(path))
    except CorruptCheckpoint as exc:  # a torn write of an earlier try: stale, never a match
        logger.warning("unreadable manifest on the replica: %s", exc)
        return Manifest(step, kind, ())


def _same_files(there: Manifest | None, here: Manifest) -> bool:
    return there is not None and set(there.files) == set(here.files)


def _advance(
    replica: StorageBackend, name: str, step: int, check_lease: Callable[[], None]
) -> Advance | None:
    """Move pointer ``name`` to ``step``; None when a later step is already named."""
    try:
        return advance_pointer(replica, name, step, check_lease)
    except StepRegression as exc:
        logger.info("replica %s: step %d superseded by step %d", name, step, exc.current)
        return None


def _copy_file(
    local: StorageBackend,
    replica: StorageBackend,
    record: FileRecord,
    should_stop: Callable[[], bool],
    on_bytes: Callable[[int], None],
) -> None:
    """Stream one file to the replica; its bytes must match ``record`` or it is not kept."""
    # The replica's writer checksums what it sends; only when it uses another algorithm than
    # the local manifest does this side compute the manifest's one as well.
    checksum = None
    if record.algorithm is not None and record.algorithm != getattr(
        replica, "checksum_algorithm", None
    ):
        checksum = Checksum(record.algorithm)
    writer = replica.open_write(record.path, track=False)
    size = 0
    try:
        with local.open_read(record.path) as source:
            while chunk := source.read(CHUNK_SIZE):
                if should_stop():
                    raise Stopped
                writer.write(chunk)
                if checksum is not None:
                    checksum.update(chunk)
                size += len(chunk)
                on_bytes(len(chunk))
        if size != record.size:
            raise CorruptCheckpoint(
                local.url_for(record.path),
                f"local file has {size} bytes, its manifest {record.size}; not replicated",
            )
    except BaseException:
        writer.abort()
        raise
    writer.close()
    written = writer.record
    assert written is not None
    found = checksum.hexdigest() if checksum is not None else written.checksum
    if record.checksum is not None and found != record.checksum:
        try:
            replica.delete(record.path)
        except CommitpointError as exc:  # an unlisted file, invisible; the next try replaces it
            logger.warning("could not remove mismatched %s: %s", replica.url_for(record.path), exc)
        raise CorruptCheckpoint(
            local.url_for(record.path),
            f"bytes read have {record.algorithm} {found}, the local manifest {record.checksum}; "
            "not replicated",
        )
