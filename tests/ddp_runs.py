"""Multi-process runs for tests/test_callback_ddp.py: every rank writes what it logged, to compare with one process.

    python tests/ddp_runs.py OUT DEVICES [NUM_NODES]

Lightning's ``ddp`` strategy starts the other ranks by running this script again; under torchrun (several "nodes"
on this machine) every process runs it. Sizes 7 and 9 with batch sizes 2 and 4: the sampler pads the ranks.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pl_pmse.callback import PerceptionMSECallback  # noqa: E402
from tests.lightning_models import ImageData, Scaler, loggers, pl, strategies  # noqa: E402

# name: (loop, space, data options); each is checked against one process over the whole set
RUNS = {
    "validate-7-pixel": ("validate", "pixel", {"val": 7, "batch_size": 2}),
    "validate-9-pyramid": ("validate", "pyramid", {"val": 9, "batch_size": 4}),
    "fit-7-pixel": ("fit", "pixel", {"train": 6, "val": 7, "batch_size": 2}),
    "test-9-pixel": ("test", "pixel", {"val": 9, "batch_size": 2}),
    "validate-7-and-9-pixel": ("validate", "pixel", {"val": [7, 9], "batch_size": 4}),
}


class ProfileProbe(pl.Callback):
    """The error profile's synced result at each validation epoch end (a collective: every rank calls it)."""

    def __init__(self, callback: PerceptionMSECallback) -> None:
        self.callback, self.profile = callback, None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        profiles = self.callback._stages["validate"].profiles
        if profiles:
            self.profile = {key: value.tolist() for key, value in profiles[0].compute().items()}


def run(name: str, out: Path, devices: int, num_nodes: int) -> None:
    loop, space, data_options = RUNS[name]
    pl.seed_everything(0)
    callback = PerceptionMSECallback(space, data_range=1.0, worst_k=20, num_panel_samples=2)
    probe = ProfileProbe(callback)
    strategy = strategies.DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy=strategy, max_epochs=1,
        logger=loggers.CSVLogger(out / name), callbacks=[callback, probe], enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False,
    )  # fmt: skip
    model, data = Scaler(), ImageData(**data_options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        getattr(trainer, loop)(model, data)
    logged = {key: value.item() for key, value in trainer.callback_metrics.items() if "pmse" in key}
    record = {
        "logged": logged,
        "dtypes": sorted({str(value.dtype) for key, value in trainer.callback_metrics.items() if "pmse" in key}),
        "scale": model.scale.item(),
        "profile": probe.profile,
        "world": trainer.world_size,
        # the sync_dist advice for our keys, or ours about samplers (Lightning's own validate-on-one-device advice
        # stays: it is about the user's other metrics, and our CSV-logger note is rank zero's alone)
        "warnings": sorted({str(w.message)[:160] for w in caught if "sync_dist=True" in str(w.message)
                            or "have no DistributedSampler" in str(w.message)}),
    }  # fmt: skip
    (out / f"{name}.rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    num_nodes = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    names = sys.argv[4].split(",") if len(sys.argv) > 4 else list(RUNS)
    for name in names:
        run(name, out, devices, num_nodes)
    # The records are written: leave without the interpreter's teardown, where a gloo process group still alive at
    # exit can abort the process ("terminate called without an active exception", seen once in ~20 runs).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
