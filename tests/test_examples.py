"""Every example and config runs in a fast mode and produces what a newcomer is promised."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
import torch
import wandb

from tests.distributed import clean_environment
from tests.wandb_reader import history, run_dirs

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]
ROOT = Path(__file__).resolve().parents[1]
FAST = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.enable_progress_bar=false",
        "--trainer.num_sanity_val_steps=0"]  # fmt: skip


def offline_run(tmp_path: Path) -> tuple[Path, list[dict]]:
    wandb.finish()
    (run,) = run_dirs(tmp_path / "runs")
    return run, history(run)


def test_image_denoising_example(tmp_path, monkeypatch, capsys) -> None:
    from examples.image_denoising import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    main(["fit", "--config", str(ROOT / "configs/image_denoising.yaml"), *FAST, "--data.train_crops=32",
          "--data.val_crops=8", "--data.batch_size=4"])  # fmt: skip
    run, rows = offline_run(tmp_path)
    values = [row["val/pmse"] for row in rows if "val/pmse" in row]
    seen = f"{len(rows)} history rows with keys {sorted({key for row in rows for key in row})}"  # if this fails
    assert len(values) == 2 and all(v > 0 for v in values), seen
    assert {"val/pmse_band0", "val/pmse_lowpass", "val/pmse_pixel", "val/pmse_psnr", "val/pmse_ssim",
            "val/pmse_sharpness"} <= {k for row in rows for k in row}  # fmt: skip
    panels = [p for p in (run / "files/media/images").rglob("*.png") if "/panels/" in str(p)]
    assert len(panels) == 2 * 5
    printed = capsys.readouterr().out
    assert "epoch" in printed and "band0" in printed and "sharpness" in printed and "wandb sync" in printed
    assert list(Path(tmp_path, "runs/image_denoising").rglob("best-*.ckpt"))  # ModelCheckpoint on val/pmse


def test_image_example_trains_with_the_vgg19_real_esrgan_loss(tmp_path, monkeypatch) -> None:
    from examples.image_denoising import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    main(["fit", "--config", str(ROOT / "configs/image_denoising.yaml"), "--config",
          str(ROOT / "configs/image_vgg19_loss.yaml"), *FAST, "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1",
          "--data.train_crops=8", "--data.val_crops=4", "--data.batch_size=4"])  # fmt: skip
    _, rows = offline_run(tmp_path)
    assert any("train/perceptual" in row for row in rows)  # the VGG19 term was in the loss
    from pl_pmse.spaces.backbones import VGG19_LAYERS

    checkpoint = torch.load(next(Path(tmp_path, "runs/image_denoising").rglob("best-*.ckpt")), weights_only=False)
    options = checkpoint["hyper_parameters"]["perceptual_options"]
    assert options["component_weights"]["conv5_4"] == 1.0 and set(options["component_weights"]) - {"pixel"} <= set(
        VGG19_LAYERS
    )
    assert not any(key.startswith("perceptual") for key in checkpoint["state_dict"])  # the frozen VGG19 is no state


def test_audio_enhancement_example_with_a_wav_folder(tmp_path, monkeypatch) -> None:
    from examples.audio_enhancement import main, synthetic_clip

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    folder = tmp_path / "wavs"
    folder.mkdir()
    for index in range(2):  # the user's own recordings, at another sample rate
        clip = synthetic_clip(12000, 8000, torch.Generator().manual_seed(index))
        soundfile.write(folder / f"take{index}.wav", clip.numpy(), 8000)
    main(["fit", "--config", str(ROOT / "configs/audio_enhancement.yaml"), *FAST, f"--data.root={folder}",
          "--data.length=8000", "--data.train_clips=8", "--data.val_clips=4", "--data.batch_size=4"])  # fmt: skip
    run, rows = offline_run(tmp_path)
    seen = f"{len(rows)} history rows with keys {sorted({key for row in rows for key in row})}"  # if this fails
    assert len([row for row in rows if "val/pmse_mel" in row]) == 2, seen
    keys = {key for row in rows for key in row}
    assert {"val/aspects_timbre", "val/aspects_pitch", "val/aspects_rhythm", "val/aspects_mcd"} <= keys, seen
    assert {f"val/wav2vec2_layer{n}" for n in range(1, 9)} <= keys and "val/pmse_mcd" not in keys, seen
    media = run / "files/media"
    clips = {prefix: list((media / "audio/val" / prefix).rglob("*.wav")) for prefix in ("pmse", "aspects", "wav2vec2")}
    # epochs x (target, prediction) x (2 fixed + 2 worst); wav2vec2: the 2 worst only
    assert {prefix: len(found) for prefix, found in clips.items()} == {"pmse": 16, "aspects": 16, "wav2vec2": 8}
    data, rate = soundfile.read(clips["pmse"][0])
    assert rate == 16000 and data.shape == (8000,)
    assert len(list((media / "images/val/aspects/panels").glob("worst_views_*.png"))) == 2


def test_perception_loss_example(tmp_path, monkeypatch) -> None:
    from examples.perception_loss import main

    trainer = main(max_epochs=1, limit_train_batches=2, root=str(tmp_path))
    metrics = trainer.callback_metrics
    expected_psnr = 10 * torch.log10(1 / metrics["val/pmse_pixel"])
    assert metrics["val/psnr"].item() == pytest.approx(expected_psnr.item(), rel=1e-5)
    assert metrics["val/pmse_pyramid"] > metrics["val/pmse_pixel"]


def test_ddp_config_runs_two_processes_on_cpu(tmp_path) -> None:
    """configs/ddp.yaml with the image example: Lightning's ``ddp`` launcher starts the second process."""
    env = clean_environment()
    command = [sys.executable, str(ROOT / "examples/image_denoising.py"), "fit",
               "--config", str(ROOT / "configs/image_denoising.yaml"), "--config", str(ROOT / "configs/ddp.yaml"),
               *FAST, "--trainer.max_epochs=1", "--data.train_crops=32", "--data.val_crops=9",
               "--data.batch_size=4"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "distributed_backend=gloo" in done.stderr and "All distributed processes registered" in done.stderr
    (run,) = run_dirs(tmp_path / "runs")
    assert any("val/pmse" in row for row in history(run))


def test_the_audio_examples_clips_are_speech_like() -> None:
    """Voiced at a speaking pitch (80-300 Hz), in syllables (2-7 loudness peaks a second: 3-6 syllables, some
    paused), with formants (the spectral envelope peaks below 1 kHz and again between 1 and 3 kHz)."""
    from examples.audio_enhancement import synthetic_clip

    rate, seconds = 16000, 4
    for seed in range(3):
        clip = synthetic_clip(seconds * rate, rate, torch.Generator().manual_seed(seed)).double()
        frames = clip.reshape(-1, 400)  # 25 ms frames
        loudness = frames.square().mean(1)
        loud = frames[loudness > 0.1 * loudness.max()]
        lags = torch.stack([(loud[:, :-lag] * loud[:, lag:]).sum(1) for lag in range(40, 201)], 1)  # 80-400 Hz
        pitch = rate / (40 + lags.median(0).values.argmax().item())
        assert 80 <= pitch <= 300, pitch
        level = 10 * torch.log10(loudness + 1e-12)
        peaks = (level[1:-1] > level[:-2]) & (level[1:-1] >= level[2:]) & (level[1:-1] > level.max() - 30)
        centres = peaks.nonzero().flatten().tolist()
        syllables = [c for i, c in enumerate(centres) if i == 0 or c - centres[i - 1] >= 4]  # 100 ms apart
        assert 2 * seconds <= len(syllables) <= 7 * seconds, len(syllables)
        power = torch.fft.rfft(loud * torch.hann_window(400, dtype=torch.float64)).abs().square().mean(0)
        hertz = torch.fft.rfftfreq(400, 1 / rate)
        low, high = power[(hertz > 200) & (hertz < 1000)].max(), power[(hertz > 1000) & (hertz < 3000)].max()
        assert high > 1e-3 * low and power[hertz > 5000].max() < high  # formants above the first, falling after
