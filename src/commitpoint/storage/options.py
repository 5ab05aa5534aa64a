"""Validated backend options: parsed once when a backend opens, unknown names refused.

A backend's own options (sizes, retries, timeouts) become a frozen dataclass; every other option
must be one its filesystem accepts, so a misspelt option raises
:class:`~commitpoint.errors.InvalidArgument` instead of being ignored. :class:`Timeouts` is what
the object stores share: how long to wait for a connection, for an answer, and for one whole
operation with its retries.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from commitpoint.errors import InvalidArgument

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_DEADLINE = 120.0

FSSPEC_OPTIONS = frozenset(
    {
        "use_listings_cache",
        "listings_expiry_time",
        "max_paths",
        "skip_instance_cache",
        "asynchronous",
        "loop",
        "batch_size",
    }
)
"""Options every fsspec filesystem takes (through ``AbstractFileSystem``'s keywords)."""


def integer(backend: str, name: str, value: object, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (digits in a str are accepted)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgument(f"{backend} option {name} must be an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise InvalidArgument(
            f"{backend} option {name} must be an integer, got {value!r}"
        ) from None
    if number < low or (high is not None and number > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise InvalidArgument(f"{backend} option {name} must be {bounds}, got {number}")
    return number


def seconds(backend: str, name: str, value: object) -> float:
    """``value`` as a finite number of seconds > 0 (a numeric str is accepted)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidArgument(f"{backend} option {name} must be a number of seconds, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise InvalidArgument(
            f"{backend} option {name} must be a number of seconds, got {value!r}"
        ) from None
    if not math.isfinite(number) or number <= 0:
        raise InvalidArgument(f"{backend} option {name} must be > 0 seconds, got {value!r}")
    return number


@dataclass(frozen=True)
class Timeouts:
    """How long an object store may take (seconds).

    ``connect``: to open a connection; ``read``: to send the next bytes of an answer (one
    attempt fails when either passes, and is retried); ``deadline``: one whole operation, every
    retry included, plus one second per MiB of body it carries: past it the operation fails with
    :class:`~commitpoint.errors.StorageError`.
    """

    connect: float = DEFAULT_CONNECT_TIMEOUT
    read: float = DEFAULT_READ_TIMEOUT
    deadline: float = DEFAULT_DEADLINE

    OPTION_NAMES = ("connect_timeout", "read_timeout", "deadline")

    @classmethod
    def parse(cls, backend: str, options: dict[str, Any]) -> Timeouts:
        """Take the timeout options out of ``options`` (defaults for those not given)."""
        defaults = cls()
        return cls(
            connect=seconds(
                backend, "connect_timeout", options.pop("connect_timeout", defaults.connect)
            ),
            read=seconds(backend, "read_timeout", options.pop("read_timeout", defaults.read)),
            deadline=seconds(backend, "deadline", options.pop("deadline", defaults.deadline)),
        )


def accepted_names(cls: type) -> set[str]:
    """The keyword parameters of ``cls``'s constructors, its bases' included (the options a
    filesystem class accepts by name)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        for parameter in inspect.signature(init).parameters.values():
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                names.add(parameter.name)
    names.discard("self")
    return names


def refuse_unknown(
    backend: str, options: Mapping[str, Any], known: Iterable[str], own: Iterable[str]
) -> None:
    """Raise :class:`InvalidArgument` naming every option in ``options`` not in ``known``."""
    allowed = set(known) | FSSPEC_OPTIONS
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InvalidArgument(
            f"unknown {backend} options {unknown}; commitpoint's own: {sorted(own)}, and the "
            "filesystem's keyword arguments"
        )
