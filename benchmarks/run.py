"""pl-pmse benchmark suite: every figure is a ratio against a reference measured in the same run.

Usage:
    python benchmarks/run.py                 # everything, Markdown tables on stdout
    python benchmarks/run.py --only pixel    # one section
    python benchmarks/run.py --quick         # smaller sizes, a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torchmetrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fake_cuda_launches, hand_written_loss, interleaved, machine, peak_extra_bytes, saved_bytes, table

from pl_pmse import PerceptionMSE, perception_mse


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


def small_batch(quick: bool, device: torch.device) -> str:
    """The fixed cost of an update: small batches (validation loops of batch 1-16) and one large frame, pl-pmse with
    both validate_args modes vs torchmetrics' MeanSquaredError, timed in turns."""
    shapes = [(1, 3, 64, 64), (2, 3, 64, 64), (16, 3, 64, 64), (1, 3, 2048, 2048), (64, 3, 256, 256)]
    rows = []
    for shape in shapes[:3] if quick else shapes:
        preds, target = torch.rand(shape, device=device), torch.rand(shape, device=device)
        checked, unchecked = PerceptionMSE().to(device), PerceptionMSE(validate_args=False).to(device)
        reference = torchmetrics.MeanSquaredError().to(device)
        repeats = 200 if preds.numel() < 1 << 20 else 15
        metrics = {"checked": checked, "unchecked": unchecked, "torchmetrics": reference}
        calls = {name: functools.partial(metric.update, preds, target) for name, metric in metrics.items()}
        seconds = interleaved(calls, repeats=repeats)
        theirs = seconds["torchmetrics"]
        rows.append((
            "x".join(map(str, shape)), f"{theirs * 1e3:.3f}", f"{seconds['checked'] * 1e3:.3f}",
            f"{seconds['checked'] / theirs:.2f}x", f"{seconds['unchecked'] * 1e3:.3f}",
            f"{seconds['unchecked'] / theirs:.2f}x", f"{seconds['unchecked'] / seconds['checked']:.2f}",
        ))  # fmt: skip
    header = ("pixel update of", "torchmetrics MSE ms", "pl-pmse ms", "time vs torchmetrics",
              "validate_args=False ms", "time vs torchmetrics", "False / True")  # fmt: skip
    return "### Fixed cost: pixel updates, small batches and one large frame\n\n" + table(rows, header)


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
        ours = PerceptionMSE(space, weights=weights, data_range=1.0).to(device)
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
        ours = PerceptionMSE("lpips-squeeze", weights=weights, data_range=1.0).to(device)
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
    """The image example's fit, logging to W&B offline as ``make demo`` does, with PerceptionMSE updated in
    validation_step (the metric alone) vs the callback. End to end: the validation loop's time per epoch and the
    whole fit's time (noisy on a shared machine). Direct, within each run: the time the callback's validation hooks
    take on the training thread beyond the metric's own update/compute (its overhead), and its training-thread
    time outside validation (the W&B uploads of drawn panels)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if quick:
        return _fit_overhead(crops=32, epochs=2, train_batches=2, repeats=1, device=device)
    return "\n\n".join(_fit_overhead(crops, 4, 16, 3, device) for crops in (32, 256))  # the example's 32, and more


class _Clock:
    """Wall time of each validation loop, and time spent inside the wrapped calls, per bucket."""

    def __init__(self) -> None:
        self.validation: list[float] = []
        self.inside = {"hooks": 0.0, "metric": 0.0, "after": 0.0}

    def wrap(self, owner: object, names: tuple[str, ...], bucket: str) -> None:
        for name in names:
            call = getattr(owner, name)

            def timed(*args: Any, call: Callable = call, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return call(*args, **kwargs)
                finally:
                    self.inside[bucket] += time.perf_counter() - start

            setattr(owner, name, timed)


SAME_SCALARS = "metric in validation_step, logging the same scalars as the callback"


def _fit_overhead(crops: int, epochs: int, train_batches: int, repeats: int, device: torch.device) -> str:
    import pytorch_lightning as pl
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    from examples.image_denoising import Denoiser, PhotoCrops
    from pl_pmse import PerceptionMSECallback

    class MetricAlone(Denoiser):
        def __init__(self, same_scalars: bool) -> None:
            super().__init__()
            self.metric = PerceptionMSE("pyramid", data_range=1.0)
            self.same_scalars = same_scalars

        def validation_step(self, batch, batch_idx):
            out = super().validation_step(batch, batch_idx)
            self.metric.update(out["preds"], out["target"])

        def on_validation_epoch_end(self) -> None:
            if self.same_scalars:  # what the callback logs: the total, each component and psnr
                summary = self.metric.compute_summary()
                del summary["skipped"]
                self.log_dict({"val/pmse" + (f"/{k}" if k != "total" else ""): v for k, v in summary.items()})
            else:
                self.log("val/pmse", self.metric.compute())
            self.metric.reset()

    class ValidationTimer(pl.Callback):
        def __init__(self, clock: _Clock) -> None:
            self.clock = clock

        def on_validation_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        def on_validation_end(self, trainer, pl_module) -> None:
            self.clock.validation.append(time.perf_counter() - self.start)

    def metric_alone(same_scalars: bool) -> Callable[[_Clock], tuple[pl.LightningModule, list[pl.Callback]]]:
        def build(clock: _Clock) -> tuple[pl.LightningModule, list[pl.Callback]]:
            model = MetricAlone(same_scalars)
            clock.wrap(model.metric, ("update",), "hooks")
            clock.wrap(model, ("on_validation_epoch_end",), "hooks")
            return model, []

        return build

    def with_callback(**options: Any) -> Callable[[_Clock], tuple[pl.LightningModule, list[pl.Callback]]]:
        def build(clock: _Clock) -> tuple[pl.LightningModule, list[pl.Callback]]:
            callback = PerceptionMSECallback("pyramid", data_range=1.0, **options)
            hooks = ("on_validation_epoch_start", "on_validation_batch_end", "on_validation_epoch_end")
            clock.wrap(callback, hooks, "hooks")
            clock.wrap(callback, ("on_train_batch_end", "teardown"), "after")
            return Denoiser(), [callback]

        return build

    variants = {
        "metric in validation_step": metric_alone(False),
        SAME_SCALARS: metric_alone(True),
        "callback, no panels": with_callback(panels=False),
        "callback, panels drawn in the loop": with_callback(background_panels=False),
        "callback, panels on the background thread, profile=False": with_callback(profile=False),
        "callback, panels on the background thread (default)": with_callback(),
    }
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)  # no banners between the tables
    warnings.filterwarnings("ignore", module="pytorch_lightning|wandb")
    data = PhotoCrops(val_crops=crops, batch_size=16)
    runs: dict[str, list[tuple[float, ...]]] = {name: [] for name in variants}
    saved = {name: getattr(PerceptionMSE, name) for name in ("update", "compute", "compute_summary")}
    with tempfile.TemporaryDirectory() as root, _environment(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=root):
        try:
            for repeat in range(repeats + 1):  # the first round warms up (W&B service, caches) and is dropped
                for name, build in variants.items():
                    clock = _Clock()
                    for method, call in saved.items():  # the metric's own work, wherever it runs
                        setattr(PerceptionMSE, method, call)
                    clock.wrap(PerceptionMSE, tuple(saved), "metric")
                    torch.manual_seed(0)
                    model, callbacks = build(clock)
                    trainer = pl.Trainer(
                        accelerator=device.type, devices=1, max_epochs=epochs, limit_train_batches=train_batches,
                        num_sanity_val_steps=0, logger=WandbLogger(project="pl-pmse-benchmark", save_dir=root),
                        callbacks=[*callbacks, ValidationTimer(clock)], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                    )  # fmt: skip
                    start = time.perf_counter()
                    trainer.fit(model, data)
                    fit_seconds = time.perf_counter() - start
                    wandb.finish()
                    if repeat:
                        own = (clock.inside["hooks"] - clock.inside["metric"]) / epochs
                        runs[name].append((min(clock.validation), own, clock.inside["after"] / epochs, fit_seconds))
        finally:
            for method, call in saved.items():
                setattr(PerceptionMSE, method, call)
    # the fastest validation epoch and fit (the least disturbed by other work on a shared machine), the median own work
    pick = (min, statistics.median, statistics.median, min)
    figures = {name: [f(c) for f, c in zip(pick, zip(*runs[name], strict=True), strict=True)] for name in runs}
    reference, same = figures["metric in validation_step"], figures[SAME_SCALARS]
    versus = lambda value, base: f"{(value / base - 1) * 100:+.1f}%"  # noqa: E731
    rows = [
        (name, f"{validation * 1e3:.0f}", versus(validation, reference[0]), versus(validation, same[0]),
         f"{own * 1e3:.1f}", f"{(own - same[1]) / same[0] * 100:+.1f}%", f"{after * 1e3:.1f}", f"{fit:.2f}",
         versus(fit, reference[3]))
        for name, (validation, own, after, fit) in figures.items()
    ]  # fmt: skip
    title = (
        f"### Callback overhead: fits of the image example ({crops} validation crops 64x64, pyramid, {epochs} "
        f"epochs of {train_batches} training batches, W&B offline)\n\n"
    )
    header = ("", "validation epoch (ms)", "vs the metric alone", "vs the metric + same scalars",
              "own work in it (ms)", "own work beyond the same scalars", "work after it (ms)", "fit (s)",
              "vs the metric alone")  # fmt: skip
    return title + table(rows, header)


@contextlib.contextmanager
def _environment(**variables: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def scaling(quick: bool, device: torch.device) -> str:
    """How update time grows with batch size (pixel), image size (pyramid) and audio length (mel)."""
    rows = []
    cases = [("pixel", "batch", n, (n, 3, 128, 128), {}) for n in (8, 32, 128)]
    cases += [("pyramid", "image side", side, (8, 3, side, side), {}) for side in (64, 128, 256)]
    cases += [("mel", "seconds at 16 kHz", sec, (8, 16000 * sec), {"sample_rate": 16000}) for sec in (1, 4, 16)]
    if quick:
        cases = cases[::3]
    for space, axis, size, shape, options in cases:
        low = -1.0 if space == "mel" else 0.0
        preds = torch.rand(shape, device=device) * (1 - low) + low
        target = torch.rand(shape, device=device) * (1 - low) + low
        metric = PerceptionMSE(space, **options).to(device)
        seconds = interleaved({"update": lambda m=metric, p=preds, t=target: m.update(p, t)}, repeats=5)["update"]
        elements = preds.numel()
        rows.append(
            (space, f"{axis} = {size}", str(tuple(shape)), f"{seconds * 1e3:.2f}", f"{seconds / elements * 1e9:.2f}")
        )
    header = ("space", "size", "shape", "ms / update", "ns / input element")
    return "### Scaling of the update cost\n\n" + table(rows, header)


def _loss_case(space: str, quick: bool, device: torch.device) -> tuple[Any, torch.Tensor, torch.Tensor, Any]:
    """A space, an input batch, a target and a small model whose output stays in the space's range."""
    from pl_pmse.spaces import get_space

    if space == "mel":
        length = 8000 if quick else 16000
        x, target = (torch.rand(8, length, device=device) * 2 - 1 for _ in range(2))
        model = torch.nn.Sequential(torch.nn.Unflatten(1, (1, -1)), torch.nn.Conv1d(1, 8, 9, padding=4),
                                    torch.nn.ReLU(), torch.nn.Conv1d(8, 1, 9, padding=4), torch.nn.Flatten(),
                                    torch.nn.Tanh())  # fmt: skip
        return get_space("mel", sample_rate=16000), x, target, model.to(device)
    side = 64 if quick else 128
    x, target = (torch.rand(8, 3, side, side, device=device) for _ in range(2))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 3, 3, padding=1), torch.nn.Sigmoid())  # fmt: skip
    options = {"weights": "random"} if space in ("vgg16", "lpips-vgg") else {}
    return get_space(space, **options).to(device), x, target, model.to(device)


