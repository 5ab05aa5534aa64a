"""The local backend's pipelined direct-I/O writer: exact bytes, any size, failures discarded."""

from __future__ import annotations

import os
import tempfile
import time
import zlib
from typing import Any

import pytest

from commitpoint import open_storage
from commitpoint.core.checksum import Checksum
from commitpoint.storage.direct_io import ALIGNMENT, BUFFER_SIZE, DirectFile


def _payload(size: int) -> bytes:
    block = os.urandom(1 << 20)
    return (block * (size // len(block) + 1))[:size]


SIZES = [0, 1, ALIGNMENT, BUFFER_SIZE - 1, BUFFER_SIZE, 3 * BUFFER_SIZE + 12345]


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("size", SIZES)
def test_bytes_arrive_exactly(tmp_path: Any, size: int, direct: bool) -> None:
    data = _payload(size)
    path = str(tmp_path / "f.bin")
    f = DirectFile(path, direct=direct)
    # uneven chunks, crossing buffer boundaries in every way
    view, step = memoryview(data), 7 * 1024 * 1024 + 3
    for start in range(0, size, step):
        f.write(view[start : start + step])
    f.close()
    with open(path, "rb") as check:
        assert zlib.crc32(check.read()) == zlib.crc32(data)
    assert os.path.getsize(path) == size


def test_backend_records_checksum_of_a_multi_buffer_file(tmp_path: Any) -> None:
    storage = open_storage(str(tmp_path))
    data = _payload(2 * BUFFER_SIZE + 777)
    with storage.open_write("global_step_1/big.bin") as writer:
        writer.write(data)
    assert writer.record is not None and writer.record.size == len(data)
    assert writer.record.checksum == _checksum(data)
    assert storage.read_bytes("global_step_1/big.bin") == data


def _checksum(data: bytes) -> str:
    checksum = Checksum()
    checksum.update(data)
    return checksum.hexdigest()


def test_queued_buffers_go_down_together_and_in_order(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk slower than the caller lets full buffers queue up; they are written with one
    pwritev each time, and a pwritev that stops part-way through a buffer is continued."""
    calls: list[int] = []
    real_pwritev = os.pwritev

    def slow_and_short(fd: int, views: list[memoryview], offset: int) -> int:
        calls.append(len(views))
        time.sleep(0.005)
        # write at most 1.5 buffers, so batches end part-way through a buffer
        allowed = BUFFER_SIZE + BUFFER_SIZE // 2 + 3
        kept: list[memoryview] = []
        for view in views:
            if allowed <= 0:
                break
            kept.append(view[:allowed])
            allowed -= len(kept[-1])
        return real_pwritev(fd, kept, offset)

    monkeypatch.setattr(os, "pwritev", slow_and_short)
    data = _payload(16 * BUFFER_SIZE + 99)
    path = str(tmp_path / "f.bin")
    f = DirectFile(path, direct=False, checksum=Checksum())
    f.write(data)
    f.close()
    with open(path, "rb") as check:
        assert check.read() == data
    assert f.checksum is not None and f.checksum.hexdigest() == _checksum(data)
    assert max(calls) > 1  # buffers did queue up and went down together


def test_failed_write_removes_the_partial_file(tmp_path: Any) -> None:
    storage = open_storage(str(tmp_path))
    with pytest.raises(RuntimeError), storage.open_write("global_step_1/big.bin") as writer:
        writer.write(_payload(2 * BUFFER_SIZE))
        raise RuntimeError("serialisation failed half way")
    assert not storage.exists("global_step_1/big.bin")


def test_filesystem_without_o_direct_falls_back(tmp_path: Any) -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no tmpfs at /dev/shm on this machine")
    folder = tempfile.mkdtemp(dir="/dev/shm")
    try:
        data = _payload(BUFFER_SIZE + 5)
        path = os.path.join(folder, "f.bin")
        f = DirectFile(path)
        f.write(data)
        f.close()
        with open(path, "rb") as check:
            assert check.read() == data
    finally:
        import shutil

        shutil.rmtree(folder)


def test_direct_io_option_survives_pickling(tmp_path: Any) -> None:
    import pickle

    storage = open_storage(str(tmp_path), direct_io="false")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.storage_options == {"direct_io": False}
