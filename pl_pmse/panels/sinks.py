"""Where panels go: Weights & Biases first, TensorBoard, or PNG / WAV files under the trainer's log dir.

Sinks are only called on global rank zero. Each call is the caller's to guard: a failing logger must never
stop training (see ``PerceptionMSECallback``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger


class Sink:
    """Receives rendered panels; ``step`` is the step Lightning uses for the epoch's scalars."""

    def image(self, key: str, image: np.ndarray, caption: str, step: int) -> None:
        raise NotImplementedError

    def audio(self, key: str, clips: list[np.ndarray], sample_rate: int, captions: list[str], step: int) -> None:
        raise NotImplementedError

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Optional: a table of values and thumbnails (W&B only)."""

    def __repr__(self) -> str:
        return type(self).__name__


class WandbSink(Sink):
    """``wandb.Image`` / ``wandb.Audio`` through the WandbLogger, keyed on ``trainer/global_step`` like the scalars."""

    def __init__(self, logger: WandbLogger) -> None:
        self.logger = logger

    def image(self, key: str, image: np.ndarray, caption: str, step: int) -> None:
        self.logger.log_image(key=key, images=[image], step=step, caption=[caption])

    def audio(self, key: str, clips: list[np.ndarray], sample_rate: int, captions: list[str], step: int) -> None:
        self.logger.log_audio(
            key=key, audios=clips, step=step, sample_rate=[sample_rate] * len(clips), caption=captions
        )

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        import wandb

        cells = [[wandb.Image(v) if isinstance(v, np.ndarray) else v for v in row] for row in rows]
        self.logger.log_table(key=key, columns=columns, data=cells, step=step)


class TensorBoardSink(Sink):
    """``add_image`` / ``add_audio`` (mono mix) / ``add_text`` for captions."""

    def __init__(self, logger: TensorBoardLogger) -> None:
        self.writer = logger.experiment

    def image(self, key: str, image: np.ndarray, caption: str, step: int) -> None:
        self.writer.add_image(key, image, step, dataformats="HWC")
        self.writer.add_text(f"{key}/caption", caption, step)

    def audio(self, key: str, clips: list[np.ndarray], sample_rate: int, captions: list[str], step: int) -> None:
        for index, (clip, caption) in enumerate(zip(clips, captions, strict=True)):
            mono = clip.mean(1) if clip.ndim == 2 else clip
            self.writer.add_audio(f"{key}/{index}", torch.from_numpy(mono)[None], step, sample_rate=sample_rate)
            self.writer.add_text(f"{key}/{index}/caption", caption, step)


class FileSink(Sink):
    """``<root>/<key>/step=<step>.png`` and ``...-<i>.wav`` (soundfile), captions in a ``.txt`` beside them."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str, step: int, suffix: str) -> Path:
        folder = self.root.joinpath(*key.split("/"))
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"step={step:06d}{suffix}"

    def image(self, key: str, image: np.ndarray, caption: str, step: int) -> None:
        Image.fromarray(image).save(self._path(key, step, ".png"), compress_level=1)  # fast; panels are small
        self._path(key, step, ".txt").write_text(caption + "\n")

    def audio(self, key: str, clips: list[np.ndarray], sample_rate: int, captions: list[str], step: int) -> None:
        import soundfile

        for index, clip in enumerate(clips):
            soundfile.write(self._path(key, step, f"-{index}.wav"), clip, sample_rate)
        self._path(key, step, ".txt").write_text("\n".join(captions) + "\n")

    def __repr__(self) -> str:
        return f"FileSink({self.root})"


def sinks_for(loggers: list[Any], file_root: str | Path) -> list[Sink]:
    """One sink per W&B or TensorBoard logger; PNG/WAV files when there is neither (CSV logger, no logger)."""
    sinks: list[Sink] = []
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            sinks.append(WandbSink(logger))
        elif isinstance(logger, TensorBoardLogger):
            sinks.append(TensorBoardSink(logger))
    return sinks or [FileSink(file_root)]
