"""pl-pmse benchmark suite: every figure is a ratio against a reference measured in the same run.

Usage:
    python benchmarks/run.py                 # everything, Markdown tables on stdout
    python benchmarks/run.py --only pixel    # one section
    python benchmarks/run.py --quick         # smaller sizes, a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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


def _torchmetrics_lpips(architecture: str, net: str, weights: str, device: torch.device) -> torch.nn.Module:
    """torchmetrics' LPIPS built on the same torchvision trunk weights instead of its ImageNet download."""
    import torchmetrics.functional.image.lpips as tm_lpips
    from torchmetrics.image import LearnedPerceptualImagePatchSimilarity

    from pl_pmse.spaces import load_backbone

    original = tm_lpips._get_tv_model_features
    tm_lpips._get_tv_model_features = lambda name, pretrained=False: load_backbone(architecture, weights).features
    try:
        return LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True).to(device)
    finally:
        tm_lpips._get_tv_model_features = original


def features(quick: bool, device: torch.device) -> str:
    """Feature path: update vs a bare backbone forward of the same 2N batch, and vs torchmetrics LPIPS."""
    rows = [
        _feature_row(space, architecture, net, quick, device)
        for space, architecture, net in (
            ("alexnet", "alexnet", "alex"),
            ("lpips-alex", "alexnet", "alex"),
            ("vgg16", "vgg16", "vgg"),
            ("lpips-vgg", "vgg16", "vgg"),
        )
    ]
    header = ("", "bare trunk forward (ms)", "pl-pmse update (ms)", "overhead vs bare", "torchmetrics LPIPS (ms)",
              "speed vs torchmetrics")  # fmt: skip
    return "### Feature path: same random backbone, one update\n\n" + table(rows, header)


def _feature_row(space: str, architecture: str, net: str, quick: bool, device: torch.device) -> tuple[str, ...]:
    from pl_pmse.spaces.backbones import ARCHITECTURES

    n, size = (4, 64) if quick else (8, 224 if net == "alex" else 128)
    with random_weights(architecture) as weights:
        ours = PerceptionMSE(space, weights=weights).to(device)
        theirs = _torchmetrics_lpips(architecture, net, weights, device)
    last_layer = list(ARCHITECTURES[architecture].layers.values())[-1]
    trunk = ours.space.module.features[: int(last_layer.split(".")[1]) + 1]
    preds, target = torch.rand(n, 3, size, size, device=device), torch.rand(n, 3, size, size, device=device)

    def bare_forward() -> None:
        with torch.no_grad():
            trunk(torch.cat([preds, target]))

    candidates = {"bare": bare_forward, "ours": lambda: ours.update(preds, target)}
    if space.startswith("lpips"):
        candidates["tm"] = lambda: theirs.update(preds, target)
    seconds = interleaved(candidates, repeats=5 if quick else 9)
    overhead = (seconds["ours"] / seconds["bare"] - 1) * 100
    versus = (
        (f"{seconds['tm'] * 1e3:.1f}", f"{seconds['tm'] / seconds['ours']:.2f}x") if "tm" in seconds else ("-", "-")
    )
    return (f"{space} ({n}+{n} images {size}x{size})", f"{seconds['bare'] * 1e3:.1f}", f"{seconds['ours'] * 1e3:.1f}",
            f"{overhead:+.1f}%", *versus)  # fmt: skip


