"""Where panels go: Weights & Biases first, TensorBoard, MLflow, a sink of your own, or PNG / WAV files under the
trainer's log dir. The one room that knows about loggers (the panels are pure rendering).

The contract: :meth:`Sink.prepare` takes an artifact of a panel (:mod:`pl_pmse.panels.sets`), does the heavy part
(encoding, files) wherever it is called, on the panel thread, and returns the logger call still to make (or keeps
it for :meth:`Sink.flush`): a ``Send`` that the callback makes in a delivery window while the training thread waits
(logger objects are not thread-safe). A ``Send`` may carry a ``cleanup`` attribute, run when the call is dropped or
given up (temporary files). Sinks are only used on global rank zero, and every call is the caller's to guard: a
failing sink must never stop training.

Loggers are matched without importing Lightning, by class name in either namespace (``lightning.pytorch`` or
``pytorch_lightning``, subclasses included) in :data:`SINKS` (:func:`register_sink` adds one), any other logger by
its ``experiment`` (a W&B run or a TensorBoard ``SummaryWriter``).
"""

from __future__ import annotations

import inspect
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .panels.png import encode_png
from .panels.sets import Artifact, Chart, Clips, Picture, Table

Send = Callable[[], None]


class Sink:
    """Receives rendered panels; ``step`` is the step Lightning uses for the epoch's scalars.

    A sink of your own (``PerceptionMSECallback(sinks=[...])``) implements :meth:`image` and :meth:`audio` (and,
    optionally, :meth:`table`, :meth:`lines`, :meth:`flush`); each returns the call to make in the delivery window,
    or None when it did everything itself. It must pickle for ``ddp_spawn``.
    """

    def prepare(self, artifact: Artifact, step: int) -> Send | None:
        """The artifact handed to the method of its kind."""
        if isinstance(artifact, Picture):
            return self.image(artifact.key, artifact.image, artifact.caption, step)
        if isinstance(artifact, Clips):
            return self.audio(artifact.key, list(artifact.clips), artifact.sample_rate, list(artifact.captions), step)
        if isinstance(artifact, Table):
            return self.table(artifact.key, list(artifact.columns), [list(row) for row in artifact.rows], step)
        if isinstance(artifact, Chart):
            series = {name: list(values) for name, values in artifact.series.items()}
            return self.lines(artifact.key, list(artifact.x), series, artifact.title, artifact.x_label)
        raise TypeError(f"artifact: expected a Picture, Clips, Table or Chart, got {type(artifact).__name__}")

    def image(self, key: str, image: np.ndarray, caption: str, step: int) -> Send | None:
        raise NotImplementedError

    def audio(self, key: str, clips: list[np.ndarray], sample_rate: int, captions: list[str], step: int) -> Send | None:
        raise NotImplementedError

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> Send | None:
        """Optional: a table of values and thumbnails (W&B only)."""
        return None

    def lines(self, key: str, x: list[float], series: dict[str, list[float]], title: str, x_label: str) -> None:
        """Optional: an interactive line chart (W&B only; the other sinks have the drawn plot)."""

    def flush(self, step: int) -> Send | None:
        """Optional: a last logger call for the epoch, after all its panels (W&B: its one history row)."""
        return None

    def fresh(self) -> Sink:
        """The sink for one epoch's panels: itself, or a copy with its own buffer (W&B), so that a drawing that
        overran its budget never mixes with the next epoch's."""
        return self

    def __repr__(self) -> str:
        return type(self).__name__


