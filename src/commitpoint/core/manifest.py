"""Manifests: the list of every file of a committed step, with size and checksum.

The monitor writes a manifest for a step and kind before it moves that kind's pointer (invariant
3). Files written through the backend carry the checksum computed while they streamed out
(``tracked``); files found only by listing the step folder (written by code outside the backend)
are listed too, marked untracked, with a checksum the monitor computed by reading them back.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from commitpoint.core.checksum import DEFAULT_ALGORITHM, checksum_stream
from commitpoint.core.layout import (
    MANIFEST_LIMIT,
    MAX_STEP,
    Kind,
    is_temporary,
    safe_relpath,
    step_dir,
    step_of_path,
)
from commitpoint.errors import CommitpointError, CorruptCheckpoint, StorageError, safe_repr
from commitpoint.storage.protocol import FileRecord, StorageBackend

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """What was committed for one step and kind."""

    step: int
    kind: Kind
    files: tuple[FileRecord, ...]
    created_at: float = field(default_factory=time.time)
    writer_epoch: int | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT_VERSION,
            "step": self.step,
            "kind": self.kind.value,
            "created_at": self.created_at,
            "writer_epoch": self.writer_epoch,
            "files": [asdict(f) for f in self.files],
        }
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, path: str, step: int | None = None) -> Manifest:
        """Parse a manifest, checking every field's type: anything else is
        :class:`CorruptCheckpoint` (never another error), whatever the bytes hold. With ``step``,
        the manifest must be that step's and list files of that step's folder only."""
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
            raise CorruptCheckpoint(path, f"manifest is unreadable: {_short(exc)}") from None
        try:
            return cls._from_body(body, step)
        except CorruptCheckpoint:
            raise
        except (CommitpointError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CorruptCheckpoint(path, f"manifest is unreadable: {_short(exc)}") from None

    @classmethod
    def _from_body(cls, body: object, step: int | None) -> Manifest:
        if not isinstance(body, dict):
            raise TypeError(f"manifest must be a JSON object, got {type(body).__name__}")
        if body.get("format") != FORMAT_VERSION:
            raise ValueError(f"unknown manifest format {safe_repr(body.get('format'))}")
        found = _field(body, "step", int)
        if not 0 <= found <= MAX_STEP or (step is not None and found != step):
            raise ValueError(f"manifest names step {safe_repr(found)}")
        files = _field(body, "files", list)
        records = tuple(_record(entry, found) for entry in files)
        created = body.get("created_at", 0.0)
        if isinstance(created, bool) or not isinstance(created, int | float):
            raise TypeError("created_at must be a number")
        epoch = body.get("writer_epoch")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
            raise TypeError("writer_epoch must be an int or null")
        return cls(
            step=found,
            kind=Kind(_field(body, "kind", str)),
            files=records,
            created_at=float(created),
            writer_epoch=epoch,
        )


def _short(exc: BaseException) -> str:
    return safe_repr(str(exc), 300)[1:-1] if isinstance(exc, Exception) else type(exc).__name__


def _field(body: dict[str, object], name: str, kind: type) -> Any:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _record(entry: object, step: int) -> FileRecord:
    """One listed file, checked: a path inside the step's folder, a size, an optional checksum."""
    if not isinstance(entry, dict):
        raise TypeError(f"a file entry must be an object, got {type(entry).__name__}")
    path = safe_relpath(_field(entry, "path", str))
    if step_of_path(path) != step:
        raise ValueError(f"file {safe_repr(path)} is outside the step's folder")
    size = _field(entry, "size", int)
    if size < 0:
        raise ValueError(f"file {safe_repr(path)} has a negative size")
    checksum, algorithm = entry.get("checksum"), entry.get("algorithm")
    if not all(v is None or isinstance(v, str) for v in (checksum, algorithm)):
        raise TypeError("checksum and algorithm must be strings or null")
    tracked = entry.get("tracked", True)
    if not isinstance(tracked, bool):
        raise TypeError("tracked must be a bool")
    unknown = set(entry) - {"path", "size", "checksum", "algorithm", "tracked"}
    if unknown:
        raise ValueError(f"unknown file fields {sorted(map(str, unknown))[:5]}")
    return FileRecord(path, size, checksum, algorithm, tracked)


