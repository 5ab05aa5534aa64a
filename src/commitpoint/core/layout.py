"""The storage layout: pointer names, step folders, and validation of names and steps.

The layout is shared with verl and Trinity-RFT readers: two pointer files holding a decimal step,
and one ``global_step_<N>`` folder per step. commitpoint's own bookkeeping lives in one hidden
folder (``.commitpoint``) under the root and in hidden manifest files inside step folders, so
existing tools never see it.
"""

from __future__ import annotations

import enum
import math
import re

from commitpoint.errors import (
    CorruptCheckpoint,
    InvalidArgument,
    InvalidName,
    InvalidStep,
    safe_repr,
)

STATE_DICT_POINTER = "latest_state_dict_iteration.txt"
CHECKPOINT_POINTER = "latest_checkpointed_iteration.txt"
META_DIR = ".commitpoint"
WRITER_EPOCH = f"{META_DIR}/writer_epoch"
REWIND_HISTORY = f"{META_DIR}/rewind_history.jsonl"
TEMP_MARKER = ".commitpoint-tmp-"
"""Part of the name of a file still being written (renamed to its final name when durable)."""
OWNED_DIR = f"{META_DIR}/steps"
"""One empty marker per step folder commitpoint writes into (see :func:`owner_marker`)."""
MAX_STEP = 2**63 - 1
"""The largest step accepted (a signed 64-bit int, as every trainer counts steps)."""
POINTER_LIMIT = 4096
"""Bytes a pointer (or the writer epoch) may hold; anything bigger is not one."""
MANIFEST_LIMIT = 64 * 1024 * 1024
"""Bytes a manifest may hold (some 300,000 files); a bigger one is refused unread."""
HISTORY_LIMIT = 16 * 1024 * 1024
"""Bytes the rewind history may hold (some 150,000 rewinds)."""
STEP_PREFIX = "global_step_"
_STEP_DIR_RE = re.compile(r"^global_step_(\d+)$")
_POINTER_RE = re.compile(rb"^\s*(\d+)\s*$")


class Kind(str, enum.Enum):
    """What a commit makes visible: weights only, or everything needed to resume."""

    STATE_DICT = "state_dict"
    CHECKPOINT = "checkpoint"

    @property
    def pointer(self) -> str:
        return STATE_DICT_POINTER if self is Kind.STATE_DICT else CHECKPOINT_POINTER

    @property
    def manifest(self) -> str:
        return f".commitpoint-manifest.{self.value}.json"

    @classmethod
    def _missing_(cls, value: object) -> Kind:
        raise InvalidArgument(f"kind must be one of {[k.value for k in cls]}, got {value!r}")

    @classmethod
    def of(cls, is_state_dict: bool) -> Kind:
        return cls.STATE_DICT if is_state_dict else cls.CHECKPOINT


def check_step(step: object, what: str = "global_step") -> int:
    """Return ``step`` if it is a non-negative int (not a bool), else raise :class:`InvalidStep`."""
    if isinstance(step, bool) or not isinstance(step, int):
        raise InvalidStep(
            f"{what} must be a non-negative int, got {type(step).__name__} {safe_repr(step)}"
        )
    if step < 0:
        raise InvalidStep(f"{what} must be non-negative, got {safe_repr(step)}")
    if step > MAX_STEP:
        raise InvalidStep(f"{what} must be at most 2**63 - 1, got {safe_repr(step)}")
    return step


def check_seconds(value: object, what: str, *, allow_none: bool = True) -> float | None:
    """``value`` as seconds if it is a finite number >= 0 (or None when allowed), else
    :class:`InvalidArgument` (NaN would make every wait hang or every age check pass)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(
            f"{what} must be a finite number of seconds{' or None' if allow_none else ''}, "
            f"got {safe_repr(value)}"
        )
    if value < 0:
        raise InvalidArgument(f"{what} must be >= 0, got {value}")
    return float(value)


def check_name(name: object, what: str = "save name") -> str:
    """Return ``name`` if it is a non-empty str, else raise :class:`InvalidName`."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidName(f"{what} must be a non-empty str, got {safe_repr(name)}")
    return name


def safe_relpath(path: object) -> str:
    """Normalise a path relative to the checkpoint root, refusing any way out of it.

    Absolute paths, ``..`` components, empty components, backslashes, NUL bytes and URL schemes
    raise :class:`InvalidName`; the result uses ``/`` separators and no leading or trailing slash.
    """
    if not isinstance(path, str) or not path:
        raise InvalidName(f"relative path must be a non-empty str, got {path!r}")
    if "\x00" in path or "\\" in path or "://" in path:
        raise InvalidName(f"relative path {path!r} contains a forbidden character sequence")
    if path.startswith("/"):
        raise InvalidName(f"relative path {path!r} is absolute")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        raise InvalidName(f"relative path {path!r} names the root itself")
    if any(p == ".." for p in parts):
        raise InvalidName(f"relative path {path!r} would escape the checkpoint root")
    return "/".join(parts)


def owner_marker(step: int) -> str:
    """The marker written before commitpoint's first file in ``step``'s folder: a step folder
    without it and without a manifest holds another tool's data (verl's own checkpoints, say),
    which retention never deletes unless asked."""
    return f"{OWNED_DIR}/{step_dir(step)}"


def is_temporary(relpath: str) -> bool:
    """True for a file commitpoint is still writing (or one a crash left behind)."""
    return TEMP_MARKER in relpath.rsplit("/", 1)[-1]


def step_dir(step: int) -> str:
    """Folder (relative to the root) that holds the files of ``step``."""
    return f"{STEP_PREFIX}{check_step(step)}"


def parse_step_dir(name: str) -> int | None:
    """The step a ``global_step_<N>`` folder name stands for, or None for any other name."""
    match = _STEP_DIR_RE.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def step_of_path(relpath: str) -> int | None:
    """The step whose folder contains ``relpath`` (relative to the root), if any."""
    head = relpath.split("/", 1)[0]
    return parse_step_dir(head)


def encode_pointer(step: int) -> bytes:
    return f"{check_step(step)}\n".encode("ascii")


def decode_pointer(data: bytes, path: str) -> int:
    """Parse a pointer file's bytes; anything but ASCII digits (and whitespace) is corrupt."""
    match = _POINTER_RE.match(data) if len(data) <= POINTER_LIMIT else None
    if match is None or len(match.group(1)) > len(str(MAX_STEP)) or int(match.group(1)) > MAX_STEP:
        shown = data[:32]
        raise CorruptCheckpoint(path, f"pointer content {shown!r} is not a decimal step")
    return int(match.group(1))
