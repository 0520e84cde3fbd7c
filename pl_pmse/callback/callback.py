"""PerceptionMSECallback: Perception MSE every validation / test epoch, with error panels.

Every rank updates its metrics and takes part in every collective, in the same order: the metric sync, the
error-profile sync and the gather of the worst samples. Only rendering and logger calls run on global rank
zero, never during the sanity check, and a failing logger only warns.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from .. import checks
from ..distributed import (
    check_same_everywhere,
    collective_device,
    dataloaders_of,
    own_samples,
    receive_bytes,
    sampler_of,
    send_bytes,
)
from ..fidelity import ImageFidelity
from ..lightning_compat import CALLBACK_BASES
from ..mcd import MelCepstralDistortion
from ..metric import PerceptionMSE
from ..panels.sets import PANEL_SETS, PanelOptions, PanelSet, Sample, SetFigures
from ..precision import own_precision
from ..profile import ErrorProfile
from ..sinks import Sink, sinks_for
from ..spaces import AudioAspects, Space, available_spaces, get_space
from ..spaces.registry import space_options as space_options_of
from .report import EpochReport, ReportPart, SyncedProfile, draw_report
from .selection import FixedSamples, WorstSamples, candidates
from .worker import PanelWorker

if TYPE_CHECKING:  # either namespace at run time: see lightning_compat
    import lightning.pytorch as pl

Extract = Callable[[Any, Any], tuple[Tensor, Tensor]]


@dataclass
class _Stage:
    """Metrics and panel buffers of one loop (validation or test), one entry per dataloader."""

    prefix: str
    metrics: list[PerceptionMSE]
    profiles: list[ErrorProfile]
    fidelity: list[ImageFidelity | MelCepstralDistortion]  # per dataloader: SSIM / sharpness, MCD; or empty
    worst: list[WorstSamples] = field(default_factory=list)
    fixed: list[Sample] = field(default_factory=list)
    own: list[int | None] = field(default_factory=list)  # per dataloader: this rank's own samples (None: unknown)
    seen: list[int] = field(default_factory=list)  # per dataloader: samples received this epoch
    figures: list[list[list[Any]]] = field(default_factory=list)  # per dataloader: [position, label, values...]

    def counted(self, index: int, rows: int) -> int:
        """How many leading rows of the next batch of dataloader ``index`` count: the padding repeats of a
        DistributedSampler are the last samples a rank receives (see :mod:`pl_pmse.distributed`)."""
        start, own = self.seen[index], self.own[index]
        self.seen[index] += rows
        return rows if own is None else max(0, min(rows, own - start))

    def key(self, name: str, index: int) -> str:
        """``<prefix>_<name>`` (``name=""``: the prefix), with Lightning's dataloader suffix when there are several.

        Not ``<prefix>/<name>``: a file store (MLflow's ``file:./mlruns``) keeps each key as a file at its path, and
        ``val/pmse`` cannot be a file and the folder of ``val/pmse/pixel`` at once."""
        key = f"{self.prefix}_{name}" if name else self.prefix
        return key + (f"/dataloader_idx_{index}" if len(self.metrics) > 1 else "")


_LONGEST_PANEL_TIMEOUT = 86400.0  # seconds; a wait far longer overflows the platform's timers


class PerceptionMSECallback(*CALLBACK_BASES):
    """Log Perception MSE every validation (and test) epoch, and draw where the model fails.

    Add it to the Trainer and return the pair from ``validation_step``::

        trainer = Trainer(callbacks=[PerceptionMSECallback("vgg16", weights="imagenet", data_range=1.0)])

        def validation_step(self, batch, batch_idx):
            x, y = batch
            return {"preds": self(x), "target": y}

    Scalars (through ``pl_module.log``, so ``ModelCheckpoint(monitor="val/pmse")`` and ``EarlyStopping`` work):
    ``val/pmse``, ``val/pmse_<component>``, ``val/pmse_psnr`` (with ``data_range``), ``val/pmse_skipped`` (when
    ``nan_strategy`` skips samples); for images ``val/pmse_ssim`` (with ``data_range``) and ``val/pmse_sharpness``
    (:class:`~pl_pmse.fidelity.ImageFidelity`); for audio ``val/pmse_mcd`` (with a sample rate; the mel-cepstral
    distortion in dB, :class:`~pl_pmse.mcd.MelCepstralDistortion`); with several dataloaders each key ends in
    ``/dataloader_idx_<i>``.
    The test loop logs the same under ``test/pmse``. Values equal ``PerceptionMSE`` (torchmetrics' SSIM) over the
    whole set, on every rank.

    Panels (rank zero, every ``panels_every_n_epochs``, never in the sanity check), keys under ``<prefix>/``:
    images: ``panels/fixed`` (the same samples every epoch), ``panels/worst`` (the worst samples across all ranks),
    ``panels/error_map``, ``panels/spectrum`` (the whole set, with its sharpness) and ``panels/comparison`` (every
    sample's Perception MSE against its PSNR and SSIM; the table ``tables/comparison`` on W&B); audio: log-mel and
    difference spectrograms, waveform overlays and playable clips of the fixed and worst samples, and
    ``panels/mel_profile``.
    They go to W&B (``WandbLogger``), TensorBoard, or PNG/WAV files under ``<log_dir>/pmse_panels``.

    Args:
        space: a space name, a Space, an ``nn.Module``, or a ready :class:`PerceptionMSE` (its space and options
            are used). Other keyword options go to the space (``weights=``, ``layers=``, ...).
        preds_key, target_key: keys of the pair in the dict that ``validation_step`` returns; a returned
            ``(preds, target)`` tuple works too.
        input_key: key of the model input in that dict (optional): image panels then show it in a first column
            (at its own size: a low-resolution input of a super-resolution model too). ``None``: no input column.
        prefix, test_prefix: key prefixes of the validation and test loops.
        extract: ``(outputs, batch) -> (preds, target)`` for any other layout (define it at module level for
            ``ddp_spawn``, which pickles the callback).
        data_range, nan_strategy, validate_args: as in :class:`PerceptionMSE` (a ready metric brings its own);
            ``data_range`` also scales the pictures (default ``[0, 1]``) and clips (default ``[-1, 1]``).
        panels: draw panels at all; ``num_panel_samples`` fixed and ``worst_k`` worst samples per panel (at most 64
            each: a panel's rows).
        panels_every_n_epochs: draw every n-th validation epoch.
        background_panels: let training go on while the panel thread draws and encodes; the logger calls are made
            at the next training batch (or when the loop ends) while the training thread waits, so they never run
            beside Lightning's own logging. ``False``: the epoch end waits for the drawing and the logger calls at
            once, under the same ``panel_timeout`` and the same containment of failures.
        panel_timeout: the most the training thread waits for one epoch's panels, in seconds, drawing and logger
            calls together (default 10). Panels that miss it are dropped with one warning that counts them, and a
            logger that overran is not called again; teardown waits at most this too, Ctrl-C not at all.
        profile: accumulate the dataset error map / spectra / mel-band profile.
        ssim, sharpness: log the set's SSIM (needs ``data_range``) and sharpness for images (see
            :mod:`pl_pmse.fidelity`): sharpness below 1 means blurrier predictions than targets, above 1 noisier.
        mcd: log the set's mel-cepstral distortion for audio (needs ``sample_rate``; on the ``audio-aspects``
            space's own cepstrum analysis, else its defaults).
        modality: ``"image"``, ``"audio"`` or ``"auto"`` (audio for audio spaces or when ``sample_rate`` is given).
        sample_rate: of the audio (for spectrograms, clips and the mel profile); taken from a ``mel`` space.
        prog_bar: show ``val/pmse`` in the progress bar.
        sinks: destinations of your own (:class:`pl_pmse.sinks.Sink` subclasses), served besides the loggers'
            (then no PNG/WAV files are written when no logger shows panels).
        space_options: options of the space as one mapping (the form LightningCLI configs need); keyword
            ``options`` are merged over it.
    """

    def __init__(
        self,
        space: str | nn.Module | PerceptionMSE = "pixel",
        preds_key: str = "preds",
        input_key: str | None = "input",
        target_key: str = "target",
        prefix: str = "val/pmse",
        test_prefix: str = "test/pmse",
        extract: Extract | None = None,
        data_range: float | tuple[float, float] | None = None,
        nan_strategy: str = "error",
        validate_args: bool = True,
        panels: bool = True,
        num_panel_samples: int = 4,
        worst_k: int = 4,
        panels_every_n_epochs: int = 1,
        background_panels: bool = True,
        panel_timeout: float = 10.0,
        profile: bool = True,
        ssim: bool = True,
        sharpness: bool = True,
        mcd: bool = True,
        error_map_grid: int = 32,
        spectrum_bands: int = 32,
        modality: str = "auto",
        sample_rate: int | None = None,
        prog_bar: bool = True,
        sinks: Sequence[Sink] | None = None,
        space_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        space_options = {**(space_options or {}), **options}
        if isinstance(space, PerceptionMSE):
            if space_options:
                raise ValueError(f"space options {sorted(space_options)} do not apply to a ready PerceptionMSE")
            ready = space
            data_range, nan_strategy, space = ready.data_range, ready.nan_strategy, ready.space
            validate_args = ready.validate_args
            if data_range is not None and not ready.psnr_clamps:
                data_range = data_range[1]  # the [0, d] form: PSNR without clamping, as the metric had it
        named = isinstance(space, str) and space in available_spaces()
        if sample_rate is not None and named and "sample_rate" in space_options_of(space):
            space_options.setdefault("sample_rate", sample_rate)  # one sample_rate for the space and the panels
        self.space: Space = get_space(space, **space_options)
        self._metric_data_range = data_range  # the form given: a (min, max) pair makes PSNR clamp, as torchmetrics'
        self.data_range = checks.check_data_range(data_range)
        checks.check_data_range_given(self.space, self.data_range)
        self.nan_strategy = checks.check_choice("nan_strategy", nan_strategy, checks.NAN_STRATEGIES)
        for argument, value in (("preds_key", preds_key), ("target_key", target_key), ("prefix", prefix),
                                ("test_prefix", test_prefix)):  # fmt: skip
            if not isinstance(value, str) or not value:
                raise ValueError(f"{argument}: expected a non-empty string, got {value!r}")
        for argument, value in (("prefix", prefix), ("test_prefix", test_prefix)):
            parts = value.split("/")
            if not value.isprintable() or "\\" in value or "" in parts or {".", ".."} & set(parts):
                raise ValueError(
                    f"{argument}: expected a key like 'val/pmse' (printable names joined by single '/', no empty, "
                    f"'.' or '..' part, no leading or trailing '/': it also names the panel folders), got {value!r}"
                )
        if (
            isinstance(panel_timeout, bool)
            or not isinstance(panel_timeout, (int, float))
            or not (0 < panel_timeout <= _LONGEST_PANEL_TIMEOUT)
        ):
            raise ValueError(
                f"panel_timeout: expected a number of seconds > 0 and at most {_LONGEST_PANEL_TIMEOUT:g} (a day: the "
                f"thread waits take no longer), got {panel_timeout!r}"
            )
        for argument, value in (("panels", panels), ("background_panels", background_panels), ("profile", profile),
                                ("ssim", ssim), ("sharpness", sharpness), ("mcd", mcd),
                                ("prog_bar", prog_bar), ("validate_args", validate_args)):  # fmt: skip
            if not isinstance(value, bool):
                raise TypeError(f"{argument}: expected True or False, got {value!r}")
        self.validate_args = validate_args
        if sinks is not None and (
            isinstance(sinks, (str, bytes)) or not isinstance(sinks, Sequence)
            or not all(isinstance(sink, Sink) for sink in sinks)
        ):  # fmt: skip
            raise TypeError(f"sinks: expected a list of pl_pmse.sinks.Sink objects, got {sinks!r}")
        if extract is not None and not callable(extract):
            raise TypeError(f"extract: expected a function (outputs, batch) -> (preds, target), got {extract!r}")
        counts = {"num_panel_samples": (num_panel_samples, 0, 64), "worst_k": (worst_k, 0, 64),  # a panel's rows
                  "panels_every_n_epochs": (panels_every_n_epochs, 1, math.inf),
                  "error_map_grid": (error_map_grid, 1, 256), "spectrum_bands": (spectrum_bands, 1, 1024)}  # fmt: skip
        for argument, (value, minimum, most) in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= most:
                bound = f">= {minimum}" if most == math.inf else f"from {minimum} to {most}"
                raise ValueError(f"{argument}: expected an integer {bound}, got {value!r}")
        self.preds_key, self.target_key, self.extract = preds_key, target_key, extract
        self.extra_sinks: list[Sink] = list(sinks or [])
        self.input_key = input_key
        self.prefixes = {"validate": prefix, "test": test_prefix}
        self.panels, self.num_panel_samples, self.worst_k = panels, num_panel_samples, worst_k
        self.panels_every_n_epochs, self.profile = panels_every_n_epochs, profile
        self.ssim, self.sharpness, self.mcd = ssim, sharpness, mcd
        self.background_panels = background_panels
        self.error_map_grid, self.spectrum_bands, self.prog_bar = error_map_grid, spectrum_bands, prog_bar
        if sample_rate is None:  # the space says its sample rate where it knows it (mel)
            sample_rate = self.space.sample_rate
        self.sample_rate = sample_rate
        self.modality = self._resolve_modality(checks.check_choice("modality", modality, ("auto", *sorted(PANEL_SETS))))
        self._panel_options = PanelOptions(self.data_range, self.sample_rate, error_map_grid, spectrum_bands)
        missing = self._panel_set.missing(self._panel_options)
        self._can_draw = missing is None
        if missing and panels:
            rank_zero_warn(
                f"PerceptionMSECallback: {self.modality} panels need {missing}; drawing none", category=UserWarning
            )
        self._stages: dict[str, _Stage] = {}
        self._fixed = FixedSamples(num_panel_samples)
        # per panel key, from its first epoch (comparable across epochs); taken from the worker on this thread when
        # an epoch's panels are delivered, so a checkpoint has them from the epoch after their first on
        self._error_scales: dict[str, float] = {}
        self._sinks: list[Sink] | None = None
        self._trainer: weakref.ref | None = None  # the Trainer of the last setup: another one starts afresh
        self._file_root = Path("pmse_panels")
        self._warned: set[str] = set()
        self._checked_everywhere = False
        self._worker = PanelWorker(panel_timeout, background_panels)

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles callbacks: leave the loggers and trainer out
        return {**self.__dict__, "_sinks": None, "_trainer": None}

    # -- Lightning hooks ------------------------------------------------------------------------------------

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefixes["validate"], space=self.space.name)

    @override
    def state_dict(self) -> dict[str, Any]:
        self._keep_scales(self._worker.drawn_scales())  # an epoch drawn but not yet delivered has fixed its scales
        return {**self._fixed.state_dict(), "error_scales": dict(self._error_scales)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"PerceptionMSECallback.load_state_dict: expected the dict that state_dict() returned, got "
                f"{type(state_dict).__name__}"
            )
        self._fixed.load_state_dict(state_dict)
        scales = state_dict.get("error_scales", {})
        if isinstance(scales, Mapping) and all(
            isinstance(k, str) and isinstance(v, float) and 0 < v < float("inf") for k, v in scales.items()
        ):
            self._error_scales = dict(scales)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # trainer.log_dir broadcasts: it is read here, on every rank, never behind a rank-zero check
        self._file_root = Path(trainer.log_dir or trainer.default_root_dir) / "pmse_panels"
        self._sinks = None
        if self._trainer is not None and self._trainer() is not trainer:  # a sweep, k-fold: the next run's own
            self._fixed, self._error_scales = FixedSamples(self.num_panel_samples), {}  # (a resume restores them)
        self._trainer = weakref.ref(trainer)
        loop = {"fit": "validate", "validate": "validate", "test": "test"}.get(stage)
        if loop is not None:  # built here, not in the first loop; rebuilt there for several dataloaders
            self._check_unique_prefix(trainer.callbacks, loop)
            self._check_same_everywhere(trainer)
            self._stage(loop, dataloaders=1)

    def configuration(self) -> dict[str, str]:
        """Every option that shapes the callback's collectives and logged keys, and its metrics' configuration:
        compared across ranks once per fit/validate/test, at setup."""
        options = ("prefixes", "panels", "num_panel_samples", "worst_k", "panels_every_n_epochs", "profile", "ssim",
                   "sharpness", "mcd", "error_map_grid", "spectrum_bands", "modality", "sample_rate",
                   "prog_bar")  # fmt: skip
        metric = self._new_metric().configuration()
        return {"callback": type(self).__name__, **{name: repr(getattr(self, name)) for name in options}, **metric}

    def _check_same_everywhere(self, trainer: pl.Trainer) -> None:
        """One collective at setup, before any other of the callback's: a rank built with other options would
        otherwise mispair collectives later (a hang) or sum unlike states (a silent wrong number)."""
        self._checked_everywhere = False
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            check_same_everywhere(self.configuration(), type(self).__name__, device=trainer.strategy.root_device)
            self._checked_everywhere = True

    def _check_unique_prefix(self, callbacks: list[Any], loop: str) -> None:
        """Two callbacks logging under one prefix, or under prefixes one of which starts the other ('val/pmse' and
        'val/pmse_vgg' or 'val/pmse/vgg'), would overwrite each other's keys or clash in a file store: refuse."""
        for other in callbacks:
            if other is self or not isinstance(other, PerceptionMSECallback):
                continue
            first, second = sorted((self, other), key=callbacks.index)
            if second.prefixes[loop].startswith(first.prefixes[loop]) or first.prefixes[loop].startswith(
                second.prefixes[loop]
            ):
                shared = "one prefix" if first.prefixes[loop] == second.prefixes[loop] else "nested prefixes"
                raise ValueError(
                    f"PerceptionMSECallback: two callbacks on this Trainer log under {shared} "
                    f"({first.prefixes[loop]!r} and {second.prefixes[loop]!r}; spaces {first.space.name!r} and "
                    f"{second.space.name!r}); give each its own prefix= and test_prefix=, neither starting the "
                    f"other, e.g. prefix='val/{self.space.name}', test_prefix='test/{self.space.name}'"
                )

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._keep_scales(self._worker.deliver(wait=False))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._keep_scales(self._worker.close(wait=True))

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Ctrl-C or an error: panels in flight are dropped at once (the worker is a daemon thread)."""
        self._worker.close(wait=False)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._keep_scales(self._worker.deliver(wait=False))
        self._start(trainer, "validate", dataloaders_of(trainer.val_dataloaders), pl_module)

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._keep_scales(self._worker.deliver(wait=False))
        self._start(trainer, "test", dataloaders_of(trainer.test_dataloaders), pl_module)

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._batch(trainer, "validate", outputs, batch, batch_idx, dataloader_idx)

    @override
    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._batch(trainer, "test", outputs, batch, batch_idx, dataloader_idx)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module, "validate")

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module, "test")

    # -- accumulation (every rank) ---------------------------------------------------------------------------

    def _start(self, trainer: pl.Trainer, loop: str, dataloaders: list[Any], pl_module: pl.LightningModule) -> None:
        stage = self._stage(loop, len(dataloaders) or 1)
        for metric in (*stage.metrics, *stage.profiles, *stage.fidelity):
            metric.to(pl_module.device)
            metric.reset()
        stage.worst = [WorstSamples(self.worst_k) for _ in stage.metrics]
        stage.fixed = []
        stage.seen = [0 for _ in stage.metrics]
        stage.figures = [[] for _ in stage.metrics]
        stage.own = [own_samples(sampler_of(loader)) for loader in dataloaders] or [None]
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        unknown = [index for index, own in enumerate(stage.own) if own is None]
        if distributed and unknown and "sampler" not in self._warned:
            self._warned.add("sampler")
            rank_zero_warn(
                f"PerceptionMSECallback: {loop} dataloader(s) {unknown} have no DistributedSampler (a custom sampler "
                f"or an IterableDataset), so the samples that pad the ranks to equal length cannot be told apart: "
                f"{self.prefixes[loop]} counts every sample each rank receives",
                category=UserWarning,
            )

    def _stage(self, loop: str, dataloaders: int) -> _Stage:
        """The loop's metrics, one per dataloader (built on first use or when the number of dataloaders changes)."""
        stage = self._stages.get(loop)
        if stage is None or len(stage.metrics) != dataloaders:
            stage = self._stages[loop] = _Stage(
                self.prefixes[loop],
                [self._new_metric() for _ in range(dataloaders)],
                [self._new_profile() for _ in range(dataloaders)] if self._profiles_drawn else [],
                [self._new_fidelity() for _ in range(dataloaders)] if self._fidelity_figures else [],
            )
            if self._checked_everywhere:  # compared at setup with the callback's options: no check at first sync
                for metric in (*stage.metrics, *stage.profiles, *stage.fidelity):
                    metric.configuration_checked()
        return stage

    def _new_metric(self) -> PerceptionMSE:
        """The metric of one dataloader; its results in float64: the logged scalars carry the exact value's digits."""
        metric = PerceptionMSE(self.space, self._metric_data_range, self.nan_strategy, self.validate_args)
        return metric.set_dtype(torch.float64)

    def _new_profile(self) -> ErrorProfile:
        options = self._panel_set.profile_options(self._panel_options, self.space)
        return ErrorProfile(self.modality, self.data_range, **options).padding_left_out_by_caller()  # see _batch

    @property
    def _fidelity_figures(self) -> tuple[str, ...]:
        """The set's figures logged beside Perception MSE: for images SSIM (with a data range) and sharpness, for
        audio the mel-cepstral distortion (with a sample rate)."""
        if self.modality == "audio":
            return ("mcd",) if self.mcd and self.sample_rate else ()
        wanted = (self.ssim and self.data_range is not None, self.sharpness)
        return tuple(name for name, on in zip(("ssim", "sharpness"), wanted, strict=True) if on)

    def _new_fidelity(self) -> ImageFidelity | MelCepstralDistortion:
        figures = self._fidelity_figures
        if figures == ("mcd",):
            options = self.space.cepstrum.options if isinstance(self.space, AudioAspects) else {}
            metric = MelCepstralDistortion(
                **{"sample_rate": self.sample_rate, **options}, nan_strategy=self.nan_strategy
            )
        else:
            metric = ImageFidelity(
                self._metric_data_range, "ssim" in figures, "sharpness" in figures, nan_strategy=self.nan_strategy
            )
        return metric.set_dtype(torch.float64)

    @property
    def _profiles_drawn(self) -> bool:
        """Whether the dataset profile is taken (and drawn): asked for, and possible for the modality's panels."""
        return (
            self.profile
            and self.panels
            and self._panel_set.profile_options(self._panel_options, self.space) is not None
        )

    def _batch(self, trainer: pl.Trainer, loop: str, outputs: Any, batch: Any, batch_idx: int, index: int) -> None:
        preds, target = self._pair(outputs, batch)
        inputs = self._input_of(outputs, preds)
        stage = self._stages[loop]
        first = stage.seen[index]  # this rank's samples before the batch: positions in the sampler's order follow
        counted = stage.counted(index, preds.shape[0])
        if counted < preds.shape[0]:  # padding repeats of the DistributedSampler: left out of everything
            preds, target = preds[:counted], target[:counted]
        metric = stage.metrics[index]
        measured = metric.batch_stats(preds, target)
        metric.accumulate(measured)
        sample_values = self._set_figures(stage, index, preds, target)
        if not self._draws_panels(trainer, loop):
            return
        if stage.profiles and stage.profiles[index].fits(preds):
            stage.profiles[index].update(preds, target)
        keep_fixed = index == 0 and trainer.is_global_zero and self.num_panel_samples > 0
        names = self._figure_names
        worst = stage.worst[index]
        for row, value, components in candidates(measured.stats, self.space.component_weights):
            fixed = keep_fixed and self._fixed.offer(batch_idx, row)
            position = (first + row) * trainer.world_size + trainer.global_rank  # DistributedSampler's interleaving
            label = f"batch {batch_idx} item {row}" + (f" (rank {trainer.global_rank})" if trainer.global_rank else "")
            if names:
                values = self._sample_figures(names, components, sample_values, row)
                stage.figures[index].append([position, label, value, *values])
            among_worst = worst.wants(value, position)
            if not (fixed or among_worst):
                continue  # only samples a panel keeps are copied to the CPU
            copies = [x[row].to("cpu", torch.float32, copy=True) if x is not None else None
                      for x in (preds, target, inputs)]  # fmt: skip  # the panel thread's own
            sample = Sample(value, -position, label, components, *copies, self._views(preds[row], target[row]))
            if fixed:
                stage.fixed.append(sample)
            if among_worst:
                worst.add(sample)

    def _views(self, preds: Tensor, target: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """The space's views of one kept sample (:meth:`Space.views`), ``{title: (target, prediction)}`` CPU copies."""
        if type(self.space).views is Space.views:
            return {}
        pair = self.space.to_expected_range(torch.stack([target, preds]), self.data_range)
        with torch.no_grad(), own_precision(pair.device):
            views = self.space.views(pair)
        return {title: tuple(view.to("cpu", torch.float32, copy=True).unbind()) for title, view in views.items()}

    def _set_figures(self, stage: _Stage, index: int, preds: Tensor, target: Tensor) -> dict[str, list[float]]:
        """Accumulate the set's figures (SSIM / sharpness, MCD) of a batch; their per-sample values (lists). A batch
        that cannot be measured (images not ``[N, C, H, W]``, too small, too short) is left out, with one warning."""
        if not stage.fidelity or not preds.shape[0]:  # (a batch of padding repeats only is empty now)
            return {}
        fidelity = stage.fidelity[index]
        if not fidelity.fits(preds):
            if "fidelity" not in self._warned:
                self._warned.add("fidelity")
                rank_zero_warn(
                    f"PerceptionMSECallback: {' and '.join(fidelity.figures)} leave out batches of shape "
                    f"{tuple(preds.shape)}: they need {fidelity.requirement} "
                    f"({' / '.join(f'{name}=False' for name in fidelity.figures)} to turn them off)",
                    category=UserWarning,
                )
            return {}
        values = fidelity.sample_values(preds, target)
        fidelity.accumulate(values)
        if not self._figure_names:  # no per-sample figures panel (audio): no read back of the values
            return {}
        return {name: value.tolist() for name, value in values.items()}

    @property
    def _figure_names(self) -> tuple[str, ...]:
        """The per-sample values beside Perception MSE for the set's figures panels: PSNR (with a data range), SSIM."""
        if not self._panel_set.figures_panels:
            return ()
        return ("psnr",) * (self.data_range is not None) + ("ssim",) * ("ssim" in self._fidelity_figures)

    def _sample_figures(
        self, names: tuple[str, ...], components: Mapping[str, float], sample_values: Mapping[str, list], row: int
    ) -> list[float]:
        """A sample's ``names`` values: PSNR of its raw MSE; SSIM (NaN in a batch the figures left out)."""
        figures = []
        if "psnr" in names:
            raw, span = components[self.space.raw_name], self.data_range[1] - self.data_range[0]
            figures.append(10 * (2 * math.log10(span) - math.log10(raw)) if raw > 0 else math.inf)
        if "ssim" in names:
            figures.append(sample_values["ssim"][row] if "ssim" in sample_values else math.nan)
        return figures

    def _input_of(self, outputs: Any, preds: Tensor) -> Tensor | None:
        """The model input for the panels' input column: ``outputs[input_key]`` when it is a batch of images."""
        value = outputs.get(self.input_key) if isinstance(outputs, Mapping) and self.input_key else None
        if isinstance(value, Tensor) and value.dim() == 4 and value.shape[0] == preds.shape[0]:
            return value.detach()
        return None

    def _pair(self, outputs: Any, batch: Any) -> tuple[Tensor, Tensor]:
        if self.extract is not None:
            pair = self.extract(outputs, batch)
        elif isinstance(outputs, Mapping) and self.preds_key in outputs and self.target_key in outputs:
            pair = (outputs[self.preds_key], outputs[self.target_key])
        elif isinstance(outputs, Sequence) and not isinstance(outputs, str) and len(outputs) == 2:
            pair = tuple(outputs)
        else:
            shown = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise ValueError(
                f"PerceptionMSECallback: validation_step/test_step must return a dict with keys "
                f"{self.preds_key!r} and {self.target_key!r} (preds_key/target_key) or a (preds, target) tuple, "
                f"got {shown}; or pass extract=(outputs, batch) -> (preds, target)"
            )
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(x, Tensor) for x in pair):
            raise TypeError(
                f"PerceptionMSECallback: expected a (preds, target) pair of tensors, got {_describe_pair(pair)}"
            )
        return pair[0].detach(), pair[1].detach()

    # -- epoch end: collectives on every rank, drawing on rank zero -------------------------------------------

    def _end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loop: str) -> None:
        stage = self._stages[loop]
        for index, metric in enumerate(stage.metrics):
            summary = metric.compute_summary()
            for name, value in summary.items():
                if name == "skipped" and self.nan_strategy == "error":
                    continue
                key = stage.key("" if name == "total" else name, index)
                # equal on every rank already (synced by the metric); Lightning's own sync of each key, by max,
                # keeps the bits and leaves it nothing to advise, without a filter on the process's warnings
                pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max", batch_size=1,
                              add_dataloader_idx=False, prog_bar=self.prog_bar and name == "total")  # fmt: skip
        figures = [fidelity.figure_values() for fidelity in stage.fidelity]  # collectives: every rank
        for index, values in enumerate(figures):
            if all(math.isnan(value) for value in values.values()):  # no image measured on any rank: no key
                figures[index] = {}
                continue
            for name, value in values.items():
                pl_module.log(stage.key(name, index), value, on_step=False, on_epoch=True, sync_dist=True,
                              reduce_fx="max", batch_size=1, add_dataloader_idx=False)  # fmt: skip
        if not self._draws_panels(trainer, loop):
            return
        profiles = [SyncedProfile(profile, profile.synced_state()) for profile in stage.profiles]  # collectives
        worst = [samples.gathered(trainer.strategy.root_device) for samples in stage.worst]  # collectives: every rank
        names = self._figure_names
        columns = ("sample", "pmse", *names) if names else ()
        rows = [self._gathered_rows(trainer, rows) for rows in stage.figures] if columns else []  # collectives
        if not trainer.is_global_zero:
            return
        if loop == "validate":
            self._fixed.end_epoch(found=len(stage.fixed))
        self._keep_scales(self._worker.deliver(wait=True))  # the previous epoch's panels first
        if self._sinks is None:
            self._sinks = self._open_sinks(trainer.loggers)
        fixed = tuple(sorted(stage.fixed, key=lambda s: s.label))
        cutoff = {"sharpness_cutoff": stage.fidelity[0].cutoff} if "sharpness" in self._fidelity_figures else {}
        set_figures = [
            SetFigures({**{name: float(value) for name, value in figures[index].items()}, **cutoff} if figures else {},
                       columns, rows[index] if rows else ())
            for index in range(len(stage.metrics))
        ]  # fmt: skip
        parts = tuple(
            ReportPart(stage.key("", index), fixed if index == 0 else (), tuple(worst[index]),
                       profiles[index] if profiles else None, set_figures[index])
            for index in range(len(stage.metrics))
        )  # fmt: skip
        report = EpochReport(
            f"{loop} epoch {trainer.current_epoch}",
            getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step),
            self._panel_set, self._panel_options, parts, MappingProxyType(dict(self._error_scales)),
        )  # fmt: skip
        sinks = [sink.fresh() for sink in self._sinks]  # bound now: this epoch's own
        self._keep_scales(self._worker.submit(report.label, draw_report(report, sinks)))

    @staticmethod
    def _gathered_rows(trainer: pl.Trainer, rows: list[list[Any]]) -> tuple[tuple[Any, ...], ...]:
        """Every rank's per-sample figures on rank zero, in the sampler's order over all ranks (``()`` elsewhere):
        under DDP each rank sends its rows to rank zero (point to point), which alone draws them."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = collective_device(trainer.strategy.root_device)
            if dist.get_rank():
                send_bytes(json.dumps(rows).encode(), 0, device)
                return ()
            rows = rows + [row for source in range(1, dist.get_world_size())
                           for row in json.loads(receive_bytes(source, device))]  # fmt: skip
        return tuple(tuple(row[1:]) for row in sorted(rows, key=lambda row: row[0]))

    @property
    def _panel_set(self) -> PanelSet:
        """The modality's panel set (looked up, not held: ``ddp_spawn`` pickles the callback)."""
        return PANEL_SETS[self.modality]

    def _keep_scales(self, scales: Mapping[str, float]) -> None:
        """The error scales of delivered panels: each panel keeps the one of its first epoch."""
        for key, scale in scales.items():
            self._error_scales.setdefault(key, scale)

    def _open_sinks(self, loggers: list[Any]) -> list[Sink]:
        """The sinks of the run's loggers; one warning names the loggers that get no panels and where they went.
        Rank zero only, after the epoch's collectives, on the panel thread within ``panel_timeout`` (a logger's
        ``experiment`` may start a run or hang): a logger that fails or hangs here must not end or stall the fit
        (the other ranks would wait in the next collective), so panels then go to files."""
        try:
            sinks, unserved = self._worker.call(
                "opening the loggers", lambda: sinks_for(loggers, self._file_root, self.extra_sinks)
            )
        except Exception as error:
            sinks, unserved = sinks_for([], self._file_root, self.extra_sinks)[0], [f"{type(error).__name__}: {error}"]
        if unserved or not (loggers or self.extra_sinks):
            which = f"{', '.join(unserved)} cannot show panels" if unserved else "the Trainer has no logger"
            rank_zero_warn(
                f"PerceptionMSECallback: {which} (the W&B, TensorBoard and MLflow loggers of lightning and "
                f"pytorch_lightning can, and those registered with pl_pmse.sinks.register_sink); panels go to "
                f"{', '.join(map(repr, sinks))}; scalars are logged as usual",
                category=UserWarning,
            )
        return sinks

    # -- helpers ------------------------------------------------------------------------------------------------

    def _draws_panels(self, trainer: pl.Trainer, loop: str) -> bool:
        """Panels this epoch (so samples and the error profile are collected this epoch)."""
        skipped = loop == "validate" and trainer.current_epoch % self.panels_every_n_epochs
        return self.panels and self._can_draw and not trainer.sanity_checking and not skipped

    def _resolve_modality(self, modality: str) -> str:
        """``auto``: the space's modality, else audio when a sample rate is given, else image."""
        if modality == "auto":
            modality = self.space.modality if self.space.modality in PANEL_SETS else None
            modality = modality or ("audio" if self.sample_rate else "image")
        return modality


def _describe_pair(pair: Any) -> str:
    if isinstance(pair, (tuple, list)):
        return f"{type(pair).__name__} of {[type(x).__name__ for x in pair]}"
    return type(pair).__name__