class WandbSink(Sink):
    """``wandb.Image`` / ``wandb.Audio`` / ``wandb.Table`` / line charts, ALL of one epoch in ONE history row at the
    epoch's ``trainer/global_step`` (as the scalars): the panel calls only prepare, :meth:`flush` returns the one
    logger call, through the logger's ``log_metrics`` (a WandbLogger's, or the run's own ``log`` for another logger
    of a W&B run).

    Pictures reach W&B as PNG files written by :func:`encode_png` (W&B's own encoder, Pillow at its default level,
    takes ~10x longer) under unique names in the run's folder; W&B copies them when they are logged, and they are
    removed then (kept when W&B is set to link media instead).
    """

    def __init__(
        self, run: Any, log_metrics: Callable[..., None] | None = None, save_dir: str | Path | None = None
    ) -> None:
        self.log_metrics = log_metrics or (lambda metrics, step: run.log({**metrics, "trainer/global_step": step}))
        disabled = getattr(run.settings, "mode", None) == "disabled"
        if not disabled and not any(Path(run.dir).parent.glob("*.wandb")):
            _follow_the_record(run, save_dir)
        self._folder = Path(run.dir).parent / "pl_pmse"  # in the run's folder, not synced
        self._keep_files = bool(getattr(run.settings, "allow_media_symlink", False))
        self._pending: dict[str, Any] = {}
        self._files: list[Path] = []

    def image(self, key: str, image: np.ndarray, caption: str, step: int) -> None:
        self._add(lambda files: {key: [self._image(image, files, caption)]})

    def audio(self, key: str, clips: list[np.ndarray], sample_rate: int, captions: list[str], step: int) -> None:
        import wandb

        self._add(lambda files: {key: [wandb.Audio(c, sample_rate, t) for c, t in zip(clips, captions, strict=True)]})

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        import wandb

        def build(files: list[Path]) -> dict[str, Any]:
            cells = [[self._image(v, files) if isinstance(v, np.ndarray) else v for v in row] for row in rows]
            return {key: wandb.Table(columns=columns, data=cells)}

        self._add(build)

    def lines(self, key: str, x: list[float], series: dict[str, list[float]], title: str, x_label: str) -> None:
        """An interactive W&B line chart (one line per series), to compare runs and epochs."""
        import wandb

        keys = list(series)
        self._add(lambda files: {key: wandb.plot.line_series(xs=x, ys=[series[k] for k in keys], keys=keys,
                                                              title=title, xname=x_label)})  # fmt: skip

    def flush(self, step: int) -> Send | None:
        """The one logger call of the epoch's panels (None when there are none)."""
        metrics, files = self._pending, self._files
        self._pending, self._files = {}, []
        if not metrics:
            return None

        def send() -> None:
            try:
                self.log_metrics(metrics, step=step)
            finally:
                self._remove(files)

        send.cleanup = lambda: self._remove(files)  # type: ignore[attr-defined]  # when the call is dropped
        return send

    def fresh(self) -> WandbSink:
        copy = object.__new__(WandbSink)
        copy.__dict__.update(self.__dict__, _pending={}, _files=[])
        return copy

    def _add(self, build: Callable[[list[Path]], dict[str, Any]]) -> None:
        """``build(files)`` makes W&B objects (listing the PNG files it writes) for the epoch's row."""
        files: list[Path] = []
        try:
            self._pending.update(build(files))
        except BaseException:
            self._remove(files)
            raise
        self._files += files

    def _image(self, image: np.ndarray, files: list[Path], caption: str | None = None) -> Any:
        import wandb

        self._folder.mkdir(parents=True, exist_ok=True)
        files.append(self._folder / f"{uuid.uuid4().hex}.png")
        files[-1].write_bytes(encode_png(image))
        return wandb.Image(str(files[-1]), caption=caption)

    def _remove(self, files: list[Path]) -> None:
        if not self._keep_files:
            for path in files:
                path.unlink(missing_ok=True)


def _follow_the_record(run: Any, save_dir: str | Path | None) -> None:
    """A ``ddp_spawn`` child attached to a W&B run takes its folders from its own ``WANDB_DIR``, not from the
    ``WandbLogger(save_dir=...)`` the run was started with: its media would land beside no record of the run (and
    ``wandb sync`` would miss them). Point the child's files folder (W&B's ``x_files_dir`` setting) at the folder of
    the run's record under ``save_dir``; warn when there is none to find."""
    found = sorted(Path(save_dir).glob(f"*wandb/*run-*-{run.id}/run-{run.id}.wandb")) if save_dir else []
    if len(found) == 1:
        run._settings.x_files_dir = str(found[0].parent / "files")
        return
    warnings.warn(
        f"PerceptionMSECallback: W&B puts this run's media under {Path(run.dir).parent}, which holds no record of "
        f"the run, and {'none' if not found else 'more than one'} was found under save_dir={save_dir}: panels are "
        f"logged, but `wandb sync` of the run may miss their files; set WANDB_DIR to the logger's save_dir",
        UserWarning,
        stacklevel=3,
    )


