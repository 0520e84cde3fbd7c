"""The documentation runs: docstring examples of the package and the README's Python blocks."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import pl_pmse

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(pl_pmse.__path__, "pl_pmse."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str, monkeypatch) -> None:
    from pl_pmse.spaces import registry

    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))  # examples may register spaces
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_readme_python_blocks_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_links_work_on_a_package_index_page() -> None:
    """PyPI shows the README outside the repository: every link is an in-page anchor or an absolute URL."""
    targets = re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text())
    assert targets
    relative = [t for t in targets if not t.startswith(("#", "https://"))]
    assert not relative, f"relative links break on the package index page: {relative}"
    anchors = {t[1:] for t in targets if t.startswith("#")}
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("#")
    }
    assert anchors <= headings, f"anchors without a heading: {anchors - headings}"