def _lpips_package(space: Any, device: torch.device) -> Callable:
    """lpips.LPIPS(net="vgg") on the same trunk weights as ``space`` (inputs in [0, 1]: normalize=True)."""
    import lpips

    model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    trunk = {f"features.{k}": v for k, v in space.module.features.state_dict().items()}
    model.net.load_state_dict({key: trunk["features." + key.split(".", 2)[1] + "." + key.split(".", 2)[2]]
                               for key in model.net.state_dict()})  # fmt: skip
    model = model.requires_grad_(False).to(device)
    return lambda preds, target: model(preds, target, normalize=True).mean()


def loss(quick: bool, device: torch.device) -> str:
    """One training step with each space as the loss: pl-pmse vs the hand-written no_grad baseline (and the lpips
    package for LPIPS): time, peak memory and bytes saved for backward."""
    rows = []
    for space_name in ("pixel", "pyramid", "vgg16", "lpips-vgg", "mel"):
        space, x, target, model = _loss_case(space_name, quick, device)
        data_range = (0.0, 1.0) if space_name == "lpips-vgg" else None
        candidates = {
            "hand-written, target under no_grad": hand_written_loss(space, data_range),
            "pl-pmse perception_mse": lambda p, t, s=space, d=data_range: perception_mse(p, t, s, data_range=d),
            "pl-pmse, validate_args=False": lambda p, t, s=space, d=data_range: perception_mse(
                p, t, s, data_range=d, validate_args=False
            ),
        }
        if space_name == "lpips-vgg":
            candidates["lpips package (lpips.LPIPS)"] = _lpips_package(space, device)
        steps = {name: _training_step(model, x, target, fn) for name, fn in candidates.items()}
        repeats = 3 if quick else 7 if "vgg" in space_name else 31  # small steps: more turns against the noise
        seconds = interleaved(steps, repeats=repeats, warmup=1)
        values = {name: float(fn(model(x), target)) for name, fn in candidates.items()}
        baseline = "hand-written, target under no_grad"
        peaks = {name: peak_extra_bytes(step, device) for name, step in steps.items()}
        saved = {name: saved_bytes(step)[0] for name, step in steps.items()}
        for name in candidates:
            rows.append((space_name, name, f"{values[name]:.6g}", f"{seconds[name] * 1e3:.1f}",
                         f"{seconds[name] / seconds[baseline]:.2f}x", f"{peaks[name] / 2**20:.0f}",
                         f"{peaks[name] / peaks[baseline]:.2f}x", f"{saved[name] / 2**20:.1f}",
                         f"{saved[name] / saved[baseline]:.2f}x"))  # fmt: skip
    shape = tuple(_loss_case("pixel", quick, device)[1].shape)
    title = (f"### Loss: one training step (forward, loss, backward) of a 2-layer conv net, images {shape}, audio "
             f"8 x 1 s at 16 kHz\n\n")  # fmt: skip
    header = ("space", "loss", "value", "ms / step", "time vs hand-written", "peak tensor MiB", "peak vs hand-written",
              "saved for backward MiB", "saved vs hand-written")  # fmt: skip
    return title + table(rows, header)


