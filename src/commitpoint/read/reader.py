"""CheckpointReader: find, verify and load what has been committed.

A reader only ever looks at steps a pointer names (or that a manifest covers), so it never sees a
half-written checkpoint. Loads verify the file against the step's manifest by default.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from commitpoint.core.layout import Kind, check_step, parse_step_dir, safe_relpath, step_dir
from commitpoint.core.manifest import Manifest, read_manifest_for
from commitpoint.errors import CorruptCheckpoint, InvalidArgument, InvalidStep, NotFound
from commitpoint.read.verify import (
    VerifyReport,
    check_bytes,
    load_manifest,
    record_of,
    verify_file,
    verify_step,
)
from commitpoint.read.watch import StopSignal, awatch, watch
from commitpoint.save.torch_io import load_torch, load_torch_bytes
from commitpoint.storage.protocol import StorageBackend
from commitpoint.storage.registry import open_storage

logger = logging.getLogger(__name__)


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

    def latest_verified_step(self, kind: Kind | str = Kind.STATE_DICT) -> int | None:
        """The newest committed step of ``kind`` whose files all match their manifest, or None.

        Starts at the step the pointer names and goes back through older committed steps (those
        with a manifest covering ``kind``) until one verifies. Each step that does not verify is
        logged with the reason and the ``commitpoint rewind`` command that moves the pointers
        back past it. It reads every file of each step it checks, so a load after it reads the
        files a second time.
        """
        kind = Kind(kind)
        latest = self.latest_step(kind)
        if latest is None:
            return None
        older = sorted(
            (s for name in self.storage.list_dirs("") if (s := parse_step_dir(name)) is not None),
            reverse=True,
        )
        candidates = [latest, *(s for s in older if s < latest)]
        for step in candidates:
            if step != latest and read_manifest_for(self.storage, step, kind) is None:
                continue  # never committed as this kind: not a candidate
            try:
                report = verify_step(self.storage, step, kind)
                problems = "; ".join(map(str, report.problems))
            except (CorruptCheckpoint, NotFound) as exc:
                problems = str(exc)
            if not problems:
                if step != latest:
                    logger.warning(
                        "using step %d of %s, the newest %s that verifies; "
                        "`commitpoint rewind %s --to %d` moves the pointers back to it",
                        step, self.url, kind.value, self.url, step,
                    )
                return step
            logger.warning(
                "step %d (%s) of %s does not verify: %s", step, kind.value, self.url, problems
            )
        return None

    def _step(self, step: object, kind: Kind) -> int:
        if step is None:
            latest = f"latest_{'checkpoint' if kind is Kind.CHECKPOINT else 'state_dict'}_step()"
            raise InvalidStep(
                f"step is None, not a step: is anything committed as {kind.value} under "
                f"{self.url}? ({latest} returns None when nothing is)"
            )
        return check_step(step)

    def step_dir(self, step: int) -> str:
        return step_dir(check_step(step))

    def step_url(self, step: int) -> str:
        """URL of the folder holding ``step``'s files (safe to print)."""
        return self.storage.url_for(self.step_dir(step))

    def manifest(self, step: int, kind: Kind | str = Kind.STATE_DICT) -> Manifest:
        """The manifest covering ``step`` for ``kind`` (CorruptCheckpoint if there is none)."""
        kind = Kind(kind)
        return load_manifest(self.storage, self._step(step, kind), kind)

    def verify(self, step: int, kind: Kind | str = Kind.STATE_DICT) -> VerifyReport:
        """Check every file of ``step`` against its manifest and report all problems."""
        kind = Kind(kind)
        return verify_step(self.storage, self._step(step, kind), kind)

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
        kind = Kind(kind)
        step = self._step(step, kind)
        path = self.path_in_step(step, relpath)
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

    def watch(
        self,
        *,
        kind: Kind | str = Kind.STATE_DICT,
        after: int | None = None,
        include_current: bool = True,
        every_step: bool = False,
        verify: bool = True,
        interval: float = 1.0,
        max_interval: float = 30.0,
        backoff: float = 2.0,
        stop: StopSignal | None = None,
        timeout: float | None = None,
    ) -> Iterator[int]:
        """Yield each newly committed, verified step of ``kind`` (docs/watch.md).

        ``after``: None starts from the step committed now (yielded first unless
        ``include_current`` is False), N yields steps above N. ``every_step`` yields every
        committed step in order instead of only the newest per poll. Polls every ``interval``
        seconds, backing off by ``backoff`` up to ``max_interval`` on errors; ends when ``stop``
        (a threading or asyncio Event) is set or after ``timeout`` seconds.
        """
        return watch(
            self.storage, kind=kind, after=after, include_current=include_current,
            every_step=every_step, verify=verify, interval=interval, max_interval=max_interval,
            backoff=backoff, stop=stop, timeout=timeout,
        )  # fmt: skip

    def awatch(
        self,
        *,
        kind: Kind | str = Kind.STATE_DICT,
        after: int | None = None,
        include_current: bool = True,
        every_step: bool = False,
        verify: bool = True,
        interval: float = 1.0,
        max_interval: float = 30.0,
        backoff: float = 2.0,
        stop: StopSignal | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[int]:
        """:meth:`watch` as an async iterator (the same options)."""
        return awatch(
            self.storage, kind=kind, after=after, include_current=include_current,
            every_step=every_step, verify=verify, interval=interval, max_interval=max_interval,
            backoff=backoff, stop=stop, timeout=timeout,
        )  # fmt: skip