def manifest_path(step: int, kind: Kind) -> str:
    return f"{step_dir(step)}/{kind.manifest}"


def is_manifest(relpath: str) -> bool:
    return relpath.rsplit("/", 1)[-1] in {k.manifest for k in Kind}


def read_manifest(storage: StorageBackend, step: int, kind: Kind) -> Manifest | None:
    """The manifest of ``step`` for ``kind``, or None if none was written."""
    path = manifest_path(step, kind)
    if not storage.exists(path):
        return None
    return Manifest.from_json(storage.read_small(path, MANIFEST_LIMIT), storage.url_for(path), step)


def read_manifest_for(storage: StorageBackend, step: int, kind: Kind) -> Manifest | None:
    """The manifest that covers ``kind`` at ``step``: a checkpoint's also covers its state dict."""
    found = read_manifest(storage, step, kind)
    if found is None and kind is Kind.STATE_DICT:
        found = read_manifest(storage, step, Kind.CHECKPOINT)
    return found


def build_manifest(
    storage: StorageBackend,
    step: int,
    kind: Kind,
    tracked: Iterable[FileRecord],
    *,
    include_listing: bool,
    writer_epoch: int | None = None,
) -> Manifest:
    """Assemble the manifest of ``step``: tracked records, plus listed files when asked.

    The step folder is always listed, and every tracked file must be there with the size its
    writer counted: a store that acknowledged a write it did not keep whole is caught here, before
    any pointer names the step. ``include_listing`` (adding files written outside the backend) is
    only safe once no save of the step is still writing; otherwise a half-written file of another
    save would be listed with a size it will not keep.
    """
    files = {r.path: r for r in tracked if step_of_path(r.path) == step and not is_manifest(r.path)}
    listed = [i for i in storage.list_files(step_dir(step)) if not is_temporary(i.path)]
    stored = {info.path: info.size for info in listed}
    problems = [
        f"{path}: written {record.size} bytes, store holds "
        + ("nothing" if path not in stored else f"{stored[path]} bytes")
        for path, record in sorted(files.items())
        if stored.get(path) != record.size
    ]
    if problems:
        raise CorruptCheckpoint(
            storage.url_for(step_dir(step)),
            f"{len(problems)} written file(s) are not stored whole; step not committed",
            problems,
        )
    if include_listing:
        for info in listed:
            if info.path in files or is_manifest(info.path):
                continue
            with storage.open_read(info.path) as stream:
                size, checksum = checksum_stream(stream, DEFAULT_ALGORITHM)
            if size != info.size:
                # Someone outside commitpoint is still writing it (Trinity's critic saves with
                # plain torch.save while the weights of the step commit): not part of this commit.
                if kind is Kind.CHECKPOINT:
                    raise CorruptCheckpoint(
                        storage.url_for(info.path),
                        f"changed while step {step} was listed ({info.size} then {size} bytes); "
                        "step not committed",
                    )
                logger.warning(
                    "%s changed while step %d was listed (%d then %d bytes): left out of the "
                    "state dict",
                    storage.url_for(info.path),
                    step,
                    info.size,
                    size,
                )
                continue
            files[info.path] = FileRecord(info.path, size, checksum, DEFAULT_ALGORITHM, False)
    return Manifest(
        step=step,
        kind=kind,
        files=tuple(sorted(files.values(), key=lambda r: r.path)),
        writer_epoch=writer_epoch,
    )


def write_manifest(storage: StorageBackend, manifest: Manifest) -> None:
    """Write the manifest and read it back: a pointer must never name a step whose manifest the
    store did not keep whole (the read costs one small request per commit)."""
    path = manifest_path(manifest.step, manifest.kind)
    body = manifest.to_json()
    storage.write_bytes(path, body, track=False)
    stored = storage.read_small(path, max(MANIFEST_LIMIT, len(body)))
    if stored != body:
        raise StorageError(
            "write manifest",
            storage.url_for(path),
            f"the store returned {len(stored)} bytes that differ from the {len(body)} written",
        )
