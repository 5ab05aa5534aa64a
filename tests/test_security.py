"""Security: loads never run code from a checkpoint, names never leave the root, and credentials
never appear in commitpoint's logs, errors or reprs."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from commitpoint import CheckpointCoordinator, CheckpointMonitor, CheckpointReader, InvalidName
from commitpoint.errors import CommitpointError
from commitpoint.storage.registry import open_storage
from commitpoint.testing import CheckpointRoot

KEY_ID = "AKIACOMMITPOINTKEYID7"
SECRET = "commitpoint+Secret/Value+0123456789"
SESSION_TOKEN = "commitpointSessionTokenQWERTY"


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_loading_never_runs_code_from_a_checkpoint(
    local_checkpoint_root: CheckpointRoot, tmp_path: Path
) -> None:
    root = local_checkpoint_root
    marker = tmp_path / "pwned"
    coordinator = CheckpointCoordinator(root.monitor())

    def save() -> None:
        with coordinator.storage.open_write("global_step_1/model.pt") as writer:
            torch.save({"w": torch.ones(2), "evil": _Payload(str(marker))}, writer)

    coordinator.save_async("model", save, 1, is_state_dict=True)
    coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=1)
    coordinator.wait_all()
    assert root.verify(1).ok  # a validly committed file, just a hostile one
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        root.reader().load(1, "model.pt")
    assert not marker.exists()


@pytest.mark.parametrize(
    "relpath", ["../outside.pt", "global_step_1/../../outside.pt", "/tmp/outside.pt", "..", "."]
)
def test_no_name_leaves_the_root(local_checkpoint_root: CheckpointRoot, relpath: str) -> None:
    storage = local_checkpoint_root.open()
    parent = Path(storage.root).parent
    before = sorted(os.listdir(parent))
    with pytest.raises(InvalidName):
        storage.write_bytes(relpath, b"x")
    with pytest.raises(InvalidName):
        storage.read_bytes(relpath)
    with pytest.raises(InvalidName):
        storage.delete(relpath, recursive=True)
    assert sorted(os.listdir(parent)) == before


def _secret_free(text: str) -> bool:
    return not any(s in text for s in (KEY_ID, SECRET, SESSION_TOKEN))


def test_s3_credentials_never_reach_logs_errors_or_reprs(
    s3_checkpoint_root: CheckpointRoot, caplog: pytest.LogCaptureFixture
) -> None:
    """moto accepts any credentials, so distinctive ones travel over real HTTP here."""
    base = s3_checkpoint_root
    options = {**base.storage_options, "key": KEY_ID, "secret": SECRET, "token": SESSION_TOKEN}
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG, logger="commitpoint"):
        monitor = CheckpointMonitor(base.url, options)
        coordinator = CheckpointCoordinator(monitor)
        reader = CheckpointReader(base.url, **options)
        coordinator.save_async(
            "model",
            lambda: coordinator.storage.write_bytes("global_step_1/a.bin", b"abc"),
            1,
            is_state_dict=True,
        )
        coordinator.register_and_monitor_sync(1, True, state_dict_thread_count=1)
        coordinator.wait_all()
        assert reader.verify(1).ok
        seen += [repr(monitor.storage), repr(coordinator.storage), repr(reader.storage)]
        seen += [monitor.storage.url, str(CheckpointRoot(base.url, options, "s3"))]
        failing: list[Any] = [
            lambda: CheckpointMonitor("s3://commitpoint-missing-bucket/x", options),
            lambda: open_storage(f"s3://{KEY_ID}:{SECRET}@bucket/x", **options).read_bytes("a"),
            lambda: reader.load(1, "missing.pt"),
            lambda: open_storage(
                base.url, **{**options, "endpoint_url": "http://127.0.0.1:9", "retries": 1}
            ).read_pointer("latest_state_dict_iteration.txt"),
        ]
        for call in failing:
            with pytest.raises((CommitpointError, OSError)) as caught:
                call()
            seen += [str(caught.value), repr(caught.value)]
    seen += [record.getMessage() for record in caplog.records]
    assert len(seen) > 10
    leaked = [text for text in seen if not _secret_free(text)]
    assert leaked == []


URL_KEY_ID = "AKIAURLONLYKEYID00042"
URL_SECRET = "urlOnly/Secret+With/Slashes+0123456789"
LOGGED_KEY_ID = "AKIALOGGEDKEYID000077"


def test_a_secret_with_slashes_inside_the_url_is_redacted_everywhere(
    s3_checkpoint_root: CheckpointRoot,
) -> None:
    import io
    import json

    from commitpoint.cli.commands import main

    url = f"s3://{URL_KEY_ID}:{URL_SECRET}@commitpoint-no-such-bucket/run"
    options = dict(s3_checkpoint_root.storage_options)
    storage = open_storage(url, **options)
    seen = [repr(storage), storage.url, storage.url_for("x")]
    with pytest.raises((CommitpointError, OSError)) as caught:
        storage.read_pointer("latest_state_dict_iteration.txt")
    seen += [str(caught.value), repr(caught.value)]
    args = [
        f"--option={k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in options.items()
    ]
    for extra in (["--json"], ["--json", "--debug"]):
        out, err = io.StringIO(), io.StringIO()
        assert main(["latest", url, *args, *extra], stdout=out, stderr=err) != 0
        seen += [out.getvalue(), err.getvalue()]
    assert "***" in seen[0]
    leaked = [t for t in seen if URL_SECRET in t or URL_KEY_ID in t or "Slashes" in t]
    assert leaked == []


def test_the_access_key_id_never_reaches_debug_logs_of_the_http_libraries(
    s3_checkpoint_root: CheckpointRoot, caplog: pytest.LogCaptureFixture
) -> None:
    options = {**s3_checkpoint_root.storage_options, "key": LOGGED_KEY_ID, "secret": SECRET}
    with caplog.at_level(logging.DEBUG):
        storage = open_storage(s3_checkpoint_root.url, **options)
        storage.write_bytes("global_step_1/a.bin", b"abc", track=False)
        storage.read_pointer("latest_state_dict_iteration.txt")
    botocore = [r for r in caplog.records if r.name.startswith(("botocore", "aiobotocore"))]
    assert botocore, "botocore logged nothing at DEBUG: the test would prove nothing"
    assert any("Credential=***" in r.getMessage() for r in botocore)
    assert [r.name for r in caplog.records if LOGGED_KEY_ID in r.getMessage()] == []
