"""MLflow as a dashboard: a real local store (file and sqlite), read back with MlflowClient."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from pl_pmse.callback import PerceptionMSECallback
from tests.lightning_models import AudioData, AudioEnhancer, Denoiser, ImageData, cpu_trainer, loggers

pytest.importorskip("mlflow")
MlflowClient = pytest.importorskip("mlflow.tracking").MlflowClient
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


def stores(tmp_path: Path) -> dict[str, str]:
    return {"file": f"file:{tmp_path / 'mlruns'}", "sqlite": f"sqlite:///{tmp_path / 'mlflow.db'}"}


@pytest.mark.parametrize("store", ["file", "sqlite"])
def test_mlflow_gets_the_scalars_and_the_panels_with_their_step(tmp_path, monkeypatch, store) -> None:
    """Before: on the file store (Lightning's default ``file:./mlruns``) the fit died at the first validation epoch
    (NotADirectoryError: ``val/pmse`` is a file, ``val/pmse/pixel`` could not be); on sqlite the panels went to PNG
    files beside the run."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    uri = stores(tmp_path)[store]
    logger = loggers.MLFlowLogger(
        experiment_name="pl-pmse", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts")
    )
    callback = PerceptionMSECallback("pyramid", data_range=1.0, background_panels=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu_trainer(tmp_path, [callback], logger=logger, num_sanity_val_steps=0).fit(Denoiser(), ImageData())
    assert not [str(w.message) for w in caught if "PerceptionMSECallback" in str(w.message)]
    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    assert {"val/pmse", "val/pmse_pixel", "val/pmse_band0", "val/pmse_lowpass", "val/pmse_psnr"} <= set(
        run.data.metrics
    )
    steps = [m.step for m in client.get_metric_history(logger.run_id, "val/pmse")]
    assert len(steps) == 2  # one per epoch; the panels at the same steps
    images = [a.path for a in client.list_artifacts(logger.run_id, "images")]
    for panel in ("fixed", "worst", "error_map", "spectrum"):
        for step in steps:
            named = re.compile(rf"val[~#]pmse[~#]panels[~#]{panel}[+%]step[+%]{step}[+%].*\.png$")  # MLflow 3, 2
            assert any(named.search(path) for path in images), (
                panel, step, images)  # fmt: skip
    captions = [a.path for a in client.list_artifacts(logger.run_id, "val/pmse/panels/fixed")]
    assert captions == [f"val/pmse/panels/fixed/step={step:06d}.txt" for step in steps]
    assert not (tmp_path / "pmse_panels").exists()  # nothing misrouted to files


def test_mlflow_gets_the_clips_as_artifacts(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = stores(tmp_path)["file"]
    logger = loggers.MLFlowLogger(
        experiment_name="pl-pmse", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts")
    )
    callback = PerceptionMSECallback("mel", sample_rate=8000, worst_k=2, num_panel_samples=1)
    cpu_trainer(tmp_path, [callback], logger=logger, num_sanity_val_steps=0, max_epochs=1).fit(
        AudioEnhancer(), AudioData(val=4, batch_size=2))  # fmt: skip
    client = MlflowClient(uri)
    worst = [a.path for a in client.list_artifacts(logger.run_id, "val/pmse/audio/worst_target")]
    assert sum(path.endswith(".wav") for path in worst) == 2 and any(path.endswith(".txt") for path in worst)
    assert not list(Path(tmp_path).glob("pl_pmse_*"))  # the temporary folders are gone
