"""Find the storage backend for a URL by its scheme, through the ``commitpoint.backends`` group.

The core registers ``file`` and ``memory``; plug-in distributions (``commitpoint-s3``,
``commitpoint-gcs``, or anyone's) register their schemes the same way. The core never imports a
plug-in by name. :func:`register_backend` adds a scheme at run time (tests, wrappers).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from commitpoint.errors import BackendNotFound, InvalidArgument
from commitpoint.storage.protocol import StorageBackend

ENTRY_POINT_GROUP = "commitpoint.backends"
BackendFactory = Callable[..., StorageBackend]

_INSTALL_HINTS = {
    "s3": "install it with `pip install commitpoint-s3`",
    "s3a": "install it with `pip install commitpoint-s3`",
    "gs": "install it with `pip install commitpoint-gcs`",
    "gcs": "install it with `pip install commitpoint-gcs`",
}
_registered: dict[str, BackendFactory] = {}
_lock = threading.Lock()


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased; ``file`` for a plain path."""
    scheme, sep, _ = url.partition("://")
    return scheme.lower() if sep else "file"


def register_backend(scheme: str, factory: BackendFactory) -> None:
    """Register ``factory(url, **storage_options)`` for ``scheme`` in this process."""
    with _lock:
        _registered[scheme.lower()] = factory


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

    The option ``faults`` (a :class:`commitpoint.testing.faults.FaultPlan` or its dict) wraps the
    backend in a fault injector: for reliability tests, never for production roots.
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidArgument(f"storage URL must be a non-empty str, got {url!r}")
    faults = storage_options.pop("faults", None)
    storage = _lookup(scheme_of(url))(url, **storage_options)
    if faults is None:
        return storage
    from commitpoint.testing.faults import wrap_with_faults

    return wrap_with_faults(storage, faults)
