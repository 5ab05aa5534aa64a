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

from commitpoint.core.checksum import DEFAULT_ALGORITHM, checksum_stream
from commitpoint.core.layout import Kind, is_temporary, step_dir, step_of_path
from commitpoint.errors import CorruptCheckpoint, StorageError
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
    def from_json(cls, data: bytes, path: str) -> Manifest:
        try:
            body = json.loads(data)
            if body.get("format") != FORMAT_VERSION:
                raise ValueError(f"unknown manifest format {body.get('format')!r}")
            return cls(
                step=int(body["step"]),
                kind=Kind(body["kind"]),
                files=tuple(FileRecord(**f) for f in body["files"]),
                created_at=float(body["created_at"]),
                writer_epoch=body.get("writer_epoch"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptCheckpoint(path, f"manifest is unreadable: {exc}") from exc


def manifest_path(step: int, kind: Kind) -> str:
    return f"{step_dir(step)}/{kind.manifest}"


def is_manifest(relpath: str) -> bool:
    return relpath.rsplit("/", 1)[-1] in {k.manifest for k in Kind}


def read_manifest(storage: StorageBackend, step: int, kind: Kind) -> Manifest | None:
    """The manifest of ``step`` for ``kind``, or None if none was written."""
    path = manifest_path(step, kind)
    if not storage.exists(path):
        return None
    return Manifest.from_json(storage.read_bytes(path), storage.url_for(path))


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
    stored = storage.read_bytes(path)
    if stored != body:
        raise StorageError(
            "write manifest",
            storage.url_for(path),
            f"the store returned {len(stored)} bytes that differ from the {len(body)} written",
        )
