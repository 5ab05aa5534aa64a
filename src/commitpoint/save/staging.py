"""Staging: snapshot live tensors into reusable CPU buffers while training goes on.

A background save may only write tensors that do not change under it, and the next
``optimizer.step()`` mutates them in place. :meth:`Stager.stage` returns a
:class:`StagedStateDict` at once and copies the tensors on a small thread pool (large tensors in
chunks, so every core helps) into preallocated CPU buffers while the caller runs the next forward
and backward pass; :meth:`StagedStateDict.wait`, called before ``optimizer.step()``, blocks only
for the part of the copy not yet done.

Guarantees: once ``wait`` returned, the staged state dict holds the values the tensors had when
``stage`` was called, whatever the caller does to them afterwards; buffers are pooled by (shape,
dtype), so repeated checkpoints of one model allocate nothing; at most ``max_in_flight`` snapshots
exist at a time, and a stager never holds more than ``max_in_flight x`` the largest state dict it
has staged. torch is imported only when something is staged.
"""

from __future__ import annotations

import collections
import copy
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from commitpoint.core.layout import check_seconds
from commitpoint.errors import InvalidArgument, StagingFailed, StagingTimeout

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MiB = 1024**2
_ORPHAN_POLL_S = 1.0
"""How often a waiting ``stage()`` looks for handles garbage-collected without release."""

_ATOMIC = (type(None), bool, int, float, complex, str, bytes)
"""Leaves that cannot change under a save: kept as they are, never copied."""

_BufferKey = tuple[tuple[int, ...], "torch.dtype", bool]
"""(shape, dtype, pinned): buffers with equal keys are interchangeable."""


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class StagingOptions:
    """How a :class:`Stager` copies and how much memory it may hold.

    ``max_in_flight`` snapshots may be unreleased at once (memory bound: ``max_in_flight x``
    the state-dict size); ``stage`` waits up to ``slot_timeout`` seconds (``None``: for ever) for
    one to be released. ``workers`` threads copy in pieces of about ``chunk_bytes``.
    """

    max_in_flight: int = 2
    workers: int = field(default_factory=_default_workers)
    chunk_bytes: int = 16 * MiB
    slot_timeout: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "workers", "chunk_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgument(f"staging option {name} must be an int >= 1, got {value!r}")
        check_seconds(self.slot_timeout, "staging option slot_timeout")
        if self.slot_timeout is not None and not self.slot_timeout > 0:
            raise InvalidArgument(
                f"staging option slot_timeout must be None or > 0, got {self.slot_timeout!r}"
            )


@dataclass(frozen=True)
class StagingStats:
    """Counters of a :class:`Stager`, to check that repeated checkpoints reuse their buffers."""

    allocations: int
    """Buffers created (a checkpoint of shapes seen before adds none)."""
    reuses: int
    """Buffers taken from the pool instead of allocated."""
    evictions: int
    """Pooled buffers dropped to stay within the memory bound."""
    held_bytes: int
    """Bytes of every buffer the stager holds, in use or pooled."""
    in_flight: int
    """Snapshots staged and not yet released."""


@dataclass
class _Chunk:
    """One unit of work for a copy thread: pieces of tensors from one device."""

    device: torch.device
    pieces: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """(key path for error messages, destination view, source view)."""
    nbytes: int = 0


@dataclass
class _Progress:
    """Which tensor a copy thread is at, so a failure can name it."""

    path: str = ""


def _cuda() -> Any:
    """``torch.cuda`` (untyped in places; only reached when a tensor lives on a CUDA device)."""
    import torch

    return torch.cuda


def _nbytes(tensor: torch.Tensor) -> int:
    return int(tensor.numel()) * int(tensor.element_size())


def _key_bytes(key: _BufferKey) -> int:
    shape, dtype, _ = key
    count = 1
    for dim in shape:
        count *= dim
    return count * int(dtype.itemsize)


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _needs_own_copy(tensor: torch.Tensor) -> bool:
    """Tensors a plain buffer cannot hold (sparse, quantized, nested): copied in ``stage``."""
    import torch

    return bool(tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested)


