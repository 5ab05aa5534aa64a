"""Backend conformance: every built-in backend passes the suite outside backends run too.

The tests are :class:`commitpoint.testing.conformance.BackendConformance`; this module runs them
on memory, local, and (when their packages are installed) S3 on moto and GCS on fake-gcs-server,
through the testing kit's roots.
"""

from __future__ import annotations

import pytest

from commitpoint.testing import CheckpointRoot
from commitpoint.testing.conformance import BackendConformance


class TestBuiltinBackends(BackendConformance):
    @pytest.fixture
    def conformance_root(self, any_checkpoint_root: CheckpointRoot) -> CheckpointRoot:
        return any_checkpoint_root
