"""Self-supervised speech models as perception spaces: wav2vec 2.0, HuBERT and WavLM (torchaudio's models).

Each transformer layer's output, as torchaudio's ``extract_features`` returns it, is a component (``layer1`` ...);
the raw ``waveform`` is kept at weight 0. The network is frozen and held outside the module tree, as the image
backbones' are (see :class:`~pl_pmse.spaces.base.Space`).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from .. import checks
from ..versions import require
from .audio import AudioSpace, constant_buffers
from .backbones import RANDOM_WEIGHTS_SEED, _PrivateGenerator, _state_from_file
from .registry import register_space

MODEL_SAMPLE_RATE = 16000  # every model here was trained on 16 kHz audio
# torchaudio's pretrained bundles (torchaudio.pipelines), by model family and size
SPEECH_BUNDLES = {
    "wav2vec2": {"base": "WAV2VEC2_BASE", "large": "WAV2VEC2_LARGE", "large-lv60k": "WAV2VEC2_LARGE_LV60K"},
    "hubert": {"base": "HUBERT_BASE", "large": "HUBERT_LARGE", "xlarge": "HUBERT_XLARGE"},
    "wavlm": {"base": "WAVLM_BASE", "base-plus": "WAVLM_BASE_PLUS", "large": "WAVLM_LARGE"},
}


def _bundle(family: str, size: str) -> Any:
    checks.check_choice("size", size, tuple(SPEECH_BUNDLES[family]))
    torchaudio = require("torchaudio")  # loaded on first use: import pl_pmse stays light

    return getattr(torchaudio.pipelines, SPEECH_BUNDLES[family][size])


def speech_weights_path(family: str, size: str = "base") -> Path:
    """Where torch's hub cache keeps the pretrained weights of a model (copy the file there on an offline machine).

    Example:
        >>> speech_weights_path("hubert").name
        'hubert_fairseq_base_ls960.pth'
    """
    name = Path(urlparse(_bundle(family, size)._path).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _download_state(bundle: Any) -> dict[str, Tensor]:
    """The bundle's state_dict through torchaudio's own download code (torch's hub cache, downloaded once)."""
    return bundle._get_state_dict({"progress": False, "map_location": "cpu", "weights_only": True})


def load_speech_model(family: str, size: str = "base", weights: str | os.PathLike = "pretrained") -> nn.Module:
    """torchaudio's ``Wav2Vec2Model`` of ``family`` (``"wav2vec2"``, ``"hubert"``, ``"wavlm"``) and ``size``, built
    from its pretrained bundle's own configuration, with ``weights`` = ``"pretrained"`` (the bundle's, through
    torch's hub cache), ``"random"`` (torchaudio's initialisation under the seed ``RANDOM_WEIGHTS_SEED``, the global
    random state untouched) or a path to the model's ``state_dict`` (loaded with ``weights_only``).

    Example:
        >>> model = load_speech_model("hubert", weights="random")
        >>> len(model.encoder.transformer.layers)
        12
    """
    if family not in SPEECH_BUNDLES:
        raise ValueError(f"model: expected one of {list(SPEECH_BUNDLES)}, got {family!r}")
    bundle = _bundle(family, size)
    from torchaudio.models import wav2vec2_model, wavlm_model

    build = {"Wav2Vec2": wav2vec2_model, "WavLM": wavlm_model}[bundle._model_type]
    if isinstance(weights, str) and weights == "random":
        with torch.device("cpu"), _PrivateGenerator(torch.Generator().manual_seed(RANDOM_WEIGHTS_SEED)):
            return build(**bundle._params)
    with torch.device("meta"):  # no time spent initialising weights that are about to be replaced
        model = build(**bundle._params)
    model = model.to_empty(device="cpu")
    if isinstance(weights, str) and weights == "pretrained":
        cached = speech_weights_path(family, size)
        try:
            state = _download_state(bundle)
        except Exception as error:  # no network, proxy, HTTP errors, a corrupt file...
            first_line = str(error).splitlines()[0][:160] if str(error) else ""
            why = (f"are in torch's hub cache ({cached}) but could not be read ({type(error).__name__}: {first_line});"
                   f" delete that file to download it again" if cached.is_file() else
                   f"are not in torch's hub cache ({cached}) and could not be downloaded ({error})")  # fmt: skip
            raise RuntimeError(
                f"weights='pretrained': the {family} {size} weights {why}. On an offline machine copy the file "
                f"there, or pass weights=<path to a torchaudio {family} {size} state_dict>."
            ) from error
    else:
        state = _state_from_file(weights, f"torchaudio {family} {size}", named="'pretrained', 'random'")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"weights: {weights} is not a state_dict of torchaudio's {family} {size} model: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}, of other shapes {wrong[:3]}"
        )
    model.load_state_dict(state)
    return model


