"""The upload session both object-store writers are: pieces filled, shipped, drained, finished.

A streaming write to S3 (multipart parts) or GCS (resumable chunks) is the same machine: bytes fill
the current :class:`~commitpoint.storage.upload.pieces.Piece`; a full piece is sent on the
filesystem's event loop while the caller fills the next one, with at most ``max_in_flight`` pieces
in flight (a ``write`` that fills one more waits); buffers of finished pieces are reused; the first
failure is kept and raised by the next ``write`` or by ``close``, which sends the rest, waits for
every piece and finishes the upload. A file smaller than one piece is one request. Any failure
aborts: running pieces are cancelled and the store's session is cancelled, so nothing is left to
be billed. Every request runs under the session's ``deadline`` plus one second per MiB it
carries (:func:`request_deadline`), so a store that stops answering fails the upload in bounded
time.

A store supplies only its requests (:meth:`UploadSession._start`, :meth:`_send`,
:meth:`_send_whole`, :meth:`_finish`, :meth:`_cancel`) and, if pieces grow, :meth:`_piece_size`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fsspec.asyn import sync

from commitpoint.errors import UploadFailed
from commitpoint.storage.upload.pieces import Piece

logger = logging.getLogger(__name__)


SECONDS_PER_MIB = 1.0
"""What a request's deadline grows by for every MiB of body it carries (a 1 MiB/s floor)."""


def request_deadline(deadline: float | None, body_bytes: int) -> float | None:
    """The bound of one request (retries included) that carries ``body_bytes``."""
    if deadline is None:
        return None
    return deadline + SECONDS_PER_MIB * body_bytes / (1024 * 1024)


def bucket_key(path: str) -> tuple[str, str]:
    """``bucket/some/key`` (a filesystem path of an object store) as ``(bucket, "some/key")``."""
    bucket, _, key = path.partition("/")
    return bucket, key


