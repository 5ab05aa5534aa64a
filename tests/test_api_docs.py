"""docs/api.md and the code agree: the curated API, the members and parameters, the error tree,
and every module path the page names."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import tomllib

import commitpoint
from commitpoint import errors

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "api.md").read_text()
CLASSES_WITH_TABLES = ("CheckpointCoordinator", "CheckpointMonitor", "CheckpointReader")


def _section(name: str) -> str:
    match = re.search(rf"^## {name}\b.*?(?=^## |\Z)", PAGE, re.MULTILINE | re.DOTALL)
    assert match, f"api.md has no section for {name}"
    return match.group(0)


def _params(text: str) -> list[tuple[str, str | None]]:
    """``a, b=1, *, c=None, **rest`` -> [(a, None), (b, "1"), (c, "None"), (rest, None)]."""
    found = []
    for part in re.split(r",\s*(?![^(\[{]*[)\]}])", text):
        part = part.strip()
        if part in ("", "*", "..."):
            continue
        name, _, default = part.partition("=")
        found.append((name.lstrip("*").strip(), default.strip() or None))
    return found


def _documented_members(name: str) -> dict[str, list[tuple[str, str | None]] | None]:
    """Member name -> documented parameters (None: shown without a parameter list, or ``...``)."""
    members: dict[str, list[tuple[str, str | None]] | None] = {}
    for row in re.findall(r"^\| (.+?) \| .+\|$", _section(name), re.MULTILINE):
        for cell in re.findall(r"`([^`]+)`", row):
            cell = cell.removeprefix("async ").removeprefix(f"{name}.")
            match = re.fullmatch(r"(\w+)(?:\((.*)\))?(?: -> .+)?", cell)
            if match is None or match.group(1) == "member":
                continue
            args = match.group(2)
            members[match.group(1)] = None if args in (None, "...") else _params(args)
    return members


def _public_members(cls: type) -> set[str]:
    return {n for n, _ in inspect.getmembers(cls) if not n.startswith("_")}


def test_every_exported_name_is_documented() -> None:
    shown = {w for span in re.findall(r"`([^`]+)`", PAGE) for w in re.findall(r"\w+", span)}
    shown |= set(re.findall(r"^## (\w+)", PAGE, re.MULTILINE))
    shown |= {name for _, name, _ in _documented_tree()}
    missing = [n for n in commitpoint.__all__ if n != "__version__" and n not in shown]
    assert missing == []


def test_section_headings_name_exported_classes_with_their_parameters() -> None:
    for name, args in re.findall(r"^## (\w+)\((.*)\)$", PAGE, re.MULTILINE):
        assert name in commitpoint.__all__, f"## {name} is not importable from commitpoint"
        real = inspect.signature(getattr(commitpoint, name))
        assert [p for p, _ in _params(args)] == list(real.parameters), name


@pytest.mark.parametrize("name", CLASSES_WITH_TABLES)
def test_member_tables_are_complete_and_true(name: str) -> None:
    cls = getattr(commitpoint, name)
    documented = _documented_members(name)
    assert set(documented) == _public_members(cls), name
    for member, params in documented.items():
        if params is None:
            continue
        real = inspect.signature(getattr(cls, member)).parameters
        real_names = [p for p in real if p != "self"]
        assert [p for p, _ in params] == real_names, f"{name}.{member}"
        for param, default in params:
            if default is None or real[param].default is inspect.Parameter.empty:
                continue
            try:
                shown: Any = ast.literal_eval(default)
            except (ValueError, SyntaxError):
                continue  # a name such as SaveStrategy.UNRESTRICTED
            if shown is Ellipsis:
                continue
            actual = real[param].default
            assert getattr(actual, "value", actual) == shown, f"{name}.{member}({param}=...)"


def _documented_tree() -> list[tuple[int, str, tuple[str, ...]]]:
    block = _section("Errors").split("```")[1]
    tree = []
    for line in block.splitlines():
        match = re.match(r"^([│ ]*)[├└]── (\w+)(?: \(also ([\w, ]+)\))?", line)
        if match:
            extra = tuple(sorted(x.strip() for x in (match.group(3) or "").split(",") if x))
            tree.append((len(match.group(1)) // 4, match.group(2), extra))
    return tree


def _real_tree() -> list[tuple[int, str, tuple[str, ...]]]:
    source = inspect.getsource(errors)
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, errors.CommitpointError) and c is not errors.CommitpointError
    ]  # fmt: skip

    def parent(cls: type) -> type:
        return next(b for b in cls.__bases__ if issubclass(b, errors.CommitpointError))

    tree = []

    def walk(node: type, depth: int) -> None:
        children = sorted(
            (c for c in classes if parent(c) is node),
            key=lambda c: source.index(f"class {c.__name__}("),
        )
        for child in children:
            extra = tuple(
                sorted(b.__name__ for b in child.__bases__
                       if not issubclass(b, errors.CommitpointError))
            )  # fmt: skip
            tree.append((depth, child.__name__, extra))
            walk(child, depth + 1)

    walk(errors.CommitpointError, 0)
    return tree


def test_the_error_tree_is_the_real_one() -> None:
    assert _documented_tree() == _real_tree()
    for _, name, _ in _real_tree():
        assert name in commitpoint.__all__, f"{name} is not importable from commitpoint"


def test_every_module_path_named_imports() -> None:
    groups = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"])
    names = set(re.findall(r"`(commitpoint(?:\.\w+)+)", PAGE)) - groups  # not modules
    assert len(names) >= 5
    for dotted in sorted(names):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                target: Any = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for attribute in parts[cut:]:
                target = getattr(target, attribute)  # AttributeError names what is wrong
            break
        else:
            pytest.fail(f"{dotted} does not import")