def receptive_field(model: nn.Module) -> int:
    """The fewest samples (at 16 kHz) that the model's convolutional feature encoder turns into one frame."""
    length = 1
    for layer in reversed(model.feature_extractor.conv_layers):
        conv = layer.conv
        length = (length - 1) * conv.stride[0] + conv.kernel_size[0]
    return length


class SpeechModelSpace(AudioSpace):
    """Perception space of a self-supervised speech model's transformer layers (torchaudio's models).

    Components: ``waveform`` (weight 0) and ``layer1`` ... ``layerN``, each a transformer layer's output
    ``[frames, features]`` as ``Wav2Vec2Model.extract_features`` returns it (no normalisation unless
    ``normalize_layers``). The forward stops after the deepest chosen layer.

    Default layers: the first two thirds (base: ``layer1`` ... ``layer8``). Layer-wise studies of these models
    (Pasad et al., 2021, for wav2vec 2.0; Chen et al., 2022, for WavLM) find the acoustic qualities (speaker,
    pitch, timbre) in the lower layers and the phonetic content peaking in the middle ones, while the last layers of
    wav2vec 2.0 and HuBERT specialise in their pre-training targets; the two thirds cover both kinds of error and
    spare a third of the transformer.

    Input: audio ``[N, T]`` or ``[N, C, T]`` in [-1, 1] at ``sample_rate``, resampled to 16 kHz inside the space by
    torchaudio's ``Resample``. Each channel is measured as a clip of its own (the models are mono; a mean of the
    channels would hide an error that cancels between them). Models whose bundle normalises the waveform (the large
    and xlarge ones but ``wav2vec2`` ``large``) normalise each clip to zero mean and unit variance, as fairseq does
    (torchaudio's wrapper normalises a whole batch as one, which would make a clip's features depend on the others).

    Args:
        model: ``"wav2vec2"``, ``"hubert"`` or ``"wavlm"``.
        sample_rate: of the audio in Hz (required).
        size: ``"base"`` or a larger variant torchaudio has (``SPEECH_BUNDLES``).
        weights: ``"pretrained"`` (downloaded once into torch's hub cache, see :func:`speech_weights_path`),
            ``"random"`` (seeded: the same network in every process) or a path to the model's ``state_dict``.
        layers: layer numbers (1-based) or names ``"layer3"``; default the first two thirds.
        normalize_layers: scale each frame's feature vector to zero mean and unit variance (a layer norm without
            weights) before the error, so that every layer counts on one scale.
        component_weights: ``{component: weight}`` overrides.

    Example:
        >>> space = SpeechModelSpace("hubert", sample_rate=16000, weights="random", layers=[1, 2])
        >>> space.features(torch.zeros(2, 16000))["layer2"].shape
        torch.Size([2, 49, 768])
    """

    def __init__(
        self,
        model: str = "wav2vec2",
        sample_rate: int | None = None,
        size: str = "base",
        weights: str | os.PathLike = "pretrained",
        layers: Sequence[int | str] | None = None,
        normalize_layers: bool = False,
        component_weights: Mapping[str, float] | None = None,
    ) -> None:
        if model not in SPEECH_BUNDLES:
            raise ValueError(f"model: expected one of {list(SPEECH_BUNDLES)}, got {model!r}")
        checks.check_sample_rate(sample_rate, f"space {model!r}")
        if not isinstance(normalize_layers, bool):
            raise TypeError(f"normalize_layers: expected True or False, got {normalize_layers!r}")
        bundle = _bundle(model, size)
        depth = bundle._params["encoder_num_layers"]
        chosen = _layer_numbers(layers, depth)
        super().__init__({f"layer{n}": 1.0 for n in chosen}, raw_weight=0.0, component_weights=component_weights)
        self.name, self.normalize_layers, self.layer_numbers = model, normalize_layers, chosen
        self._sample_rate = sample_rate
        self.normalize_waveform = bundle._normalize_waveform
        network = _folded(load_speech_model(model, size, weights)).requires_grad_(False).eval()
        self.__dict__["network"] = network  # outside the module tree: see Space
        self.min_length = math.ceil(receptive_field(network) * sample_rate / MODEL_SAMPLE_RATE)
        self.resampler: nn.Module | None = None
        if sample_rate != MODEL_SAMPLE_RATE:
            from torchaudio.transforms import Resample

            self.resampler = constant_buffers(Resample(sample_rate, MODEL_SAMPLE_RATE), "kernel")

    @property
    def sample_rate(self) -> int:
        return self._sample_rate

    def networks(self) -> tuple[nn.Module, ...]:
        return (self.network,)

    @property
    def length_dims(self) -> str:
        return f"signals (the model's receptive field at {self._sample_rate} Hz)"

    def features(self, x: Tensor) -> dict[str, Tensor]:
        clips = x.reshape(-1, x.shape[-1])  # each channel a clip of its own
        if self.resampler is not None:
            clips = self._resampled(clips)
        if self.normalize_waveform:
            clips = nn.functional.layer_norm(clips, clips.shape[-1:])
        outputs, _ = self.network.extract_features(clips, num_layers=max(self.layer_numbers))
        features = {}
        for number in self.layer_numbers:
            feature = outputs[number - 1]
            if self.normalize_layers:
                feature = nn.functional.layer_norm(feature, feature.shape[-1:])
            features[f"layer{number}"] = feature.reshape(*x.shape[:-1], *feature.shape[1:])
        return features

    def _resampled(self, clips: Tensor) -> Tensor:
        """torchaudio's ``Resample`` of ``[N, T]`` (its kernel and its steps), with the output length in Python
        integers: torchaudio computes it as a tensor and slices by it, a host synchronisation on an accelerator."""
        resampler = self.resampler
        orig, new = resampler.orig_freq // resampler.gcd, resampler.new_freq // resampler.gcd
        padded = nn.functional.pad(clips, (resampler.width, resampler.width + orig))
        frames = nn.functional.conv1d(padded[:, None], resampler.kernel.to(clips.dtype), stride=orig)
        return frames.transpose(1, 2).reshape(clips.shape[0], -1)[:, : -(-new * clips.shape[-1] // orig)]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={self.layer_numbers}, {super().extra_repr()}"


def _folded(network: nn.Module) -> nn.Module:
    """The network with its parametrizations (the positional convolution's weight norm) computed once into plain
    weights: the same values, and a network that pickles (``ddp_spawn`` pickles the callback and its space)."""
    from torch.nn.utils import parametrize

    for module in network.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
            hooks = module._load_state_dict_pre_hooks  # weight_norm's hook for old checkpoints: a local function
            for key in [k for k, h in hooks.items() if "weight_norm" in getattr(h.hook, "__qualname__", "")]:
                del hooks[key]
    return network


def _layer_numbers(layers: Sequence[int | str] | None, depth: int) -> list[int]:
    """Layer numbers from ``layers`` (1-based numbers or ``"layerK"`` names), default the first two thirds."""
    if layers is None:
        return list(range(1, 2 * depth // 3 + 1))
    if isinstance(layers, (str, int)) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"layers: expected a non-empty list of layer numbers 1..{depth} or names, got {layers!r}")
    numbers = []
    for layer in layers:
        text = layer[len("layer") :] if isinstance(layer, str) and layer.startswith("layer") else None
        number = layer if isinstance(layer, int) and not isinstance(layer, bool) else None
        if text is not None and text.isdigit():
            number = int(text)
        if number is None or not 1 <= number <= depth:
            raise ValueError(f"layers: expected layer numbers 1..{depth} or names 'layer1'..'layer{depth}', "
                             f"got {layer!r}")  # fmt: skip
        numbers.append(number)
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"layers: expected distinct layers, got {list(layers)}")
    return sorted(numbers)


def _register(family: str) -> None:
    factory = functools.partial(SpeechModelSpace, family)
    factory.__doc__ = (
        f"torchaudio's {family} (size {', '.join(SPEECH_BUNDLES[family])}): transformer layers 'layer1'... as "
        f"components, the first two thirds by default; see SpeechModelSpace."
    )
    register_space(family)(factory)


for _family in SPEECH_BUNDLES:
    _register(_family)
