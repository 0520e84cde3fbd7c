"""ExactEvaluation: the pl-pmse metrics a LightningModule updates itself count every sample once under DDP."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor
from typing_extensions import override

from ..distributed import dataloaders_of, own_samples, sampler_of
from ..exact_metric import ExactSumMetric, Padding
from ..lightning_compat import CALLBACK_BASES

if TYPE_CHECKING:  # either namespace at run time: see lightning_compat
    import lightning.pytorch as pl


class ExactEvaluation(*CALLBACK_BASES):
    """Under DDP, a ``DistributedSampler`` pads the ranks to equal length with repeats of the first samples, and a
    metric updated with every sample a rank receives counts them. With this callback on the Trainer, every
    :class:`~pl_pmse.PerceptionMSE` and :class:`~pl_pmse.ErrorProfile` held by the LightningModule (as an attribute,
    in a ``MetricCollection`` or any submodule) leaves those repeats out of its validation and test updates: the
    value logged with ``self.log("val/pmse", self.val_pmse)`` equals one process's over the whole set, on any
    number of processes and any set size.

    Each update of such a metric in a ``validation_step`` / ``test_step`` must take the batch's samples in order
    (one update per batch, or updates of consecutive slices of it).

    Example::

        class Model(LightningModule):
            def __init__(self):
                super().__init__()
                self.val_pmse = PerceptionMSE("pyramid", data_range=1.0)

            def validation_step(self, batch, batch_idx):
                x, y = batch
                self.val_pmse.update(self(x), y)
                self.log("val/pmse", self.val_pmse)

        Trainer(strategy="ddp", devices=2, callbacks=[ExactEvaluation()])
    """

    def __init__(self) -> None:
        super().__init__()
        self._passes: dict[int, Padding] = {}
        self._metrics: list[ExactSumMetric] = []  # the module's, found once per pass
        self._warned = False

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(pl_module, trainer.val_dataloaders)

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(pl_module, trainer.test_dataloaders)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._mark(pl_module, dataloader_idx)

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._mark(pl_module, dataloader_idx)

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._advance(pl_module, batch, dataloader_idx)

    @override
    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._advance(pl_module, batch, dataloader_idx)

    def _start(self, pl_module: pl.LightningModule, dataloaders: Any) -> None:
        loaders = enumerate(dataloaders_of(dataloaders))
        self._passes = {index: Padding(own_samples(sampler_of(loader))) for index, loader in loaders}
        self._metrics = [module for module in pl_module.modules() if isinstance(module, ExactSumMetric)]

    def _mark(self, pl_module: pl.LightningModule, index: int) -> None:
        """The metrics' next updates are of this batch: from its start position in this rank's pass."""
        padding = self._passes.setdefault(index, Padding(None))
        padding.rows = 0
        for metric in self._metrics:
            metric.__dict__.update(_padding=padding, _padding_rows=0)

    def _advance(self, pl_module: pl.LightningModule, batch: Any, index: int) -> None:
        padding = self._passes[index]
        rows = _rows_of(batch)
        if rows and padding.rows > rows and not self._warned:  # a metric took more rows than the batch holds
            self._warned = True
            warnings.warn(
                f"ExactEvaluation: a metric was updated with {padding.rows} rows in a batch of {rows} (updated twice "
                f"per batch, or the batch's first tensor is not batch-major): the DistributedSampler's padding "
                f"cannot be told apart, so the value may differ between 1 and N processes; update each metric once "
                f"per batch with the batch's samples in order",
                UserWarning,
                stacklevel=2,
            )
        padding.seen += rows or padding.rows
        for metric in self._metrics:
            metric.__dict__["_padding"] = None


def _rows_of(batch: Any) -> int:
    """The batch size: the first dimension of the first tensor in the batch (as Lightning finds it), else 0."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else 0
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, Sequence) else ()
    for item in items if not isinstance(batch, str) else ():
        rows = _rows_of(item)
        if rows:
            return rows
    return 0
