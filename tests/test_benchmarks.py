"""The benchmark script runs (a smoke run: --quick sizes; the figures live in BENCHMARKS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import clean_environment

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_suite_smoke_run() -> None:
    command = [sys.executable, str(ROOT / "benchmarks/run.py"), "--quick", "--only", "pixel", "--only", "memory",
               "--only", "scaling", "--only", "sync", "--only", "callback", "--only", "loss",
               "--only", "pyramid", "--only", "exactness", "--only", "launches", "--only", "small-batch",
               "--only", "fidelity"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=clean_environment())
    assert done.returncode == 0, done.stderr[-3000:]
    for title in (
        "Pixel path",
        "State memory",
        "Scaling",
        "Sync",
        "Callback overhead",
        "Loss",
        "Pyramid scaling",
        "SSIM and sharpness",
        "Exactness costs",
        "Fixed cost",
        "Kernel launches per update",
    ):
        assert f"### {title}" in done.stdout
    assert "| pl-pmse PerceptionMSE('pixel')                                 | 1 " in done.stdout
    assert "| callback, panels on the background thread (default) " in done.stdout
    assert "| lpips-vgg | lpips package (lpips.LPIPS)" in done.stdout
