"""Retention: delete old committed steps by policy, and garbage-collect orphaned step folders.

A :class:`RetentionPolicy` keeps a committed step if *either* of its rules keeps it (the newest
``keep_last`` steps, every step divisible by ``keep_every``); with neither rule set it keeps every
committed step and only collects orphans. Whatever the policy says, a step is never deleted when

- a pointer names it (pointers are read fresh from storage right before each deletion, and once
  more after its manifest is gone: if a rewind moved a pointer onto it meanwhile, the manifest is
  put back and the step is kept),
- it is in flight (the monitor passes the steps it still tracks),
- it is above the newest pointer (a commit in progress, or steps left behind by a rewind),
- it is the target of the latest rewind of a kind (read from the rewind history).

An *orphan* is a step folder without any manifest (never committed, or half deleted), below every
pointer, not in flight, and whose newest file is older than ``orphan_min_age_s`` — so a save the
monitor has not heard of yet is safe while it writes. Only folders commitpoint wrote into are
orphans (their owner marker, :func:`~commitpoint.core.layout.owner_marker`, is there): another
tool's step folders in the same root (verl's own ``global_step_N``) are never deleted unless
``gc_foreign=True`` asks for it, and even then never a step a pointer names.

Every deletion goes through the backend's ``delete``, which lists exactly what it removes (no glob
expansion) and refuses anything outside the folder it was given.

A step is deleted manifest-first: a half-deleted step has no manifest, so it is never seen as
committed or verifiable; the next round collects the rest as an orphan.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from commitpoint.core.layout import (
    HISTORY_LIMIT,
    MANIFEST_LIMIT,
    REWIND_HISTORY,
    Kind,
    owner_marker,
    parse_step_dir,
    step_dir,
)
from commitpoint.core.manifest import manifest_path
from commitpoint.errors import InvalidArgument, safe_repr
from commitpoint.storage.protocol import StorageBackend

logger = logging.getLogger(__name__)

DEFAULT_ORPHAN_MIN_AGE_S = 3600.0


@dataclass(frozen=True)
class RetentionResult:
    """What one :meth:`RetentionPolicy.apply` did (or, with ``dry_run``, would do)."""

    deleted: tuple[int, ...] = ()
    """Committed steps deleted by the policy."""
    orphans: tuple[int, ...] = ()
    """Orphaned step folders collected."""
    kept: tuple[int, ...] = ()
    """Committed steps kept (by a rule or because they are protected)."""
    protected: tuple[int, ...] = ()
    """Steps the policy would drop but that a pointer, a rewind or a save in flight protects."""
    dry_run: bool = False
    errors: tuple[str, ...] = field(default_factory=tuple)
    """Steps that could not be deleted, with the cause (they are retried next round)."""


@dataclass(frozen=True)
class _Step:
    step: int
    kinds: frozenset[Kind]
    owned: bool = True
    """commitpoint wrote into the folder (a manifest or its owner marker is there)."""


@dataclass(frozen=True)
class RetentionPolicy:
    """Which committed steps to keep; see the module docstring for what is always protected."""

    keep_last: int | None = None
    keep_every: int | None = None
    gc_orphans: bool = True
    orphan_min_age_s: float = DEFAULT_ORPHAN_MIN_AGE_S
    gc_foreign: bool = False
    """Also collect step folders another tool wrote (no manifest, no owner marker) — off by
    default: commitpoint never deletes data it did not write unless asked."""

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise InvalidArgument(
                    f"{name} must be a positive int or None, got {safe_repr(value)}"
                )
        for name in ("gc_orphans", "gc_foreign"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgument(
                    f"{name} must be a bool, got {safe_repr(getattr(self, name))}"
                )
        age = self.orphan_min_age_s
        if (
            isinstance(age, bool)
            or not isinstance(age, int | float)
            or not math.isfinite(age)
            or age < 0
        ):
            raise InvalidArgument(
                f"orphan_min_age_s must be a finite number >= 0, got {safe_repr(age)}"
            )

    def kept_by_rules(self, committed: Collection[int]) -> set[int]:
        """The steps of ``committed`` a rule keeps (all of them when no rule is set)."""
        if self.keep_last is None and self.keep_every is None:
            return set(committed)
        kept = set(sorted(committed)[-self.keep_last :]) if self.keep_last is not None else set()
        if self.keep_every is not None:
            kept.update(s for s in committed if s % self.keep_every == 0)
        return kept

    def apply(
        self,
        storage: StorageBackend,
        *,
        in_flight: Collection[int] = (),
        dry_run: bool = False,
    ) -> RetentionResult:
        """Delete what the policy drops and collect orphans; return what was (or would be) done."""
        if not all(callable(getattr(storage, n, None)) for n in ("list_dirs", "delete")):
            raise InvalidArgument(f"storage must be a StorageBackend, got {safe_repr(storage)}")
        if not isinstance(dry_run, bool):
            raise InvalidArgument(f"dry_run must be a bool, got {safe_repr(dry_run)}")
        try:
            in_flight = frozenset(in_flight)
        except TypeError:
            raise InvalidArgument(
                f"in_flight must be a collection of steps, got {safe_repr(in_flight)}"
            ) from None
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in in_flight):
            raise InvalidArgument(f"in_flight must hold int steps, got {safe_repr(in_flight)}")
        steps = _scan(storage)
        pointers = _pointers(storage)
        if not pointers:
            logger.debug("retention on %s: nothing committed yet", storage.url)
            return RetentionResult(dry_run=dry_run)
        newest = max(pointers.values())
        committed = sorted(s.step for s in steps if s.kinds and s.step <= newest)
        rewound = _rewind_targets(storage)
        deleted: list[int] = []
        orphans: list[int] = []
        kept: list[int] = []
        protected: list[int] = []
        errors: list[str] = []

        by_rules = self.kept_by_rules(committed)
        for step in committed:
            if step in by_rules:
                kept.append(step)
            elif step in in_flight or step in pointers.values() or step in rewound:
                kept.append(step)
                protected.append(step)
            elif dry_run:
                deleted.append(step)
            else:
                outcome = _delete_step(storage, step, in_flight)
                if outcome is None:
                    deleted.append(step)
                else:
                    kept.append(step)
                    protected.append(step)
                    if outcome:
                        errors.append(outcome)

        if self.gc_orphans:
            below = min(pointers.values())
            now = time.time()
            for entry in steps:
                step = entry.step
                if entry.kinds or step >= below or step in in_flight:
                    continue
                if not entry.owned and not self.gc_foreign:
                    logger.debug("step %d was not written by commitpoint; left alone", step)
                    continue
                age = _age(storage, step, now)
                if age is None or age < self.orphan_min_age_s:
                    logger.debug("step %d has no manifest but may still be written", step)
                    continue
                if dry_run:
                    orphans.append(step)
                    continue
                outcome = _delete_orphan(storage, step)
                if outcome is None:
                    orphans.append(step)
                elif outcome:
                    errors.append(outcome)

        result = RetentionResult(
            tuple(deleted), tuple(orphans), tuple(kept), tuple(protected), dry_run, tuple(errors)
        )
        if deleted or orphans:
            logger.info(
                "retention on %s %s steps %s and orphans %s",
                storage.url,
                "would delete" if dry_run else "deleted",
                list(deleted),
                list(orphans),
            )
        return result


def _scan(storage: StorageBackend) -> list[_Step]:
    """Every step folder under the root with the kinds it has manifests for."""
    found: list[_Step] = []
    for name in storage.list_dirs(""):
        step = parse_step_dir(name)
        if step is None:
            continue
        kinds = frozenset(k for k in Kind if storage.exists(manifest_path(step, k)))
        owned = bool(kinds) or storage.exists(owner_marker(step))
        found.append(_Step(step, kinds, owned))
    return sorted(found, key=lambda s: s.step)


def _pointers(storage: StorageBackend) -> dict[Kind, int]:
    """The steps the pointers name right now (absent pointers left out)."""
    named: dict[Kind, int] = {}
    for kind in Kind:
        value = storage.read_pointer(kind.pointer).value
        if value is not None:
            named[kind] = value
    return named


def _rewind_targets(storage: StorageBackend) -> frozenset[int]:
    """The target of the latest rewind of each kind, per the rewind history."""
    try:
        if not storage.exists(REWIND_HISTORY):
            return frozenset()
        data = storage.read_small(REWIND_HISTORY, HISTORY_LIMIT)
    except Exception as exc:  # history is a safety net; a pointer still protects the step
        logger.warning("could not read the rewind history of %s: %s", storage.url, exc)
        return frozenset()
    latest: dict[str, int] = {}
    for line in data.splitlines():
        try:
            entry = json.loads(line)
            latest[str(entry["kind"])] = int(entry["to"])
        except (ValueError, KeyError, TypeError, RecursionError):
            continue
    return frozenset(latest.values())


def _delete_step(storage: StorageBackend, step: int, in_flight: Collection[int]) -> str | None:
    """Delete a committed step manifest-first; None when deleted, else why it was kept ("" if
    a pointer or save protects it, or the error)."""
    if step in in_flight or step in _pointers(storage).values():
        return ""
    saved: dict[str, bytes] = {}
    try:
        for kind in Kind:
            path = manifest_path(step, kind)
            if storage.exists(path):
                saved[path] = storage.read_small(path, MANIFEST_LIMIT)
        # The manifest of the full checkpoint first: it also covers the state dict.
        for path in sorted(saved, key=lambda p: Kind.CHECKPOINT.manifest not in p):
            storage.delete(path)
        if step in _pointers(storage).values():
            for path, data in saved.items():
                storage.write_bytes(path, data, track=False)
            logger.info("step %d became a pointer target while being deleted; kept", step)
            return ""
        storage.delete(step_dir(step), recursive=True)
        storage.delete(owner_marker(step))
    except Exception as exc:
        logger.warning("could not delete step %d on %s: %s", step, storage.url, exc)
        return f"step {step}: {exc}"
    return None


def _delete_orphan(storage: StorageBackend, step: int) -> str | None:
    try:
        if any(storage.exists(manifest_path(step, k)) for k in Kind):
            return ""  # committed meanwhile
        if step in _pointers(storage).values():
            return ""  # named by a pointer (another tool's, or a rewind): never deleted
        storage.delete(step_dir(step), recursive=True)
        storage.delete(owner_marker(step))
    except Exception as exc:
        logger.warning("could not delete orphan step %d on %s: %s", step, storage.url, exc)
        return f"step {step}: {exc}"
    return None


def _age(storage: StorageBackend, step: int, now: float) -> float | None:
    """Seconds since anything in ``step``'s folder last changed (None if unknown or empty)."""
    try:
        found = storage.list_files(step_dir(step))
    except Exception as exc:
        logger.warning("could not list step %d on %s: %s", step, storage.url, exc)
        return None
    stamps = [info.modified for info in found]
    if not stamps or any(s is None for s in stamps):
        return None
    return now - max(s for s in stamps if s is not None)


__all__ = ["DEFAULT_ORPHAN_MIN_AGE_S", "RetentionPolicy", "RetentionResult"]


class BackgroundRetention:
    """Applies a :class:`RetentionPolicy` on its own thread after commits, one round at a time.

    ``in_flight`` returns the steps still being written (the monitor's open steps), read right
    before each round; a failing round is logged and deletes nothing more.
    """

    def __init__(
        self,
        policy: RetentionPolicy,
        storage: StorageBackend,
        in_flight: Callable[[], Collection[int]],
    ) -> None:
        self._policy = policy
        self._storage = storage
        self._in_flight = in_flight
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="commitpoint-retention")

    def after_commit(self, step: int, kind: Kind) -> None:
        """A commit listener: schedule a round."""
        try:
            self._pool.submit(self._round)
        except RuntimeError:  # closed: the commit stands, retention just does not run
            logger.debug("monitor closed; no retention round after step %d", step)

    def _round(self) -> None:
        try:
            self._policy.apply(self._storage, in_flight=set(self._in_flight()))
        except Exception:
            logger.exception(
                "retention on %s failed; nothing more is deleted this round", self._storage.url
            )

    def close(self) -> None:
        """Wait for a round in progress; no new ones start."""
        self._pool.shutdown(wait=True)
