"""Both Lightning namespaces: ``import lightning as L`` (lightning.pytorch) and ``import pytorch_lightning as pl``.

The callback tests themselves (test_callback.py, test_faults.py) run under the other namespace in a subprocess here;
the rest checks what only a mix of namespaces can show: loggers of one with a Trainer of the other, one package
missing, a model holding spaces and metrics under Lightning's checks and true-precision plugins.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import wandb
import yaml
from torch import nn

from pl_pmse import PerceptionMSE, get_space, perception_mse
from pl_pmse.callback import PerceptionMSECallback
from pl_pmse.lightning_compat import NAMESPACES
from pl_pmse.sinks import FileSink, TensorBoardSink, WandbSink, sinks_for
from tests.lightning_models import NAMESPACE, smooth_images
from tests.wandb_reader import history, run_dirs

ROOT = Path(__file__).resolve().parents[1]
OTHER = NAMESPACES[0] if NAMESPACE == "pytorch_lightning" else NAMESPACES[1]


def lightning(namespace: str):
    return importlib.import_module(namespace)


def loggers_of(namespace: str):
    return importlib.import_module(f"{namespace}.loggers")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env={**os.environ, **env})  # fmt: skip


@pytest.mark.slow
def test_the_callback_tests_pass_under_the_other_namespace() -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_callback.py",
               "tests/test_faults.py", "tests/test_mlflow.py"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PL_PMSE_TEST_LIGHTNING": OTHER,
                               "PYTHONFAULTHANDLER": "1"})  # fmt: skip  # an abort at exit names its threads
    assert done.returncode == 0, f"under {OTHER}:\n{done.stdout[-6000:]}\n{done.stderr[-8000:]}"
    assert " passed" in done.stdout.splitlines()[-1]


def test_the_callback_is_a_callback_of_every_namespace() -> None:
    callback = PerceptionMSECallback("pixel")
    for namespace in NAMESPACES:
        assert isinstance(callback, lightning(namespace).Callback), namespace
    assert PerceptionMSECallback.on_validation_batch_end.__override__  # marked as Lightning marks its own hooks


def readme_callback_config(weights: str) -> dict:
    """The README's YAML block for the callback, with a local weights file for ``imagenet`` (no download)."""
    (block,) = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    config = yaml.safe_load(block)
    (callback,) = config["trainer"]["callbacks"]
    assert callback["init_args"]["space_options"]["weights"] == "imagenet"
    callback["init_args"]["space_options"]["weights"] = weights
    return config


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_lightning_cli_of_either_namespace_accepts_the_readme_config(tmp_path, backbone_weights, namespace) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(readme_callback_config(backbone_weights["vgg16"])))
    done = run_python(
        f"""
        from {namespace}.cli import LightningCLI
        from tests.lightning_models import Denoiser
        cli = LightningCLI(Denoiser, args=["--config", {str(config)!r}], run=False)
        (callback,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "PerceptionMSECallback"]
        print(type(cli.trainer).__module__, callback.space.name)
        """,
        PL_PMSE_TEST_LIGHTNING=namespace,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [f"{namespace}.trainer.trainer", "vgg16"]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_sinks_serve_the_loggers_of_either_namespace(tmp_path, monkeypatch, namespace: str) -> None:
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    loggers = loggers_of(namespace)
    wandb_logger = loggers.WandbLogger(project="pl-pmse-tests", save_dir=str(tmp_path), offline=True)
    try:
        served = [wandb_logger, loggers.TensorBoardLogger(tmp_path / "tb"), loggers.CSVLogger(tmp_path / "csv")]
        sinks, unserved = sinks_for(served, tmp_path / "files")
        assert [type(s) for s in sinks] == [WandbSink, TensorBoardSink] and unserved == ["CSVLogger"]
        sinks, unserved = sinks_for([loggers.CSVLogger(tmp_path / "csv")], tmp_path / "files")
        assert [type(s) for s in sinks] == [FileSink] and unserved == ["CSVLogger"]

        class RunLogger(lightning(namespace).loggers.Logger):  # duck-typed: any logger of a W&B run
            name, version = "run", 0
            experiment = property(lambda self: wandb_logger.experiment)
            log_metrics = log_hyperparams = lambda self, *args, **kwargs: None

        sinks, unserved = sinks_for([RunLogger()], tmp_path / "files")
        assert [type(s) for s in sinks] == [WandbSink] and unserved == []
    finally:
        wandb.finish()


def test_loggers_of_one_namespace_with_a_trainer_of_the_other_get_the_panels(tmp_path, monkeypatch) -> None:
    """L.Trainer with pytorch_lightning's WandbLogger (or the reverse): images reach the W&B run."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    from tests.lightning_models import Denoiser, ImageData, cpu_trainer

    logger = loggers_of(OTHER).WandbLogger(project="pl-pmse-tests", save_dir=str(tmp_path), offline=True)
    callback = PerceptionMSECallback("pixel", data_range=1.0, profile=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu_trainer(tmp_path, [callback], logger=logger, max_epochs=1, num_sanity_val_steps=0).fit(
            Denoiser(), ImageData()
        )
    wandb.finish()
    assert not [w for w in caught if "cannot show panels" in str(w.message)]
    (run,) = run_dirs(tmp_path)
    rows = history(run)
    assert any("val/pmse" in row for row in rows)
    assert any("val/pmse/panels/worst/filenames" in row for row in rows)
    assert list((run / "files" / "media" / "images").rglob("*.png"))


def test_a_logger_without_panels_warns_once_naming_where_they_went(tmp_path) -> None:
    from tests.lightning_models import Denoiser, ImageData, cpu_trainer, loggers

    callback = PerceptionMSECallback("pixel", data_range=1.0, profile=False)
    trainer = cpu_trainer(tmp_path, [callback], logger=loggers.CSVLogger(tmp_path), max_epochs=2,
                          num_sanity_val_steps=0)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Denoiser(), ImageData())
    (warning,) = [w for w in caught if "cannot show panels" in str(w.message)]
    assert "CSVLogger" in str(warning.message) and "pmse_panels" in str(warning.message)
    assert len(list((Path(trainer.log_dir) / "pmse_panels").rglob("*.png"))) >= 2


def test_two_callbacks_under_one_prefix_are_refused(tmp_path) -> None:
    from tests.lightning_models import Denoiser, ImageData, cpu_trainer

    callbacks = [PerceptionMSECallback("pixel"), PerceptionMSECallback("pyramid")]
    trainer = cpu_trainer(tmp_path, callbacks, logger=False, max_epochs=1)
    with pytest.raises(
        ValueError,
        match=r"under one prefix .'val/pmse' and 'val/pmse'; spaces 'pixel' and 'pyramid'",
    ):
        trainer.fit(Denoiser(), ImageData())
    callbacks = [PerceptionMSECallback("pixel"), PerceptionMSECallback("pyramid", prefix="val/pyr")]
    trainer = cpu_trainer(tmp_path, callbacks, logger=False, max_epochs=1)
    trainer.fit(Denoiser(), ImageData())  # the test prefixes are only checked when testing
    with pytest.raises(ValueError, match="'test/pmse'"):
        trainer.test(Denoiser(), ImageData())


@pytest.mark.parametrize("package", ["lightning", "pytorch_lightning"])
def test_one_lightning_package_is_enough(package: str) -> None:
    """The other package blocked (as if not installed): the callback is a Callback of the one there, and works."""
    kept = "pytorch_lightning" if package == "lightning" else "lightning.pytorch"
    done = run_python(
        f"""
        import sys
        sys.modules[{package!r}] = None  # import {package} now fails as if it were not installed
        import tempfile
        from pl_pmse.callback import PerceptionMSECallback
        from pl_pmse.lightning_compat import CALLBACK_BASES
        from tests.lightning_models import Denoiser, ImageData, cpu_trainer, pl
        assert [base.__module__.split(".")[0] for base in CALLBACK_BASES] == [{kept.split(".")[0]!r}], CALLBACK_BASES
        trainer = cpu_trainer(tempfile.mkdtemp(), [PerceptionMSECallback("pixel", panels=False)], logger=False)
        trainer.validate(Denoiser(), ImageData())
        print("val/pmse", float(trainer.callback_metrics["val/pmse"]))
        """,
        PL_PMSE_TEST_LIGHTNING=kept,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "val/pmse" in done.stdout


class SpaceHolder:
    """Mixed into a LightningModule of either namespace: a space used as a loss and a metric used in validation."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Conv2d(3, 3, 3, padding=1)
        torch.manual_seed(3)
        self.space = get_space("squeezenet", weights="random")
        torch.manual_seed(3)
        self.metric = PerceptionMSE("squeezenet", weights="random")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return perception_mse(self(x), x, space=self.space)

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.metric.update(self(x), x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.01)


def holder_module(namespace: str) -> nn.Module:
    return type("Holder", (SpaceHolder, lightning(namespace).LightningModule), {})()


def image_loader(n: int = 4) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(smooth_images(n, 32)), batch_size=2)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_frozen_networks_raise_no_eval_mode_warning(tmp_path, namespace: str) -> None:
    model = holder_module(namespace)
    trainer = lightning(namespace).Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                                           enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, image_loader(), image_loader())
    assert not [w for w in caught if "eval mode" in str(w.message)], [str(w.message) for w in caught]
    assert not model.space.module.training and not model.metric.space.module.training


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_true_precision_leaves_the_measuring_networks_bit_identical(tmp_path, precision: str) -> None:
    model = holder_module(NAMESPACE)
    weights = [t.clone() for t in (*model.space.tensors(), *model.metric.space.tensors())]
    trainer = lightning(NAMESPACE).Trainer(precision=precision, accelerator="cpu", logger=False,
                                           enable_progress_bar=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.validate(model, image_loader())
    assert next(model.net.parameters()).dtype != torch.float32  # the plugin did cast the model
    after = [*model.space.tensors(), *model.metric.space.tensors()]
    assert all(torch.equal(a, b) for a, b in zip(weights, after, strict=True))
    preds, target = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    torch.manual_seed(3)
    fresh = get_space("squeezenet", weights="random")
    assert torch.equal(perception_mse(preds, target, space=model.space), perception_mse(preds, target, space=fresh))