def _training_step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn: Callable) -> Callable:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()

    return step


def compiled(quick: bool, device: torch.device) -> str:
    """torch.compile(perception_mse, fullgraph=True) vs eager, validate_args=False, one training step."""
    rows = []
    for space_name in ("pixel",) if quick else ("pixel", "pyramid", "vgg16", "mel"):  # quick: compiling takes ~30 s
        space, x, target, model = _loss_case(space_name, quick, device)
        eager = lambda p, t, s=space: perception_mse(p, t, s, validate_args=False)  # noqa: E731
        graph = torch.compile(eager, fullgraph=True)
        start = time.perf_counter()
        _training_step(model, x, target, graph)()
        compile_seconds = time.perf_counter() - start
        with torch.no_grad():
            preds = model(x)
            difference = abs(float(graph(preds, target)) - float(eager(preds, target))) / float(eager(preds, target))
        steps = {name: _training_step(model, x, target, fn) for name, fn in (("eager", eager), ("compiled", graph))}
        seconds = interleaved(steps, repeats=3 if quick else 9, warmup=1)
        rows.append((space_name, f"{seconds['eager'] * 1e3:.1f}", f"{seconds['compiled'] * 1e3:.1f}",
                     f"{seconds['eager'] / seconds['compiled']:.2f}x", f"{compile_seconds:.1f}",
                     f"{difference:.1e}"))  # fmt: skip
    header = ("space", "eager ms / step", "compiled ms / step", "speed-up", "first call (compiling) s",
              "relative difference of the loss")  # fmt: skip
    return "### torch.compile(perception_mse, fullgraph=True), one training step as in the loss section\n\n" + table(
        rows, header
    )


