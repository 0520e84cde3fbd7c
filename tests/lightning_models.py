"""Tiny Lightning modules and data for callback tests (synthetic data, seconds on a CPU).

The Lightning namespace is ``$PL_PMSE_TEST_LIGHTNING``: ``pytorch_lightning`` (default) or ``lightning.pytorch``;
tests/test_lightning_namespaces.py runs the callback tests under the other one. Tests take ``pl`` and the
Lightning submodules from here.
"""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NAMESPACE = os.environ.get("PL_PMSE_TEST_LIGHTNING", "pytorch_lightning")
pl = importlib.import_module(NAMESPACE)
callbacks = importlib.import_module(f"{NAMESPACE}.callbacks")
loggers = importlib.import_module(f"{NAMESPACE}.loggers")
strategies = importlib.import_module(f"{NAMESPACE}.strategies")
cli = importlib.import_module(f"{NAMESPACE}.cli")


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=generator)
    return nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def tones(n: int, length: int = 4000, sample_rate: int = 8000, seed: int = 0) -> torch.Tensor:
    """Harmonic tones in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / sample_rate
    pitch = 150 + 300 * torch.rand(n, 1, generator=generator)
    return 0.5 * sum(torch.sin(2 * math.pi * k * pitch * t) / k for k in (1, 2, 3))


class Denoiser(pl.LightningModule):
    """A 2-layer conv net that removes Gaussian noise; ``validation_step`` returns the pair for the callback."""

    def __init__(self, channels: int = 3, lr: float = 1e-2, noise: float = 0.2, output: str = "dict") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.net(x)).clamp(0, 1)

    def _pair(self, batch: tuple[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        (clean,) = batch
        generator = torch.Generator(device=clean.device).manual_seed(int(clean.sum().item() * 1000) % 2**31)
        noisy = clean + self.hparams.noise * torch.randn(clean.shape, generator=generator, device=clean.device)
        return self(noisy.clamp(0, 1)), clean

    def training_step(self, batch, batch_idx):
        preds, target = self._pair(batch)
        loss = nn.functional.mse_loss(preds, target)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        preds, target = self._pair(batch)
        if self.hparams.output == "tuple":
            return preds, target
        if self.hparams.output == "none":
            return None
        return {"preds": preds, "target": target}

    test_step = validation_step

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def degrade(clean: torch.Tensor) -> torch.Tensor:
    """A per-sample, element-wise degradation: the same bits whatever the batch (exactness tests)."""
    return (0.75 * clean + 0.125 + 0.05 * torch.sin(37 * clean)).clamp(0, 1)


class Scaler(pl.LightningModule):
    """``preds = degrade(target) * scale`` with one trainable scale: every value is batch-independent, so a
    multi-process run must reproduce the one-process Perception MSE bit for bit."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, clean: torch.Tensor) -> torch.Tensor:
        return degrade(clean) * self.scale

    def training_step(self, batch, batch_idx):
        (clean,) = batch
        return nn.functional.mse_loss(self(clean), clean)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        (clean,) = batch
        return {"preds": self(clean), "target": clean}

    test_step = validation_step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class AudioEnhancer(pl.LightningModule):
    """A 1-d conv net that removes noise from tones."""

    def __init__(self, lr: float = 1e-2, noise: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Conv1d(1, 8, 9, padding=4), nn.Tanh(), nn.Conv1d(8, 1, 9, padding=4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x[:, None])[:, 0]

    def _pair(self, batch):
        (clean,) = batch
        generator = torch.Generator(device=clean.device).manual_seed(7)
        noise = self.hparams.noise * torch.randn(clean.shape, generator=generator, device=clean.device)
        return self(clean + noise).clamp(-1, 1), clean

    def training_step(self, batch, batch_idx):
        preds, target = self._pair(batch)
        return nn.functional.mse_loss(preds, target)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        preds, target = self._pair(batch)
        return {"preds": preds, "target": target}

    test_step = validation_step

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class ImageData(pl.LightningDataModule):
    """``val`` samples per validation set (a list: one set of each size), ``val_loaders`` sets of ``val``."""

    def __init__(
        self, train: int = 16, val: int | list[int] = 10, batch_size: int = 4, size: int = 32, val_loaders: int = 1
    ):
        super().__init__()
        self.train_set = TensorDataset(smooth_images(train, size, seed=1))
        sizes = val if isinstance(val, list) else [val] * val_loaders
        self.val_sets = [TensorDataset(smooth_images(n, size, seed=2 + i)) for i, n in enumerate(sizes)]
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        loaders = [DataLoader(s, batch_size=self.batch_size) for s in self.val_sets]
        return loaders[0] if len(loaders) == 1 else loaders

    test_dataloader = val_dataloader


class AudioData(pl.LightningDataModule):
    def __init__(self, train: int = 8, val: int = 6, batch_size: int = 3, length: int = 4000):
        super().__init__()
        self.train_set = TensorDataset(tones(train, length, seed=1))
        self.val_set = TensorDataset(tones(val, length, seed=2))
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    test_dataloader = val_dataloader


def cpu_trainer(root: Path, callbacks: list, **options: Any) -> pl.Trainer:
    """A quick single-process CPU Trainer writing under ``root``; ``options`` override the defaults."""
    defaults = dict(max_epochs=2, accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=root)  # fmt: skip
    return pl.Trainer(callbacks=callbacks, **{**defaults, **options})
