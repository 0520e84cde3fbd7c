"""The callback in real 2-process DDP fits on CPU (gloo): ``ddp_spawn`` in-process, ``ddp`` as a script."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import wandb
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.strategies import DDPStrategy

from pl_pmse import PerceptionMSE
from pl_pmse.callback import PerceptionMSECallback
from tests.distributed import clean_environment
from tests.lightning_models import Denoiser, ImageData
from tests.wandb_reader import history, run_dirs

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]
ROOT = Path(__file__).resolve().parents[1]


class RankProbe(pl.Callback):
    """Writes what each rank sees at every validation epoch end, to compare ranks afterwards."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        path = Path(self.folder) / f"rank{trainer.global_rank}.jsonl"
        value = float(trainer.callback_metrics["val/pmse"])
        with path.open("a") as file:
            file.write(json.dumps({"epoch": trainer.current_epoch, "val/pmse": value}) + "\n")


def test_ddp_spawn_fit_is_exact_draws_once_and_gathers_both_ranks(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(project="pl-pmse-tests", save_dir=str(tmp_path), offline=True)
    callback = PerceptionMSECallback("pixel", data_range=1.0, worst_k=10, num_panel_samples=2)
    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=60))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=2, logger=logger, default_root_dir=tmp_path,
        callbacks=[callback, RankProbe(str(tmp_path))], enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=2,
    )  # fmt: skip
    model, data = Denoiser(), ImageData(val=9, batch_size=4)  # 9 samples: the sampler pads rank 1 with sample 0
    trainer.fit(model, data)
    wandb.finish()

    ranks = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]) == 2  # identical on both ranks, once per epoch
    (run,) = run_dirs(tmp_path)  # one W&B run
    rows = history(run)  # waits for W&B's service: rank 0 ended with os._exit, the service writes on disconnect
    logged = [row["val/pmse"] for row in rows if "val/pmse" in row]
    assert logged == pytest.approx([entry["val/pmse"] for entry in ranks[0]], rel=1e-6)

    # the last epoch, recomputed in this process from the same batches each rank saw
    model.eval()
    dataset = data.val_sets[0].tensors[0]
    reference = PerceptionMSE("pixel", data_range=1.0)
    with torch.no_grad():
        for indices in ([0, 2, 4, 6], [8], [1, 3, 5, 7], [0]):
            reference.update(*model._pair((dataset[indices],)))
    assert logged[-1] == pytest.approx(reference.compute().item(), rel=1e-6)

    worst = [row["val/pmse/panels/worst/captions"][0] for row in rows if "val/pmse/panels/worst/captions" in row]
    assert len(worst) == 2 and "(rank 1)" in worst[-1] and worst[-1].count("batch ") == 10  # k from every rank
    panels = list((run / "files" / "media" / "images").rglob("*.png"))
    assert len([p for p in panels if "/panels/" in str(p)]) == 8  # 4 panels x 2 epochs, drawn once (rank 0)


DDP_SCRIPT = """
import sys
from datetime import timedelta
sys.path.insert(0, {root!r})
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.strategies import DDPStrategy
from pl_pmse.callback import PerceptionMSECallback
from tests.lightning_models import AudioData, AudioEnhancer
from tests.test_callback_ddp import RankProbe

if __name__ == "__main__":
    pl.seed_everything(0)
    callback = PerceptionMSECallback("mrstft", sample_rate=8000, worst_k=2, num_panel_samples=1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_epochs=1, logger=CSVLogger({out!r}),
                         strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)),
                         callbacks=[callback, RankProbe({out!r})], enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(AudioEnhancer(), AudioData(val=5, batch_size=2))
"""


def test_ddp_script_fit_with_audio_panels(tmp_path) -> None:
    script = tmp_path / "fit.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path))))
    env = clean_environment()
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [(tmp_path / f"rank{r}.jsonl").read_text() for r in (0, 1)]
    assert ranks[0] == ranks[1] and '"epoch": 0' in ranks[0]  # both ranks ran and agree
    wavs = list(tmp_path.rglob("pmse_panels/**/*.wav"))
    assert len(wavs) == 2 * (1 + 2)  # target and prediction of 1 fixed and 2 worst, written once by rank 0
