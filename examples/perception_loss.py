"""Perception MSE without the callback: as a training loss, and as torchmetrics metrics in a LightningModule.

    python examples/perception_loss.py            # a short run on the scikit-image photographs, CSV logs

The module trains the denoiser of examples/image_denoising.py with ``mse + 0.5 * perception_mse(pyramid)``
and logs a ``MetricCollection`` (Perception MSE in two spaces plus torchmetrics' PSNR) every validation epoch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torchmetrics import MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.image_denoising import Denoiser, PhotoCrops
from pl_pmse import ExactEvaluation, PerceptionMSE, get_space, perception_mse


class PerceptualDenoiser(Denoiser):
    def __init__(self, perceptual_weight: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.perceptual_weight = perceptual_weight
        self.pyramid = get_space("pyramid")  # build a space once; it moves with the module
        self.val_metrics = MetricCollection(
            {
                "pmse_pixel": PerceptionMSE("pixel"),
                "pmse_pyramid": PerceptionMSE(self.pyramid, data_range=1.0),
                "psnr": PeakSignalNoiseRatio(data_range=1.0),
            },
            prefix="val/",
        )

    def training_step(self, batch, batch_idx):
        noisy, clean = batch
        denoised = self(noisy)
        mse = torch.nn.functional.mse_loss(denoised, clean)
        perceptual = perception_mse(denoised, clean, space=self.pyramid)  # differentiable
        self.log_dict({"train/mse": mse, "train/pmse": perceptual}, prog_bar=True)
        return mse + self.perceptual_weight * perceptual

    def validation_step(self, batch, batch_idx):
        noisy, clean = batch
        self.val_metrics.update(self(noisy), clean)
        self.log_dict(self.val_metrics)  # Lightning computes (one all_reduce each) and resets every epoch


def main(max_epochs: int = 2, limit_train_batches: int = 16, root: str = "runs/perception_loss") -> pl.Trainer:
    pl.seed_everything(0)
    # ExactEvaluation: under DDP the pl-pmse metrics above leave the DistributedSampler's padding repeats out, so
    # they equal the one-process values on any set size (torchmetrics' PSNR still counts them)
    trainer = pl.Trainer(max_epochs=max_epochs, limit_train_batches=limit_train_batches, accelerator="cpu",
                         logger=CSVLogger(root), default_root_dir=root, enable_model_summary=False,
                         callbacks=[ExactEvaluation()])  # fmt: skip
    trainer.fit(PerceptualDenoiser(), PhotoCrops(train_crops=256, val_crops=16))
    print({name: round(float(value), 6) for name, value in trainer.callback_metrics.items()})
    return trainer


if __name__ == "__main__":
    main()
