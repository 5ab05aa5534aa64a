"""Checksums: every install verifies every checkpoint, whatever CRC32C implementation it has."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from commitpoint import CheckpointCoordinator
from commitpoint.core.checksum import (
    DEFAULT_ALGORITHM,
    Checksum,
    available_algorithms,
    checksum_stream,
    crc32c_python,
)
from commitpoint.testing import CheckpointRoot, commit_step


def test_pure_python_crc32c_matches_the_standard_check_value() -> None:
    assert crc32c_python(0, b"123456789") == 0xE3069283
    assert crc32c_python(0, b"") == 0


@pytest.mark.parametrize("size", [1, 255, 4096, 100_003])
def test_pure_python_crc32c_matches_the_compiled_one_incrementally(size: int) -> None:
    data = os.urandom(size)
    compiled = Checksum("crc32c")
    compiled.update(memoryview(data))
    value = 0
    for start in range(0, size, 999):  # uneven pieces, as streams arrive
        value = crc32c_python(value, bytearray(data[start : start + 999]))
    assert f"{value:08x}" == compiled.hexdigest()


def test_both_algorithms_are_always_available_and_new_files_use_crc32c() -> None:
    assert set(available_algorithms()) == {"crc32", "crc32c"}
    assert DEFAULT_ALGORITHM == "crc32c"  # the crc32c package is a core dependency


def test_unknown_algorithm_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'md5' is not known.*crc32c"):
        Checksum("md5")


_WITHOUT_COMPILED_CRC32C = """
import sys
sys.modules["crc32c"] = None          # as on a platform with no wheel for it
sys.modules["google_crc32c"] = None
from commitpoint.core.checksum import CRC32C_IMPLEMENTATION, DEFAULT_ALGORITHM
from commitpoint import CheckpointReader
from commitpoint.cli import main
print(CRC32C_IMPLEMENTATION, DEFAULT_ALGORITHM)
report = CheckpointReader(sys.argv[1]).verify(1)
print("verify", report.ok, report.files)
print("ls exit", main(["ls", sys.argv[1]]))
print("verify exit", main(["verify", sys.argv[1]]))
"""


def test_a_checkpoint_written_with_crc32c_verifies_without_any_crc32c_package(
    local_checkpoint_root: CheckpointRoot,
) -> None:
    root = local_checkpoint_root
    commit_step(CheckpointCoordinator(root.monitor()), 1)
    assert {f.algorithm for f in root.manifest(1).files} == {"crc32c"}

    script = textwrap.dedent(_WITHOUT_COMPILED_CRC32C)
    done = subprocess.run(
        [sys.executable, "-c", script, root.url], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "pure Python (slow) crc32"
    assert "verify True 1" in lines
    assert "ls exit 0" in lines and "verify exit 0" in lines


def test_checksum_stream_reads_to_the_end(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"123456789")
    with path.open("rb") as stream:
        assert checksum_stream(stream, "crc32c") == (9, "e3069283")
