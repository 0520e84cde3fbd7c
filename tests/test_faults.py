"""Fault injection in training: broken media writes, NaN batches, a failing renderer, kill and resume, DDP errors."""

from __future__ import annotations

import contextlib
import errno
import threading
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
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


def test_disk_full_leaves_no_partial_file_and_reports_every_failure_per_epoch(tmp_path, monkeypatch) -> None:
    real_write = Path.write_bytes

    def disk_full(path: Path, data: bytes) -> int:
        if ".png" in path.name:  # as a full disk does: part of the file, then the error
            real_write(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    trainer = trainer_for(tmp_path, [PerceptionMSECallback("pixel", data_range=1.0)], max_epochs=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Denoiser(), ImageData())
    failures = [str(w.message) for w in caught if "No space left" in str(w.message)]
    assert len(failures) == 3 and all("5 logger or drawing call(s) failed" in f and "FileSink" in f for f in failures)
    assert trainer.current_epoch == 3 and "val/pmse" in trainer.callback_metrics
    written = [path for path in Path(trainer.log_dir, "pmse_panels").rglob("*") if path.is_file()]
    assert not written  # no partial picture, no temporary file (and no caption for a picture that failed)


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
    skipped = [float(row[header.index("val/pmse_skipped")]) for row in values if row[header.index("val/pmse_skipped")]]
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
    assert len(list(Path(trainer.log_dir, "pmse_panels").rglob("*.png"))) == 4 + 5


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


# ---- delivery never stalls training beyond panel_timeout ------------------------------------------------------


def test_a_hung_logger_costs_at_most_the_budget_and_is_then_skipped(tmp_path, monkeypatch) -> None:
    from pl_pmse.sinks import TensorBoardSink

    calls = []

    def hung_image(self, key, image, caption, step):
        def send():
            calls.append(key)
            time.sleep(30)  # a W&B / TensorBoard call that never answers in time

        return send

    monkeypatch.setattr(TensorBoardSink, "image", hung_image)
    callback = PerceptionMSECallback("pixel", data_range=1.0, panel_timeout=1.0)
    trainer = trainer_for(tmp_path, [callback], logger=loggers.TensorBoardLogger(tmp_path), max_epochs=3)
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Denoiser(), ImageData())
    elapsed = time.monotonic() - start
    assert elapsed < 12, elapsed  # 3 epochs x 5 panels x 30 s before; now 1 s for the one call that hung
    assert len(calls) == 1  # the sink that overran is not called again
    reports = [str(w.message) for w in caught if "panels of validate epoch" in str(w.message)]
    assert "no answer within the 1 s budget; TensorBoardSink is skipped now" in reports[0]
    assert "4 panel(s) were dropped" in reports[0] and all("dropped" in report for report in reports[1:])


@pytest.mark.parametrize("background", [True, False], ids=["background", "at the epoch end"])
def test_slow_drawing_is_dropped_at_the_budget_and_teardown_waits_at_most_that(
    tmp_path, monkeypatch, background
) -> None:
    draw = image_panels.comparison_grid

    def slow_draw(*args, **kwargs):
        time.sleep(20)
        return draw(*args, **kwargs)

    monkeypatch.setattr(image_panels, "comparison_grid", slow_draw)
    callback = PerceptionMSECallback("pixel", data_range=1.0, panel_timeout=1.0, profile=False,
                                     background_panels=background)  # fmt: skip
    trainer = trainer_for(tmp_path, [callback], max_epochs=2)
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Denoiser(), ImageData())
    assert time.monotonic() - start < 10  # before: 2 epochs x 20 s of drawing waited for (either mode)
    reports = [str(w.message) for w in caught if "panels of validate epoch" in str(w.message)]
    assert len(reports) == 2 and all("were dropped" in report for report in reports)