def state_memory(quick: bool, device: torch.device) -> str:
    """Metric state bytes and forward() time over many updates: flat here, growing in torchmetrics LPIPS."""
    updates = 200 if quick else 1000
    with random_weights("squeezenet") as weights:
        ours = PerceptionMSE("lpips-squeeze", weights=weights).to(device)
        theirs = _torchmetrics_lpips("squeezenet", "squeeze", weights, device)
    preds, target = torch.rand(2, 3, 32, 32, device=device), torch.rand(2, 3, 32, 32, device=device)
    rows = []
    checkpoints = {1, 10, 100, updates}
    timings: dict[str, list[float]] = {"ours": [], "theirs": []}
    for step in range(1, updates + 1):
        for name, metric in (("ours", ours), ("theirs", theirs)):
            start = time.perf_counter()
            metric(preds, target)
            timings[name].append(time.perf_counter() - start)
        if step in checkpoints:
            rows.append((str(step), f"{_state_bytes(ours):,}", f"{_state_bytes(theirs):,}",
                         f"{statistics.median(timings['ours'][-10:]) * 1e3:.2f}",
                         f"{statistics.median(timings['theirs'][-10:]) * 1e3:.2f}"))  # fmt: skip
    header = ("updates", "pl-pmse state (bytes)", "torchmetrics LPIPS state (bytes)", "pl-pmse forward (ms)",
              "torchmetrics forward (ms)")  # fmt: skip
    return f"### State memory over {updates} forward() calls (2+2 images 32x32, squeezenet)\n\n" + table(rows, header)


@contextlib.contextmanager
def random_weights(architecture: str) -> Iterator[str]:
    """A temporary file with seeded random torchvision weights (no download anywhere)."""
    from pl_pmse.spaces import load_backbone

    torch.manual_seed(0)
    with tempfile.NamedTemporaryFile(suffix=".pth") as file:
        torch.save(load_backbone(architecture, "random").state_dict(), file.name)
        yield file.name


def _state_bytes(metric: torchmetrics.Metric) -> int:
    total = 0
    for value in metric.metric_state.values():
        for tensor in value if isinstance(value, list) else [value]:
            total += tensor.numel() * tensor.element_size()
    return total


def callback_overhead(quick: bool, device: torch.device) -> str:
    """Validation epoch of the image example: PerceptionMSE updated in validation_step (the metric alone) vs
    PerceptionMSECallback without and with panels (drawn once per epoch to PNG files)."""
    import pytorch_lightning as pl

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from examples.image_denoising import Denoiser, PhotoCrops
    from pl_pmse import PerceptionMSECallback

    class MetricAlone(Denoiser):
        def __init__(self) -> None:
            super().__init__()
            self.metric = PerceptionMSE("pyramid", data_range=1.0)

        def validation_step(self, batch, batch_idx):
            out = super().validation_step(batch, batch_idx)
            self.metric.update(out["preds"], out["target"])

        def on_validation_epoch_end(self) -> None:
            self.log("val/pmse", self.metric.compute())
            self.metric.reset()

    crops = 32 if quick else 256
    data = PhotoCrops(val_crops=crops, batch_size=16)
    torch.manual_seed(0)
    plain, alone = Denoiser(), MetricAlone()
    alone.load_state_dict(plain.state_dict(), strict=False)
    with tempfile.TemporaryDirectory() as root:

        def trainer(callbacks: list) -> pl.Trainer:
            return pl.Trainer(accelerator=device.type, devices=1, logger=False, callbacks=callbacks,
                              enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)  # fmt: skip

        runs = {
            "metric in validation_step": (trainer([]), alone),
            "callback, no panels": (trainer([PerceptionMSECallback("pyramid", data_range=1.0, panels=False)]), plain),
            "callback with panels, profile=False": (
                trainer([PerceptionMSECallback("pyramid", data_range=1.0, profile=False)]),
                plain,
            ),
            "callback with panels": (trainer([PerceptionMSECallback("pyramid", data_range=1.0)]), plain),
        }
        seconds = interleaved(
            {name: (lambda t=t, m=m: t.validate(m, data, verbose=False)) for name, (t, m) in runs.items()},
            repeats=3 if quick else 7,
        )
    reference = seconds["metric in validation_step"]
    rows = [(name, f"{s * 1e3:.0f}", f"{(s / reference - 1) * 100:+.1f}%") for name, s in seconds.items()]
    title = f"### Callback overhead: one validation epoch of the image example ({crops} crops 64x64, pyramid)\n\n"
    return title + table(rows, ("", "ms / validation epoch", "vs the metric alone"))


SECTIONS: dict[str, Callable[[bool, torch.device], str]] = {
    "pixel": pixel,
    "features": features,
    "memory": state_memory,
    "callback": callback_overhead,
}


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
