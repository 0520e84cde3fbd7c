"""The callback in real 2-process DDP fits on CPU (gloo): ``ddp_spawn`` in-process, ``ddp`` as a script."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import wandb
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.strategies import DDPStrategy
from torchmetrics.image import StructuralSimilarityIndexMeasure

from pl_pmse import PerceptionMSE
from pl_pmse.callback import PerceptionMSECallback
from tests.distributed import clean_environment
from tests.lightning_models import Denoiser, ImageData
from tests.wandb_reader import history, media_paths, run_dirs

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


def test_ddp_spawn_fit_is_exact_draws_once_and_gathers_both_ranks(tmp_path, monkeypatch, capfd) -> None:
    # WANDB_DIR and save_dir apart: the child's media must follow the run's record under save_dir
    (tmp_path / "environment").mkdir()
    (tmp_path / "saved").mkdir()  # W&B 0.17-0.18 put a run whose save_dir is missing in the system temp folder
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "environment"))
    logger = WandbLogger(project="pl-pmse-tests", save_dir=str(tmp_path / "saved"), offline=True)
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
    assert "WANDB_DIR" not in capfd.readouterr().err  # the child's media follow the run's record

    ranks = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]) == 2  # identical on both ranks, once per epoch
    (run,) = run_dirs(tmp_path / "saved")  # one W&B run
    rows = history(run)  # waits for W&B's service: rank 0 ended with os._exit, the service writes on disconnect
    logged = [row["val/pmse"] for row in rows if "val/pmse" in row]
    assert logged == pytest.approx([entry["val/pmse"] for entry in ranks[0]], rel=1e-6)

    # the last epoch, recomputed in this process from the same batches each rank saw, less rank 1's padding repeat
    model.eval()
    dataset = data.val_sets[0].tensors[0]
    reference, ssim = PerceptionMSE("pixel", data_range=1.0), StructuralSimilarityIndexMeasure(data_range=1.0)
    with torch.no_grad():
        for indices in ([0, 2, 4, 6], [8], [1, 3, 5, 7]):
            pair = model._pair((dataset[indices],))
            reference.update(*pair)
            ssim.update(*pair)
    assert logged[-1] == pytest.approx(reference.compute().item(), rel=1e-6)
    logged_ssim = [row["val/pmse_ssim"] for row in rows if "val/pmse_ssim" in row]
    assert len(logged_ssim) == 2 and logged_ssim[-1] == pytest.approx(ssim.compute().item(), abs=1e-6)

    worst = [row["val/pmse/panels/worst/captions"][0] for row in rows if "val/pmse/panels/worst/captions" in row]
    # k=10 from every rank, but only the 9 samples of the set: the repeat that pads rank 1 is not a candidate
    assert len(worst) == 2 and "(rank 1)" in worst[-1] and worst[-1].count("batch ") == 9
    compared = [
        row["val/pmse/panels/comparison/captions"][0] for row in rows if "val/pmse/panels/comparison/captions" in row
    ]
    assert len(compared) == 2 and all(c.startswith("9 samples;") for c in compared)  # both ranks' rows, no repeat
    panels = list(tmp_path.rglob("files/media/images/**/*.png"))
    assert len([p for p in panels if "/panels/" in str(p)]) == 10  # 5 panels x 2 epochs, drawn once (rank 0)
    # every file the history refers to is beside the record, where `wandb sync` reads it (before: under WANDB_DIR)
    referenced = media_paths(rows)
    assert len(referenced) >= 10 and all((run / "files" / path).is_file() for path in referenced)
    assert not list((tmp_path / "environment").rglob("*.png"))


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


# ---- every sample once: padded validation sets on 2 and 3 processes and on 2 "nodes" -------------------------


def expected_runs(folder: Path, world: int) -> dict[str, dict]:
    """Each run's records (one per rank, all equal) next to the one-process values over the whole set."""
    from pl_pmse import ErrorProfile
    from pl_pmse.fidelity import ImageFidelity
    from tests.ddp_runs import RUNS
    from tests.lightning_models import Scaler

    runs = {}
    for name, (loop, space, options) in RUNS.items():
        if not (folder / f"{name}.rank0.json").exists():
            continue
        records = [json.loads((folder / f"{name}.rank{rank}.json").read_text()) for rank in range(world)]
        model = Scaler()
        with torch.no_grad():
            model.scale.fill_(records[0]["scale"])
        prefix = "test/pmse" if loop == "test" else "val/pmse"
        sets = ImageData(**options).val_sets
        expected, profile = {}, None
        for index, dataset in enumerate(sets):
            target = dataset.tensors[0]
            with torch.no_grad():
                preds = model(target)
            metric = PerceptionMSE(space, data_range=1.0).set_dtype(torch.float64)  # as the callback logs
            metric.update(preds, target)
            for key, value in metric.compute_summary().items():
                if key == "skipped":
                    continue
                suffix = f"/dataloader_idx_{index}" if len(sets) > 1 else ""
                expected[(prefix if key == "total" else f"{prefix}_{key}") + suffix] = value.item()
            fidelity = ImageFidelity(1.0).set_dtype(torch.float64)  # SSIM and sharpness: bit for bit too
            fidelity.update(preds, target)
            for key, value in fidelity.compute().items():
                expected[f"{prefix}_{key}{suffix}"] = value.item()
            if index == 0 and loop != "test":
                profile = ErrorProfile("image", data_range=1.0)
                profile.update(preds, target)
                profile = {key: value.tolist() for key, value in profile.compute().items()}
        runs[name] = {"records": records, "expected": expected, "profile": profile, "sizes": [len(d) for d in sets]}
    return runs


