"""PerceptionMSECallback in real (tiny) Lightning runs, read back from offline W&B runs and log folders."""

from __future__ import annotations

import csv
import io
import pickle
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb
from PIL import Image
from torchmetrics import MeanSquaredError

from pl_pmse import ErrorProfile, PerceptionMSE
from pl_pmse.callback import PerceptionMSECallback
from pl_pmse.callback.worker import PanelWorker
from pl_pmse.panels import image as image_panels
from tests.lightning_models import AudioData, AudioEnhancer, Denoiser, ImageData, cli, cpu_trainer, pl
from tests.lightning_models import callbacks as pl_callbacks
from tests.lightning_models import loggers as pl_loggers
from tests.wandb_reader import history, run_dirs

EarlyStopping, ModelCheckpoint = pl_callbacks.EarlyStopping, pl_callbacks.ModelCheckpoint
CSVLogger, TensorBoardLogger, WandbLogger = pl_loggers.CSVLogger, pl_loggers.TensorBoardLogger, pl_loggers.WandbLogger

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Recorder(pl.Callback):
    """Independent reference: keeps every validation pair of real epochs and scores it with torchmetrics."""

    def __init__(self) -> None:
        self.pairs: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.pairs.append([])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.pairs[-1].append((outputs["preds"].clone(), outputs["target"].clone()))

    def mse(self, epoch: int) -> float:
        metric = MeanSquaredError().double()
        metric.set_dtype(torch.float64)
        for preds, target in self.pairs[epoch]:
            metric.update(preds.double(), target.double())
        return metric.compute().item()


def trainer_for(tmp_path: Path, logger, callbacks: list, **options) -> pl.Trainer:
    return cpu_trainer(tmp_path, callbacks, logger=logger, **{"log_every_n_steps": 1, **options})


