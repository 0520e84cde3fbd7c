"""pl-pmse benchmark suite: every figure is a ratio against a reference measured in the same run.

Usage:
    python benchmarks/run.py                 # everything, Markdown tables on stdout
    python benchmarks/run.py --only pixel    # one section
    python benchmarks/run.py --quick         # smaller sizes, a smoke run
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torchmetrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, table

from pl_pmse import PerceptionMSE


def pixel(quick: bool, device: torch.device) -> str:
    """Pixel-space update throughput vs torchmetrics MeanSquaredError and vs reading both tensors once."""
    shape = (16, 3, 128, 128) if quick else (64, 3, 256, 256)
    preds, target = torch.rand(shape, device=device), torch.rand(shape, device=device)
    gigabytes = 2 * preds.numel() * preds.element_size() / 1e9
    ours, theirs = PerceptionMSE().to(device), torchmetrics.MeanSquaredError().to(device)
    seconds = interleaved(
        {
            "read both tensors once (floor)": lambda: (preds.sum(), target.sum()),
            "pl-pmse PerceptionMSE(space='pixel').update": lambda: ours.update(preds, target),
            "torchmetrics MeanSquaredError.update": lambda: theirs.update(preds, target),
        }
    )
    reference = seconds["torchmetrics MeanSquaredError.update"]
    rows = [(name, f"{s * 1e3:.2f}", f"{gigabytes / s:.1f}", f"{reference / s:.2f}x") for name, s in seconds.items()]
    title = f"### Pixel path: update on {shape} float32 ({gigabytes * 1e3:.0f} MB read per update)\n\n"
    return title + table(rows, ("", "ms / update", "GB/s", "speed vs torchmetrics MSE"))


SECTIONS: dict[str, Callable[[bool, torch.device], str]] = {"pixel": pixel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test, not a measurement)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"Machine: {machine()}; device {device}; torchmetrics {torchmetrics.__version__}\n")
    for name in args.only or SECTIONS:
        print(SECTIONS[name](args.quick, device), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
