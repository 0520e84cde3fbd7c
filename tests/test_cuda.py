"""On a GPU: every space on CUDA against its CPU values, mixed-precision Trainers, DDP over NCCL (two GPUs).

Skipped without CUDA. ``make gpu-check`` runs this file and the quick CUDA benchmarks. ``PL_PMSE_GPU_CHECK=cpu``
runs it on the CPU with the accelerator path forced (integer words, whole-batch kernels), to try the checks
themselves on a machine without a GPU.
"""

from __future__ import annotations

import datetime
import os
import warnings

import pytest
import torch

from pl_pmse import PerceptionMSE, PerceptionMSECallback, exact, perception_mse, reduction
from pl_pmse.spaces import get_space

from .distributed import free_port
from .lightning_models import Denoiser, ImageData, pl

DRY_RUN = os.environ.get("PL_PMSE_GPU_CHECK") == "cpu"
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or DRY_RUN), reason="needs a CUDA device")
DEVICE = torch.device("cpu" if DRY_RUN else "cuda")

RANDOM = {"weights": "random"}
SPACES = [  # (space, options, data_range, audio)
    ("pixel", {}, None, False),
    ("pyramid", {}, None, False),
    ("aspects", {}, None, False),
    ("vgg16", RANDOM, None, False),
    ("vgg19", RANDOM, None, False),
    ("alexnet", RANDOM, None, False),
    ("squeezenet", RANDOM, None, False),
    ("lpips-alex", RANDOM, 1.0, False),
    ("lpips-vgg", RANDOM, 1.0, False),
    ("lpips-squeeze", RANDOM, 1.0, False),
    ("waveform", {}, None, True),
    ("mel", {"sample_rate": 16000}, None, True),
    ("mrstft", {}, None, True),
    ("audio-aspects", {"sample_rate": 16000}, None, True),
    ("hubert", {"sample_rate": 16000, "layers": [1, 2], **RANDOM}, None, True),
]
# on CUDA, exact-feature spaces sum in integers (1e-11 of the float64 sum) and cuDNN / cuFFT / cuBLAS round otherwise
TOLERANCE = {"pixel": 1e-6, "pyramid": 1e-6, "aspects": 1e-6, "waveform": 1e-6}


@pytest.fixture(autouse=True)
def _accelerator_path(monkeypatch):
    if DRY_RUN:
        monkeypatch.setattr(reduction, "works_in_cache_blocks", lambda device: False)
        monkeypatch.setattr(exact, "on_host", lambda device, count: False)
        monkeypatch.setattr("pl_pmse.metric.on_host", lambda device, count: False)