def _split(
    path: str, destination: torch.Tensor, source: torch.Tensor, chunk_bytes: int
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, int]]:
    """Pieces of at most about ``chunk_bytes`` (whole tensor if small or not splittable).

    A contiguous tensor is split as a flat run of elements; another one by its rows (dim 0).
    """
    nbytes = _nbytes(source)
    if nbytes <= chunk_bytes or source.dim() == 0:
        yield path, destination, source, nbytes
        return
    if source.is_contiguous():
        source, destination = source.reshape(-1), destination.view(-1)
    elif source.size(0) <= 1:
        yield path, destination, source, nbytes
        return
    rows = source.size(0)
    step = max(1, chunk_bytes // max(1, nbytes // rows))
    for start in range(0, rows, step):
        length = min(step, rows - start)
        piece = nbytes * length // rows
        yield path, destination.narrow(0, start, length), source.narrow(0, start, length), piece


class StagedStateDict:
    """A state dict being copied into staging buffers; the handle :meth:`Stager.stage` returns.

    Call :meth:`wait` before mutating the source tensors, :meth:`state_dict` to get the copy,
    and :meth:`release` (or leave a ``with`` block) when done with it so its buffers are reused.
    A handle given to :meth:`CheckpointCoordinator.save_staged_async` belongs to that save,
    which releases it; the caller's ``release`` is then a no-op.
    """

    def __init__(self, stager: Stager, staged: dict[str, Any], nbytes: int) -> None:
        self._stager = stager
        self._staged: dict[str, Any] | None = staged
        self.nbytes = nbytes
        """Bytes of tensor data in the snapshot."""
        self._lock = threading.Lock()
        self._copied = threading.Event()
        self._pending_chunks = 0
        self._failure: StagingFailed | None = None
        self._released = False
        self._handed_over = False
        self._buffers: list[tuple[_BufferKey, torch.Tensor]] = []
        self._give_back = weakref.finalize(self, stager._unreleased_handle_collected, self._buffers)
        self._give_back.atexit = False

    # -- for the stager and its copy threads -----------------------------------------------------
    def _attach(self, buffers: list[tuple[_BufferKey, torch.Tensor]], chunks: int) -> None:
        self._buffers.extend(buffers)
        self._pending_chunks = chunks
        if chunks == 0:
            self._copied.set()

    def _chunk_finished(self, failure: StagingFailed | None) -> None:
        with self._lock:
            if failure is not None and self._failure is None:
                self._failure = failure
            self._pending_chunks -= 1
            finished = self._pending_chunks == 0
            give_back = finished and self._released
        if finished:
            self._copied.set()
        if give_back:
            self._return_buffers()

    def _hand_over(self) -> Callable[[], None]:
        """Make a save the owner of this handle; returns the release the save must call."""
        with self._lock:
            if self._released:
                raise InvalidArgument("this staged state dict was already released")
            if self._handed_over:
                raise InvalidArgument("this staged state dict was already handed to a save")
            self._handed_over = True
        return self._release

    def _release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
            give_back = self._pending_chunks == 0
        if give_back:
            self._return_buffers()

    def _return_buffers(self) -> None:
        self._staged = None
        if self._give_back.detach() is not None:  # not given back yet (by the GC path either)
            self._stager._take_back(self._buffers)

    # -- public ----------------------------------------------------------------------------------
    def done(self) -> bool:
        """True once the copy finished (successfully or not)."""
        return self._copied.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the copy is complete: after this the source tensors may change.

        Raises :class:`StagingFailed` if the copy failed, :class:`StagingTimeout` after
        ``timeout`` seconds.
        """
        if not self._copied.wait(timeout):
            raise StagingTimeout(f"staging {self.nbytes} bytes was not finished after {timeout} s")
        if self._failure is not None:
            raise self._failure

    def state_dict(self, timeout: float | None = None) -> dict[str, Any]:
        """The snapshot: the structure of the staged state dict on the staging buffers.

        Waits for the copy first. Valid until the handle is released; do not modify it.
        """
        self.wait(timeout)
        with self._lock:
            staged = None if self._released else self._staged
        if staged is None:
            raise InvalidArgument("this staged state dict was released; its buffers are reused")
        return staged

    def release(self) -> None:
        """Give the buffers back to the pool (once the copy is over); safe to call twice."""
        with self._lock:
            owned_by_save = self._handed_over
        if not owned_by_save:
            self._release()

    def __enter__(self) -> StagedStateDict:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Stager:
    """Copies state dicts into a reusable pool of CPU buffers on a small thread pool.

    One per training process is enough (:class:`CheckpointCoordinator` makes one on first use
    of :meth:`CheckpointCoordinator.stage`). Thread-safe.
    """

    def __init__(self, options: StagingOptions | None = None) -> None:
        self.options = options or StagingOptions()
        self._lock = threading.Lock()
        self._slot_freed = threading.Condition(self._lock)
        self._free: dict[_BufferKey, list[torch.Tensor]] = {}
        self._in_flight = 0
        self._held_bytes = 0
        self._largest = 0
        self._allocations = 0
        self._reuses = 0
        self._evictions = 0
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None
        self._side_streams: dict[torch.device, Any] = {}
        self._orphans: collections.deque[list[tuple[_BufferKey, torch.Tensor]]] = (
            collections.deque()
        )

    @property
    def stats(self) -> StagingStats:
        with self._lock:
            self._adopt_orphans()
            return StagingStats(
                allocations=self._allocations,
                reuses=self._reuses,
                evictions=self._evictions,
                held_bytes=self._held_bytes,
                in_flight=self._in_flight,
            )

    # -- staging ---------------------------------------------------------------------------------
    def stage(
        self, state_dict: Mapping[str, Any], *, timeout: float | None = None
    ) -> StagedStateDict:
        """Start copying ``state_dict`` and return its handle at once.

        Tensors are copied in the background; nested dicts, lists and tuples are rebuilt with
        the same types, and other leaves are deep-copied now (immutable ones are kept as they
        are). When ``max_in_flight`` snapshots are unreleased, waits for one to be released, up
        to ``timeout`` seconds (default: the ``slot_timeout`` option), then raises
        :class:`StagingTimeout`.
        """
        if not isinstance(state_dict, Mapping):
            raise InvalidArgument(
                f"stage() needs a state dict (a mapping), got {type(state_dict).__name__}"
            )
        timeout = check_seconds(timeout, "timeout")
        self._take_slot(self.options.slot_timeout if timeout is None else timeout)
        buffers: list[tuple[_BufferKey, torch.Tensor]] = []
        try:
            sources: dict[Hashable, tuple[str, torch.Tensor]] = {}
            identity_of: dict[int, Hashable] = {}
            _collect_tensors(state_dict, "", sources, identity_of, set())
            staged_tensors: dict[Hashable, Any] = {}
            pooled: list[tuple[Hashable, str, torch.Tensor, _BufferKey]] = []
            for identity, (path, tensor) in sources.items():
                if tensor.device.type == "meta":
                    staged_tensors[identity] = tensor  # no data that could change
                elif _needs_own_copy(tensor):
                    staged_tensors[identity] = tensor.detach().to("cpu", copy=True)
                else:
                    key = (tuple(tensor.shape), tensor.dtype, tensor.device.type == "cuda")
                    pooled.append((identity, path, tensor.detach(), key))
            buffers = self._acquire([key for *_, key in pooled])
            pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []
            for (identity, path, source, _), (_, buffer) in zip(pooled, buffers, strict=True):
                staged_tensors[identity] = buffer
                pairs.append((path, buffer, source))
            staged_by_id = {key: staged_tensors[identity] for key, identity in identity_of.items()}
            staged = _rebuild(state_dict, staged_by_id, {}, {})
            ready = self._ready_events({source.device for _, _, source in pairs})
            chunks = _plan_chunks(pairs, self.options.chunk_bytes)
            handle = StagedStateDict(self, staged, sum(_key_bytes(key) for key, _ in buffers))
            handle._attach(buffers, len(chunks))
        except BaseException:
            self._take_back(buffers)
            raise
        for index, chunk in enumerate(chunks):
            try:
                self._copy_threads().submit(
                    self._copy_chunk, handle, chunk, ready.get(chunk.device)
                )
            except BaseException as exc:  # closed meanwhile: the handle must still finish
                for unsubmitted in chunks[index:]:
                    handle._chunk_finished(StagingFailed(unsubmitted.pieces[0][0], exc))
                break
        return handle

    def _take_slot(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._slot_freed:
            if self._closed:
                raise InvalidArgument("this stager is closed")
            if self._in_flight >= self.options.max_in_flight:
                logger.debug("stage() waits: %d snapshots are still unreleased", self._in_flight)
            while self._adopt_orphans() >= self.options.max_in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise StagingTimeout(
                        f"{self._in_flight} staged state dicts (max_in_flight) were still "
                        f"unreleased after {timeout} s; release them or let their saves finish"
                    )
                # woken by a release; the poll also notices handles collected without one
                self._slot_freed.wait(
                    _ORPHAN_POLL_S if remaining is None else min(remaining, _ORPHAN_POLL_S)
                )
            self._in_flight += 1

    def _acquire(self, keys: list[_BufferKey]) -> list[tuple[_BufferKey, torch.Tensor]]:
        """A buffer per key: pooled ones first, new ones for the rest (evicting pooled buffers
        of other shapes first, so the memory bound holds)."""
        import torch

        taken: list[torch.Tensor | None] = []
        with self._lock:
            for key in keys:
                free = self._free.get(key)
                taken.append(free.pop() if free else None)
                if free is not None and not free:
                    del self._free[key]
            unallocated = sum(_key_bytes(k) for k, b in zip(keys, taken, strict=True) if b is None)
            self._reuses += sum(buffer is not None for buffer in taken)
            self._largest = max(self._largest, sum(_key_bytes(key) for key in keys))
            bound = self.options.max_in_flight * self._largest
            while self._free and self._held_bytes + unallocated > bound:
                key = next(iter(self._free))
                self._free[key].pop()
                if not self._free[key]:
                    del self._free[key]
                self._held_bytes -= _key_bytes(key)
                self._evictions += 1
            self._held_bytes += unallocated  # reserved now, so concurrent stage() calls see it
        result: list[tuple[_BufferKey, torch.Tensor]] = []
        try:
            for key, buffer in zip(keys, taken, strict=True):
                if buffer is None:
                    shape, dtype, pinned = key
                    buffer = torch.empty(shape, dtype=dtype, pin_memory=pinned)
                    unallocated -= _key_bytes(key)
                    with self._lock:
                        self._allocations += 1
                result.append((key, buffer))
        except BaseException:
            with self._lock:
                self._held_bytes -= unallocated
            rest = zip(keys[len(result) :], taken[len(result) :], strict=True)
            result += [(key, buffer) for key, buffer in rest if buffer is not None]
            self._take_back(result, slot=False)
            raise
        return result

    def _take_back(self, buffers: list[tuple[_BufferKey, torch.Tensor]], slot: bool = True) -> None:
        """Buffers back into the pool (dropped once closed) and, with ``slot``, a snapshot slot
        free again."""
        with self._slot_freed:
            self._pool(buffers)
            if slot:
                self._in_flight -= 1
                self._slot_freed.notify()

    def _pool(self, buffers: list[tuple[_BufferKey, torch.Tensor]]) -> None:
        """Under the lock."""
        for key, buffer in buffers:
            if self._closed:
                self._held_bytes -= _key_bytes(key)
            else:
                self._free.setdefault(key, []).append(buffer)
        buffers.clear()

    def _unreleased_handle_collected(self, buffers: list[tuple[_BufferKey, torch.Tensor]]) -> None:
        """Finalizer of a handle dropped without ``release()``. It may run inside any locked
        region of any thread, so it takes no lock: the buffers wait in a queue for
        :meth:`_adopt_orphans`."""
        self._orphans.append(buffers)
        logger.warning(
            "a staged state dict was garbage-collected without release(); release it (or use "
            "it in a with block) so its buffers and slot are reused at once"
        )

    def _adopt_orphans(self) -> int:
        """Under the lock: take back the buffers of collected handles; returns the snapshots
        still in flight."""
        while self._orphans:
            self._pool(self._orphans.popleft())
            self._in_flight -= 1
        return self._in_flight

    # -- copying ---------------------------------------------------------------------------------
    def _copy_threads(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise InvalidArgument("this stager is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self.options.workers, thread_name_prefix="commitpoint-stage"
                )
            return self._executor

    def _ready_events(self, devices: set[torch.device]) -> dict[torch.device, Any]:
        """Per CUDA device, an event on the caller's current stream: the copy starts after the
        work that produced the values, and never sees later work."""
        events: dict[torch.device, Any] = {}
        for device in devices:
            if device.type == "cuda":
                event = _cuda().Event()
                event.record(_cuda().current_stream(device))
                events[device] = event
        return events

    def _side_stream(self, device: torch.device) -> Any:
        with self._lock:
            stream = self._side_streams.get(device)
            if stream is None:
                stream = self._side_streams[device] = _cuda().Stream(device=device)
            return stream

    def _copy_chunk(self, handle: StagedStateDict, chunk: _Chunk, ready: Any) -> None:
        """Runs on a copy thread; every outcome reaches the handle."""
        progress = _Progress()
        failure: StagingFailed | None = None
        try:
            if chunk.device.type == "cuda":
                self._copy_from_cuda(chunk, ready, progress)
            else:
                for path, destination, source in chunk.pieces:
                    progress.path = path
                    destination.copy_(source)
        except BaseException as exc:  # reported through wait(), never lost in the pool
            failure = StagingFailed(progress.path, exc)
            logger.error("%s", failure)
        handle._chunk_finished(failure)

    def _copy_from_cuda(self, chunk: _Chunk, ready: Any, progress: _Progress) -> None:
        """Asynchronous device-to-pinned-host copies on a side stream, then wait for them."""
        cuda = _cuda()
        stream = self._side_stream(chunk.device)
        with cuda.stream(stream):
            stream.wait_event(ready)  # start after the work that produced the values
            for path, destination, source in chunk.pieces:
                progress.path = path
                destination.copy_(source, non_blocking=True)
                source.record_stream(stream)  # the allocator keeps it until the copy is done
            copied = cuda.Event()
            copied.record(stream)
        copied.synchronize()

    # -- lifecycle -------------------------------------------------------------------------------
    def trim(self) -> int:
        """Drop every pooled (unused) buffer; returns the bytes freed."""
        with self._lock:
            self._adopt_orphans()
            freed = sum(_key_bytes(key) * len(buffers) for key, buffers in self._free.items())
            self._evictions += sum(len(buffers) for buffers in self._free.values())
            self._free.clear()
            self._held_bytes -= freed
            return freed

    def close(self) -> None:
        """Finish the copies in progress, stop the copy threads and drop the pool."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
            self._slot_freed.notify_all()
        if executor is not None:
            executor.shutdown(wait=True)
        self.trim()

    def __enter__(self) -> Stager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _identity(tensor: torch.Tensor) -> Hashable:
    """Equal for tensors that are the same view of the same memory (tied weights appear in a
    state dict as distinct tensor objects), so they are staged once and stay shared."""
    if tensor.device.type == "meta" or _needs_own_copy(tensor):
        return id(tensor)
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
        tensor.device,
    )


