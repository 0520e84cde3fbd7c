"""Image denoising on real photographs, validated with Perception MSE and W&B error panels, offline.

The photographs ship inside scikit-image's wheel (no download). Training uses random crops of chelsea,
rocket, hubble_deep_field, immunohistochemistry and retina; validation uses fixed crops of astronaut and
coffee. The model is a small residual CNN (DnCNN-style) that predicts the noise.

    python examples/image_denoising.py fit --config configs/image_denoising.yaml
    python examples/image_denoising.py fit --config configs/image_denoising.yaml --config configs/ddp.yaml
    WANDB_MODE=online python examples/image_denoising.py fit --config configs/image_denoising.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.common import run_cli

TRAIN_PHOTOS = ("chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
VAL_PHOTOS = ("astronaut", "coffee")


def photograph(name: str) -> torch.Tensor:
    """A scikit-image photograph as float ``[3, H, W]`` in [0, 1]."""
    from skimage import data

    return torch.from_numpy(np.ascontiguousarray(getattr(data, name)())).permute(2, 0, 1).float() / 255


class NoisyCrops(Dataset):
    """Crops of photographs with additive Gaussian noise: ``(noisy, clean)``.

    Random crops (and noise) when ``random=True``; otherwise a fixed grid of crops with fixed noise, so that
    validation sees the same pairs every epoch.
    """

    def __init__(self, photos: tuple[str, ...], crop: int, count: int, noise: float, random: bool, seed: int) -> None:
        self.images = [photograph(name) for name in photos]
        self.crop, self.count, self.noise, self.random, self.seed = crop, count, noise, random, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(
            self.seed + (index if not self.random else int(torch.randint(2**31, ())))
        )
        image = self.images[index % len(self.images)]
        _, height, width = image.shape
        top = int(torch.randint(height - self.crop + 1, (), generator=generator))
        left = int(torch.randint(width - self.crop + 1, (), generator=generator))
        clean = image[:, top : top + self.crop, left : left + self.crop]
        noisy = clean + self.noise * torch.randn(clean.shape, generator=generator)
        return noisy, clean


class PhotoCrops(pl.LightningDataModule):
    """Noisy/clean crop pairs of the photographs shipped with scikit-image."""

    def __init__(
        self, crop: int = 64, train_crops: int = 512, val_crops: int = 32, noise: float = 0.1, batch_size: int = 16,
        num_workers: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        h = self.hparams
        self.train_set = NoisyCrops(TRAIN_PHOTOS, h.crop, h.train_crops, h.noise, random=True, seed=0)
        self.val_set = NoisyCrops(VAL_PHOTOS, h.crop, h.val_crops, h.noise, random=False, seed=10_000)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(self.train_set, batch_size=h.batch_size, shuffle=True, num_workers=h.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)

    test_dataloader = val_dataloader


class Denoiser(pl.LightningModule):
    """A small DnCNN: ``depth`` 3x3 conv layers predicting the noise (residual learning), trained with MSE plus,
    with ``perceptual_weight > 0``, a Perception MSE term in ``perceptual_space`` (the super-resolution recipe:
    ``vgg19`` with Real-ESRGAN's layers and weights, see ``configs/image_vgg19_loss.yaml``)."""

    def __init__(
        self, width: int = 32, depth: int = 5, lr: float = 1e-3, perceptual_space: str = "vgg19",
        perceptual_weight: float = 0.0, perceptual_options: dict | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        self.perceptual = None
        if perceptual_weight > 0:
            from pl_pmse import get_space

            self.perceptual = get_space(perceptual_space, **(perceptual_options or {}))  # frozen, moves with us
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        return (noisy - self.net(noisy)).clamp(0, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        noisy, clean = batch
        denoised = self(noisy)
        loss = nn.functional.mse_loss(denoised, clean)
        self.log("train/mse", loss, prog_bar=True)
        if self.perceptual is not None:
            from pl_pmse import perception_mse

            perceptual = perception_mse(denoised, clean, space=self.perceptual, data_range=1.0)
            self.log("train/perceptual", perceptual)
            loss = loss + self.hparams.perceptual_weight * perceptual
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        noisy, clean = batch
        return {"preds": self(noisy), "target": clean}  # PerceptionMSECallback reads this pair

    test_step = validation_step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(args: list[str] | None = None) -> None:
    run_cli(Denoiser, PhotoCrops, "image_denoising", args)


if __name__ == "__main__":
    main()
