"""CheckpointReader: find, verify and load what has been committed.

A reader only ever looks at steps a pointer names (or that a manifest covers), so it never sees a
half-written checkpoint. Loads verify the file against the step's manifest by default.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from commitpoint.core.layout import Kind, check_step, safe_relpath, step_dir
from commitpoint.core.manifest import Manifest
from commitpoint.errors import CorruptCheckpoint, InvalidArgument
from commitpoint.read.verify import (
    VerifyReport,
    check_bytes,
    load_manifest,
    record_of,
    verify_file,
    verify_step,
)
from commitpoint.read.watch import awatch, watch
from commitpoint.save.torch_io import load_torch, load_torch_bytes
from commitpoint.storage.protocol import StorageBackend
from commitpoint.storage.registry import open_storage


class CheckpointReader:
    """Read access to the checkpoints committed under ``url``."""

    def __init__(self, url: str | StorageBackend, **storage_options: Any) -> None:
        if not isinstance(url, str | StorageBackend):
            raise InvalidArgument(f"url must be a str or a StorageBackend, got {url!r}")
        self.storage: StorageBackend = (
            open_storage(url, **storage_options) if isinstance(url, str) else url
        )

    @property
    def url(self) -> str:
        return self.storage.url

    def latest_step(self, kind: Kind | str) -> int | None:
        return self.storage.read_pointer(Kind(kind).pointer).value

    def latest_checkpoint_step(self) -> int | None:
        """Newest step with a complete full checkpoint, or None."""
        return self.latest_step(Kind.CHECKPOINT)

    def latest_state_dict_step(self) -> int | None:
        """Newest step with complete weights, or None."""
        return self.latest_step(Kind.STATE_DICT)

    def step_dir(self, step: int) -> str:
        return step_dir(check_step(step))

    def step_url(self, step: int) -> str:
        """URL of the folder holding ``step``'s files (safe to print)."""
        return self.storage.url_for(self.step_dir(step))

    def manifest(self, step: int, kind: Kind | str = Kind.STATE_DICT) -> Manifest:
        """The manifest covering ``step`` for ``kind`` (CorruptCheckpoint if there is none)."""
        return load_manifest(self.storage, check_step(step), Kind(kind))

    def verify(self, step: int, kind: Kind | str = Kind.STATE_DICT) -> VerifyReport:
        """Check every file of ``step`` against its manifest and report all problems."""
        return verify_step(self.storage, check_step(step), Kind(kind))

    def path_in_step(self, step: int, relpath: str) -> str:
        return f"{self.step_dir(step)}/{safe_relpath(relpath)}"

    def load(
        self,
        step: int,
        relpath: str,
        *,
        kind: Kind | str = Kind.STATE_DICT,
        verify: bool = True,
        map_location: Any = "cpu",
        weights_only: bool = True,
    ) -> Any:
        """``torch.load`` of ``relpath`` inside ``step``'s folder, verified by default.

        The object is returned only once the file's size and checksum match the manifest. With
        ``weights_only=True`` (the default) the checksum pass and the load run at the same time,
        so a verified load takes about as long as a plain one: that unpickler cannot run code, and
        its result is dropped if the check fails. With ``weights_only=False`` the file is read
        once into memory, those bytes are verified, and only those bytes are unpickled: a file
        replaced between the check and the load cannot slip through (this needs the file's size
        in memory for a moment).
        """
        path = self.path_in_step(step, relpath)
        kind = Kind(kind)
        if not verify:
            return self._load(path, map_location, weights_only)
        if not weights_only:
            return self._load_checked_bytes(step, path, kind, map_location)
        with ThreadPoolExecutor(1, thread_name_prefix="commitpoint-verify") as pool:
            check = pool.submit(verify_file, self.storage, step, path, kind)
            try:
                loaded = self._load(path, map_location, weights_only)
            except Exception:
                check.result()  # a corrupt file explains a failed load: report that first
                raise
            check.result()
        return loaded

    def _load_checked_bytes(self, step: int, path: str, kind: Kind, map_location: Any) -> Any:
        """Unrestricted load of exactly the bytes that were verified (one open, one read)."""
        record = record_of(self.storage, step, path, kind)
        with self.storage.open_read(path) as stream:
            data = stream.read()
        problem = check_bytes(record, data)
        if problem is not None:
            raise CorruptCheckpoint(self.storage.url_for(path), problem.reason)
        return load_torch_bytes(data, map_location=map_location, weights_only=False)

    def _load(self, path: str, map_location: Any, weights_only: bool) -> Any:
        return load_torch(self.storage, path, map_location=map_location, weights_only=weights_only)

    def watch(self, **options: Any) -> Iterator[int]:
        """Yield each newly committed, verified step (options as for
        :func:`~commitpoint.read.watch.watch`: kind, after, include_current, every_step, interval,
        stop, timeout...)."""
        return watch(self.storage, **options)

    def awatch(self, **options: Any) -> AsyncIterator[int]:
        """:meth:`watch` as an async iterator (:func:`commitpoint.read.watch.awatch`)."""
        return awatch(self.storage, **options)
