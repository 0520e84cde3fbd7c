"""docs/errors.md is the bad-input matrix as users see it: every case still raises exactly what it says."""

from __future__ import annotations

from pathlib import Path

from tests.error_cases import CASES, table

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def test_every_documented_error_is_raised_with_its_message() -> None:
    assert len(CASES) >= 30
    assert DOCUMENT.read_text() == table(), "docs/errors.md is out of date: python -m tests.error_cases"
