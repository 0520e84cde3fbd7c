"""The package as a user installs it: its metadata, and MLflow from the ``[mlflow]`` extra alone.

``make dist-check`` runs this file (with a few others) in a fresh venv holding the built wheel with only its
``[mlflow]`` extra, from a folder outside the checkout (``PL_PMSE_INSTALLED_WHEEL=1``); it runs in the suite too.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import torch

import pl_pmse


def test_the_installed_version_is_the_package_s() -> None:
    assert importlib.metadata.version("pl-pmse") == pl_pmse.__version__
    assert (Path(pl_pmse.__file__).parent / "py.typed").exists()
    if os.environ.get("PL_PMSE_INSTALLED_WHEEL"):  # from the wheel: site-packages, not a checkout on sys.path
        assert "site-packages" in pl_pmse.__file__, pl_pmse.__file__
        assert not (Path(pl_pmse.__file__).parents[1] / "pyproject.toml").exists()


@pytest.mark.parametrize("store", ["default file store", "sqlite"])
def test_lightnings_mlflow_logger_runs_with_the_mlflow_extra(store, tmp_path, monkeypatch) -> None:
    """``pip install "pl-pmse[mlflow]"`` is enough for Lightning's ``MLFlowLogger()`` (its default store is
    ``./mlruns``; MLflow 3 serves it only with ``MLFLOW_ALLOW_FILE_STORE=true``, as the README says) and for a sqlite
    store (sqlalchemy and alembic come with the extra)."""
    mlflow_tracking = pytest.importorskip("mlflow.tracking")
    from pl_pmse import PerceptionMSECallback
    from tests.lightning_models import Denoiser, ImageData, cpu_trainer, loggers

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if store == "sqlite":
        logger = loggers.MLFlowLogger(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    else:
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        logger = loggers.MLFlowLogger()  # file:./mlruns
    callback = PerceptionMSECallback("pixel", data_range=1.0, panels=False)
    torch.manual_seed(0)
    cpu_trainer(tmp_path, [callback], logger=logger, num_sanity_val_steps=0).fit(Denoiser(), ImageData())
    client = mlflow_tracking.MlflowClient(logger._tracking_uri)
    history = client.get_metric_history(logger.run_id, "val/pmse")
    assert len(history) == 2 and all(entry.value > 0 for entry in history)
    if store != "sqlite":
        assert (tmp_path / "mlruns").is_dir()