class TensorBoardSink(Sink):
    """Images (PNG by :func:`encode_png`), audio (mono mix) and captions as text, in the logger's event file.

    Summaries are built where the sink is called and written on the training thread; with a tensorboardX writer
    (Lightning's fallback when ``tensorboard`` is not installed) the writer's own ``add_*`` do both then.
    """

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self._own_summaries = type(self.writer).__module__.startswith("torch.utils.tensorboard")

    def image(self, key: str, image: np.ndarray, caption: str, step: int) -> Send:
        if not self._own_summaries:

            def send() -> None:
                self.writer.add_image(key, image, step, dataformats="HWC")
                self.writer.add_text(f"{key}/caption", caption, step)

            return send
        from torch.utils.tensorboard.summary import Summary, text

        height, width, channels = image.shape
        encoded = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=encode_png(image))
        return self._send([Summary(value=[Summary.Value(tag=key, image=encoded)]), text(f"{key}/caption", caption)],
                          step)  # fmt: skip

    def audio(self, key: str, clips: list[np.ndarray], sample_rate: int, captions: list[str], step: int) -> Send:
        monos = [torch.from_numpy(clip.mean(1) if clip.ndim == 2 else clip)[None] for clip in clips]
        if not self._own_summaries:

            def send() -> None:
                for index, (mono, caption) in enumerate(zip(monos, captions, strict=True)):
                    self.writer.add_audio(f"{key}/{index}", mono, step, sample_rate=sample_rate)
                    self.writer.add_text(f"{key}/{index}/caption", caption, step)

            return send
        from torch.utils.tensorboard.summary import audio, text

        summaries = []
        for index, (mono, caption) in enumerate(zip(monos, captions, strict=True)):
            summaries += [audio(f"{key}/{index}", mono, sample_rate=sample_rate),
                          text(f"{key}/{index}/caption", caption)]  # fmt: skip
        return self._send(summaries, step)

    def _send(self, summaries: list[Any], step: int) -> Send:
        def send() -> None:
            writer = self.writer._get_file_writer()  # what SummaryWriter.add_* write through
            for summary in summaries:
                writer.add_summary(summary, step)

        return send


class FileSink(Sink):
    """``<root>/<key>/step=<step>.png`` and ``...-<i>.wav`` (soundfile), captions in a ``.txt`` beside them.

    Every file is written whole or not at all (a temporary file renamed into place), and keys cannot leave ``root``
    (``..`` and empty parts are dropped).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str, step: int, suffix: str) -> Path:
        folder = self.root.joinpath(*(part for part in key.split("/") if part not in ("", ".", "..")))
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"step={step:06d}{suffix}"

    def image(self, key: str, image: np.ndarray, caption: str, step: int) -> None:
        _write_whole(self._path(key, step, ".png"), lambda path: path.write_bytes(encode_png(image)))
        _write_whole(self._path(key, step, ".txt"), lambda path: path.write_text(caption + "\n"))

    def audio(self, key: str, clips: list[np.ndarray], sample_rate: int, captions: list[str], step: int) -> None:
        import soundfile

        for index, clip in enumerate(clips):
            _write_whole(self._path(key, step, f"-{index}.wav"),
                         lambda path, c=clip: soundfile.write(path, c, sample_rate, format="WAV"))  # fmt: skip
        _write_whole(self._path(key, step, ".txt"), lambda path: path.write_text("\n".join(captions) + "\n"))

    def __repr__(self) -> str:
        return f"FileSink({self.root})"


def _write_whole(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(temporary)`` then rename it to ``path``: a reader (or a full disk) never sees a partial file."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temporary)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class MlflowSink(Sink):
    """MLflow: pictures through ``MlflowClient.log_image`` with their ``key`` and ``step`` (the run's image slider;
    MLflow >= 2.15; before, as ``<key>/step=<step>.png`` artifacts), captions and clips (WAV) as artifacts under
    ``<key>/``. Clips are written on the panel thread into a temporary folder, uploaded in the delivery window and
    removed then (or when the call is given up)."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self._keyed = "key" in inspect.signature(client.log_image).parameters

    def image(self, key: str, image: np.ndarray, caption: str, step: int) -> Send:
        def send() -> None:
            if self._keyed:
                self.client.log_image(self.run_id, image, key=key, step=step)
            else:
                self.client.log_image(self.run_id, image, artifact_file=f"{key}/step={step:06d}.png")
            self.client.log_text(self.run_id, caption, f"{key}/step={step:06d}.txt")

        return send

    def audio(self, key: str, clips: list[np.ndarray], sample_rate: int, captions: list[str], step: int) -> Send:
        import soundfile

        folder = Path(tempfile.mkdtemp(prefix="pl_pmse_"))
        try:
            for index, clip in enumerate(clips):
                soundfile.write(folder / f"step={step:06d}-{index}.wav", clip, sample_rate, format="WAV")
            (folder / f"step={step:06d}.txt").write_text("\n".join(captions) + "\n")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

        def send() -> None:
            try:
                self.client.log_artifacts(self.run_id, str(folder), key)
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        send.cleanup = lambda: shutil.rmtree(folder, ignore_errors=True)  # type: ignore[attr-defined]
        return send

    def __repr__(self) -> str:
        return f"MlflowSink(run {self.run_id})"


