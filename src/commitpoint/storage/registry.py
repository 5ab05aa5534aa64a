"""Find the storage backend for a URL by its scheme, through the ``commitpoint.backends`` group.

The core registers ``file`` and ``memory``; plug-in distributions (``commitpoint-s3``,
``commitpoint-gcs``, or anyone's) register their schemes the same way. The core never imports a
plug-in by name. :func:`register_backend` adds a scheme at run time (tests).

Wrappers (fault injection today, anything that sits over another backend) plug in the same way:
a storage option named after a wrapper, registered in the ``commitpoint.wrappers`` group or by
:func:`register_wrapper`, is taken out of the options and wraps the opened backend
(``wrapper(storage, value)``). The core knows no wrapper by name.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from commitpoint.errors import (
    BackendNotFound,
    CommitpointError,
    InvalidArgument,
    StorageError,
    describe_exception,
    safe_repr,
)
from commitpoint.storage.protocol import StorageBackend

ENTRY_POINT_GROUP = "commitpoint.backends"
WRAPPER_GROUP = "commitpoint.wrappers"
BackendFactory = Callable[..., StorageBackend]
WrapperFactory = Callable[[StorageBackend, Any], StorageBackend]

_S3_HINT = (
    "install the commitpoint-s3 plug-in from commitpoint's repository: `pip install ./backends/s3` "
    "(or its wheel, built by `./run wheels`)"
)
_GCS_HINT = (
    "install the commitpoint-gcs plug-in from commitpoint's repository: "
    "`pip install ./backends/gcs` (or its wheel, built by `./run wheels`)"
)
_INSTALL_HINTS = {"s3": _S3_HINT, "s3a": _S3_HINT, "gs": _GCS_HINT, "gcs": _GCS_HINT}
_registered: dict[str, BackendFactory] = {}
_wrappers: dict[str, WrapperFactory] = {}
_lock = threading.Lock()


_SCHEME_WITHOUT_SLASHES = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(?!//)")


def _check_url_form(url: str) -> None:
    """Refuse ``s3:/bucket`` and the like: a known scheme without ``//`` would otherwise be a
    local folder named ``s3:`` in the working directory."""
    match = _SCHEME_WITHOUT_SLASHES.match(url)
    if match is None:
        return
    scheme = match.group(1).lower()
    if scheme in _INSTALL_HINTS or scheme in available_schemes():
        raise InvalidArgument(
            f"storage URL {safe_repr(url.split('@')[-1])} names scheme {scheme!r} without "
            f"'//'; write {scheme}://..."
        )


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased; ``file`` for a plain path."""
    scheme, sep, _ = url.partition("://")
    return scheme.lower() if sep else "file"


def register_backend(scheme: str, factory: BackendFactory) -> None:
    """Register ``factory(url, **storage_options)`` for ``scheme`` in this process."""
    with _lock:
        _registered[scheme.lower()] = factory


def register_wrapper(option: str, factory: WrapperFactory) -> None:
    """Have ``open_storage(url, <option>=value)`` return ``factory(backend, value)``."""
    with _lock:
        _wrappers[option] = factory


def _wrapper_names() -> set[str]:
    with _lock:
        names = set(_wrappers)
    return names | {ep.name for ep in entry_points(group=WRAPPER_GROUP)}


def _wrapper(option: str) -> WrapperFactory:
    with _lock:
        if option in _wrappers:
            return _wrappers[option]
    for ep in entry_points(group=WRAPPER_GROUP):
        if ep.name == option:
            factory: WrapperFactory = ep.load()
            register_wrapper(option, factory)
            return factory
    raise LookupError(option)  # pragma: no cover - only called with known names


def _lookup(scheme: str) -> BackendFactory:
    with _lock:
        if scheme in _registered:
            return _registered[scheme]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name.lower() == scheme:
            factory: BackendFactory = ep.load()
            register_backend(scheme, factory)
            return factory
    raise BackendNotFound(scheme, _INSTALL_HINTS.get(scheme, "no installed package registers it"))


def available_schemes() -> list[str]:
    """Every scheme that can be opened here (entry points and run-time registrations)."""
    names = {ep.name.lower() for ep in entry_points(group=ENTRY_POINT_GROUP)}
    with _lock:
        names.update(_registered)
    return sorted(names)


def open_storage(url: str, **storage_options: Any) -> StorageBackend:
    """Open the checkpoint root at ``url`` with the backend registered for its scheme.

    Options named after a registered wrapper (see the module docstring; the testing kit's
    ``faults``) wrap the backend instead of reaching it.
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidArgument(f"storage URL must be a non-empty str, got {safe_repr(url)}")
    _check_url_form(url)
    wanted = sorted(_wrapper_names() & set(storage_options))
    wrapping = [(name, storage_options.pop(name)) for name in wanted]
    factory = _lookup(scheme_of(url))
    try:
        storage = factory(url, **storage_options)
    except CommitpointError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        # an option of the wrong type, found by the store's own client: still a typed error
        raise InvalidArgument(
            f"cannot open {scheme_of(url)} storage with these options: {describe_exception(exc)}"
        ) from exc
    except Exception as exc:
        raise StorageError("open", scheme_of(url) + " storage", describe_exception(exc)) from exc
    for name, value in wrapping:
        if value is not None:
            storage = _wrapper(name)(storage, value)
    return storage
