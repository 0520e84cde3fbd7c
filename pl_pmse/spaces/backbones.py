"""Feature spaces from neural networks: torchvision backbones, LPIPS calibration, your own ``nn.Module``.

Features are read with forward hooks at named layers; the forward stops after the last of them. The network
is frozen and kept in eval mode; in-place activations are turned off unless the hooked layers are known to be
safe from them, so that a captured feature map is never overwritten by a later layer.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .. import checks
from ..versions import require
from .image import ImageSpace
from .registry import register_module_space, register_space

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# LPIPS' ScalingLayer, applied to inputs in [-1, 1]
LPIPS_SHIFT, LPIPS_SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)
NORMALIZATIONS = ("imagenet", "lpips", "none")


@dataclass(frozen=True)
class Architecture:
    """A torchvision classifier, its named layers (``{name: module path}``) and the ones measured by default (all,
    unless ``defaults`` says). ``before_inplace``: layers whose output the next in-place ReLU would change (conv
    outputs): choosing one turns the network's in-place ReLUs off."""

    builder: str
    layers: dict[str, str]
    min_size: int
    lpips_name: str = ""
    lpips_channels: tuple[int, ...] = ()  # the channels of LPIPS' layers, which its calibration weights must have
    defaults: tuple[str, ...] = ()
    before_inplace: frozenset[str] = frozenset()

    @property
    def default_layers(self) -> list[str]:
        return list(self.defaults or self.layers)


def _vgg19_layers() -> dict[str, str]:
    """``conv<b>_<i>`` (the convolution's output, before its ReLU) and ``relu<b>_<i>`` of torchvision's VGG19
    ``features``, as the super-resolution literature names them (ESRGAN, Real-ESRGAN, BasicSR)."""
    layers, index = {}, 0
    for block, convolutions in enumerate((2, 2, 4, 4, 4), start=1):
        for conv in range(1, convolutions + 1):
            layers[f"conv{block}_{conv}"], layers[f"relu{block}_{conv}"] = f"features.{index}", f"features.{index + 1}"
            index += 2
        index += 1  # the max pool
    return layers


VGG19_LAYERS = _vgg19_layers()


ARCHITECTURES = {
    "vgg16": Architecture(
        "vgg16",
        {"relu1_2": "features.3", "relu2_2": "features.8", "relu3_3": "features.15", "relu4_3": "features.22",
         "relu5_3": "features.29"},
        min_size=16,
        lpips_name="vgg",
        lpips_channels=(64, 128, 256, 512, 512),
    ),
    "alexnet": Architecture(
        "alexnet",
        {"relu1": "features.1", "relu2": "features.4", "relu3": "features.7", "relu4": "features.9",
         "relu5": "features.11"},
        min_size=31,
        lpips_name="alex",
        lpips_channels=(64, 192, 384, 256, 256),
    ),
    "squeezenet": Architecture(
        "squeezenet1_1",
        {"relu1": "features.1", "fire3": "features.4", "fire5": "features.7", "fire6": "features.9",
         "fire7": "features.10", "fire8": "features.11", "fire9": "features.12"},
        min_size=17,
        lpips_name="squeeze",
        lpips_channels=(64, 128, 256, 384, 384, 512, 512),
    ),
    # Real-ESRGAN's perceptual layers (ESRGAN uses conv5_4 alone): before the activation, as in BasicSR
    "vgg19": Architecture(
        "vgg19",
        VGG19_LAYERS,
        min_size=16,
        defaults=("conv1_2", "conv2_2", "conv3_4", "conv4_4", "conv5_4"),
        before_inplace=frozenset(name for name in VGG19_LAYERS if name.startswith("conv")),
    ),
}  # fmt: skip


RANDOM_WEIGHTS_SEED = 0  # weights="random": torchvision's initialisation under this seed, the same in every process


class _Captured(Exception):
    """Raised by the last hook: the rest of the network is not needed."""


_CAPTURE_LOCK = threading.Lock()  # one capture at a time in the process: spaces may share hooked submodules


def _install_hook(module: nn.Module) -> None:
    """Give ``module`` the forward hook :func:`_keep_output`, once however many spaces read it (registered at
    construction, so that ``torch.compile`` traces it; a module-level function, so that copies and pickles keep it)."""
    if "_pl_pmse_slot" not in module.__dict__:
        module._pl_pmse_slot = None
        module.register_forward_hook(_keep_output)


