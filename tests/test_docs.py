"""Docs stay true: the testing page shows the example file our suite runs, verbatim."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_testing_page_embeds_the_example_that_runs() -> None:
    example = (DOCS / "examples" / "test_training_checkpoints.py").read_text().rstrip()
    page = (DOCS / "testing.md").read_text()
    assert f"```python\n{example}\n```" in page


def test_index_links_resolve() -> None:
    import re

    index = (DOCS / "index.md").read_text()
    missing = [
        link for link in re.findall(r"\]\(([^)]+\.md)\)", index) if not (DOCS / link).exists()
    ]
    assert missing == []
