"""The self-supervised speech spaces (wav2vec2, hubert, wavlm) against torchaudio's own models and features."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchaudio

from pl_pmse import PerceptionMSE, perception_mse, perception_mse_components
from pl_pmse.spaces import get_space, load_speech_model, speech_weights_path

TORCHAUDIO_BUILDERS = {"wav2vec2": torchaudio.models.wav2vec2_base, "hubert": torchaudio.models.hubert_base,
                       "wavlm": torchaudio.models.wavlm_base}  # fmt: skip


def _clips(n: int = 3, length: int = 3200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    time = torch.arange(length) / 16000
    pitch = 100 + 150 * torch.rand(n, 1, generator=generator)
    target = 0.3 * torch.sin(2 * torch.pi * pitch * time) + 0.05 * torch.randn(n, length, generator=generator)
    return (target + 0.05 * torch.randn(n, length, generator=generator)).clamp(-1, 1), target.clamp(-1, 1)


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory) -> dict[str, object]:
    """Random weights of each base model, saved to a file by the test (no download anywhere)."""
    folder = tmp_path_factory.mktemp("speech_weights")
    files = {}
    for family in TORCHAUDIO_BUILDERS:
        path = folder / f"{family}.pt"
        torch.save(load_speech_model(family, weights="random").state_dict(), path)
        files[family] = path
    return files


def _reference_model(family: str, path) -> torch.nn.Module:
    model = TORCHAUDIO_BUILDERS[family]()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


@pytest.mark.parametrize("family", list(TORCHAUDIO_BUILDERS))
def test_each_layer_is_the_mse_of_torchaudios_own_features(family, weights_files) -> None:
    space = get_space(family, sample_rate=16000, weights=weights_files[family], layers=[1, 4, 12])
    preds, target = _clips()
    components = perception_mse_components(preds, target, space=space)
    reference = _reference_model(family, weights_files[family])
    with torch.no_grad():
        ours_p, _ = reference.extract_features(preds)
        ours_t, _ = reference.extract_features(target)
    assert space.component_names == ("waveform", "layer1", "layer4", "layer12")
    for number in (1, 4, 12):
        expected = ((ours_p[number - 1] - ours_t[number - 1]) ** 2).mean()
        torch.testing.assert_close(components[f"layer{number}"], expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(components["waveform"], ((preds - target) ** 2).mean(), rtol=1e-6, atol=0)
    total = perception_mse(preds, target, space=space)  # waveform at weight 0: the layers' sum
    torch.testing.assert_close(total, sum(components[f"layer{n}"] for n in (1, 4, 12)), rtol=1e-6, atol=0)


def test_other_sample_rates_are_resampled_by_torchaudio_to_16_khz(weights_files) -> None:
    space = get_space("hubert", sample_rate=8000, weights=weights_files["hubert"], layers=[2])
    preds, target = (x[:, ::2].contiguous() for x in _clips(length=3200))
    reference = _reference_model("hubert", weights_files["hubert"])
    with torch.no_grad():
        up = [torchaudio.functional.resample(x, 8000, 16000) for x in (preds, target)]
        expected = ((reference.extract_features(up[0])[0][1] - reference.extract_features(up[1])[0][1]) ** 2).mean()
    torch.testing.assert_close(perception_mse_components(preds, target, space=space)["layer2"], expected,
                               rtol=1e-5, atol=0)  # fmt: skip
    assert space.min_length == 200  # the 400-sample receptive field at 16 kHz
    assert not space.state_dict()  # the resampling kernel is a constant of the options
    for length in (999, 1234, 4000):  # torchaudio's Resample, its output length in Python integers
        clips = torch.randn(2, length)
        assert torch.equal(space._resampled(clips), space.resampler(clips))


def test_default_layers_are_the_first_two_thirds_and_the_forward_stops_after_the_deepest() -> None:
    space = get_space("wav2vec2", sample_rate=16000, weights="random")
    assert space.component_names == ("waveform", *(f"layer{n}" for n in range(1, 9)))
    assert space.component_weights["waveform"] == 0.0
    calls = []
    hook = space.network.encoder.transformer.layers[8].register_forward_hook(lambda *args: calls.append(1))
    space.features(torch.zeros(1, 400))
    hook.remove()
    assert calls == []  # layer 9 never ran
    assert get_space("hubert", sample_rate=16000, weights="random", layers=["layer3", 1]).layer_numbers == [1, 3]


def test_random_weights_are_seeded_and_leave_the_global_random_state_alone() -> None:
    state = torch.get_rng_state()
    first, second = (load_speech_model("hubert", weights="random") for _ in range(2))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                  strict=True))  # fmt: skip


def test_the_network_is_frozen_and_outside_the_module_tree_and_the_loss_has_a_graph_for_preds_only() -> None:
    space = get_space("hubert", sample_rate=16000, weights="random", layers=[1, 2])
    holder = torch.nn.Module()
    holder.space = space
    assert not list(holder.parameters()) and not holder.state_dict()
    assert not any(p.requires_grad for p in space.network.parameters()) and not space.network.training
    holder.train()
    assert not space.network.training
    preds, target = _clips(n=2)
    preds.requires_grad_(True)
    loss = perception_mse(preds, target, space=space)
    loss.backward()
    assert preds.grad is not None and preds.grad.abs().sum() > 0
    assert all(p.grad is None for p in space.network.parameters())
    metric = PerceptionMSE(space)
    metric.update(preds.detach(), target)
    torch.testing.assert_close(metric.compute(), loss.detach(), rtol=1e-5, atol=0)


def test_a_speech_space_pickles_for_ddp_spawn_and_measures_the_same_after() -> None:
    import pickle

    from pl_pmse import PerceptionMSECallback

    space = get_space("hubert", sample_rate=8000, weights="random", layers=[1])
    preds, target = (x[:, ::2].contiguous() for x in _clips(n=2))
    copy = pickle.loads(pickle.dumps(space))
    assert torch.equal(perception_mse(preds, target, space=copy), perception_mse(preds, target, space=space))
    callback = pickle.loads(pickle.dumps(PerceptionMSECallback(space, sample_rate=8000)))
    assert torch.equal(perception_mse(preds, target, space=callback.space), perception_mse(preds, target, space=space))


def test_each_channel_is_measured_as_a_clip_of_its_own() -> None:
    space = get_space("hubert", sample_rate=16000, weights="random", layers=[1])
    (p0, p1), (t0, t1) = (x.split(1) for x in _clips(n=2))
    stereo = perception_mse(torch.stack([p0, p1], 1), torch.stack([t0, t1], 1), space=space)  # [1, 2, T]
    per_channel = [perception_mse(p, t, space=space) for p, t in ((p0, t0), (p1, t1))]
    torch.testing.assert_close(stereo, sum(per_channel) / 2, rtol=1e-5, atol=0)


def test_models_that_normalise_the_waveform_do_it_per_clip(weights_files) -> None:
    assert (
        torchaudio.pipelines.HUBERT_LARGE._normalize_waveform
        and not torchaudio.pipelines.HUBERT_BASE._normalize_waveform
    )
    space = get_space("hubert", sample_rate=16000, weights=weights_files["hubert"], layers=[1])
    assert space.normalize_waveform is False
    space.normalize_waveform = True  # as for the large models, on the base one's weights
    from torchaudio.pipelines._wav2vec2.utils import _extend_model

    wrapped = _extend_model(_reference_model("hubert", weights_files["hubert"]), normalize_waveform=True)
    loud, quiet = _clips(n=2)[1].split(1)
    quiet = quiet * 0.01
    with torch.no_grad():
        alone = [wrapped.extract_features(clip)[0][0] for clip in (loud, quiet)]  # torchaudio's, one clip at a time
        batched = space.features(torch.cat([loud, quiet]))["layer1"]
        together = wrapped.extract_features(torch.cat([loud, quiet]))[0][0]
    torch.testing.assert_close(batched, torch.cat(alone), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together[1], alone[1][0], atol=1e-2)  # torchaudio's wrapper mixes the batch's clips


def test_pretrained_weights_load_from_torchs_hub_cache(monkeypatch, tmp_path, weights_files) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    path = speech_weights_path("hubert")
    assert path == tmp_path / "checkpoints" / "hubert_fairseq_base_ls960.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(weights_files["hubert"].read_bytes())
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    space = get_space("hubert", sample_rate=16000, layers=[1])  # weights="pretrained" is the default
    clip = _clips(n=1)[1]
    with torch.no_grad():
        expected = _reference_model("hubert", weights_files["hubert"]).extract_features(clip, num_layers=1)[0][0]
    assert torch.equal(space.features(clip)["layer1"], expected)
    path.write_bytes(b"not a checkpoint")  # a corrupt cached file: said so, not "not in the cache"
    with pytest.raises(RuntimeError, match=r"the hubert base weights are in torch's hub cache \(.*\) but could not be "
                                           r"read \(.*\); delete that file to download it again"):  # fmt: skip
        get_space("hubert", sample_rate=16000, layers=[1])


def _no_download(url, *args, **kwargs):
    raise urllib.error.URLError(f"offline (test): {url}")


def test_pretrained_weights_offline_raise_naming_the_cache_file(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    with pytest.raises(RuntimeError, match=r"weights='pretrained': the wavlm base weights are not in torch's hub "
                                           r"cache \(.*wavlm_base.pth\) and could not be downloaded"):  # fmt: skip
        get_space("wavlm", sample_rate=16000)


BAD_OPTIONS = [
    ({}, ValueError, r"sample_rate: space 'hubert' needs the audio's sample rate in Hz \(e.g. 16000\), got None"),
    ({"sample_rate": 0}, ValueError, r"sample_rate: .* got 0"),
    ({"sample_rate": -16000}, ValueError, r"sample_rate: .* got -16000"),
    ({"sample_rate": 16000.0}, ValueError, r"sample_rate: .* got 16000.0"),
    ({"sample_rate": 16000, "size": "huge"}, ValueError, r"size: expected one of 'base', 'large', 'xlarge'"),
    ({"sample_rate": 16000, "layers": [0]}, ValueError, r"layers: expected layer numbers 1..12"),
    ({"sample_rate": 16000, "layers": [13]}, ValueError, r"layers: expected layer numbers 1..12"),
    ({"sample_rate": 16000, "layers": ["conv1"]}, ValueError, r"layers: .* got 'conv1'"),
    ({"sample_rate": 16000, "layers": [2, "layer2"]}, ValueError, r"layers: expected distinct layers"),
    ({"sample_rate": 16000, "layers": 3}, ValueError, r"layers: expected a non-empty list"),
    ({"sample_rate": 16000, "weights": "imagenet"}, ValueError, r"weights: expected 'pretrained', 'random' or a path"),
    ({"sample_rate": 16000, "normalize_layers": 1}, TypeError, r"normalize_layers: expected True or False"),
]


@pytest.mark.parametrize(("options", "error", "message"), BAD_OPTIONS)
def test_bad_options_name_the_option(options, error, message) -> None:
    with pytest.raises(error, match=message):
        get_space("hubert", **options)


def test_a_state_dict_of_another_model_is_refused(tmp_path, weights_files) -> None:
    expected = r"weights: .*wavlm.pt is not a state_dict of torchaudio's hubert base model: missing \['encoder"
    with pytest.raises(ValueError, match=expected):
        get_space("hubert", sample_rate=16000, weights=weights_files["wavlm"])
    large = tmp_path / "not_a_model.pt"
    torch.save({"features.0.weight": torch.zeros(3)}, large)
    with pytest.raises(
        ValueError, match=r"weights: .* missing \['encoder.feature_projection.*unexpected \['features.0.weight'\]"
    ):
        get_space("wav2vec2", sample_rate=16000, weights=large)
    torch.save([1, 2], large)
    with pytest.raises(ValueError, match=r"weights: .* holds a list"):
        get_space("wav2vec2", sample_rate=16000, weights=large)


def test_bad_inputs_name_what_was_expected_and_leave_the_state_alone() -> None:
    metric = PerceptionMSE("hubert", sample_rate=16000, weights="random", layers=[1])
    preds, target = _clips(n=2, length=800)
    metric.update(preds, target)
    before = metric.compute()
    for bad, message in (
        ((torch.zeros(2, 399), torch.zeros(2, 399)), r"space 'hubert' needs signals \(the model's receptive field at "
                                                     r"16000 Hz\) of at least 400, got 399"),
        ((torch.zeros(2, 1, 1, 800), torch.zeros(2, 1, 1, 800)), r"space 'hubert' expects audio \[N, T\] or "
                                                                 r"\[N, C, T\], got shape \(2, 1, 1, 800\)"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            metric.update(*bad)
    assert torch.equal(metric.compute(), before)


def test_normalize_layers_gives_each_frame_zero_mean_and_unit_variance() -> None:
    space = get_space("hubert", sample_rate=16000, weights="random", layers=[3], normalize_layers=True)
    feature = space.features(_clips(n=1)[1])["layer3"]
    torch.testing.assert_close(feature.mean(-1), torch.zeros(feature.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(feature.var(-1, unbiased=False), torch.ones(feature.shape[:-1]), atol=1e-3, rtol=0)