def _collect_tensors(
    value: Any,
    path: str,
    found: dict[Hashable, tuple[str, torch.Tensor]],
    identity_of: dict[int, Hashable],
    seen: set[int],
) -> None:
    """Every distinct tensor in the containers of ``value``, and the identity of each tensor
    object (several objects may share one identity)."""
    import torch

    if isinstance(value, torch.Tensor):
        identity = identity_of.setdefault(id(value), _identity(value))
        found.setdefault(identity, (path, value))
        return
    if isinstance(value, _ATOMIC) or id(value) in seen:
        return
    if isinstance(value, Mapping):
        seen.add(id(value))
        for key, item in value.items():
            _collect_tensors(item, _join(path, key), found, identity_of, seen)
    elif isinstance(value, list | tuple):
        seen.add(id(value))
        for index, item in enumerate(value):
            _collect_tensors(item, _join(path, index), found, identity_of, seen)


def _rebuild(
    value: Any, tensors: dict[int, Any], memo: dict[int, Any], leaf_memo: dict[int, Any]
) -> Any:
    """``value`` with every tensor replaced by its staged copy and every other leaf copied.

    Container types (OrderedDict with its ``_metadata``, namedtuples, subclasses) and shared
    references are preserved.
    """
    import torch

    if isinstance(value, torch.Tensor):
        return tensors[id(value)]
    if isinstance(value, _ATOMIC):
        return value
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, dict):
        try:
            mapping = copy.copy(value)  # same type, same attributes (state_dict()'s _metadata)
        except Exception:
            mapping = {}
        memo[id(value)] = mapping
        for name, attribute in list(getattr(mapping, "__dict__", {}).items()):
            setattr(mapping, name, copy.deepcopy(attribute, leaf_memo))
        for key, item in value.items():
            mapping[key] = _rebuild(item, tensors, memo, leaf_memo)
        return mapping
    if isinstance(value, Mapping):
        plain: dict[Any, Any] = {}
        memo[id(value)] = plain
        for key, item in value.items():
            plain[key] = _rebuild(item, tensors, memo, leaf_memo)
        return plain
    if isinstance(value, list):
        sequence = copy.copy(value)
        memo[id(value)] = sequence
        sequence[:] = [_rebuild(item, tensors, memo, leaf_memo) for item in value]
        return sequence
    if isinstance(value, tuple):
        items = [_rebuild(item, tensors, memo, leaf_memo) for item in value]
        rebuilt = type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        memo[id(value)] = rebuilt
        return rebuilt
    try:
        return copy.deepcopy(value, leaf_memo)
    except Exception as exc:
        raise InvalidArgument(
            f"cannot stage a leaf of type {type(value).__name__}: it cannot be deep-copied ({exc})"
        ) from exc


def _plan_chunks(
    pairs: list[tuple[str, torch.Tensor, torch.Tensor]], chunk_bytes: int
) -> list[_Chunk]:
    """Group small tensors and split large ones into chunks of about ``chunk_bytes`` per
    device, so the copy threads share the work evenly."""
    chunks: list[_Chunk] = []
    open_chunks: dict[torch.device, _Chunk] = {}
    for path, destination, source in pairs:
        for piece_path, piece_destination, piece_source, nbytes in _split(
            path, destination, source, chunk_bytes
        ):
            chunk = open_chunks.get(source.device)
            if chunk is None:
                chunk = open_chunks[source.device] = _Chunk(source.device)
            chunk.pieces.append((piece_path, piece_destination, piece_source))
            chunk.nbytes += nbytes
            if chunk.nbytes >= chunk_bytes:
                chunks.append(open_chunks.pop(source.device))
    chunks.extend(open_chunks.values())
    return chunks