class Interrupt(pl.Callback):
    """Ctrl-C during the second training epoch, while the first epoch's panels are still being drawn."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 1:
            raise KeyboardInterrupt


def test_ctrl_c_with_panels_in_flight_ends_at_once(tmp_path, monkeypatch) -> None:
    draw = image_panels.comparison_grid
    monkeypatch.setattr(image_panels, "comparison_grid", lambda *a, **k: (time.sleep(30), draw(*a, **k))[1])
    callback = PerceptionMSECallback("pixel", data_range=1.0, profile=False)
    trainer = trainer_for(tmp_path, [callback, Interrupt()], max_epochs=3)
    start = time.monotonic()
    with warnings.catch_warnings(), contextlib.suppress(SystemExit, KeyboardInterrupt):
        warnings.simplefilter("ignore")
        trainer.fit(Denoiser(), ImageData())
    assert time.monotonic() - start < 8  # before: it waited for the drawing (80 s observed)
    assert trainer.interrupted
    thread = next(t for t in threading.enumerate() if t.name == "pl_pmse_panels")
    assert thread.daemon  # a daemon: the interpreter does not wait for it at exit


@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt()], ids=["SystemExit", "KeyboardInterrupt"])
@pytest.mark.parametrize("background", [True, False], ids=["background", "at the epoch end"])
def test_an_exit_while_drawing_does_not_end_the_fit_and_is_reported(tmp_path, monkeypatch, error, background) -> None:
    """Before: SystemExit ended the fit with background_panels=False, and a KeyboardInterrupt raised by drawing code
    on the panel thread (no Ctrl-C reaches that thread) lost the epoch's panels without a word."""

    def exits(*args, **kwargs):
        raise error

    monkeypatch.setattr(image_panels, "comparison_grid", exits)
    callback = PerceptionMSECallback("pixel", data_range=1.0, background_panels=background)
    trainer = trainer_for(tmp_path, [callback], max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Denoiser(), ImageData())
    assert trainer.current_epoch == 2 and not trainer.interrupted
    assert sum(type(error).__name__ in str(w.message) for w in caught) == 2  # one report per epoch
    assert list(Path(trainer.log_dir, "pmse_panels").rglob("error_map/*.png"))  # the other panels were drawn


def test_keys_cannot_leave_the_panel_folder(tmp_path) -> None:
    from pl_pmse.sinks import FileSink

    with pytest.raises(ValueError, match=r"prefix: expected a key like 'val/pmse'.*got '\.\./\.\./x'"):
        PerceptionMSECallback("pixel", prefix="../../x")
    root = tmp_path / "panels"
    FileSink(root).image("../../escaped/key", np.zeros((4, 4, 3), np.uint8), "caption", 1)
    assert not list(tmp_path.glob("escaped*")) and list(root.rglob("step=000001.png"))


