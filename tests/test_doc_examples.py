"""Every Python example in the README and docs/ runs, as written, against real storage.

A fragment may use the names a reader of its page has in hand (``url``, ``storage``, ``model``,
``optimizer``, ``x``, ``y``, ``loss_fn``, ``steps``, ``save_every``, ``path``, ``stop_event``);
cloud URLs in it are pointed at a fresh root (the S3 and GCS pages' at the emulators). A block that
cannot run says why in a ``<!-- not run: ... -->`` comment on the line before it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from commitpoint import CheckpointCoordinator, CheckpointMonitor, RetentionPolicy, save_torch
from commitpoint.storage.registry import open_storage
from commitpoint.testing import CheckpointRoot, commit_step, local_root

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
EXAMPLE_FILE = REPO / "docs" / "examples" / "test_training_checkpoints.py"
_BLOCK = re.compile(
    r"(?:^<!-- not run: (?P<reason>[^\n]*?) -->\n)?^```python(?P<info>[^\n]*)\n(?P<body>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)
_CLOUD_URL = re.compile(r"\"(?:s3|gs)://[^\"]+\"")


@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    number: int
    body: str
    info: str
    reason: str | None

    @property
    def id(self) -> str:
        return f"{self.page}#{self.number}"


def _blocks() -> list[Block]:
    found = []
    for page in PAGES:
        name = str(page.relative_to(REPO))
        for number, match in enumerate(_BLOCK.finditer(page.read_text()), 1):
            found.append(
                Block(name, number, match["body"], match["info"].strip(), match["reason"])
            )
    return found


def _why_not_run(block: Block) -> str | None:
    if "file=" in block.info:
        return "a file of the package tests/test_outside_backend.py builds and tests"
    if block.body.rstrip() == EXAMPLE_FILE.read_text().rstrip():
        return "docs/examples/test_training_checkpoints.py, which pytest runs as a test module"
    return block.reason


RUNNABLE = [b for b in _blocks() if _why_not_run(b) is None]


def test_every_block_runs_or_says_why_not() -> None:
    blocks = _blocks()
    assert len(blocks) >= 15
    for block in blocks:
        reason = _why_not_run(block)
        assert reason is None or reason.strip(), f"{block.id}: empty not-run reason"
    assert len(RUNNABLE) >= 10
    assert any(b.page == "README.md" for b in RUNNABLE)


def test_retention_page_shows_the_policys_fields() -> None:
    block = next(b for b in _blocks() if b.page == "docs/retention.md" and b.reason)
    shown = dict(re.findall(r"^\s+(\w+): [^=]+= ([^#\s]+)", block.body, re.MULTILINE))
    real = {f.name: repr(f.default) for f in dataclasses.fields(RetentionPolicy)}
    assert shown == real


# -- what a page's reader has in hand -----------------------------------------------------------
def _commit_weights(url: str, steps: list[int], model: Any, *, checkpoint: bool) -> None:
    coordinator = CheckpointCoordinator(CheckpointMonitor(url))
    for step in steps:
        if not checkpoint:
            folder = coordinator.step_dir(step)
            weights = model.state_dict()
            save = partial(save_torch, coordinator.storage, f"{folder}/model.pt", weights)
            coordinator.save_async("model", save, step, is_state_dict=True)
            coordinator.register_and_monitor_sync(step, True, state_dict_thread_count=1)
            coordinator.wait_all()
        else:
            commit_step(coordinator, step, checkpoint=True)


def _rewind_page(url: str, names: dict[str, Any]) -> None:
    _commit_weights(url, [4, 7, 10], names["model"], checkpoint=True)


def _watch_page(url: str, names: dict[str, Any]) -> None:
    _commit_weights(url, [1], names["model"], checkpoint=False)
    timer = threading.Timer(1.5, names["stop_event"].set)  # a worker asked to stop
    timer.daemon = True
    timer.start()


def _testing_page(url: str, names: dict[str, Any]) -> None:
    spec = importlib.util.spec_from_file_location("doc_example", EXAMPLE_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names["train"] = module.train


_BEFORE: dict[str, Callable[[str, dict[str, Any]], None]] = {
    "docs/rewind.md": _rewind_page,
    "docs/watch.md": _watch_page,
    "docs/testing.md": _testing_page,
}


def _names(url: str, tmp_path: Path) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    return {
        "__name__": "doc_example",
        "torch": torch,
        "url": url,
        "storage": open_storage(url),
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "x": torch.randn(16, 8),
        "y": torch.randn(16, 1),
        "loss_fn": torch.nn.functional.mse_loss,
        "steps": 4,
        "save_every": 2,
        "path": str(tmp_path / "model.pt"),
        "stop_event": threading.Event(),
    }


@pytest.fixture
def cloud_root(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The emulator root for the S3 and GCS pages, reachable without options (as a real
    account is, through the environment); None elsewhere."""
    block: Block = request.param
    if block.page == "docs/backends/s3.md":
        root: CheckpointRoot = request.getfixturevalue("s3_checkpoint_root")
        monkeypatch.setenv("AWS_ENDPOINT_URL", root.storage_options["endpoint_url"])
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield block, root
    elif block.page == "docs/backends/gcs.md":
        root = request.getfixturevalue("gcs_checkpoint_root")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", root.storage_options["endpoint_url"])
        yield block, root
    else:
        yield block, None


@pytest.mark.parametrize("cloud_root", RUNNABLE, ids=[b.id for b in RUNNABLE], indirect=True)
def test_example_runs(
    cloud_root: tuple[Block, CheckpointRoot | None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    block, cloud = cloud_root
    monkeypatch.chdir(tmp_path)
    with local_root(str(tmp_path)) as local:
        url = cloud.url if cloud is not None else local.url
        names = _names(url, tmp_path)
        before = _BEFORE.get(block.page)
        if before is not None:
            before(url, names)
        source = block.body if block.page == "README.md" else _CLOUD_URL.sub(repr(url), block.body)
        try:
            exec(compile(source, block.id, "exec"), names)
        finally:
            for value in list(names.values()):
                if isinstance(value, CheckpointMonitor):
                    value.close()
    if block.page == "README.md":
        assert names["step"] == 600


def test_pages_cite_only_files_the_repository_has() -> None:
    cited = re.compile(r"`((?:[\w.-]+/)*[\w.-]+\.(?:md|py|toml|txt))`|\]\(([^)#:]+\.md)\)")
    outside = ("pyproject.toml", "tests/test_conformance.py")  # the page's own package files
    missing = []
    for page in PAGES:
        for match in cited.finditer(page.read_text()):
            name = match.group(1) or match.group(2)
            if ("/" not in name and not name.endswith(".md")) or name in outside:
                continue
            if name.startswith(("commitpoint-dir/", "src/commitpoint_dir/")):
                continue
            if name.startswith(("trinity/", "verl/", "torch/")):
                continue  # files of the upstream projects a page compares commitpoint with
            bases = [page.parent, REPO, REPO / "docs", REPO / "src" / "commitpoint"]
            if not any((base / name).exists() for base in bases):
                missing.append(f"{page.relative_to(REPO)}: {name}")
    assert missing == []