def check_runs(folder: Path, world: int, names: set[str]) -> None:
    runs = expected_runs(folder, world)
    assert set(runs) == names
    for name, run in runs.items():
        first = run["records"][0]
        for record in run["records"]:  # identical on every rank
            assert record == first, (name, {key for key in first if record[key] != first[key]})
        assert first["logged"] == run["expected"], name  # the one-process value, bit for bit
        assert first["dtypes"] == ["torch.float64"] and first["warnings"] == [], (name, first["warnings"])
        if run["profile"] is not None:
            assert first["profile"] == run["profile"], name  # the error profile: the set itself, exactly
        if not name.startswith("test"):
            captions = sorted((folder / name).rglob("panels/worst/step=*.txt"))  # one per dataloader, in order
            counts = [caption.read_text().count("batch ") for caption in captions]
            assert counts == run["sizes"], name  # worst_k=20: every sample of each set, once


def launch(command: list[str], cwd: Path, timeout: int = 240) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=clean_environment())  # fmt: skip


@pytest.mark.parametrize("world", [2, 3])
def test_padded_sets_count_each_sample_once_on_every_rank(tmp_path, world: int) -> None:
    """Sizes 7 and 9, batch sizes 2 and 4, validate / fit / test / two dataloaders, Lightning's ``ddp``."""
    process = launch([sys.executable, str(ROOT / "tests" / "ddp_runs.py"), str(tmp_path), str(world)], tmp_path)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    from tests.ddp_runs import RUNS

    check_runs(tmp_path, world, set(RUNS))


