"""Save and load torch objects through a storage backend (torch is imported only when used).

Saves stream through the backend's tracked writer, so the manifest gets their checksums. Loads
use ``weights_only=True`` by default: a checkpoint can never run arbitrary code on the reader.
"""

from __future__ import annotations

from typing import Any

from commitpoint.layout import safe_relpath
from commitpoint.storage.protocol import StorageBackend


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("torch helpers need PyTorch: pip install 'commitpoint[torch]'") from exc
    return torch


def save_torch(storage: StorageBackend, relpath: str, obj: object) -> None:
    """``torch.save(obj)`` streamed to ``relpath`` under the storage root."""
    torch = _torch()
    with storage.open_write(safe_relpath(relpath)) as writer:
        try:
            torch.save(obj, writer)
        except Exception as exc:
            # torch's zip writer reports a failed write as its own RuntimeError; surface the
            # storage error that caused it (bucket, key and cause) instead.
            failure = getattr(writer, "failure", None)
            if isinstance(failure, Exception) and failure is not exc:
                raise failure from exc
            raise


def load_torch(
    storage: StorageBackend,
    relpath: str,
    *,
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> Any:
    """``torch.load`` of ``relpath`` (tensors, plain containers and numbers only by default)."""
    torch = _torch()
    with storage.open_read(safe_relpath(relpath)) as stream:
        return torch.load(stream, map_location=map_location, weights_only=weights_only)
