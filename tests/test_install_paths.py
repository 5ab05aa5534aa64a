"""A new user's way in: the install commands the docs give exist, error messages name them, and
``./run`` shows its commands and runs the CLI where the user is."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from commitpoint import BackendNotFound, CheckpointCoordinator, open_storage
from commitpoint.testing import CheckpointRoot, commit_step

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _pip_installs() -> list[tuple[Path, str]]:
    """Every ``pip install`` argument that names a folder of this repository (``./...``)."""
    found = []
    for page in PAGES:
        for line in page.read_text().splitlines():
            if "pip install" not in line:
                continue
            command = line.split("pip install", 1)[1].split("#", 1)[0].strip().strip("`")
            for arg in shlex.split(command):
                if arg.startswith("./"):
                    found.append((page, arg))
    return found


def test_docs_install_only_what_the_repository_holds() -> None:
    installs = _pip_installs()
    assert len(installs) >= 6  # README, testing.md, the backend pages
    for page, arg in installs:
        folder, _, extras = arg.partition("[")
        if folder.startswith("./commitpoint-dir"):  # the package writing-a-backend.md builds
            continue
        pyproject = REPO / folder / "pyproject.toml"
        assert pyproject.exists(), f"{page.name}: {arg} is not a distribution of this repository"
        declared = tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {})
        for extra in filter(None, extras.rstrip("]").split(",")):
            assert extra in declared, f"{page.name}: {arg} names an extra {folder} does not have"


def test_no_page_or_message_names_a_registry_package_that_does_not_exist() -> None:
    pattern = re.compile(r"pip install '?(commitpoint(-s3|-gcs)?)\b(?!-dir)")
    sources = [*(REPO / "src").rglob("*.py"), *(REPO / "backends").rglob("*.py")]
    offenders = [
        f"{page.relative_to(REPO)}: {line.strip()}"
        for page in [*PAGES, *sources]
        for line in page.read_text().splitlines()
        if pattern.search(line)
    ]
    assert offenders == []


@pytest.mark.parametrize(("scheme", "folder"), [("s3", "backends/s3"), ("gs", "backends/gcs")])
def test_a_missing_plug_in_names_the_repository_folder(
    monkeypatch: pytest.MonkeyPatch, scheme: str, folder: str
) -> None:
    from commitpoint.storage import registry

    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    monkeypatch.setattr(registry, "_registered", {})
    with pytest.raises(BackendNotFound, match=f"pip install ./{folder}") as info:
        open_storage(f"{scheme}://bucket/run")
    assert "./run wheels" in str(info.value)
    assert (REPO / folder / "pyproject.toml").exists()


def _run(*args: str, cwd: Path, venv: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if venv is not None:
        env["COMMITPOINT_VENV"] = venv
    return subprocess.run(
        [str(REPO / "run"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_run_without_a_command_shows_its_commands(tmp_path: Path) -> None:
    done = _run(cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: ./run COMMAND")
    for verb in ("demo", "commitpoint", "test", "bench", "lint", "wheels", "python"):
        assert re.search(rf"^  {verb}\b", done.stdout, re.MULTILINE), verb
    assert "set -" not in done.stdout


def test_run_with_an_unknown_command_says_so(tmp_path: Path) -> None:
    done = _run("ls", cwd=tmp_path)
    assert done.returncode == 2
    assert "run: unknown command 'ls'" in done.stderr
    assert "usage: ./run COMMAND" in done.stderr


def _this_environment_is_up_to_date() -> bool:
    """True when ``./run`` would use this interpreter's environment without reinstalling."""
    inputs = [REPO / "pyproject.toml", REPO / "constraints.txt"]
    inputs += sorted(p for p in (REPO / "backends").glob("*/pyproject.toml"))
    want = hashlib.sha256(b"".join(p.read_bytes() for p in inputs)).hexdigest()
    stamp = Path(sys.prefix) / ".commitpoint-installed"
    return stamp.exists() and stamp.read_text().strip() == want


def test_run_commitpoint_runs_the_cli_in_the_callers_folder(tmp_path: Path) -> None:
    if not _this_environment_is_up_to_date():
        pytest.fail("the test environment was not installed by ./run from this checkout")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = CheckpointRoot(str(elsewhere / "ckpt"))
    commit_step(CheckpointCoordinator(root.monitor()), 2)
    done = _run(
        "commitpoint", "latest", "ckpt", "--kind", "state_dict", cwd=elsewhere, venv=sys.prefix
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "2\n"
    done = _run("cli", "verify", "ckpt", cwd=elsewhere, venv=sys.prefix)
    assert done.returncode == 0, done.stderr
    assert "step 2 (state_dict)" in done.stdout


def test_loading_without_torch_says_how_to_get_it(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from commitpoint import CheckpointReader\n"
        "try:\n"
        "    CheckpointReader(sys.argv[1]).load(1, 'model.pt', verify=False)\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert "`pip install torch`" in done.stdout, done.stdout + done.stderr
    assert "pip install './[torch]'" in done.stdout


def test_install_progress_shows_what_pip_does_and_logs_all_of_it(tmp_path: Path) -> None:
    pip_says = [
        "Obtaining file:///repo",
        *(f"Collecting package{i}>=1 (from commitpoint==0.1.0)" for i in range(30)),
        "  Downloading torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl (190.2 MB)",
        "  Downloading small-1.0-py3-none-any.whl (12 kB)",
        "Building wheels for collected packages: commitpoint, commitpoint-s3",
        "Installing collected packages: small, torch, ray",
        "Successfully installed ray-2.60.0 small-1.0 torch-2.13.0",
    ]
    log = tmp_path / "install.log"
    script = f'source <(sed -n "/^show_progress() {{/,/^}}/p" {REPO / "run"}); show_progress {log}'
    done = subprocess.run(
        ["bash", "-c", script], input="\n".join(pip_says) + "\n", capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert log.read_text().splitlines() == pip_says
    shown = [re.sub(r"^run: \[ *\d+s\] ", "", line) for line in done.stderr.splitlines()]
    assert shown == [
        "resolving: 25 packages so far (package23>=1)",
        "downloading torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl (190.2 MB)",
        "Building wheels for collected packages: commitpoint, commitpoint-s3",
        "installing 3 packages (unpacking PyTorch and Ray takes a minute or so)",
        "installed",
    ]
