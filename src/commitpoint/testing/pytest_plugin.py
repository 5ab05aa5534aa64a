"""pytest fixtures for checkpoint roots, loaded automatically when commitpoint is installed.

- ``local_checkpoint_root``, ``memory_checkpoint_root``: a fresh folder / in-memory root.
- ``s3_checkpoint_root``: a fresh bucket on a moto S3 server (needs ``./backends/s3[testing]``).
- ``gcs_checkpoint_root``: a fresh bucket on fake-gcs-server (needs ``./backends/gcs[testing]``).
- ``checkpoint_root``: parametrised over local, S3 and GCS; a backend whose packages are not
  installed is skipped with the reason shown.
- ``any_checkpoint_root``: the same plus the in-memory root (for fast checks of logic).
Servers start on first use, are shared by the whole session, and are stopped when it ends.

Set ``COMMITPOINT_TESTING_REQUIRE=s3,gcs`` (as commitpoint's own CI does) to turn a skip for a
missing backend into a failure, so a broken install cannot pass as "skipped".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

from commitpoint.testing import (
    CheckpointRoot,
    MissingTestDependency,
    local_root,
    memory_root,
    shutdown_servers,
)


@contextlib.contextmanager
def _s3_root() -> Iterator[CheckpointRoot]:
    from commitpoint.testing.s3 import s3_root

    with s3_root() as root:
        yield root


@contextlib.contextmanager
def _gcs_root() -> Iterator[CheckpointRoot]:
    from commitpoint.testing.gcs import gcs_root

    with gcs_root() as root:
        yield root


@contextlib.contextmanager
def _root(kind: str, tmp_path: Any) -> Iterator[CheckpointRoot]:
    """Enter the root of ``kind``; a missing optional dependency skips (or fails, if required)."""
    if kind == "local":
        manager: Any = local_root(str(tmp_path))
    elif kind == "memory":
        manager = memory_root()
    else:
        manager = _s3_root() if kind == "s3" else _gcs_root()
    with contextlib.ExitStack() as stack:
        try:
            root = stack.enter_context(manager)
        except (MissingTestDependency, ModuleNotFoundError) as exc:
            required = os.environ.get("COMMITPOINT_TESTING_REQUIRE", "").replace(" ", "").split(",")
            if kind in required:
                pytest.fail(f"{kind} checkpoint root required but unavailable: {exc}")
            pytest.skip(f"{kind} checkpoint root unavailable: {exc}")
        yield root


@pytest.fixture(scope="session", autouse=True)
def _commitpoint_stop_servers() -> Iterator[None]:
    yield
    shutdown_servers()


@pytest.fixture
def local_checkpoint_root(tmp_path: Any) -> Iterator[CheckpointRoot]:
    with _root("local", tmp_path) as root:
        yield root


@pytest.fixture
def memory_checkpoint_root(tmp_path: Any) -> Iterator[CheckpointRoot]:
    with _root("memory", tmp_path) as root:
        yield root


@pytest.fixture
def s3_checkpoint_root(tmp_path: Any) -> Iterator[CheckpointRoot]:
    with _root("s3", tmp_path) as root:
        yield root


@pytest.fixture
def gcs_checkpoint_root(tmp_path: Any) -> Iterator[CheckpointRoot]:
    with _root("gcs", tmp_path) as root:
        yield root


@pytest.fixture(params=["local", "s3", "gcs"])
def checkpoint_root(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[CheckpointRoot]:
    with _root(request.param, tmp_path) as root:
        yield root


@pytest.fixture(params=["memory", "local", "s3", "gcs"])
def any_checkpoint_root(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[CheckpointRoot]:
    with _root(request.param, tmp_path) as root:
        yield root
