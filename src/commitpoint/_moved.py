"""Old module paths keep importing: ``commitpoint.reader`` is ``commitpoint.read.reader``, etc.

The modules moved into packages (see docs/architecture.md, "Code map"). Code written against the
old paths, including ``unittest.mock.patch("commitpoint.reader....")``, gets the very same module
object under the old name, with a :class:`DeprecationWarning`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {
    "commitpoint.checksum": "commitpoint.core.checksum",
    "commitpoint.layout": "commitpoint.core.layout",
    "commitpoint.lease": "commitpoint.core.lease",
    "commitpoint.manifest": "commitpoint.core.manifest",
    "commitpoint.pointer": "commitpoint.core.pointer",
    "commitpoint.coordinator": "commitpoint.save.coordinator",
    "commitpoint.staging": "commitpoint.save.staging",
    "commitpoint.torch_io": "commitpoint.save.torch_io",
    "commitpoint.monitor_client": "commitpoint.monitor.transport",
    "commitpoint.strategy": "commitpoint.monitor.slots",
    "commitpoint.reader": "commitpoint.read.reader",
    "commitpoint.verify": "commitpoint.read.verify",
    "commitpoint.watch": "commitpoint.read.watch",
    "commitpoint.retention": "commitpoint.maintenance.retention",
    "commitpoint.rewind": "commitpoint.maintenance.rewind",
    "commitpoint.demo": "commitpoint.cli.demo",
    "commitpoint.storage.upload_pieces": "commitpoint.storage.upload.pieces",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self._target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self._target}; import it from there (or from commitpoint)",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(self._target)

    def exec_module(self, module: ModuleType) -> None:
        """The target module is already executed."""


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