class UploadSession:
    """A write-only file object that uploads ``bucket/key`` piece by piece (see the module)."""

    max_pieces: int | None = None
    """The store's limit on pieces per upload (None: none)."""
    piece_name = "pieces"
    """What the store calls a piece, for messages."""
    sends_empty_last_piece = False
    """Whether the last piece is sent even when empty (it carries the total size on GCS)."""
    abort_hint = ""
    """Appended to the warning logged when an abort fails (what cleans up otherwise)."""

    def __init__(
        self,
        fs: Any,
        path: str,
        *,
        piece_size: int,
        max_in_flight: int,
        where: str,
        deadline: float | None = None,
    ) -> None:
        self._fs = fs
        self._bucket, self._key = bucket_key(path)
        self._first_size = piece_size
        self._max_in_flight = max_in_flight
        self._where = where  # redacted URL, for messages and log lines
        self._deadline = deadline
        self._piece = Piece()  # the piece being filled
        self._next = 1  # number of the piece being filled (from 1)
        self._filling = self._piece_size(1)  # its size
        self._spare: list[bytearray] = []  # buffers of finished pieces, reused for the next ones
        self._started = False
        self._in_flight: dict[concurrent.futures.Future[Any], bytearray] = {}
        self._tasks: set[asyncio.Task[Any]] = set()  # running pieces (loop thread only)
        self._results: list[Any] = []  # what each finished piece's request returned
        self._failure: BaseException | None = None
        self._size = 0  # bytes written so far
        self.closed = False

    # -- what a store supplies -------------------------------------------------------------
    def _piece_size(self, number: int) -> int:
        """Size of piece ``number`` (from 1); constant unless the store grows them."""
        return self._first_size

    async def _start(self) -> None:
        """Open the store's upload session (before the first piece is sent)."""
        raise NotImplementedError

    def _send(self, number: int, body: memoryview, final: bool) -> Awaitable[Any]:
        """The request that sends piece ``number`` (called on the caller's thread, awaited on
        the loop; its result is kept in ``_results``)."""
        raise NotImplementedError

    async def _send_whole(self, body: memoryview) -> None:
        """Upload a file smaller than one piece in one request."""
        raise NotImplementedError

    async def _finish(self) -> None:
        """Complete the upload once every piece is acknowledged."""

    async def _cancel(self) -> None:
        """Cancel the store's upload session (running pieces are already stopped)."""

    # -- the file interface FsspecWriter uses -----------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Buffer ``data``; every full piece starts uploading (waiting if too many are running)."""
        if self.closed:
            raise ValueError("write to a closed upload")
        self._raise_failure()
        view = memoryview(data).cast("B")
        written = len(view)
        self._size += written
        while view:
            view = self._piece.fill(view, self._filling)
            if self._piece.filled == self._filling:
                self._ship(final=False)
        return written

    def flush(self) -> None:
        """Nothing to do: a piece is sent as soon as it is full, and the rest at ``close``."""

    def close(self) -> None:
        """Upload what is left and finish the object; on any failure abort, then raise."""
        if self.closed:
            return
        self.closed = True
        try:
            if not self._started:
                body = self._piece.data()
                self._run_bounded(len(body), self._send_whole, body)
            else:
                if self._piece.filled or self.sends_empty_last_piece:
                    self._ship(final=True)
                self._drain(concurrent.futures.ALL_COMPLETED)
                self._raise_failure()
                self._run(self._finish)
        except BaseException:
            self._abort()
            raise
        finally:
            self._release_buffers()
            self._fs.invalidate_cache(f"{self._bucket}/{self._key}")

    def discard(self) -> None:
        """Give up: stop the pieces still running and cancel the upload session."""
        self.closed = True
        self._abort()
        self._release_buffers()

    # -- caller-side machinery ---------------------------------------------------------------
    def _ship(self, final: bool) -> None:
        """Send the current piece, keeping at most ``max_in_flight`` running."""
        if self.max_pieces is not None and self._next > self.max_pieces:
            raise UploadFailed(
                self._where,
                f"more than {self.max_pieces} {self.piece_name} (the object is over the limit)",
            )
        if not self._started:
            self._run(self._start)
            self._started = True
        while len(self._in_flight) >= self._max_in_flight:
            self._drain(concurrent.futures.FIRST_COMPLETED)
            self._raise_failure()
        piece, number = self._piece, self._next
        self._next += 1
        filling = self._piece_size(self._next)
        if filling != self._filling:
            self._filling = filling
            self._spare.clear()  # buffers of the old size: the next pieces are bigger
        self._piece = Piece(self._spare.pop() if self._spare else None)
        body = piece.data()
        request = self._send(number, body, final)
        bound = request_deadline(self._deadline, len(body))
        future = asyncio.run_coroutine_threadsafe(self._tracked(request, bound), self._fs.loop)
        self._in_flight[future] = piece.buffer

    def _drain(self, return_when: str) -> None:
        """Wait for running pieces; keep each result, remember the first failure."""
        if not self._in_flight:
            return
        done, _ = concurrent.futures.wait(list(self._in_flight), return_when=return_when)
        for future in done:
            buffer = self._in_flight.pop(future)
            if future.cancelled():
                continue
            failure = future.exception()
            if failure is not None:
                if self._failure is None:
                    self._failure = failure
                continue
            self._results.append(future.result())
            if len(buffer) == self._filling:
                self._spare.append(buffer)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _release_buffers(self) -> None:
        self._piece = Piece()
        self._spare.clear()

    def _abort(self) -> None:
        """Stop running pieces, then cancel the session (best effort; a failure is logged)."""
        started, self._started = self._started, False
        try:
            self._run(self._stop_pieces_and_cancel, started)
        except Exception as exc:
            logger.warning(
                "could not abort the upload of %s (%s)%s",
                self._where,
                type(exc).__name__,
                self.abort_hint,
            )
        finally:
            self._in_flight.clear()

    def _run(self, factory: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """Run a request without a body on the filesystem's event loop, within the deadline."""
        return self._run_bounded(0, factory, *args, **kwargs)

    def _run_bounded(
        self, body_bytes: int, factory: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> Any:
        bound = request_deadline(self._deadline, body_bytes)
        return sync(self._fs.loop, factory, *args, timeout=bound, **kwargs)

    # -- on the event loop --------------------------------------------------------------------
    async def _tracked(self, request: Awaitable[Any], bound: float | None) -> Any:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            return await asyncio.wait_for(request, bound)
        finally:
            self._tasks.discard(task)

    async def _stop_pieces_and_cancel(self, started: bool) -> None:
        # Pieces submitted from the caller's thread started before this coroutine (the loop runs
        # callbacks in order), so every one of them is in _tasks or already finished.
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if started:
            await self._cancel()
