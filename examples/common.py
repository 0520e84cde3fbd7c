"""Pieces shared by the examples: the LightningCLI entry point, an offline-first W&B logger, a console table."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import WandbLogger


class EpochTable(pl.Callback):
    """Prints one line per validation epoch with Perception MSE and its components (rank zero only): every key
    under ``prefix``, or the ``keys`` given (each column named by the key's last word: ``val/aspects_pitch`` ->
    ``pitch``).

    At the end of ``fit`` it says where the W&B run lives and how to upload it.
    """

    def __init__(self, prefix: str = "val/pmse", keys: list[str] | None = None) -> None:
        self.prefix, self.keys = prefix, keys
        self._columns: list[str] | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        wanted = (lambda k: k in self.keys) if self.keys else (lambda k: k.startswith(self.prefix))
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if wanted(k)}
        if self._columns is None:
            if self.keys:
                self._columns = list(self.keys)
                names = [re.split(r"[/_]", key)[-1] for key in self._columns]
            else:
                self._columns = sorted(values, key=lambda k: (k != self.prefix, k))
                names = [k[len(self.prefix) :].lstrip("/_") or "pmse" for k in self._columns]
            print("\n" + " ".join(f"{n:>10.10s}" for n in ["epoch", *names]), flush=True)
        row = [f"{trainer.current_epoch:>10d}"] + [f"{values.get(k, float('nan')):>10.4g}" for k in self._columns]
        print(" ".join(row), flush=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run_dir = os.path.dirname(logger.experiment.dir)
                if logger.experiment.settings.mode in ("offline", "dryrun") or getattr(
                    logger.experiment, "offline", False
                ):
                    print(f"\nW&B run (offline): {run_dir}\n  upload it:   wandb sync {run_dir}\n"
                          "  run online:  wandb login, then WANDB_MODE=online python ...", flush=True)  # fmt: skip
                else:
                    print(f"\nW&B run: {logger.experiment.url}", flush=True)
                return
        print(f"\nLogs and panels: {trainer.log_dir}", flush=True)


def wandb_logger(project: str) -> dict[str, Any]:
    """A WandbLogger entry for ``trainer_defaults``: offline unless ``WANDB_MODE=online``."""
    online = os.environ.get("WANDB_MODE", "offline") == "online"
    save_dir = os.path.abspath("runs")
    os.makedirs(save_dir, exist_ok=True)  # W&B 0.17-0.18 put the run in the system temp folder if it is missing
    return {"class_path": "pytorch_lightning.loggers.WandbLogger",
            "init_args": {"project": project, "save_dir": save_dir, "offline": not online}}  # fmt: skip


def run_cli(model: type, data: type, project: str, args: Sequence[str] | None = None) -> LightningCLI:
    """``LightningCLI(model, data)`` with W&B offline by default and the epoch table."""
    return LightningCLI(
        model,
        data,
        args=args,
        trainer_defaults={"logger": wandb_logger(project), "default_root_dir": f"runs/{project}"},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )
