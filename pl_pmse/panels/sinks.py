"""Where panels go: Weights & Biases first, TensorBoard, or PNG / WAV files under the trainer's log dir.

Each sink call does the heavy part (encoding, files) wherever it is called, possibly on a background thread, and
returns the logger call still to make, a ``Send`` that the callback makes on the training thread (logger objects
are not thread-safe). Sinks are only used on global rank zero, and every call is the caller's to guard: a failing
logger must never stop training (see ``PerceptionMSECallback``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from .png import encode_png

Send = Callable[[], None]


class Sink:
    """Receives rendered panels; ``step`` is the step Lightning uses for the epoch's scalars."""

    def image(self, key: str, image: np.ndarray, caption: str, step: int) -> Send | None:
        raise NotImplementedError

    def audio(self, key: str, clips: list[np.ndarray], sample_rate: int, captions: list[str], step: int) -> Send | None:
        raise NotImplementedError

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> Send | None:
        """Optional: a table of values and thumbnails (W&B only)."""
        return None

    def __repr__(self) -> str:
        return type(self).__name__


class WandbSink(Sink):
    """``wandb.Image`` / ``wandb.Audio`` / ``wandb.Table`` through the WandbLogger, keyed on ``trainer/global_step``
    like the scalars.

    Pictures reach W&B as PNG files written by :func:`encode_png` (W&B's own encoder, Pillow at its default level,
    takes ~10x longer); W&B copies them into the run when they are logged, and they are removed then.
    """

    def __init__(self, logger: WandbLogger) -> None:
        self.logger = logger
        run = logger.experiment  # started here, on the training thread
        self._folder = Path(run.dir).parent / "pl_pmse"  # in the run's folder, not synced
        self._keep_files = bool(getattr(run.settings, "allow_media_symlink", False))  # W&B links instead of copying
        self._names = itertools.count()

    def image(self, key: str, image: np.ndarray, caption: str, step: int) -> Send:
        picture, path = self._image(image, caption)
        return self._send({key: [picture]}, step, [path])

    def audio(self, key: str, clips: list[np.ndarray], sample_rate: int, captions: list[str], step: int) -> Send:
        import wandb

        audios = [wandb.Audio(clip, sample_rate, caption) for clip, caption in zip(clips, captions, strict=True)]
        return self._send({key: audios}, step, [])

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> Send:
        import wandb

        paths: list[Path] = []
        cells = []
        for row in rows:
            cells.append([])
            for value in row:
                if isinstance(value, np.ndarray):
                    value, path = self._image(value)
                    paths.append(path)
                cells[-1].append(value)
        return self._send({key: wandb.Table(columns=columns, data=cells)}, step, paths)

    def _image(self, image: np.ndarray, caption: str | None = None) -> tuple[Any, Path]:
        import wandb

        self._folder.mkdir(exist_ok=True)
        path = self._folder / f"{next(self._names)}.png"
        path.write_bytes(encode_png(image))
        return wandb.Image(str(path), caption=caption), path

    def _send(self, metrics: dict[str, Any], step: int, files: list[Path]) -> Send:
        def send() -> None:
            try:
                self.logger.log_metrics(metrics, step=step)
            finally:  # W&B has copied the files into the run
                if not self._keep_files:
                    for path in files:
                        path.unlink(missing_ok=True)

        return send


class TensorBoardSink(Sink):
    """Images (PNG by :func:`encode_png`), audio (mono mix) and captions as text, in the logger's event file."""

    def __init__(self, logger: TensorBoardLogger) -> None:
        self.writer = logger.experiment

    def image(self, key: str, image: np.ndarray, caption: str, step: int) -> Send:
        from torch.utils.tensorboard.summary import Summary, text

        height, width, channels = image.shape
        encoded = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=encode_png(image))
        return self._send([Summary(value=[Summary.Value(tag=key, image=encoded)]), text(f"{key}/caption", caption)],
                          step)  # fmt: skip

    def audio(self, key: str, clips: list[np.ndarray], sample_rate: int, captions: list[str], step: int) -> Send:
        from torch.utils.tensorboard.summary import audio, text

        summaries = []
        for index, (clip, caption) in enumerate(zip(clips, captions, strict=True)):
            mono = clip.mean(1) if clip.ndim == 2 else clip
            summaries += [audio(f"{key}/{index}", torch.from_numpy(mono)[None], sample_rate=sample_rate),
                          text(f"{key}/{index}/caption", caption)]  # fmt: skip
        return self._send(summaries, step)

    def _send(self, summaries: list[Any], step: int) -> Send:
        def send() -> None:
            writer = self.writer._get_file_writer()  # what SummaryWriter.add_* write through
            for summary in summaries:
                writer.add_summary(summary, step)

        return send


class FileSink(Sink):
    """``<root>/<key>/step=<step>.png`` and ``...-<i>.wav`` (soundfile), captions in a ``.txt`` beside them."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str, step: int, suffix: str) -> Path:
        folder = self.root.joinpath(*key.split("/"))
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"step={step:06d}{suffix}"

    def image(self, key: str, image: np.ndarray, caption: str, step: int) -> None:
        self._path(key, step, ".png").write_bytes(encode_png(image))
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