LIGHTNING_NAMESPACES = ("lightning", "pytorch_lightning")
SinkFactory = Callable[[Any], "Sink | None"]  # a logger -> its sink (None: it shows no panels)

# Lightning logger class name -> the sink of such a logger (``experiment`` is read on the panel thread, in time)
SINKS: dict[str, SinkFactory] = {
    "WandbLogger": lambda logger: WandbSink(logger.experiment, logger.log_metrics, logger.save_dir),
    "TensorBoardLogger": lambda logger: TensorBoardSink(logger.experiment),
    "MLFlowLogger": lambda logger: MlflowSink(logger.experiment, logger.run_id),
    "CSVLogger": lambda logger: None,
}
_LIGHTNING_SINKS = frozenset(SINKS)  # the built-in names: matched in Lightning's own namespaces only


def register_sink(logger_class_name: str, factory: SinkFactory, replace: bool = False) -> None:
    """Panels for the loggers of a Lightning logger class (matched by name in either namespace, subclasses too):
    ``factory(logger)`` returns its :class:`Sink`, or None for no panels. A name registered already (the built-in
    W&B, TensorBoard and MLflow sinks included) is refused unless ``replace=True``: it changes where every
    callback of the process sends that logger's panels."""
    if not isinstance(logger_class_name, str) or not logger_class_name.isidentifier():
        raise ValueError(f"logger_class_name: expected a class name like 'CometLogger', got {logger_class_name!r}")
    if not callable(factory):
        raise TypeError(f"factory: expected a function logger -> Sink or None, got {factory!r}")
    if not isinstance(replace, bool):
        raise TypeError(f"replace: expected True or False, got {replace!r}")
    if logger_class_name in SINKS and not replace:
        built_in = " (a built-in sink)" if logger_class_name in _LIGHTNING_SINKS else ""
        raise ValueError(
            f"logger_class_name: {logger_class_name!r} has a sink already{built_in}; pass replace=True to replace "
            f"it for this process"
        )
    SINKS[logger_class_name] = factory


def lightning_logger_kind(logger: Any) -> str | None:
    """The name in :data:`SINKS` of the logger's class or of its nearest base there (either Lightning namespace; a
    registered name of another package's logger matches by name alone), else None."""
    for cls in type(logger).__mro__:
        lightning = cls.__module__.split(".")[0] in LIGHTNING_NAMESPACES
        if cls.__name__ in SINKS and (lightning or cls.__name__ not in _LIGHTNING_SINKS):
            return cls.__name__
    return None


def _experiment_kind(logger: Any) -> str | None:
    """Duck typing for other loggers: ``"wandb"`` when ``logger.experiment`` is a W&B run, ``"tensorboard"`` when it
    is a ``SummaryWriter`` (torch's or tensorboardX's)."""
    try:
        experiment = logger.experiment
    except Exception:
        return None
    kind = type(experiment)
    if kind.__module__.startswith("wandb.") and kind.__name__ == "Run":
        return "wandb"
    if kind.__name__ == "SummaryWriter" and kind.__module__.split(".")[0] in ("torch", "tensorboardX"):
        return "tensorboard"
    return None


def sinks_for(loggers: list[Any], file_root: str | Path, extra: list[Sink] = ()) -> tuple[list[Sink], list[str]]:
    """One sink per logger that shows panels, plus ``extra`` (the user's own); PNG/WAV files when there is none;
    and the names of the loggers that get no panels, for the caller's warning.

    ``experiment`` is read here (it may start a W&B run): on the panel thread, within the callback's budget.
    """
    sinks: list[Sink] = []
    unserved: list[str] = []
    for logger in loggers:
        kind = lightning_logger_kind(logger)
        if kind is not None:
            sink = SINKS[kind](logger)
        elif (duck := _experiment_kind(logger)) is not None:
            sink = WandbSink(logger.experiment) if duck == "wandb" else TensorBoardSink(logger.experiment)
        else:
            sink = None
        if sink is None:
            unserved.append(type(logger).__name__)
        else:
            sinks.append(sink)
    sinks += list(extra)
    return (sinks or [FileSink(file_root)]), unserved
