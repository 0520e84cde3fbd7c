"""The benchmark script runs (a smoke run: --quick sizes; the figures live in BENCHMARKS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchmetrics

from pl_pmse.versions import release
from tests.distributed import clean_environment

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(
    release(torchmetrics.__version__) < (1, 9) or release(torch.__version__) < (2, 14),
    reason="the benchmarks compare with torchmetrics 1.9's LPIPS internals and count launches under fake CUDA",
)
def test_benchmark_suite_smoke_run() -> None:
    """Every section, at --quick sizes."""
    command = [sys.executable, str(ROOT / "benchmarks/run.py"), "--quick"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=clean_environment())
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
        "Feature path",
        "torch.compile",
        "Import time",
        "Audio",
    ):
        assert f"### {title}" in done.stdout
    assert "| pl-pmse PerceptionMSE('pixel')                                 | 1 " in done.stdout
    assert "| callback, panels on the background thread (default) " in done.stdout
    assert "| lpips-vgg | lpips package (lpips.LPIPS)" in done.stdout