def _inputs(audio: bool, n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if audio:
        return torch.rand(n, 8000, generator=generator) * 2 - 1, torch.rand(n, 8000, generator=generator) * 2 - 1
    return torch.rand(n, 3, 64, 64, generator=generator), torch.rand(n, 3, 64, 64, generator=generator)


def _summaries(name: str, options: dict, data_range, preds, target, device, split) -> tuple[dict, torch.Tensor]:
    torch.manual_seed(0)
    metric = PerceptionMSE(name, data_range=data_range, **options).to(device)
    for p, t in zip(preds.split(split), target.split(split), strict=True):
        metric.update(p.to(device), t.to(device))
    loss = perception_mse(preds.to(device), target.to(device), metric.space, data_range=data_range)
    return {key: value.cpu() for key, value in metric.compute_summary().items()}, loss.cpu()


@pytest.mark.parametrize(("name", "options", "data_range", "audio"), SPACES, ids=[s[0] for s in SPACES])
def test_every_space_on_cuda_gives_its_cpu_values(name, options, data_range, audio) -> None:
    preds, target = _inputs(audio)
    with pytest.MonkeyPatch.context() as cpu_path:  # the CPU's own path, the reference
        cpu_path.setattr(reduction, "works_in_cache_blocks", lambda device: device.type == "cpu")
        cpu_path.setattr(exact, "on_host", lambda device, count: device.type == "cpu" and count <= 64)
        cpu_path.setattr("pl_pmse.metric.on_host", lambda device, count: device.type == "cpu" and count <= 64)
        reference, reference_loss = _summaries(name, options, data_range, preds, target, torch.device("cpu"), 6)
    tolerance = TOLERANCE.get(name, 1e-4)
    whole, loss = _summaries(name, options, data_range, preds, target, DEVICE, 6)
    for key, value in reference.items():
        torch.testing.assert_close(whole[key], value, rtol=tolerance, atol=1e-12, msg=f"{name} {key}")
    torch.testing.assert_close(loss, reference_loss, rtol=tolerance, atol=1e-12)
    split, _ = _summaries(name, options, data_range, preds, target, DEVICE, [1, 2, 3])
    for key, value in whole.items():  # another batch split on the device
        if name in TOLERANCE:  # exact-feature spaces: the same bits for any split
            assert torch.equal(split[key], value), (name, key, split[key], value)
        else:
            torch.testing.assert_close(split[key], value, rtol=tolerance, atol=1e-12)


def test_ssim_and_sharpness_on_cuda_give_their_cpu_values_and_the_same_bits_for_any_split() -> None:
    from pl_pmse import ImageFidelity

    preds, target = _inputs(False)

    def measured(device: torch.device, split) -> dict[str, torch.Tensor]:
        fidelity = ImageFidelity().set_dtype(torch.float64).to(device)
        for p, t in zip(preds.split(split), target.split(split), strict=True):
            fidelity.update(p.to(device), t.to(device))
        return {key: value.cpu() for key, value in fidelity.compute().items()}

    reference, whole = measured(torch.device("cpu"), 6), measured(DEVICE, 6)
    for key, value in reference.items():
        torch.testing.assert_close(whole[key], value, rtol=1e-5, atol=1e-12, msg=key)
    assert measured(DEVICE, [1, 2, 3]) == whole  # elementwise windows, fixed FFT chunks: one value per image


@pytest.mark.parametrize("name", ["pixel", "pyramid", "squeezenet", "mel"])
def test_the_loss_backpropagates_and_compiles_on_cuda(name: str) -> None:
    options = {"sample_rate": 16000} if name == "mel" else RANDOM if name == "squeezenet" else {}
    preds, target = _inputs(name == "mel", n=4)
    space = get_space(name, **options).to(DEVICE)
    preds = preds.to(DEVICE).requires_grad_()
    target = target.to(DEVICE)
    loss = perception_mse(preds, target, space, validate_args=False)
    loss.backward()
    assert preds.grad is not None and torch.isfinite(preds.grad).all()
    if name == "pixel":  # the plain formula's gradient
        expected = 2 * (preds.detach() - target) / preds[0].numel() / preds.shape[0]
        torch.testing.assert_close(preds.grad, expected, rtol=1e-5, atol=1e-9)
    if DRY_RUN:
        return  # compiling for the CPU proves nothing about CUDA and takes long
    compiled = torch.compile(lambda p, t: perception_mse(p, t, space, validate_args=False), fullgraph=True)
    torch.testing.assert_close(compiled(preds.detach(), target), loss.detach(), rtol=1e-5, atol=0)


class _Recording(Denoiser):
    """Keeps the validation predictions the callback receives."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        out = super().validation_step(batch, batch_idx, dataloader_idx)
        self.pairs.append((out["preds"].detach().float().cpu(), out["target"].detach().float().cpu()))
        return out


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_a_mixed_precision_trainer_logs_the_float32_value_of_its_predictions(tmp_path, precision: str) -> None:
    """Under Lightning's autocast the callback measures the predictions in float32: the value a metric outside
    autocast gives on the same (half-precision) predictions."""
    if DRY_RUN and precision == "16-mixed":
        pytest.skip("16-mixed needs CUDA")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    torch.manual_seed(0)
    model = _Recording()
    model.pairs = []
    trainer = pl.Trainer(
        accelerator="cpu" if DRY_RUN else "gpu", devices=1, precision=precision, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[PerceptionMSECallback(space="pyramid", panels=False)],
    )  # fmt: skip
    trainer.validate(model, datamodule=ImageData(val=10), verbose=False)
    reference = PerceptionMSE("pyramid")
    for preds, target in model.pairs:
        reference.update(preds, target)
    assert float(trainer.callback_metrics["val/pmse"]) == pytest.approx(float(reference.compute()), rel=1e-6)


def _nccl_rank(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    preds, target = _inputs(False, n=7)
    metric = PerceptionMSE("pyramid").to(f"cuda:{rank}")
    mine = slice(rank, 7, world)  # a DistributedSampler's interleaving, no padding
    metric.update(preds[mine].cuda(rank), target[mine].cuda(rank))
    results.put((rank, metric.compute().item()))
    dist.destroy_process_group()


@pytest.mark.skipif(DRY_RUN or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_over_nccl_gives_the_one_process_value() -> None:
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    processes = [ctx.Process(target=_nccl_rank, args=(rank, 2, port, results)) for rank in range(2)]
    for process in processes:
        process.start()
    values = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=30)
    preds, target = _inputs(False, n=7)
    single = PerceptionMSE("pyramid").to("cuda")
    single.update(preds.cuda(), target.cuda())
    assert values[0] == values[1] == single.compute().item()
