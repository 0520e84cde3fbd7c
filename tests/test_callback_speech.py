"""The callback with the speech and audio-aspects spaces: per-layer and per-aspect scalars, the mel-cepstral
distortion of the set, the worst clips by the feature distance and the aspects' panel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_lightning.loggers import CSVLogger

from pl_pmse import MelCepstralDistortion, PerceptionMSECallback, perception_mse
from pl_pmse.panels.audio import feature_views
from pl_pmse.panels.sets import PanelOptions, Sample
from tests.lightning_models import AudioData, AudioEnhancer, cpu_trainer


def _validation_pairs(model: AudioEnhancer, data: AudioData) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        pairs = [model._pair(batch) for batch in data.val_dataloader()]
    return torch.cat([p for p, _ in pairs]), torch.cat([t for _, t in pairs])


def test_audio_aspects_log_each_aspect_and_the_mcd_of_the_set_and_draw_the_views(tmp_path) -> None:
    callback = PerceptionMSECallback("audio-aspects", sample_rate=8000, num_panel_samples=1, worst_k=2)
    model, data = AudioEnhancer(), AudioData()
    trainer = cpu_trainer(tmp_path, [callback], logger=CSVLogger(tmp_path), max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(model, data)
    logged = trainer.callback_metrics
    assert {"val/pmse", "val/pmse_timbre", "val/pmse_pitch", "val/pmse_rhythm", "val/pmse_mcd"} <= set(logged)
    preds, target = _validation_pairs(model, data)
    expected = MelCepstralDistortion(**callback.space.cepstrum.options)
    expected.update(preds, target)
    torch.testing.assert_close(logged["val/pmse_mcd"].double(), expected.compute().double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(logged["val/pmse"].double(), perception_mse(preds, target, callback.space).double(),
                               rtol=1e-5, atol=0)  # fmt: skip
    views = sorted(Path(trainer.log_dir, "pmse_panels").rglob("worst_views/*.png"))
    assert len(views) == 1
    with Image.open(views[0]) as picture:
        assert picture.height > 400  # two samples, each with two pitch-class maps and an onset curve


def test_mcd_uses_the_default_cepstrum_for_other_audio_spaces_and_can_be_turned_off(tmp_path) -> None:
    on = PerceptionMSECallback("mel", sample_rate=8000, n_fft=256, panels=False)
    off = PerceptionMSECallback("mel", sample_rate=8000, n_fft=256, panels=False, mcd=False, prefix="val/off")
    model, data = AudioEnhancer(), AudioData()
    trainer = cpu_trainer(tmp_path, [on, off], logger=False, max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(model, data)
    expected = MelCepstralDistortion(sample_rate=8000)
    expected.update(*_validation_pairs(model, data))
    torch.testing.assert_close(trainer.callback_metrics["val/pmse_mcd"].double(), expected.compute().double(),
                               rtol=1e-6, atol=0)  # fmt: skip
    assert "val/off_mcd" not in trainer.callback_metrics and "val/off" in trainer.callback_metrics


def test_a_speech_space_logs_each_layer_and_keeps_the_clips_worst_by_the_feature_distance(tmp_path) -> None:
    callback = PerceptionMSECallback("hubert", sample_rate=8000, weights="random", layers=[1, 3], worst_k=2,
                                     num_panel_samples=0)  # fmt: skip
    model, data = AudioEnhancer(noise=0.2), AudioData()
    trainer = cpu_trainer(tmp_path, [callback], logger=CSVLogger(tmp_path), max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(model, data)
    assert {"val/pmse_layer1", "val/pmse_layer3", "val/pmse_waveform"} <= set(trainer.callback_metrics)
    preds, target = _validation_pairs(model, data)
    per_clip = perception_mse(preds, target, callback.space, reduction="none")
    worst = [int(i) for i in per_clip.argsort(descending=True)[:2]]
    kept = sorted(callback._stages["validate"].worst[0].heap, reverse=True)
    assert [f"batch {i // 3} item {i % 3}" for i in worst] == [s.label for s in kept]
    assert kept[0].value == pytest.approx(float(per_clip.max()), rel=1e-5)
    assert not kept[0].views  # a speech space has no views: no views panel
    assert not list(Path(trainer.log_dir, "pmse_panels").rglob("*views*"))


def test_the_views_panel_draws_maps_and_curves_over_the_clips_duration() -> None:
    views = {
        "pitch class": (torch.rand(12, 30), torch.rand(12, 30)),
        "onset strength": (torch.rand(29), torch.rand(29)),
    }
    sample = Sample(0.5, 0, "batch 0 item 0", {"pitch": 0.5}, torch.zeros(8000), torch.zeros(8000), None, views)
    (picture,) = feature_views(
        "val/pmse/panels/worst_views", [sample, sample], PanelOptions(sample_rate=8000), None
    ).artifacts
    assert picture.image.dtype == np.uint8 and picture.image.shape[2] == 3
    assert picture.caption == "batch 0 item 0: pmse 0.5 (pitch 0.5); batch 0 item 0: pmse 0.5 (pitch 0.5)"
    plain = Sample(0.5, 0, "b", {}, torch.zeros(8000), torch.zeros(8000))
    assert feature_views("k", [plain], PanelOptions(sample_rate=8000), None).artifacts == ()