def pyramid(quick: bool, device: torch.device) -> str:
    """The pyramid's cost per element and its peak memory from 64x64 to 4096x4096 (metric update and loss)."""
    rows = []
    reference: dict[str, float] = {}
    for side in (64, 256, 1024) if quick else (64, 256, 1024, 2048, 4096):
        batch = max(1, (1 << 22) // (3 * side * side))  # about the same number of elements in every row
        preds, target = (torch.rand(batch, 3, side, side, device=device) for _ in range(2))
        metric = PerceptionMSE("pyramid").to(device)
        leaf = preds.clone().requires_grad_()
        work = {
            "metric update": lambda m=metric, p=preds, t=target: m.update(p, t),
            "loss + backward": lambda p=leaf, t=target: perception_mse(p, t, "pyramid").backward(),
        }
        seconds = interleaved(work, repeats=3 if quick or side >= 2048 else 5, warmup=1)
        one_input = preds.numel() * preds.element_size()
        for name, fn in work.items():
            per_element = seconds[name] / preds.numel() * 1e9
            reference.setdefault(name, per_element)
            peak = peak_extra_bytes(fn, device)
            rows.append((name, f"{batch} x 3 x {side} x {side}", f"{seconds[name] * 1e3:.0f}", f"{per_element:.1f}",
                         f"{per_element / reference[name]:.2f}x", f"{peak / one_input:.2f}x"))  # fmt: skip
    header = ("", "batch", "ms", "ns / element", "vs 64 x 64", "peak tensor memory / one input")
    return "### Pyramid scaling: 5 levels, about 4M elements per row\n\n" + table(rows, header)


class CountingCollectives:
    """Counts torch.distributed collectives, and the bytes each rank contributes, while active."""

    OPERATIONS = ("all_reduce", "all_gather", "barrier", "broadcast")

    def __enter__(self) -> CountingCollectives:
        import torch.distributed as dist

        self.calls: list[tuple[str, int]] = []
        self.originals = {op: getattr(dist, op) for op in self.OPERATIONS}
        for op in self.OPERATIONS:
            setattr(dist, op, self._counted(op))
        return self

    def _counted(self, op: str) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            sent = args[1] if op == "all_gather" else (args[0] if args else None)
            size = sent.numel() * sent.element_size() if isinstance(sent, torch.Tensor) else 0
            self.calls.append((op, size))
            return self.originals[op](*args, **kwargs)

        return call

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        for op, original in self.originals.items():
            setattr(dist, op, original)


def _sync_worker(rank: int, world: int, port: int, results: Any) -> None:
    import os

    import torch.distributed as dist
    from torchmetrics import CatMetric, MeanSquaredError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    candidates = {
        "pl-pmse PerceptionMSE('pixel')": lambda: PerceptionMSE(),
        "pl-pmse PerceptionMSE('pyramid'), 6 components": lambda: PerceptionMSE("pyramid"),
        "torchmetrics MeanSquaredError": MeanSquaredError,
        "torchmetrics list state, 1000 scores per rank (as LPIPS keeps)": CatMetric,
    }
    rows = []
    for name, make in candidates.items():
        metric = make()
        if isinstance(metric, CatMetric):
            metric.update(torch.rand(1000))
        else:
            metric.update(torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32))
        if isinstance(metric, PerceptionMSE):
            metric.check_configuration()  # the one-time check, before the timed computes
        with CountingCollectives() as counter:
            metric._computed = None
            metric.compute()
        start = time.perf_counter()
        for _ in range(20):
            metric._computed = None
            metric.compute()
        elapsed = (time.perf_counter() - start) / 20
        rows.append((name, len(counter.calls), sum(size for _, size in counter.calls), elapsed))
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def sync(quick: bool, device: torch.device) -> str:
    """Collectives and bytes per compute with 2 real gloo processes, vs torchmetrics."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_sync_worker, args=(r, 2, port, results)) for r in range(2)]
    for process in processes:
        process.start()
    rows = results.get(timeout=300)
    for process in processes:
        process.join(timeout=60)
    table_rows = [(name, str(count), f"{size:,}", f"{seconds * 1e3:.2f}") for name, count, size, seconds in rows]
    header = ("metric", "collectives per compute", "bytes sent per rank", "ms per compute")
    note = ("\n\nWith N ranks the state is all-reduced once: O(state) bytes whatever N and the dataset size; a list "
            "state is all-gathered: O(N x samples).")  # fmt: skip
    return "### Sync: 2 gloo processes on CPU\n\n" + table(table_rows, header) + note


def exactness(quick: bool, device: torch.device) -> str:
    """What the same-number guarantees cost: exact integer inputs, mel filters applied per band (vs torchaudio's MKL
    matrix product) and the autocast switch, each against its reference in the same run."""
    import torchaudio

    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(2 if quick else 16, 3, 64, 64, generator=generator).to(device) for _ in range(2)]
    clips = [(torch.rand(4 if quick else 16, 16000, generator=generator) * 2 - 1).to(device) for _ in range(2)]
    as_uint8 = [(x * 255).to(torch.uint8) for x in images]
    float_metric, int_metric = PerceptionMSE(data_range=1.0).to(device), PerceptionMSE(data_range=255).to(device)
    mel_metric = PerceptionMSE("mel", sample_rate=16000).to(device)
    mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=1024, hop_length=256, n_mels=80, power=2.0).to(device)
    reference_mse = torchmetrics.MeanSquaredError().to(device)

    def torchaudio_log_mel_mse() -> None:
        both = torch.log(mel(torch.cat(clips)) + 1e-5)
        reference_mse.update(*(x.contiguous() for x in both.chunk(2)))  # torchmetrics views with .view(-1)

    def under_autocast() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            float_metric.update(*images)

    seconds = interleaved({
        "pixel float32": lambda: float_metric.update(*images),
        "pixel float32 under bf16 autocast": under_autocast,
        "pixel uint8 (exact integer sums)": lambda: int_metric.update(*as_uint8),
        "mel (filters per band)": lambda: mel_metric.update(*clips),
        "torchaudio MelSpectrogram + log + torchmetrics MSE": torchaudio_log_mel_mse,
    })  # fmt: skip
    audio_reference = "torchaudio MelSpectrogram + log + torchmetrics MSE"
    references = {name: audio_reference if "mel" in name.lower() else "pixel float32" for name in seconds}
    rows = [(name, f"{s * 1e3:.2f}", references[name], f"{s / seconds[references[name]]:.2f}x")
            for name, s in seconds.items()]  # fmt: skip
    title = (f"### Exactness costs: {images[0].shape[0]}+{images[0].shape[0]} images 64x64, "
             f"{clips[0].shape[0]}+{clips[0].shape[0]} clips of 1 s at 16 kHz, one update\n\n")  # fmt: skip
    return title + table(rows, ("", "ms / update", "relative to", "time ratio"))


def launches(quick: bool, device: torch.device) -> str:
    """Kernel launches per update on CUDA, counted under torch's FakeTensorMode (no GPU needed): every built-in space
    with validate_args=False vs torchmetrics' MSE on the same inputs, and beyond the space's own features (the
    network's forward, its normalisation, the spectrogram) of the 2N inputs."""
    import warnings

    warnings.filterwarnings("ignore", message=".*data_ptr.*")  # FakeTensorMode's note on untyped storages
    random = {"weights": "random"}
    audio = {"sample_rate": 16000}
    cases = [("pixel", {}, 64), ("pixel", {}, 1024), ("pyramid", {}, 64), ("pyramid", {}, 1024),
             ("squeezenet", random, 64), ("squeezenet", random, 1024), ("vgg16", random, 64),
             ("lpips-alex", {**random, "data_range": 1.0}, 64), ("waveform", {}, 16000), ("mel", audio, 16000),
             ("mel", audio, 160000), ("mrstft", {}, 16000)]  # fmt: skip
    rows = []
    for name, options, size in cases:  # cheap (no GPU work): the full table even with --quick
        shape = (16, size) if size >= 16000 else (16, 3, size, size)
        metric = PerceptionMSE(name, validate_args=False, **options)
        count = fake_cuda_launches(metric, shape, lambda m, p, t: m.update(p, t))
        shown = str(count)
        if device.type == "cuda":  # the kernels this GPU really runs, as the profiler sees them
            measured = _cuda_kernels(PerceptionMSE(name, validate_args=False, **options).to(device), shape, device)
            shown = f"{count} (measured: {measured})"
        features = 0
        if len(metric.space.component_names) > 1 and not metric.space.linear:
            features = fake_cuda_launches(PerceptionMSE(name, **options), shape,
                                          lambda m, p, t: m.space.features(torch.cat([p, t])))  # fmt: skip
        reference = fake_cuda_launches(torchmetrics.MeanSquaredError(), shape, lambda m, p, t: m.update(p, t))
        rows.append((f"{name} {'x'.join(map(str, shape))}", shown, str(count - features), str(reference)))
    header = ("update (validate_args=False)", "launches", "beyond the space's features", "torchmetrics MSE")
    return "### Kernel launches per update on CUDA (counted under fake CUDA)\n\n" + table(rows, header)


def _cuda_kernels(metric: torch.nn.Module, shape: tuple[int, ...], device: torch.device) -> int:
    """CUDA kernels of the second update, counted with torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    preds, target = torch.rand(shape, device=device), torch.rand(shape, device=device)
    metric.update(preds, target)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as recorded:
        metric.update(preds, target)
        torch.cuda.synchronize()
    return sum(1 for event in recorded.events() if event.device_type == torch.autograd.DeviceType.CUDA)


IMPORTS = {
    "import torch": "import torch",
    "import pl_pmse": "import torch; import pl_pmse",
    "from pl_pmse import perception_mse": "import torch; from pl_pmse import perception_mse",
    "import torchmetrics": "import torch; import torchmetrics",
    "from pl_pmse import PerceptionMSE": "import torch; import torchmetrics; from pl_pmse import PerceptionMSE",
    "import lightning.pytorch": "import torch; import torchmetrics; import lightning.pytorch",
    "from pl_pmse import PerceptionMSECallback": "import torch; import torchmetrics; import lightning.pytorch; "
    "from pl_pmse import PerceptionMSECallback",
}


def imports(quick: bool, device: torch.device) -> str:
    """Import time of pl-pmse beyond what it builds on, each in a fresh interpreter (median of several; the loading
    of ``import torch`` itself differs run to run, so each row is compared with the row it builds on)."""
    import subprocess

    repeats = 1 if quick else 7

    def seconds(code: str) -> float:
        runs = []
        for _ in range(repeats):
            timed = f"import time; start = time.perf_counter(); {code}; print(time.perf_counter() - start)"
            done = subprocess.run([sys.executable, "-c", timed], capture_output=True, text=True, check=True)
            runs.append(float(done.stdout.split()[-1]))
        return statistics.median(runs)

    measured = {name: seconds(code) for name, code in IMPORTS.items()}
    base = {"import pl_pmse": "import torch", "from pl_pmse import perception_mse": "import torch",
            "import torchmetrics": "import torch", "from pl_pmse import PerceptionMSE": "import torchmetrics",
            "import lightning.pytorch": "import torchmetrics",
            "from pl_pmse import PerceptionMSECallback": "import lightning.pytorch"}  # fmt: skip
    rows = [(name, f"{measured[name]:.2f}", base.get(name, ""),
             f"{measured[name] - measured[base[name]]:+.2f}" if name in base else "") for name in IMPORTS]  # fmt: skip
    return "### Import time (fresh interpreter, median)\n\n" + table(rows, ("", "s", "beyond", "s beyond"))


def fidelity(quick: bool, device: torch.device) -> str:
    """SSIM and sharpness (pl_pmse.ImageFidelity, exact) vs torchmetrics' StructuralSimilarityIndexMeasure."""
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    from pl_pmse import ImageFidelity

    rows = []
    for shape in [(16, 3, 64, 64), (16, 3, 256, 256)] if not quick else [(4, 3, 64, 64)]:
        rows += _fidelity_rows(shape, device, StructuralSimilarityIndexMeasure, ImageFidelity)
    title = "### SSIM and sharpness: update time vs torchmetrics' SSIM\n\n"
    return title + table(rows, ("batch", "", "ms / update", "speed vs torchmetrics"))


def _fidelity_rows(shape: tuple[int, ...], device: torch.device, ssim_class: Any, fidelity_class: Any) -> list:
    preds, target = torch.rand(shape, device=device), torch.rand(shape, device=device)
    both, ssim = fidelity_class().to(device), fidelity_class(sharpness=False).to(device)
    reference = ssim_class(data_range=1.0).to(device)
    seconds = interleaved(
        {
            "torchmetrics SSIM": lambda: reference.update(preds, target),
            "ImageFidelity, SSIM only": lambda: ssim.update(preds, target),
            "ImageFidelity, SSIM + sharpness": lambda: both.update(preds, target),
        }
    )
    base = seconds["torchmetrics SSIM"]
    return [(str(shape), name, f"{s * 1e3:.1f}", f"{base / s:.2f}x") for name, s in seconds.items()]


def audio(quick: bool, device: torch.device) -> str:
    """Speech and aspects spaces: a hubert update and loss step vs the same torchaudio model's features by hand (one
    forward over both halves, per-layer MSE; the target under no_grad in the loss); audio-aspects vs mel."""
    import torchaudio

    from pl_pmse.spaces import get_space

    n, length = (2, 4000) if quick else (4, 16000)
    generator = torch.Generator().manual_seed(0)
    target = (0.3 * torch.randn(n, length, generator=generator)).clamp(-1, 1).to(device)
    preds = (target + 0.05 * torch.randn(n, length, generator=generator).to(device)).clamp(-1, 1)
    torch.manual_seed(0)
    reference = torchaudio.models.hubert_base().eval()  # random weights, saved to a file the space loads
    with tempfile.TemporaryDirectory() as folder:
        torch.save(reference.state_dict(), Path(folder) / "hubert.pt")
        hubert = get_space("hubert", sample_rate=16000, weights=Path(folder) / "hubert.pt").to(device)
    reference = reference.requires_grad_(False).to(device)
    depth = max(hubert.layer_numbers)

    def by_hand_update() -> float:
        with torch.no_grad():
            layers, _ = reference.extract_features(torch.cat([preds, target]), num_layers=depth)
        return sum(float(((f[:n] - f[n:]) ** 2).mean()) for f in layers)

    def by_hand_loss(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            constant, _ = reference.extract_features(t, num_layers=depth)
        tracked, _ = reference.extract_features(p, num_layers=depth)
        return sum(torch.nn.functional.mse_loss(a, b) for a, b in zip(tracked, constant, strict=True))

    layers = (torch.nn.Unflatten(1, (1, -1)), torch.nn.Conv1d(1, 8, 9, padding=4), torch.nn.Tanh(),
              torch.nn.Conv1d(8, 1, 9, padding=4), torch.nn.Flatten(), torch.nn.Tanh())  # fmt: skip
    model = torch.nn.Sequential(*layers).to(device)
    metrics = {"hubert": PerceptionMSE(hubert)}
    metrics |= {name: PerceptionMSE(name, sample_rate=16000) for name in ("audio-aspects", "mel")}
    spaces = {name: metric.to(device).space for name, metric in metrics.items()}
    repeats = 3 if quick else 7
    updates = interleaved({
        "hubert: torchaudio by hand": by_hand_update,
        "hubert: pl-pmse update": lambda: metrics["hubert"].update(preds, target),
        "mel: pl-pmse update": lambda: metrics["mel"].update(preds, target),
        "audio-aspects: pl-pmse update": lambda: metrics["audio-aspects"].update(preds, target),
    }, repeats=repeats, warmup=1)  # fmt: skip
    steps = interleaved({
        "hubert: torchaudio by hand": _training_step(model, preds, target, by_hand_loss),
        "hubert: pl-pmse perception_mse": _training_step(model, preds, target,
                                                        lambda p, t: perception_mse(p, t, spaces["hubert"])),
        "mel: pl-pmse perception_mse": _training_step(model, preds, target,
                                                     lambda p, t: perception_mse(p, t, spaces["mel"])),
        "audio-aspects: pl-pmse perception_mse": _training_step(
            model, preds, target, lambda p, t: perception_mse(p, t, spaces["audio-aspects"])),
    }, repeats=repeats, warmup=1)  # fmt: skip
    rows = []
    for what, seconds in (("update", updates), ("loss step", steps)):
        names = list(seconds)
        for name in names:
            base = seconds[names[0]] if name.startswith("hubert") else seconds[names[2]]
            versus = "hand-written" if name.startswith("hubert") else "mel"
            rows.append((what, name, f"{seconds[name] * 1e3:.1f}", f"{seconds[name] / base:.2f}x vs {versus}"))
    title = (f"### Audio: hubert (layers 1-{depth}, random weights) vs torchaudio by hand; audio-aspects vs mel; "
             f"{n} clips x {length / 16000:g} s at 16 kHz\n\n")  # fmt: skip
    return title + table(rows, ("", "", "ms", "time"))


SECTIONS: dict[str, Callable[[bool, torch.device], str]] = {
    "pixel": pixel,
    "small-batch": small_batch,
    "features": features,
    "memory": state_memory,
    "callback": callback_overhead,
    "scaling": scaling,
    "sync": sync,
    "loss": loss,
    "compiled": compiled,
    "pyramid": pyramid,
    "exactness": exactness,
    "launches": launches,
    "imports": imports,
    "fidelity": fidelity,
    "audio": audio,
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
