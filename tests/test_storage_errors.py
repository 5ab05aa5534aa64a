"""Disk full, permission denied and read-only storage on real filesystems: each gives a clear
StorageError, no step is committed by the failure, and earlier commits stay intact and loadable.

Disk full and read-only use a small tmpfs mounted for the test (root with CAP_SYS_ADMIN, as on
CI); permission denied runs the writer as an unprivileged user (or chmods when not root)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from commitpoint import CheckpointCoordinator, CheckpointMonitor, SaveFailed, StorageError
from commitpoint import save_torch as save_tensor
from commitpoint.storage.registry import open_storage
from commitpoint.testing import CheckpointRoot

NOBODY = 65534


@contextlib.contextmanager
def _tmpfs(size: str) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="commitpoint-tmpfs-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        folder.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        folder.rmdir()


def _commit(coordinator: CheckpointCoordinator, step: int, numel: int = 1024) -> None:
    def save() -> None:
        save_tensor(coordinator.storage, f"global_step_{step}/model.pt", {"w": torch.ones(numel)})

    coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)
    coordinator.save_async("model", save, step, is_state_dict=True)
    coordinator.wait_all()


def _intact(root: CheckpointRoot, step: int) -> None:
    assert root.committed_steps()["state_dict"] == step
    assert root.verify(step).ok
    assert root.reader().load(step, "model.pt")["w"].sum().item() == 1024


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".commitpoint-tmp-" in p.name)


def test_disk_full_fails_the_save_and_keeps_earlier_commits() -> None:
    with _tmpfs("4m") as folder:
        root = CheckpointRoot(str(folder / "ckpt"))
        coordinator = CheckpointCoordinator(CheckpointMonitor(root.url))
        _commit(coordinator, 1)

        # a save bigger than the disk
        with pytest.raises(SaveFailed) as caught:
            _commit(coordinator, 2, numel=4 * 1024 * 1024)
        assert isinstance(caught.value.cause, StorageError)
        assert "no space left on device" in str(caught.value.cause)
        assert "global_step_2/model.pt" in str(caught.value.cause)
        _intact(root, 1)
        assert _leftovers(folder) == []  # the partial file was removed, space given back

        # a disk filled to the last byte: even a small save (and its commit) fails cleanly
        filler = folder / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
        with pytest.raises(SaveFailed, match="no space left on device"):
            _commit(coordinator, 3)
        _intact(root, 1)

        # space comes back: training goes on
        filler.unlink()
        _commit(coordinator, 4)
        assert root.committed_steps()["state_dict"] == 4
        assert root.verify(4).ok


def test_read_only_storage_refuses_writes_and_still_serves_reads() -> None:
    with _tmpfs("8m") as folder:
        root = CheckpointRoot(str(folder / "ckpt"))
        coordinator = CheckpointCoordinator(CheckpointMonitor(root.url))
        _commit(coordinator, 1)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        try:
            with pytest.raises(SaveFailed) as caught:
                _commit(coordinator, 2)
            assert "read-only file system" in str(caught.value.cause)
            with pytest.raises(StorageError, match="read-only file system"):
                CheckpointMonitor(root.url)  # a new job cannot take the writer lease
            _intact(root, 1)  # readers are unaffected
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(folder)], check=True)
        _commit(coordinator, 3)
        assert root.committed_steps()["state_dict"] == 3


def _attempts_as_unprivileged_user(url: str) -> str:
    """Try to take the lease and write a file as a user with no write permission on the root:
    a forked child drops to ``nobody`` (when run as root) or the folder is made read-only."""
    lines: list[str] = []

    def attempt() -> None:
        try:
            CheckpointMonitor(url)
        except StorageError as exc:
            lines.append(f"MONITOR {exc}")
        try:
            open_storage(url).write_bytes("global_step_2/model.pt", b"x")
        except StorageError as exc:
            lines.append(f"WRITE {exc}")

    if os.geteuid() != 0:
        Path(url).chmod(0o555)
        attempt()
        return "\n".join(lines)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges for good, try, report, exit at once
        try:
            os.close(read)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            attempt()
            os.write(write, "\n".join(lines).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        out = pipe.read()
    os.waitpid(pid, 0)
    return out


def test_permission_denied_is_clear_and_changes_nothing() -> None:
    parent = Path(tempfile.mkdtemp(prefix="commitpoint-perm-"))
    try:
        parent.chmod(0o755)
        root = CheckpointRoot(str(parent / "ckpt"))
        coordinator = CheckpointCoordinator(CheckpointMonitor(root.url))
        _commit(coordinator, 1)
        before = sorted(str(p) for p in parent.rglob("*"))
        out = _attempts_as_unprivileged_user(root.url)
        assert "MONITOR" in out and "WRITE" in out, out
        assert out.count("permission denied") == 2, out
        assert "global_step_2/model.pt" in out
        assert sorted(str(p) for p in parent.rglob("*")) == before
        (parent / "ckpt").chmod(0o755)
        _intact(root, 1)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