@pytest.fixture
def wandb_logger(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(project="pl-pmse-tests", save_dir=str(tmp_path), offline=True)
    yield logger
    wandb.finish()


def finished_history(tmp_path: Path) -> tuple[Path, list[dict]]:
    wandb.finish()
    (run,) = run_dirs(tmp_path)
    return run, history(run)


def test_image_run_logs_one_row_per_epoch_with_panels(tmp_path, wandb_logger) -> None:
    recorder = Recorder()
    callback = PerceptionMSECallback("pixel", data_range=1.0)
    trainer = trainer_for(tmp_path, wandb_logger, [recorder, callback], num_sanity_val_steps=2)
    trainer.fit(Denoiser(), ImageData())
    run, rows = finished_history(tmp_path)

    scalar_rows = [row for row in rows if "val/pmse" in row]
    assert [row["epoch"] for row in scalar_rows] == [0, 1]  # none from the sanity check
    for epoch, row in enumerate(scalar_rows):
        assert row["val/pmse"] == pytest.approx(recorder.mse(epoch), rel=1e-6)
        assert row["val/pmse_pixel"] == row["val/pmse"]
        assert row["val/pmse_psnr"] == pytest.approx(10 * np.log10(1 / recorder.mse(epoch)), rel=1e-6)
        assert -1 < row["val/pmse_ssim"] < 1 and row["val/pmse_sharpness"] > 0  # equal to torchmetrics: DDP test
    assert trainer.callback_metrics["val/pmse"].item() == pytest.approx(recorder.mse(1), rel=1e-6)

    panel_keys = ["val/pmse/panels/fixed", "val/pmse/panels/worst", "val/pmse/panels/error_map",
                  "val/pmse/panels/spectrum", "val/pmse/panels/comparison"]  # fmt: skip
    for key in panel_keys:
        panel_rows = [row for row in rows if f"{key}/filenames" in row]
        assert len(panel_rows) == 2, key
        # drawn at the step Lightning uses for the same epoch's scalars
        assert [row["trainer/global_step"] for row in panel_rows] == [r["trainer/global_step"] for r in scalar_rows]
    images = sorted((run / "files" / "media" / "images").rglob("*.png"))
    panels = [path for path in images if "/panels/" in str(path)]
    assert len(panels) == 2 * len(panel_keys)
    for path in panels:
        with Image.open(path) as picture:
            assert picture.mode == "RGB" and min(picture.size) > 32
    fixed = [row["val/pmse/panels/fixed/captions"][0] for row in rows if "val/pmse/panels/fixed/captions" in row]
    assert fixed[0].split(":")[0] == fixed[1].split(":")[0] == "rows"
    assert [c.split(": pmse")[0] for c in fixed[0].split("; ")] == [c.split(": pmse")[0] for c in fixed[1].split("; ")]
    # one error scale per panel key, fixed from the first epoch, so that epochs compare at a glance
    scales = [caption.split("Error scale 0 to ")[1].split(" ")[0] for caption in fixed]
    assert scales[0] == scales[1] and callback.state_dict()["error_scales"]["val/pmse/panels/fixed"] > 0
    # ALL panels of an epoch in ONE history row, at the step of the epoch's scalars; with the interactive charts
    panel_rows = [row for row in rows if any(key.startswith("val/pmse/panels/") for key in row)]
    assert len(panel_rows) == 2
    for row in panel_rows:
        assert {f"{key}/filenames" for key in panel_keys} <= set(row)
        assert "val/pmse/worst_table/path" in row and any(key.startswith("val/pmse/charts/spectrum") for key in row)
        assert "val/pmse/tables/comparison/path" in row and "sharpness" in row["val/pmse/panels/spectrum/captions"][0]


def test_panels_are_drawn_off_the_training_thread_and_logged_on_it(tmp_path, wandb_logger, monkeypatch) -> None:
    threads: dict[str, set] = {"drawn": set(), "logged": set(), "intra-op threads": set()}
    draw, log_metrics = image_panels.comparison_grid, WandbLogger.log_metrics

    def recorded_draw(*args, **kwargs):
        threads["drawn"].add(threading.current_thread().name)
        threads["intra-op threads"].add(torch.get_num_threads())
        return draw(*args, **kwargs)

    delivering = threading.Event()  # set while the training thread waits in a delivery window
    deliver = PanelWorker.deliver

    def recorded_deliver(self, wait):
        delivering.set()
        try:
            return deliver(self, wait)
        finally:
            delivering.clear()

    def recorded_log(self, metrics, step=None):
        if any(key.startswith("val/pmse/panels/") for key in metrics):
            threads["logged"].add((threading.current_thread().name, delivering.is_set()))
        return log_metrics(self, metrics, step)

    monkeypatch.setattr(image_panels, "comparison_grid", recorded_draw)
    monkeypatch.setattr(WandbLogger, "log_metrics", recorded_log)
    monkeypatch.setattr(PanelWorker, "deliver", recorded_deliver)
    callback = PerceptionMSECallback("pixel", data_range=1.0)
    training_threads = torch.get_num_threads()
    trainer_for(tmp_path, wandb_logger, [callback], max_epochs=3, num_sanity_val_steps=0).fit(Denoiser(), ImageData())
    assert threads["drawn"] and all(name.startswith("pl_pmse_panels") for name in threads["drawn"])
    # single-threaded torch there (a second OpenMP team slows training down), the training thread unchanged
    assert threads["intra-op threads"] == {1} and torch.get_num_threads() == training_threads
    # logger calls: on the panel thread, only while the training thread waits (never beside Lightning's logging)
    assert threads["logged"] == {("pl_pmse_panels", True)}
    _, rows = finished_history(tmp_path)
    assert len([row for row in rows if "val/pmse/panels/worst/filenames" in row]) == 3  # all delivered by fit's end
    assert callback._worker._thread is None and callback._worker._epoch is None  # teardown delivered, thread let go
    copy = pickle.loads(pickle.dumps(callback))  # ddp_spawn pickles callbacks: a fresh worker on the other side
    assert copy._worker._thread is None and copy._worker.timeout == callback._worker.timeout
    assert not list((next(iter(run_dirs(tmp_path))) / "pl_pmse").iterdir())  # W&B copied the PNGs; ours are gone


@pytest.mark.parametrize("background", [True, False])
def test_a_failing_error_profile_loses_only_its_own_panels(tmp_path, monkeypatch, background: bool) -> None:
    def broken(self, state):
        raise ArithmeticError("profile broke")

    monkeypatch.setattr(ErrorProfile, "profile_of", broken)
    callback = PerceptionMSECallback("pixel", data_range=1.0, background_panels=background)
    trainer = trainer_for(tmp_path, CSVLogger(tmp_path), [callback], num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Denoiser(), ImageData())
    reports = [str(w.message) for w in caught if "profile broke" in str(w.message)]
    assert len(reports) == 2 and "panels of validate epoch 0: 1 logger or drawing call(s) failed" in reports[0]
    drawn = {path.parent.name for path in Path(trainer.log_dir, "pmse_panels").rglob("*.png")}
    assert drawn == {"fixed", "worst", "comparison"}  # the figures are not the profile


def test_two_callbacks_share_one_wandb_run(tmp_path, wandb_logger) -> None:
    callbacks = [PerceptionMSECallback("pixel", data_range=1.0, prefix=prefix) for prefix in ("val/pmse", "val/pyr")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_for(tmp_path, wandb_logger, callbacks, num_sanity_val_steps=0).fit(Denoiser(), ImageData())
    assert not [w for w in caught if "PerceptionMSECallback" in str(w.message)]
    run, rows = finished_history(tmp_path)
    for prefix in ("val/pmse", "val/pyr"):
        assert len([row for row in rows if f"{prefix}/panels/worst/filenames" in row]) == 2, prefix
    assert len(list((run / "files" / "media" / "images").rglob("*.png"))) == 2 * 2 * 5  # callbacks x epochs x panels


def test_background_panels_equal_panels_drawn_in_the_loop(tmp_path) -> None:
    pictures = {}
    for background in (True, False):
        root = tmp_path / str(background)
        callback = PerceptionMSECallback("pixel", data_range=1.0, background_panels=background)
        trainer = trainer_for(root, CSVLogger(root), [callback], num_sanity_val_steps=0)
        pl.seed_everything(0)
        trainer.fit(Denoiser(), ImageData())
        folder = Path(trainer.log_dir, "pmse_panels")
        pictures[background] = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.*"))}
    assert len(pictures[True]) == 20 and pictures[True] == pictures[False]  # 5 panels x (png, txt) x 2 epochs


def test_panels_every_n_epochs_collect_and_draw_only_then(tmp_path, monkeypatch) -> None:
    profiled_epochs = []
    update = ErrorProfile.update

    def recorded_update(self, preds, target):
        profiled_epochs.append(trainer.current_epoch)
        return update(self, preds, target)

    monkeypatch.setattr(ErrorProfile, "update", recorded_update)
    callback = PerceptionMSECallback("pixel", data_range=1.0, panels_every_n_epochs=2)
    trainer = trainer_for(tmp_path, CSVLogger(tmp_path), [callback], max_epochs=3, num_sanity_val_steps=0)
    trainer.fit(Denoiser(), ImageData())
    spectra = sorted(Path(trainer.log_dir, "pmse_panels").rglob("spectrum/*.png"))
    assert len(spectra) == 2 and sorted(set(profiled_epochs)) == [0, 2]  # epoch 1: no panels, no profile work
    rows = list(csv.DictReader((Path(trainer.log_dir) / "metrics.csv").open()))
    assert len([row for row in rows if row.get("val/pmse")]) == 3  # scalars every epoch


def test_audio_run_logs_spectrograms_and_playable_clips(tmp_path, wandb_logger) -> None:
    callback = PerceptionMSECallback("mel", sample_rate=8000, num_panel_samples=2, worst_k=2)
    trainer = trainer_for(tmp_path, wandb_logger, [callback], max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(AudioEnhancer(), AudioData())
    run, rows = finished_history(tmp_path)
    assert len([row for row in rows if "val/pmse_mel" in row]) == 1
    clips = sorted((run / "files" / "media" / "audio").rglob("*.wav"))
    assert len(clips) == 8  # fixed and worst, target and prediction, 2 each
    import soundfile

    data, rate = soundfile.read(clips[0])
    assert rate == 8000 and data.shape == (4000,) and np.abs(data).max() <= 1
    for key in ("val/pmse/panels/fixed", "val/pmse/panels/worst", "val/pmse/panels/mel_profile"):
        assert any(f"{key}/filenames" in row for row in rows), key
    audio_rows = [row for row in rows if "val/pmse/audio/fixed_target/_type" in row]
    assert audio_rows and audio_rows[0]["val/pmse/audio/fixed_target/sampleRates"] == [8000, 8000]


def test_values_equal_the_metric_over_the_whole_set_with_several_dataloaders(tmp_path) -> None:
    callback = PerceptionMSECallback("pyramid", data_range=1.0, panels=False)
    data = ImageData(val_loaders=2, size=32)
    model = Denoiser()
    trainer = trainer_for(tmp_path, CSVLogger(tmp_path), [callback], max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(model, data)
    model.eval()
    for index, loader in enumerate(data.val_dataloader()):
        reference = PerceptionMSE("pyramid", data_range=1.0)
        with torch.no_grad():
            for batch in loader:
                reference.update(*model._pair(batch))
        summary = reference.compute_summary()
        logged = trainer.callback_metrics
        assert logged[f"val/pmse/dataloader_idx_{index}"].item() == pytest.approx(summary["total"].item(), rel=1e-6)
        assert logged[f"val/pmse_band0/dataloader_idx_{index}"].item() == pytest.approx(
            summary["band0"].item(), rel=1e-6
        )
    (metrics_file,) = Path(tmp_path).rglob("metrics.csv")
    header = next(csv.reader(metrics_file.open()))
    assert "val/pmse/dataloader_idx_0" in header and "val/pmse_lowpass/dataloader_idx_1" in header


def test_files_without_wandb_and_tensorboard_images(tmp_path) -> None:
    callback = PerceptionMSECallback("pixel", data_range=1.0, worst_k=2, num_panel_samples=2)
    trainer = trainer_for(tmp_path / "csv", CSVLogger(tmp_path / "csv"), [callback], max_epochs=1)
    trainer.fit(Denoiser(), ImageData())
    files = sorted(Path(trainer.log_dir, "pmse_panels").rglob("*.png"))
    assert {p.parent.name for p in files} == {"fixed", "worst", "error_map", "spectrum", "comparison"}
    for path in files:
        assert (path.with_suffix(".txt")).read_text().strip()
    tensorboard = TensorBoardLogger(tmp_path / "tb")
    callback = PerceptionMSECallback("pixel", data_range=1.0, worst_k=2, num_panel_samples=2)
    trainer_for(tmp_path / "tb", tensorboard, [callback], max_epochs=1).fit(Denoiser(), ImageData())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard.log_dir, size_guidance={"images": 0}).Reload()
    assert {"val/pmse/panels/fixed", "val/pmse/panels/worst"} <= set(events.Tags()["images"])
    (event,) = events.Images("val/pmse/panels/worst")
    with Image.open(io.BytesIO(event.encoded_image_string)) as picture:
        assert picture.mode == "RGB" and picture.size == (event.width, event.height)
    assert "val/pmse" in events.Tags()["scalars"]


def test_audio_files_sink_and_missing_soundfile_warns_once(tmp_path, monkeypatch) -> None:
    callback = PerceptionMSECallback("mrstft", sample_rate=8000, num_panel_samples=1, worst_k=1)
    trainer = trainer_for(tmp_path, CSVLogger(tmp_path), [callback], max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(AudioEnhancer(), AudioData())
    assert len(list(Path(trainer.log_dir, "pmse_panels").rglob("*.wav"))) == 4
    tensorboard = TensorBoardLogger(tmp_path / "tb")
    callback = PerceptionMSECallback("mrstft", sample_rate=8000, num_panel_samples=1, worst_k=1)
    trainer_for(tmp_path / "tb", tensorboard, [callback], max_epochs=1, num_sanity_val_steps=0).fit(
        AudioEnhancer(), AudioData()
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard.log_dir, size_guidance={"images": 0, "audio": 0}).Reload()
    assert "val/pmse/audio/worst_target/0" in events.Tags()["audio"]
    assert events.Audio("val/pmse/audio/worst_target/0")[0].sample_rate == 8000
    assert {"val/pmse/panels/worst", "val/pmse/panels/mel_profile"} <= set(events.Tags()["images"])
    import builtins

    real_import = builtins.__import__

    def no_soundfile(name, *args, **kwargs):
        if name == "soundfile":
            raise ImportError("No module named 'soundfile'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_soundfile)
    callback = PerceptionMSECallback("mrstft", sample_rate=8000, num_panel_samples=1, worst_k=1)
    trainer = trainer_for(tmp_path / "again", CSVLogger(tmp_path / "again"), [callback], max_epochs=2,
                          num_sanity_val_steps=0)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(AudioEnhancer(), AudioData())
    messages = [str(w.message) for w in caught if "soundfile" in str(w.message)]  # one report per epoch
    assert len(messages) == 2 and all("pip install soundfile" in message for message in messages)
    assert "val/pmse" in trainer.callback_metrics
    assert list(Path(trainer.log_dir, "pmse_panels").rglob("*.png"))


class FailingWandb(WandbLogger):
    """Scalars and tables go through; every image upload fails."""

    def log_metrics(self, metrics, step=None):
        if any(isinstance(value, list) and isinstance(value[0], wandb.Image) for value in metrics.values()):
            raise ConnectionError("W&B is down")
        super().log_metrics(metrics, step)


def test_failing_logger_reports_once_per_epoch_and_training_continues(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = FailingWandb(project="pl-pmse-tests", save_dir=str(tmp_path), offline=True)
    callback = PerceptionMSECallback("pixel", data_range=1.0)
    trainer = trainer_for(tmp_path, logger, [callback], max_epochs=3, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Denoiser(), ImageData())
    failures = [str(w.message) for w in caught if "W&B is down" in str(w.message)]
    # one report per epoch; the epoch's panels are ONE W&B row, so the failed call carried all of them
    assert len(failures) == 3 and all(
        "WandbSink epoch row (logging): ConnectionError: W&B is down" in f for f in failures
    )
    _, rows = finished_history(tmp_path)
    assert len([row for row in rows if "val/pmse" in row]) == 3  # the scalars all went through


def test_checkpoint_and_early_stopping_monitor_val_pmse(tmp_path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/pmse", mode="min",
                                 filename="best-{epoch}-{val/pmse:.5f}", auto_insert_metric_name=False)  # fmt: skip
    stopping = EarlyStopping(monitor="val/pmse", mode="min", patience=1, min_delta=1.0)
    callback = PerceptionMSECallback("pixel", panels=False)
    trainer = trainer_for(tmp_path, False, [callback, checkpoint, stopping], max_epochs=10, num_sanity_val_steps=0)
    trainer.fit(Denoiser(), ImageData())
    assert trainer.current_epoch == 2  # min_delta=1 can never be met: stopped after patience
    assert checkpoint.best_model_score is not None
    assert Path(checkpoint.best_model_path).exists() and "best-" in Path(checkpoint.best_model_path).name
    assert checkpoint.best_model_score.item() <= trainer.callback_metrics["val/pmse"].item()


def test_state_survives_checkpoint_and_resume(tmp_path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = PerceptionMSECallback("pixel", data_range=1.0, num_panel_samples=3)
    trainer = trainer_for(tmp_path, False, [first, checkpoint], max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(Denoiser(), ImageData())
    saved = torch.load(checkpoint.last_model_path, weights_only=False)["callbacks"]
    assert saved[first.state_key]["fixed_positions"] == [[0, 0], [0, 1], [0, 2]]
    second = PerceptionMSECallback("pixel", data_range=1.0, num_panel_samples=3)
    other = PerceptionMSECallback("pixel", prefix="val/other", num_panel_samples=1)
    assert second.state_key == first.state_key != other.state_key
    resumed = trainer_for(tmp_path, False, [second, other], max_epochs=2, num_sanity_val_steps=0)
    resumed.fit(Denoiser(), ImageData(), ckpt_path=checkpoint.last_model_path)
    assert second._fixed.positions == [(0, 0), (0, 1), (0, 2)] and second._fixed.frozen
    assert "val/other" in resumed.callback_metrics


def test_test_loop_and_tuple_outputs(tmp_path) -> None:
    callback = PerceptionMSECallback("pixel", data_range=1.0, panels=False)
    trainer = trainer_for(tmp_path, False, [callback], max_epochs=1, num_sanity_val_steps=0)
    model = Denoiser(output="tuple")
    trainer.fit(model, ImageData())
    results = trainer.test(model, ImageData(), verbose=False)
    assert set(results[0]) >= {"test/pmse", "test/pmse_pixel", "test/pmse_psnr"}


def test_wrong_validation_outputs_fail_clearly(tmp_path) -> None:
    callback = PerceptionMSECallback("pixel")
    trainer = trainer_for(tmp_path, False, [callback], max_epochs=1)
    with pytest.raises(
        ValueError, match=r"validation_step/test_step must return a dict with keys 'preds' and 'target'"
    ):
        trainer.fit(Denoiser(output="none"), ImageData())


def test_extract_function_and_custom_keys(tmp_path) -> None:
    callback = PerceptionMSECallback("pixel", extract=swap_pair, panels=False)
    trainer = trainer_for(tmp_path, False, [callback], max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(Denoiser(), ImageData())
    assert "val/pmse" in trainer.callback_metrics


def swap_pair(outputs, batch):
    return outputs["target"], outputs["preds"]


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        ({"preds_key": ""}, ValueError, r"preds_key: expected a non-empty string"),
        ({"worst_k": -1}, ValueError, r"worst_k: expected an integer from 0 to 64, got -1"),
        ({"panels_every_n_epochs": 0}, ValueError, r"panels_every_n_epochs: expected an integer >= 1"),
        ({"extract": "preds"}, TypeError, r"extract: expected a function"),
        ({"modality": "video"}, ValueError, r"modality: expected one of 'auto', 'audio', 'image'"),
        ({"space": PerceptionMSE(), "weights": "random"}, ValueError, r"do not apply to a ready PerceptionMSE"),
        ({"space": "nope"}, ValueError, r"space: expected one of"),
    ],
)
def test_bad_callback_arguments(options, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        PerceptionMSECallback(**options)


CLI_CONFIG = """
trainer:
  max_epochs: 1
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  num_sanity_val_steps: 0
  default_root_dir: {root}
  callbacks:
    - class_path: pl_pmse.PerceptionMSECallback
      init_args:
        space: pyramid
        data_range: 1.0
        worst_k: 2
        space_options:
          levels: 3
          component_weights: {{pixel: 0.0}}
model:
  class_path: tests.lightning_models.Denoiser
data:
  class_path: tests.lightning_models.ImageData
"""


def test_lightning_cli_config_with_the_callback(tmp_path) -> None:
    config = tmp_path / "cli.yaml"
    config.write_text(CLI_CONFIG.format(root=tmp_path))
    run = cli.LightningCLI(args=["fit", "--config", str(config)], subclass_mode_model=True, subclass_mode_data=True)
    (callback,) = [c for c in run.trainer.callbacks if isinstance(c, PerceptionMSECallback)]
    assert isinstance(callback, pl.Callback)
    assert callback.space.component_names == ("pixel", "band0", "band1", "lowpass")
    metrics = run.trainer.callback_metrics
    assert metrics["val/pmse"].item() == pytest.approx(
        sum(metrics[f"val/pmse_{name}"].item() for name in ("band0", "band1", "lowpass")), rel=1e-5
    )


def test_tensorboardx_writers_get_their_own_add_calls_on_the_training_thread() -> None:
    from pl_pmse.sinks import TensorBoardSink

    class TensorBoardXWriter:  # what Lightning uses when `tensorboard` is not installed: no torch summaries
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def __getattr__(self, name):
            return lambda *args, **kwargs: self.calls.append((name, args[0], args[2]))

    writer = TensorBoardXWriter()
    sink = TensorBoardSink(writer)
    sends = [sink.image("val/pmse/panels/worst", np.zeros((8, 8, 3), np.uint8), "caption", 7),
             sink.audio("val/pmse/audio/worst_target", [np.zeros(800, np.float32)], 8000, ["clip"], 7)]  # fmt: skip
    assert writer.calls == []  # nothing is written where the panel is prepared
    for send in sends:
        send()
    assert writer.calls == [("add_image", "val/pmse/panels/worst", 7), ("add_text", "val/pmse/panels/worst/caption", 7),
                            ("add_audio", "val/pmse/audio/worst_target/0", 7),
                            ("add_text", "val/pmse/audio/worst_target/0/caption", 7)]  # fmt: skip


def as_8bit(outputs, batch):
    """Module level: ddp_spawn pickles the callback with its extract function."""
    return outputs["preds"] * 255, outputs["target"] * 255


def test_0_255_floats_with_the_default_range_warn_once_through_the_callback(tmp_path) -> None:
    callback = PerceptionMSECallback("pixel", extract=as_8bit, panels=False)
    trainer = trainer_for(tmp_path, False, [callback], max_epochs=2, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Denoiser(), ImageData())
    (warning,) = [w for w in caught if "assumes values in [0, 1]" in str(w.message)]
    assert "data_range=255" in str(warning.message)


def test_panel_pictures_read_at_a_glance() -> None:
    from pl_pmse.panels import audio as audio_panels
    from pl_pmse.panels.render import _tick_label

    pairs = [(torch.zeros(3, 8, 8), torch.full((3, 8, 8), 0.5))] * 2
    plain, _ = image_panels.comparison_grid(pairs, (0.0, 1.0))
    labelled, vmax = image_panels.comparison_grid(pairs, (0.0, 1.0), vmax=1.0, labels=["a: pmse 1", "b: pmse 2"])
    assert labelled.shape[0] == plain.shape[0] + 2 * 16 and vmax == 1.0  # a title strip on each row; the given scale
    # log axes within one decade read as values, not as the same "1e+2" three times
    labels = [_tick_label(v, log=True) for v in np.linspace(2.0, 2.3, 4)]
    assert len(set(labels)) == 4 and labels[0] == "1e+02"
    # spectrograms get a frequency axis in Hz, and the waveform below stays in line with them
    spectrogram = audio_panels.spectrogram_panel(torch.randn(4000) * 0.1, torch.randn(4000) * 0.1, 8000)
    waveform = audio_panels.waveform_overlay(torch.randn(4000), torch.randn(4000))
    assert spectrogram.shape[1] == waveform.shape[1] == 640 + audio_panels.AXIS_MARGIN


def test_the_audio_profile_uses_the_metrics_own_mel_analysis() -> None:
    callback = PerceptionMSECallback("mel", sample_rate=8000, n_fft=512, hop_length=128, n_mels=40)
    profile = callback._new_profile()
    assert (profile.analysis.n_fft, profile.analysis.hop_length, profile.analysis.n_mels) == (512, 128, 40)


class ShowsInput(Denoiser):
    """Returns the model input beside the pair, for the panels' input column."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        (clean,) = batch
        noisy = (clean + 0.2 * torch.randn_like(clean)).clamp(0, 1)
        return {"preds": self(noisy), "target": clean, "input": noisy}


def test_an_input_returned_by_validation_step_gets_its_own_column(tmp_path) -> None:
    widths = {}
    for name, model in (("without", Denoiser()), ("with", ShowsInput())):
        callback = PerceptionMSECallback("pixel", data_range=1.0, profile=False, num_panel_samples=1, worst_k=1)
        trainer = trainer_for(tmp_path / name, CSVLogger(tmp_path / name), [callback], max_epochs=1,
                              num_sanity_val_steps=0)  # fmt: skip
        trainer.fit(model, ImageData())
        (picture,) = Path(trainer.log_dir, "pmse_panels").rglob("panels/fixed/*.png")
        with Image.open(picture) as image:
            widths[name] = image.size[0]
    assert widths["with"] > widths["without"] + 90  # one more 96-pixel column


class ScaleProbe(pl.Callback):
    """The error scales a checkpoint would save, at the end of each validation epoch."""

    def __init__(self, callback: PerceptionMSECallback) -> None:
        self.callback, self.seen = callback, []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.seen.append(self.callback.state_dict()["error_scales"])


@pytest.mark.parametrize("background", [True, False])
def test_error_scales_are_kept_by_the_callback_from_each_panels_first_epoch(tmp_path, background) -> None:
    """The panels return their scales; the callback keeps them on the training thread (before: the panel thread
    wrote them into the callback while a checkpoint could be reading them)."""
    callback = PerceptionMSECallback("pixel", data_range=1.0, background_panels=background)
    probe = ScaleProbe(callback)
    trainer = trainer_for(tmp_path, CSVLogger(tmp_path), [callback, probe], num_sanity_val_steps=0, max_epochs=3)
    trainer.fit(Denoiser(), ImageData())
    first = probe.seen[-1]
    assert set(first) == {"val/pmse/panels/fixed", "val/pmse/panels/worst", "val/pmse/panels/error_map"}
    assert all(0 < scale < 1 for scale in first.values())
    assert probe.seen[1:] == [first] * 2  # from the first epoch's on (in the background: once it is drawn)
    if not background:
        assert probe.seen[0] == first  # drawn at the epoch end: in the first epoch's checkpoint already


def test_a_new_panel_is_one_function_in_its_set(tmp_path, monkeypatch) -> None:
    import dataclasses

    from pl_pmse.panels.sets import PANEL_SETS, Drawn, Picture, SamplePanel

    def brightest(key, samples, options, scale):
        picture = np.full((8, 8 * len(samples), 3), 255, dtype=np.uint8)
        return Drawn((Picture(key, picture, f"{len(samples)} samples"),))

    image = PANEL_SETS["image"]
    extended = dataclasses.replace(image, sample_panels=(*image.sample_panels, SamplePanel("bright/{set}", brightest)))
    monkeypatch.setitem(PANEL_SETS, "image", extended)
    callback = PerceptionMSECallback("pixel", data_range=1.0, num_panel_samples=2, worst_k=3)
    trainer = trainer_for(tmp_path, CSVLogger(tmp_path), [callback], num_sanity_val_steps=0)
    trainer.fit(Denoiser(), ImageData())
    folder = Path(trainer.log_dir, "pmse_panels", "val", "pmse", "bright")
    assert [p.read_text() for p in sorted((folder / "worst").glob("*.txt"))] == ["3 samples\n"] * 2
    assert len(list((folder / "fixed").glob("*.png"))) == 2


def test_a_new_modality_is_a_space_and_a_panel_set(tmp_path, monkeypatch) -> None:
    """A modality the library does not know: its space names it, its panel set draws it; nothing else changes."""
    from pl_pmse.panels.sets import PANEL_SETS, Drawn, PanelSet, Picture, SamplePanel
    from pl_pmse.spaces import Space

    class Curves(Space):  # e.g. 1-d measurement curves [N, L]
        name, modality = "curves", "curves"

        def __init__(self):
            super().__init__({"slope": 1.0})

        def features(self, x):
            return {"slope": x.diff(dim=-1)}

    def overlay(key, samples, options, scale):
        return Drawn((Picture(key, np.zeros((4, 4, 3), dtype=np.uint8), " | ".join(s.label for s in samples)),))

    curves = PanelSet("curves", (SamplePanel("panels/{set}", overlay),), (), lambda sample, options: True,
                      lambda options, space: None)  # fmt: skip
    monkeypatch.setitem(PANEL_SETS, "curves", curves)

    class CurveModel(Denoiser):
        def validation_step(self, batch, batch_idx):
            out = super().validation_step(batch, batch_idx)
            return {"preds": out["preds"].flatten(1), "target": out["target"].flatten(1)}

    callback = PerceptionMSECallback(Curves(), worst_k=2)
    assert callback.modality == "curves"
    trainer = trainer_for(tmp_path, CSVLogger(tmp_path), [callback], num_sanity_val_steps=0)
    trainer.fit(CurveModel(), ImageData())
    assert "val/pmse_slope" in trainer.callback_metrics
    drawn = {p.parent.name for p in Path(trainer.log_dir, "pmse_panels").rglob("*.png")}
    assert drawn == {"fixed", "worst"}


def test_the_callback_leaves_the_process_warning_filters_alone_and_warns_on_rank_zero_only(tmp_path, monkeypatch):
    """Before: setup added a process-wide filter for Lightning's sync_dist advice on our keys."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    filters = list(warnings.filters)
    callback = PerceptionMSECallback("pixel", data_range=1.0, panels=False)
    trainer_for(tmp_path, CSVLogger(tmp_path), [callback], num_sanity_val_steps=0).fit(Denoiser(), ImageData())
    assert warnings.filters == filters
    for rank, expected in ((0, 1), (1, 0)):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            PerceptionMSECallback("waveform")  # audio panels without a sample rate: a warning on rank zero
        assert len([w for w in caught if "audio panels need sample_rate" in str(w.message)]) == expected


def test_a_callback_used_by_a_second_trainer_starts_afresh_unless_resumed(tmp_path) -> None:
    """Sweeps and k-fold reuse one callback: before, the second run kept the first run's fixed samples and error
    scales (its heatmaps nearly black on the first run's scale)."""
    callback = PerceptionMSECallback("pixel", data_range=1.0, background_panels=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = trainer_for(tmp_path / "a", CSVLogger(tmp_path / "a"), [callback, checkpoint], num_sanity_val_steps=0,
                        max_epochs=2)  # fmt: skip
    first.fit(Denoiser(), ImageData())
    saved = callback.state_dict()
    assert saved["error_scales"] and saved["fixed_positions"]
    callback._error_scales = {key: 1e9 for key in saved["error_scales"]}  # would show up if carried over
    second = trainer_for(tmp_path / "b", CSVLogger(tmp_path / "b"), [callback], num_sanity_val_steps=0, max_epochs=1)
    second.fit(Denoiser(), ImageData())
    assert all(scale < 1 for scale in callback.state_dict()["error_scales"].values())  # its own first epoch's
    callback._error_scales = {}
    resumed = trainer_for(tmp_path / "c", CSVLogger(tmp_path / "c"), [callback], num_sanity_val_steps=0, max_epochs=3)
    resumed.fit(Denoiser(), ImageData(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert callback.state_dict()["error_scales"] == saved["error_scales"]  # a resume restores the first run's


def test_a_sink_of_your_own_and_a_registered_logger_get_the_panels(tmp_path, monkeypatch) -> None:
    from pl_pmse import sinks as sinks_module
    from pl_pmse.sinks import Sink

    received: list[tuple[str, str, int]] = []

    class Recording(Sink):
        def __init__(self, name: str) -> None:
            self.name = name

        def image(self, key, image, caption, step):
            return lambda: received.append((self.name, key, step))

        def audio(self, key, clips, sample_rate, captions, step):
            return None

    class TeamLogger(CSVLogger):  # a logger pl-pmse does not know, registered by its class name
        pass

    monkeypatch.setattr(sinks_module, "SINKS", dict(sinks_module.SINKS))  # the registration ends with the test
    sinks_module.register_sink("TeamLogger", lambda logger: Recording("team"))
    callback = PerceptionMSECallback("pixel", data_range=1.0, sinks=[Recording("own")], background_panels=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = trainer_for(tmp_path, TeamLogger(tmp_path), [callback], num_sanity_val_steps=0)
        trainer.fit(Denoiser(), ImageData())
    assert not [w for w in caught if "PerceptionMSECallback" in str(w.message)]
    for name in ("own", "team"):
        keys = {key for who, key, _ in received if who == name}
        assert keys == {f"val/pmse/panels/{p}" for p in ("fixed", "worst", "error_map", "spectrum", "comparison")}, name
    assert len({step for _, _, step in received}) == 2 and not (tmp_path / "pmse_panels").exists()
    with pytest.raises(TypeError, match=r"sinks: expected a list of pl_pmse.sinks.Sink objects"):
        PerceptionMSECallback("pixel", sinks=["wandb"])


def test_lightning_cli_shows_the_space_error_of_a_callback(tmp_path, monkeypatch, capsys) -> None:
    """``weights: imagenet`` offline in a LightningCLI config: our message (where the file goes) is among
    jsonargparse's errors, first, not replaced by its "Does not validate against any of the Union subtypes"."""

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    config = tmp_path / "cli.yaml"
    config.write_text(CLI_CONFIG.format(root=tmp_path).replace("space: pyramid", "space: vgg16").replace(
        "levels: 3\n          component_weights: {{pixel: 0.0}}", "weights: imagenet").replace(
        "levels: 3\n          component_weights: {pixel: 0.0}", "weights: imagenet"))  # fmt: skip
    with pytest.raises((SystemExit, ValueError)) as raised:  # jsonargparse exits or raises, by version
        cli.LightningCLI(args=["fit", "--config", str(config)], subclass_mode_model=True, subclass_mode_data=True)
    errors = capsys.readouterr().err + str(raised.value)
    ours = errors.find("weights='imagenet': the vgg16 ImageNet weights are not in torchvision's cache")
    assert 0 <= ours < errors.find("Not a valid subclass of Callback"), errors[-2000:]


def test_exact_evaluation_leaves_the_padding_out_of_every_pl_pmse_metric_of_the_module() -> None:
    """The positions ExactEvaluation hands the module's metrics, without processes: rank 1 of 2 over 7 samples
    receives 3 of its own and one repeat, in batches of 2 (the DDP run is in test_callback_ddp)."""
    from torch.utils.data import DataLoader, DistributedSampler

    from pl_pmse import ExactEvaluation

    module = torch.nn.Module()
    module.pmse, module.profile = PerceptionMSE("pixel"), ErrorProfile("image", grid=2, bands=4)
    module.forwarded = PerceptionMSE("pixel")
    loader = DataLoader(range(7), batch_size=2, sampler=DistributedSampler(range(7), num_replicas=2, rank=1))
    callback = ExactEvaluation()
    callback._start(module, loader)
    data = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    for start in (0, 2):
        callback._mark(module, 0)
        preds, target = data[0][start : start + 2], data[1][start : start + 2]
        module.pmse.update(preds, target)
        module.profile.update(preds, target)
        module.forwarded(preds, target)
        callback._advance(module, preds, 0)
    expected_pmse, expected_profile = PerceptionMSE("pixel"), ErrorProfile("image", grid=2, bands=4)
    expected_pmse.update(data[0][:3], data[1][:3])
    expected_profile.update(data[0][:3], data[1][:3])
    assert torch.equal(module.pmse.totals, expected_pmse.totals)
    assert torch.equal(module.forwarded.totals, expected_pmse.totals)
    found, expected = module.profile.compute(), expected_profile.compute()  # the exact sums (bins may carry apart)
    assert all(torch.equal(found[name], expected[name]) for name in expected)


def test_batches_the_figures_cannot_measure_are_left_out_with_one_warning(monkeypatch) -> None:
    """Before the fix the first batch of rows (the pixel space takes any shape) or of small images raised."""
    from types import SimpleNamespace

    from pl_pmse.callback import callback as callback_module

    said = []
    monkeypatch.setattr(callback_module, "rank_zero_warn", lambda message, **kwargs: said.append(message))
    callback = PerceptionMSECallback("pixel", data_range=1.0, panels=False)
    callback._start(None, "validate", [], SimpleNamespace(device=torch.device("cpu")))
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, global_rank=0, world_size=1, current_epoch=0)
    for pair in ((torch.rand(4, 10), torch.rand(4, 10)), (torch.rand(2, 3, 5, 5), torch.rand(2, 3, 5, 5))):
        callback._batch(trainer, "validate", {"preds": pair[0], "target": pair[1]}, None, 0, 0)
    stage = callback._stages["validate"]
    assert len(said) == 1 and "ssim and sharpness leave out batches of shape (4, 10)" in said[0]
    assert stage.fidelity[0].compute()["ssim"].isnan() and stage.metrics[0].compute() > 0


class _Overshooting(Denoiser):
    """An unclamped residual denoiser at initialisation: some predicted pixels far above 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x) + 0.8 * (x > 0.6)


@pytest.mark.parametrize("space", ["pyramid", "aspects"])
def test_a_model_that_overshoots_its_range_is_measured_and_the_fit_completes(tmp_path, space) -> None:
    recorder = Recorder()
    callback = PerceptionMSECallback(space, data_range=1.0, panels=False)
    trainer = cpu_trainer(tmp_path, [recorder, callback], logger=False, num_sanity_val_steps=2)
    with pytest.warns(UserWarning, match=rf"preds: space '{space}': .*% of the predicted values lie outside \[0, 1\]"):
        trainer.fit(_Overshooting(), ImageData())
    assert trainer.current_epoch == 2 and trainer.callback_metrics["val/pmse"] > 0
    ready = PerceptionMSE(space, data_range=1.0, validate_args=False)
    assert not PerceptionMSECallback(ready).validate_args  # a ready metric keeps its options
    assert not PerceptionMSECallback(space, data_range=1.0, validate_args=False).validate_args
    with pytest.raises(TypeError, match="validate_args: expected True or False"):
        PerceptionMSECallback(space, data_range=1.0, validate_args="no")