def test_two_nodes_of_two_processes_launched_as_on_a_cluster(tmp_path) -> None:
    """torchrun --nnodes 2 twice over localhost, Lightning num_nodes=2: val/pmse equals the one-process value."""
    from tests.distributed import free_port

    names, failures = "validate-7-pixel,fit-7-pixel", []
    for attempt in range(2):  # a second try on a fresh port: free_port() can race with another process for it
        port, folder = free_port(), tmp_path / f"attempt{attempt}"
        folder.mkdir()
        nodes = [
            launch([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                    "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                    str(ROOT / "tests" / "ddp_runs.py"), str(folder), "2", "2", names], folder)
            for node in (0, 1)
        ]  # fmt: skip
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
        if [node.returncode for node in nodes] == [0, 0]:
            break
        failures.append("\n".join(output[-3000:] for output in outputs))
        print(f"2-node attempt {attempt} failed:\n{failures[-1]}")
    assert len(failures) < 2, "\n\n".join(failures)
    check_runs(folder, 4, set(names.split(",")))


# ---- one configuration everywhere, and never a hang -----------------------------------------------------------

FAULT_SCRIPT = """
import os, sys, time
from datetime import timedelta
sys.path.insert(0, {root!r})
from pl_pmse.callback import PerceptionMSECallback
from tests.lightning_models import ImageData, Scaler, loggers, pl, strategies

CASE = {case!r}
RANK1 = os.environ.get("LOCAL_RANK", "0") == "1"  # Lightning's ddp sets it for the ranks it starts


class Faulty(Scaler):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        if RANK1 and batch_idx == 1 and CASE == "rank 1 raises":
            raise RuntimeError("rank 1 failed in validation_step")
        if RANK1 and batch_idx == 1 and CASE == "rank 1 is killed":
            os._exit(9)
        return super().validation_step(batch, batch_idx, dataloader_idx)


if __name__ == "__main__":
    options = {{"panels": not RANK1}} if CASE == "panels on rank 0 only" else {{}}
    if CASE == "panels_every_n_epochs 2 on rank 1":
        options = {{"panels_every_n_epochs": 2 if RANK1 else 1}}
    if CASE == "pyramid levels":
        options = {{"levels": 2 if RANK1 else 3}}
    callback = PerceptionMSECallback("pyramid" if CASE == "pyramid levels" else "pixel", **options)
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_epochs=2, logger=False, callbacks=[callback],
                         strategy=strategies.DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=600)),
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         enable_checkpointing=False)
    trainer.fit(Faulty(), ImageData(train=4, val=9, batch_size=2))
"""

FAULTS = {  # case: what the output must say (the collective timeout is 600 s: ending within 60 s is not a timeout)
    "panels on rank 0 only": "panels is True (rank 0), False (rank 1)",
    "panels_every_n_epochs 2 on rank 1": "panels_every_n_epochs is 1 (rank 0), 2 (rank 1)",
    "pyramid levels": "levels is 3 (rank 0), 2 (rank 1)",
    "rank 1 raises": "rank 1 failed in validation_step",
    "rank 1 is killed": "",
}


@pytest.mark.parametrize("case", list(FAULTS))
def test_mismatches_and_failing_ranks_end_every_rank_fast(tmp_path, case: str) -> None:
    script = tmp_path / "fault.py"
    script.write_text(textwrap.dedent(FAULT_SCRIPT.format(root=str(ROOT), case=case)))
    start = time.monotonic()
    process = launch([sys.executable, str(script)], tmp_path)
    output, _ = process.communicate(timeout=300)
    elapsed = time.monotonic() - start
    assert process.returncode != 0 and elapsed < 60, (elapsed, output[-3000:])
    assert FAULTS[case] in output, output[-3000:]
    print(f"{case}: every rank ended in {elapsed:.1f} s")


# ---- the torchmetrics idiom: a metric the LightningModule holds, updates and logs itself --------------------------


class HeldMetricDenoiser(Denoiser):
    """``self.val_pmse.update(...)`` in ``validation_step`` and ``self.log("val/held", self.val_pmse)``; writes, per
    rank, the logged value and the warnings the updates gave."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder
        self.val_pmse = PerceptionMSE("pixel", data_range=1.0)
        self.messages: list[str] = []

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        preds, target = self._pair(batch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.val_pmse.update(preds, target)
        self.messages += [str(w.message) for w in caught]
        self.log("val/held", self.val_pmse)

    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:
            record = {"value": float(self.trainer.callback_metrics["val/held"]), "messages": self.messages}
            (Path(self.folder) / f"held{self.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.parametrize("exact", [True, False], ids=["with ExactEvaluation", "without"])
def test_a_metric_the_module_holds_counts_each_sample_once_with_exact_evaluation(tmp_path, exact) -> None:
    """Before: the logged value counted the sampler's padding repeat (here sample 0 a second time, on rank 1) with no
    word; now ExactEvaluation leaves it out (the one-process value), and without it every rank warns."""
    from pl_pmse import ExactEvaluation

    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=60))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, logger=False, default_root_dir=tmp_path,
        callbacks=[ExactEvaluation()] if exact else [], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0,
    )  # fmt: skip
    model, data = HeldMetricDenoiser(str(tmp_path)), ImageData(val=9, batch_size=4)
    trainer.fit(model, data)
    records = [json.loads((tmp_path / f"held{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0]["value"] == records[1]["value"]

    model.eval()
    dataset = data.val_sets[0].tensors[0]
    reference = PerceptionMSE("pixel", data_range=1.0)
    batches = [[0, 2, 4, 6], [8], [1, 3, 5, 7]] + ([] if exact else [[0]])  # rank 1's last batch: the repeat
    with torch.no_grad():
        for indices in batches:
            reference.update(*model._pair((dataset[indices],)))
    assert records[0]["value"] == pytest.approx(reference.compute().item(), rel=1e-6)
    warned = [any("counts every sample each rank receives" in m for m in r["messages"]) for r in records]
    assert warned == [not exact, not exact]
