"""docs/errors.md is the bad-input matrix as users see it: every case still raises exactly what it says."""

from __future__ import annotations

import re
from pathlib import Path

from tests.error_cases import CASES, outcome, table
from tests.torch_support import needs_fake_cuda

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


@needs_fake_cuda
def test_every_documented_error_is_raised_with_its_message() -> None:
    assert len(CASES) >= 30
    for where, what, call in CASES:  # each case fails in our checks, not in the harness calling it
        message = outcome(call)[1]
        assert not re.search(r"positional argument|unexpected keyword|has no attribute", message), (
            where,
            what,
            message,
        )
    assert DOCUMENT.read_text() == table(), "docs/errors.md is out of date: python -m tests.error_cases"