def _keep_output(module: nn.Module, inputs: Any, output: Tensor) -> None:
    """Record ``output`` while a :class:`Backbone` captures (it sets the module's slot: where to record, under which
    names, how many layers in all, the module's path), and stop the forward after the last layer; else nothing."""
    slot = module._pl_pmse_slot
    if slot is None:
        return
    captured, names, wanted, path = slot
    if names[0] in captured:
        raise ValueError(
            f"layers: {names[0]!r} ({path!r}) runs more than once per forward (a shared module); hook a module that "
            f"runs once"
        )
    for name in names:
        captured[name] = output
    if len(captured) == wanted:
        raise _Captured


@register_module_space
class Backbone(ImageSpace):
    """Perception space of a network's feature maps at named layers, plus the raw pixels.

    Args:
        module: any ``nn.Module`` taking ``[N, C, H, W]`` images. It is frozen in place
            (``requires_grad_(False)``, eval mode, in-place activations off): pass a copy of a network you still
            train. A hooked module must run once per forward (not a shared activation like ResNet's ``relu``).
        layers: module paths as in ``module.named_modules()`` (component names = paths), or
            ``{component name: module path}``.
        normalize: input normalisation of images in [0, 1]: ``"imagenet"`` (mean/std), ``"lpips"`` (LPIPS'
            scaling layer on [-1, 1]) or ``"none"``. With ``"imagenet"``/``"lpips"`` inputs must have 3 channels
            (1-channel images are repeated).
        component_weights: ``{component: weight}`` overrides; every layer defaults to 1.
        pixel_weight: default weight of the raw ``"pixel"`` component.
        min_size: smallest height/width the network accepts (checked before the forward).
        name: the space's name in messages.
        keep_inplace: keep the module's in-place activations (faster); only safe when no later layer modifies a
            hooked layer's output in place (true for the built-in torchvision layers, which are ReLU outputs).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
        >>> space = Backbone(net, layers={"low": "1", "high": "2"}, normalize="none")
        >>> space.component_names
        ('pixel', 'low', 'high')
    """

    def __init__(
        self,
        module: nn.Module,
        layers: Sequence[str] | Mapping[str, str],
        normalize: str = "imagenet",
        component_weights: Mapping[str, float] | None = None,
        pixel_weight: float = 1.0,
        min_size: int = 1,
        name: str = "custom",
        keep_inplace: bool = False,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
        layer_map = _layer_map(module, layers)
        super().__init__(dict.fromkeys(layer_map, 1.0), pixel_weight, component_weights)
        self.name = name
        self.normalize = checks.check_choice("normalize", normalize, NORMALIZATIONS)
        self.layers = layer_map
        self.min_size = min_size
        self.__dict__["module"] = _freeze(module, keep_inplace)  # outside the module tree: see Space
        modules = dict(module.named_modules())  # the hooked modules, each with the layer names it gives
        self.__dict__["_hooked"] = [
            (modules[path], tuple(n for n, p in layer_map.items() if p == path), path)
            for path in dict.fromkeys(layer_map.values())
        ]
        for hooked, _, _ in self._hooked:
            _install_hook(hooked)
        # the normalisation as one affine map per channel, x * gain + bias (LPIPS: [0, 1] -> [-1, 1] first)
        shift, scale = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "lpips": (LPIPS_SHIFT, LPIPS_SCALE)}.get(
            normalize, ((0.0,), (1.0,))
        )
        shift, scale = torch.tensor(shift).view(1, -1, 1, 1), torch.tensor(scale).view(1, -1, 1, 1)
        gain, bias = (2 / scale, (-1 - shift) / scale) if normalize == "lpips" else (1 / scale, -shift / scale)
        self.register_buffer("gain", gain, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def networks(self) -> tuple[nn.Module, ...]:
        return (self.module,)

    def check_input(self, x: Tensor) -> None:
        super().check_input(x)
        if self.normalize != "none" and x.shape[1] not in (1, 3):
            raise ValueError(
                f"preds and target: space {self.name!r} expects RGB images [N, 3, H, W] (grayscale [N, 1, H, W] is "
                f"repeated to 3 channels), got {x.shape[1]} channels (shape {tuple(x.shape)})"
            )
        checks.check_min_size(x, self.min_size, "height and width", self.name, dim=-2)
        checks.check_min_size(x, self.min_size, "height and width", self.name, dim=-1)

    def features(self, x: Tensor) -> dict[str, Tensor]:
        if self.normalize != "none":
            x = torch.addcmul(self.bias, x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x, self.gain)
        captured = self._capture(x)
        return {name: self.transform(name, captured[name]) for name in self.layers}

    def transform(self, name: str, feature: Tensor) -> Tensor:
        """Post-process one captured feature map (identity here; LPIPS normalises and calibrates)."""
        return feature

    def _capture(self, x: Tensor) -> dict[str, Tensor]:
        """Run the network on ``x`` until every hooked layer has given its output (see :func:`_keep_output`).

        The hooks' slots belong to the network's modules, which every space and thread reading them shares (two
        spaces may hook one submodule): one capture at a time in the process (a lock; two threads measuring with
        network spaces take turns, each with its own features). Under ``torch.compile`` the hooks are traced into the
        graph and no slot is read at run time."""
        if torch.compiler.is_compiling():
            return self._capture_unlocked(x)
        with _CAPTURE_LOCK:
            return self._capture_unlocked(x)

    def _capture_unlocked(self, x: Tensor) -> dict[str, Tensor]:
        captured: dict[str, Tensor] = {}
        for hooked, names, path in self._hooked:
            hooked._pl_pmse_slot = (captured, names, len(self.layers), path)
        try:
            self.module(x)
        except _Captured:
            pass
        finally:
            for hooked, _, _ in self._hooked:
                hooked._pl_pmse_slot = None
        missing = [f"{name!r} ({path!r})" for _, names, path in self._hooked for name in names if name not in captured]
        if missing:
            raise ValueError(
                f"layers: {', '.join(missing)} did not run in the forward of space {self.name!r} (a module the "
                f"network's forward never calls); hook modules on its path"
            )
        return captured

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={self.layers}, normalize={self.normalize!r}, {super().extra_repr()}"


class LPIPSSpace(Backbone):
    """LPIPS as a Perception MSE: unit-normalised features scaled by the calibration weights.

    For layer ``l`` with features ``f`` (``C`` channels) and non-negative calibration weights ``w``, the component is
    ``sqrt(C * w) * f / sqrt(sum_c f**2 + eps)``, so that its MSE over ``[C, H, W]`` is
    ``mean_hw sum_c w_c (f0 - f1)**2``: LPIPS' layer distance (equal to the ``lpips`` package to 1e-5; eps sits
    inside the square root here, outside in ``lpips``, which only matters for near-zero feature vectors and keeps
    the gradient finite there). Layer weights default to 1 and the pixel
    weight to 0, so the total is LPIPS.

    ``data_range`` must be given: LPIPS is fed [-1, 1] images by the ``lpips`` package and by torchmetrics (unless
    ``normalize=True``), [0, 1] images elsewhere, and either kind passes a range check.
    """

    data_range_advice = (
        "LPIPS inputs come in two conventions that both pass a range check: images in [-1, 1] (the lpips package; "
        "torchmetrics' LPIPS with normalize=False) -> data_range=(-1, 1); images in [0, 1] (torchmetrics' "
        "normalize=True) -> data_range=1.0"
    )

    def __init__(self, module: nn.Module, calibration: dict[str, Tensor], eps: float = 1e-10, **options: Any):
        super().__init__(module, normalize="lpips", **options)
        self.eps = eps
        for name, weight in calibration.items():
            self.register_buffer(f"lpips_scale_{name}", (weight.shape[1] * weight).sqrt(), persistent=False)

    def transform(self, name: str, feature: Tensor) -> Tensor:
        feature = feature.to(torch.promote_types(feature.dtype, torch.float32))  # eps and |f|**2 need float32 at least
        normalized = feature / torch.sqrt(feature.square().sum(1, keepdim=True) + self.eps)  # finite gradient at 0
        scale = getattr(self, f"lpips_scale_{name}")
        return normalized * scale if normalized.requires_grad else normalized.mul_(scale)  # the same bits either way


class _PrivateGenerator(TorchDispatchMode):
    """Every random operation of this thread draws from ``generator`` instead of torch's global one.

    A freshly seeded CPU generator gives the numbers ``torch.manual_seed`` would, so torchvision's initialisation
    under it is the one under the global seed, while other threads' random state (their dropout, their data
    augmentation) is neither read nor changed, and theirs cannot perturb these weights (dispatch modes are
    per thread)."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        names = [argument.name for argument in func._schema.arguments]
        if "generator" in names:
            position = names.index("generator")
            if position < len(args):  # passed by position (poisson, binomial, ...)
                if args[position] is None:
                    args = (*args[:position], self.generator, *args[position + 1 :])
            elif kwargs.get("generator") is None:
                kwargs["generator"] = self.generator
        return func(*args, **kwargs)


def imagenet_weights_path(architecture: str) -> Path:
    """Where torchvision's cache keeps the ImageNet weights of ``architecture`` (copy them there offline).

    Example:
        >>> imagenet_weights_path("vgg16").name
        'vgg16-397923af.pth'
    """
    torchvision = require("torchvision")  # loaded on first use: import pl_pmse stays light

    enum = torchvision.models.get_model_weights(ARCHITECTURES[architecture].builder).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(enum.url).path).name


def load_backbone(architecture: str, weights: str | os.PathLike = "imagenet") -> nn.Module:
    """A torchvision classifier (head dropped) with ``weights`` = ``"imagenet"``, ``"random"`` or a path.

    A path must hold a torchvision-format ``state_dict`` of the whole model (the head's keys are not needed).
    ``"random"`` is torchvision's initialisation under the seed ``RANDOM_WEIGHTS_SEED`` (0), so two networks built
    alike, in one process or several, are equal; the global random state is not touched.
    """
    arch = ARCHITECTURES[architecture]
    torchvision = require("torchvision")

    builder = getattr(torchvision.models, arch.builder)
    if isinstance(weights, str) and weights == "random":  # torchvision's own initialisation, seeded: reproducible
        with torch.device("cpu"), _PrivateGenerator(torch.Generator().manual_seed(RANDOM_WEIGHTS_SEED)):
            model = builder(weights=None)  # on the CPU whatever the default device: the same values everywhere
        model.classifier = nn.Identity()
        return model
    with torch.device("meta"):  # no time spent initialising weights that are about to be replaced
        model = builder(weights=None)
    model.classifier = nn.Identity()
    model = model.to_empty(device="cpu")
    state = _imagenet_state(architecture) if weights == "imagenet" else _state_from_file(weights, architecture)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"weights: {weights} is not a torchvision {arch.builder} state_dict: missing {missing[:4]}")
    try:
        model.load_state_dict({key: state[key] for key in expected})
    except RuntimeError as error:
        raise ValueError(f"weights: {weights} does not fit torchvision's {arch.builder}: {error}") from None
    return model


def _imagenet_state(architecture: str) -> dict[str, Tensor]:
    torchvision = require("torchvision")  # loaded on first use: import pl_pmse stays light

    enum = torchvision.models.get_model_weights(ARCHITECTURES[architecture].builder).DEFAULT
    try:
        return enum.get_state_dict(progress=False)
    except Exception as error:  # no network, proxy, HTTP errors, a corrupt partial file...
        raise RuntimeError(
            f"weights='imagenet': the {architecture} ImageNet weights are not in torchvision's cache "
            f"({imagenet_weights_path(architecture)}) and could not be downloaded from {enum.url} ({error}). "
            f"On an offline machine copy that file there, or pass weights=<path to a torchvision state_dict>."
        ) from error


def _state_from_file(
    path: str | os.PathLike, architecture: str, argument: str = "weights", named: str = "'imagenet', 'random'"
) -> dict[str, Tensor]:
    """The state_dict in the file ``path`` that the option ``argument`` gave (``named``: the values it takes
    besides a path, for the messages)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument}: expected {named} or a path, got {type(path).__name__}")
    if not Path(path).is_file():
        raise ValueError(f"{argument}: expected {named} or a path to a state_dict file, got {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = type(error).__name__
        raise ValueError(f"{argument}: {path} is not a readable torch state_dict file ({reason})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{argument}: {path} holds a {type(state).__name__}, expected a {architecture} state_dict")
    return dict(state)


def lpips_calibration(architecture: str, calibration: str | os.PathLike = "lpips") -> dict[str, Tensor]:
    """LPIPS' per-layer channel weights ``{layer name: [1, C, 1, 1]}``, from the ``lpips`` package or a file."""
    arch = ARCHITECTURES[architecture]
    if isinstance(calibration, str) and calibration == "lpips":
        try:
            path: Any = resources.files("lpips") / "weights" / "v0.1" / f"{arch.lpips_name}.pth"
        except ModuleNotFoundError:
            raise ValueError(
                f"calibration='lpips' reads LPIPS' weights from the lpips package, which is not installed: "
                f"pip install 'pl-pmse[lpips]', or pass calibration=<path to an LPIPS {arch.lpips_name}.pth>"
            ) from None
    else:
        path = calibration
    state = _state_from_file(path, f"LPIPS {arch.lpips_name}", "calibration", "'lpips'")
    weights = {}
    for index, (name, channels) in enumerate(zip(arch.layers, arch.lpips_channels, strict=True)):
        weight = state.get(f"lin{index}.model.1.weight")
        if weight is None or tuple(weight.shape) != (1, channels, 1, 1):
            found = "none" if weight is None else f"shape {list(weight.shape)}"
            raise ValueError(
                f"calibration: {path} needs lin{index}.model.1.weight of shape [1, {channels}, 1, 1] for LPIPS "
                f"{arch.lpips_name}'s layer {name}, found {found} (a calibration file of another network?)"
            )
        if (weight < 0).any():
            raise ValueError(f"calibration: {path} has negative weights in lin{index}; LPIPS weights are >= 0")
        weights[name] = weight.float()
    return weights


def _layer_map(module: nn.Module, layers: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    if isinstance(layers, str) or not isinstance(layers, (Sequence, Mapping)) or not layers:
        raise ValueError(f"layers: expected a non-empty list of module paths or a mapping, got {layers!r}")
    layer_map = dict(layers) if isinstance(layers, Mapping) else {path: path for path in layers}
    available = dict(module.named_modules())
    for name, path in layer_map.items():
        if path not in available or path == "":
            shown = [n for n in available if n][:12]
            raise ValueError(f"layers: {name!r} -> {path!r} is not a submodule; some are {shown}")
    return layer_map


def _freeze(module: nn.Module, keep_inplace: bool) -> nn.Module:
    module.requires_grad_(False).eval()
    for child in module.modules():
        if not keep_inplace and getattr(child, "inplace", False) is True:
            child.inplace = False
    return module


def _named_backbone(
    architecture: str,
    weights: str | os.PathLike,
    layers: Sequence[str] | None,
) -> tuple[nn.Module, dict[str, str]]:
    arch = ARCHITECTURES[architecture]
    chosen = arch.default_layers if layers is None else layers
    if isinstance(chosen, str) or not chosen:
        raise ValueError(f"layers: expected a non-empty list of layer names, got {layers!r}")
    return load_backbone(architecture, weights), {name: arch.layers.get(name, name) for name in chosen}


def _register_torchvision(space_name: str) -> None:
    def factory(
        weights: str | os.PathLike = "imagenet",
        layers: Sequence[str] | None = None,
        component_weights: Mapping[str, float] | None = None,
        pixel_weight: float = 1.0,
    ) -> Backbone:
        module, layer_map = _named_backbone(space_name, weights, layers)
        arch = ARCHITECTURES[space_name]
        safe = set(arch.layers) - arch.before_inplace  # in-place ReLUs change no captured output
        return Backbone(
            module, layer_map, "imagenet", component_weights, pixel_weight, arch.min_size, space_name,
            keep_inplace=set(layer_map) <= safe,
        )  # fmt: skip

    arch = ARCHITECTURES[space_name]
    which = "LPIPS' layers" if arch.lpips_name else "the layers"
    factory.__doc__ = (
        f"torchvision {arch.builder} features at {which} {arch.default_layers} (or ``layers=``, names or module "
        f"paths), plus pixels; ImageNet-normalised input."
    )
    register_space(space_name)(factory)


def _register_lpips(space_name: str, architecture: str) -> None:
    def factory(
        weights: str | os.PathLike = "imagenet",
        calibration: str | os.PathLike = "lpips",
        component_weights: Mapping[str, float] | None = None,
        pixel_weight: float = 0.0,
    ) -> LPIPSSpace:
        module, layer_map = _named_backbone(architecture, weights, None)
        return LPIPSSpace(
            module, lpips_calibration(architecture, calibration), layers=layer_map,
            component_weights=component_weights, pixel_weight=pixel_weight,
            min_size=ARCHITECTURES[architecture].min_size, name=space_name, keep_inplace=True,
        )  # fmt: skip

    factory.__doc__ = f"LPIPS with the {architecture} trunk: the total equals lpips.LPIPS(net=...) to 1e-5."
    register_space(space_name)(factory)


for _name in ARCHITECTURES:
    _register_torchvision(_name)
for _name, _arch in (("lpips-alex", "alexnet"), ("lpips-vgg", "vgg16"), ("lpips-squeeze", "squeezenet")):
    _register_lpips(_name, _arch)
