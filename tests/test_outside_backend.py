"""docs/writing-a-backend.md works as written: its package is built, installed, and passes the
conformance suite, found through its entry point like any outside backend."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from commitpoint.testing.conformance import BackendConformance

PAGE = Path(__file__).resolve().parent.parent / "docs" / "writing-a-backend.md"
_BLOCK = re.compile(r"^```(\w+) file=(\S+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _files() -> dict[str, str]:
    return {path: body for _, path, body in _BLOCK.findall(PAGE.read_text())}


def _suite_size() -> int:
    """How many tests BackendConformance holds, counting parametrised cases."""
    count = 0
    for name in dir(BackendConformance):
        if not name.startswith("test_"):
            continue
        marks = getattr(getattr(BackendConformance, name), "pytestmark", [])
        cases = [len(m.args[1]) for m in marks if m.name == "parametrize"]
        count += cases[0] if cases else 1
    return count


def test_the_page_holds_the_whole_package() -> None:
    assert sorted(_files()) == [
        "pyproject.toml",
        "src/commitpoint_dir/__init__.py",
        "src/commitpoint_dir/backend.py",
        "tests/test_conformance.py",
    ]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The page's package, written out and installed (a real wheel with its entry points) into a
    folder of its own; returns (package folder, install folder)."""
    base = tmp_path_factory.mktemp("outside")
    package = base / "commitpoint-dir"
    for relpath, body in _files().items():
        target = package / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)
    site = base / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(package)],
        check=True,
        capture_output=True,
        text=True,
        timeout=240,
    )
    return package, site


def _run(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_conformance_suite_runs_on_the_outside_backend(installed: tuple[Path, Path]) -> None:
    package, site = installed
    done = _run(site, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "-rA", cwd=package)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = re.findall(r"^PASSED (\S+)", done.stdout, re.MULTILINE)
    on_dir = [t for t in passed if "::TestDirBackend::" in t]
    assert len(on_dir) == _suite_size()  # every test of the suite, on dir:// and nothing else
    assert len(passed) == len(on_dir) + 1  # + the page's own commit test
    assert f"{len(passed)} passed" in done.stdout


def test_the_cli_finds_the_outside_scheme(installed: tuple[Path, Path], tmp_path: Path) -> None:
    _, site = installed
    script = (
        "import sys\n"
        "from commitpoint import CheckpointCoordinator, open_storage\n"
        "from commitpoint.cli import main\n"
        "from commitpoint.testing import CheckpointRoot, commit_step\n"
        "url = 'dir://' + sys.argv[1]\n"
        "print(type(open_storage(url)).__module__)\n"
        "commit_step(CheckpointCoordinator(CheckpointRoot(url).monitor()), 3)\n"
        "raise SystemExit(main(['verify', url]))\n"
    )
    done = _run(site, "-c", script, str(tmp_path / "root"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "commitpoint_dir.backend"
    assert "step 3 (state_dict): 1 files" in done.stdout
    assert (tmp_path / "root" / "latest_state_dict_iteration.txt").read_bytes() == b"3\n"