@pytest.mark.parametrize(
    ("state", "warned"),
    [({"fixed_positions": None}, "not valid"), ({"fixed_positions": [[0, "a"]]}, "not valid"),
     ({"fixed_positions": [[50, 0], [0, 1]], "fixed_frozen": True}, "1 of the 2 fixed panel samples"),
     ({"fixed_positions": [[0, 0], [0, 1], [0, 2], [1, 0]], "fixed_frozen": True}, "the first 2 are kept")],
)  # fmt: skip
def test_restored_fixed_samples_are_validated(tmp_path, state: dict, warned: str) -> None:
    callback = PerceptionMSECallback("pixel", data_range=1.0, num_panel_samples=2, profile=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.load_state_dict(state)
        trainer_for(tmp_path, [callback], max_epochs=2).fit(Denoiser(), ImageData())
    assert any(warned in str(w.message) for w in caught)
    assert len(callback._fixed.positions) == 2 and callback._fixed.frozen  # chosen afresh
    captions = sorted(Path(tmp_path).rglob("panels/fixed/step=*.txt"))
    assert captions[-1].read_text().count("batch ") == 2  # the last epoch draws both fixed samples


def test_the_worker_lets_a_hung_thread_go_and_blames_only_the_sink_that_overran() -> None:
    from pl_pmse.callback.worker import PanelWorker

    worker, calls = PanelWorker(timeout=0.4), []

    def epoch_with(sinks_and_delays, draw_delay=0.0):
        def draw(epoch):
            time.sleep(draw_delay)
            for sink, delay in sinks_and_delays:
                epoch.send(sink, f"{sink} call", lambda s=sink, d=delay: (time.sleep(d), calls.append(s)))

        return draw

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        worker.submit("epoch 0", epoch_with([("S", 5.0)]))  # S hangs: its thread is let go after 0.4 s
        worker.deliver(wait=True)
        start = time.monotonic()
        worker.submit("epoch 1", epoch_with([("T", 0.0)]))  # a healthy sink is served by a fresh thread
        worker.deliver(wait=True)
        assert time.monotonic() - start < 0.3 and calls == ["T"]
        worker.submit("epoch 2", epoch_with([("T", 0.0)], draw_delay=0.35))  # drawing takes most of the budget
        worker.deliver(wait=True)
        assert "T" not in worker._broken  # a call with too little budget left is dropped, its sink not blamed
        worker.close()
    reports = [str(w.message) for w in caught]
    assert "S is skipped now" in reports[0] and "1 panel(s) were dropped" in reports[-1]


def test_ctrl_c_while_drawing_in_the_loop_is_not_swallowed() -> None:
    from pl_pmse.callback.worker import Epoch

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Epoch("validate epoch 0", 1.0).guard("drawing panels", interrupted)  # background_panels=False: main thread


class HangingExperimentLogger(loggers.Logger):
    """A logger whose ``experiment`` stops answering once training has started, until ``release`` is set (a run
    whose backend stalls, a stuck network mount); panels find it by its ``experiment``, as they find any other
    logger's W&B run or writer."""

    release = threading.Event()

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root, self.stalled = root, False

    name, version = "hanging", 0

    @property
    def save_dir(self) -> str:
        return str(self.root)

    @property
    def experiment(self):
        if self.stalled:
            self.release.wait(30)
        return object()

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class StallLoggers(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        for logger in trainer.loggers:
            logger.stalled = True


def test_a_logger_whose_experiment_hangs_costs_the_fit_at_most_the_panel_timeout(tmp_path) -> None:
    """Before: the training thread read every logger's ``experiment`` itself when the panels' sinks were opened, and
    a hanging one stalled the fit for as long as it hung (30 s here)."""
    callback = PerceptionMSECallback("pixel", data_range=1.0, panel_timeout=1.0)
    trainer = trainer_for(tmp_path, [callback, StallLoggers()], logger=HangingExperimentLogger(tmp_path), max_epochs=2)
    start = time.monotonic()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(Denoiser(), ImageData())
    finally:
        HangingExperimentLogger.release.set()
    assert time.monotonic() - start < 15
    reports = [str(w.message) for w in caught if "PerceptionMSECallback" in str(w.message)]
    assert any("TimeoutError: opening the loggers: no answer within the 1 s budget" in r for r in reports), reports
    assert len(list(Path(tmp_path, "pmse_panels").rglob("*.png"))) == 2 * 5  # panels went to files


def test_a_hung_wandb_call_leaves_no_temporary_file(tmp_path, monkeypatch) -> None:
    """Before: the PNGs written for W&B stayed in the run folder when its log call never returned."""
    import wandb

    from tests.lightning_models import loggers as namespace_loggers

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = namespace_loggers.WandbLogger(project="pl-pmse-tests", save_dir=str(tmp_path), offline=True)
    log_metrics, release = type(logger).log_metrics, threading.Event()

    def hung(self, metrics, step=None):
        if any("/panels/" in key for key in metrics):
            release.wait(30)  # a call that never answers in time; released (and then dropped) at the test's end
            return None
        return log_metrics(self, metrics, step)

    monkeypatch.setattr(type(logger), "log_metrics", hung)
    callback = PerceptionMSECallback("pixel", data_range=1.0, panel_timeout=1.0)
    trainer = trainer_for(tmp_path, [callback], logger=logger, max_epochs=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(Denoiser(), ImageData())
        assert any("is skipped now" in str(w.message) for w in caught)
        (folder,) = Path(tmp_path, "wandb").glob("offline-run-*/pl_pmse")
        assert not list(folder.iterdir())
    finally:
        release.set()
        wandb.finish()


def test_wandb_media_without_a_record_to_follow_are_said(tmp_path) -> None:
    """A run folder holding no record and no record under save_dir: the sink warns where the media go."""
    from types import SimpleNamespace

    from pl_pmse.sinks import WandbSink

    files = tmp_path / "elsewhere" / "offline-run-1-abc" / "files"
    files.mkdir(parents=True)
    run = SimpleNamespace(id="abc", dir=str(files), settings=SimpleNamespace(mode="offline"), log=print)
    with pytest.warns(UserWarning, match=r"holds no record of the run, and none was found under save_dir=.*WANDB_DIR"):
        WandbSink(run, save_dir=tmp_path / "saved")


def test_the_process_exits_cleanly_when_a_drawing_overran_at_teardown(tmp_path) -> None:
    """Before: a panel thread still inside a torch operation when the interpreter finalized aborted the process
    ("terminate called without an active exception", exit code 134), seen at the end of DDP audio fits."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "overrun.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from pl_pmse.callback.worker import PanelWorker

        def draw(epoch):  # torch work past the budget: the worker gives it up after 1 s
            end = time.monotonic() + 1.6
            while time.monotonic() < end:
                torch.fft.rfft(torch.randn(64, 4096)).abs().sum()

        worker = PanelWorker(1.0)
        worker.submit("validate epoch 0", draw)
        worker.close(wait=True)
    """)
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 panel(s) were dropped" in done.stderr
