"""Fault injection in training: broken media writes, NaN batches, a failing renderer, kill and resume, DDP errors."""

from __future__ import annotations

import errno
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from pl_pmse.callback import PerceptionMSECallback
from pl_pmse.panels import image as image_panels
from tests.lightning_models import Denoiser, ImageData, callbacks, cpu_trainer, loggers, pl, strategies

ModelCheckpoint, CSVLogger, DDPStrategy = callbacks.ModelCheckpoint, loggers.CSVLogger, strategies.DDPStrategy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def trainer_for(root: Path, callbacks: list, **options) -> pl.Trainer:
    return cpu_trainer(root, callbacks, **{"logger": CSVLogger(root), "num_sanity_val_steps": 0, **options})


class PoisonedDenoiser(Denoiser):
    """Predicts NaN for one validation batch of one epoch (on ``rank``), like a model blowing up mid-epoch."""

    def __init__(self, epoch: int = 1, batch: int = 1, rank: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.poison = (epoch, batch, rank)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        out = super().validation_step(batch, batch_idx)
        if (self.current_epoch, batch_idx, self.global_rank) == self.poison:
            out["preds"] = out["preds"].clone()
            out["preds"][0, 0, 0, 0] = float("nan")
        return out


def test_disk_full_on_media_write_warns_once_and_training_continues(tmp_path, monkeypatch) -> None:
    real_write = Path.write_bytes

    def disk_full(path: Path, data: bytes) -> int:
        if path.suffix == ".png":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    trainer = trainer_for(tmp_path, [PerceptionMSECallback("pixel", data_range=1.0)], max_epochs=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Denoiser(), ImageData())
    failures = [str(w.message) for w in caught if "No space left" in str(w.message)]
    assert len(failures) == 1 and "FileSink" in failures[0]
    assert trainer.current_epoch == 3 and "val/pmse" in trainer.callback_metrics


@pytest.mark.parametrize("strategy", ["warn", "ignore"])
def test_nan_batch_mid_epoch_is_skipped_and_counted(tmp_path, strategy: str) -> None:
    trainer = trainer_for(tmp_path, [PerceptionMSECallback("pixel", data_range=1.0, nan_strategy=strategy)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(PoisonedDenoiser(epoch=1, batch=1), ImageData())
    nan_warnings = [w for w in caught if "contains NaN or Inf" in str(w.message)]
    assert len(nan_warnings) == (1 if strategy == "warn" else 0)
    rows = (Path(trainer.log_dir) / "metrics.csv").read_text().splitlines()
    header, values = rows[0].split(","), [row.split(",") for row in rows[1:]]
    skipped = [float(row[header.index("val/pmse/skipped")]) for row in values if row[header.index("val/pmse/skipped")]]
    assert skipped == [0.0, 1.0]  # epoch 0 clean, epoch 1 lost one sample and went on
    assert torch.isfinite(trainer.callback_metrics["val/pmse"])


def test_nan_batch_with_the_default_strategy_stops_with_a_clear_error(tmp_path) -> None:
    trainer = trainer_for(tmp_path, [PerceptionMSECallback("pixel", data_range=1.0)])
    with pytest.raises(ValueError, match=r"preds: contains NaN or Inf in samples \[0\]"):
        trainer.fit(PoisonedDenoiser(epoch=1, batch=1), ImageData())


def test_an_exception_in_one_epochs_rendering_skips_only_that_epochs_panels(tmp_path, monkeypatch) -> None:
    calls = {"n": 0}
    original = image_panels.comparison_grid

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("renderer out of memory")
        return original(*args, **kwargs)

    monkeypatch.setattr(image_panels, "comparison_grid", flaky)
    trainer = trainer_for(tmp_path, [PerceptionMSECallback("pixel", data_range=1.0)], max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Denoiser(), ImageData())
    assert any("renderer out of memory" in str(w.message) for w in caught)
    fixed = sorted(Path(trainer.log_dir, "pmse_panels", "val", "pmse", "panels", "fixed").glob("*.png"))
    assert len(fixed) == 1  # epoch 0's fixed grid failed; its other panels and all of epoch 1 were drawn
    assert len(list(Path(trainer.log_dir, "pmse_panels").rglob("*.png"))) == 3 + 4


class KillAt(pl.Callback):
    """Simulates the process dying in the middle of a training epoch."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == self.at:
            raise SystemExit("killed")


class OrderedData(ImageData):
    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)


class ValHistory(pl.Callback):
    def __init__(self) -> None:
        self.values: dict[int, float] = {}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.values[trainer.current_epoch] = float(trainer.callback_metrics["val/pmse"])


def test_kill_and_resume_gives_the_values_of_an_uninterrupted_run(tmp_path) -> None:
    options = dict(max_epochs=3, logger=False, enable_checkpointing=True)
    pl.seed_everything(0)
    reference = ValHistory()
    trainer_for(tmp_path / "ref", [PerceptionMSECallback("pyramid", data_range=1.0), reference], **options).fit(
        Denoiser(), OrderedData()
    )

    pl.seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    first = ValHistory()
    killed = trainer_for(tmp_path / "run", [PerceptionMSECallback("pyramid", data_range=1.0), first, checkpoints,
                                            KillAt(epoch=1, batch=2)], **options)  # fmt: skip
    with pytest.raises(SystemExit):
        killed.fit(Denoiser(), OrderedData())
    (last,) = sorted((tmp_path / "ckpt").glob("epoch=0-*.ckpt"))
    second = ValHistory()
    resumed = trainer_for(tmp_path / "run", [PerceptionMSECallback("pyramid", data_range=1.0), second], **options)
    resumed.fit(Denoiser(), OrderedData(), ckpt_path=last)
    assert first.values == {0: reference.values[0]}
    assert second.values == {1: reference.values[1], 2: reference.values[2]}  # bit for bit


@pytest.mark.slow
def test_ddp_error_on_one_rank_fails_fast_instead_of_hanging(tmp_path) -> None:
    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=30))
    trainer = trainer_for(tmp_path, [PerceptionMSECallback("pixel", data_range=1.0)], devices=2, strategy=strategy)
    start = time.monotonic()
    with pytest.raises(Exception, match=r"contains NaN or Inf"):
        trainer.fit(PoisonedDenoiser(epoch=0, batch=0, rank=1), ImageData())
    assert time.monotonic() - start < 120
