"""Perception MSE of degraded versions of a real photograph (scikit-image's astronaut), offline.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import torch
from skimage import data

from pl_pmse import PerceptionMSE


def degradations(image: torch.Tensor) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    blur = torch.nn.functional.avg_pool2d(image, 5, stride=1, padding=2, count_include_pad=False)
    return {
        "gaussian noise (sigma=0.05)": (image + 0.05 * torch.randn(image.shape, generator=generator)).clamp(0, 1),
        "box blur (5x5)": blur,
        "brightness +0.05": (image + 0.05).clamp(0, 1),
    }


def main() -> None:
    target = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    print(f"target: astronaut, {tuple(target.shape)}")
    print(f"{'degradation':<30} {'Perception MSE':>15} {'PSNR (dB)':>10}")
    for name, preds in degradations(target).items():
        metric = PerceptionMSE("pixel", data_range=1.0)
        metric.update(preds, target)
        summary = metric.compute_summary()
        print(f"{name:<30} {summary['total'].item():>15.6f} {summary['psnr'].item():>10.2f}")


if __name__ == "__main__":
    main()
