"""Image spaces against independent references: the lpips package, torchvision slices, a numpy pyramid."""

from __future__ import annotations

import urllib.error

import lpips
import numpy as np
import pytest
import torch
import torchvision
from scipy.ndimage import convolve1d

from pl_pmse import PerceptionMSE, get_space, perception_mse, perception_mse_components
from pl_pmse.spaces import Backbone, LaplacianPyramid, imagenet_weights_path, load_backbone
from pl_pmse.spaces.backbones import ARCHITECTURES, IMAGENET_MEAN, IMAGENET_STD

LPIPS_NETS = {
    "lpips-alex": ("alexnet", "alex"),
    "lpips-vgg": ("vgg16", "vgg"),
    "lpips-squeeze": ("squeezenet", "squeeze"),
}


def lpips_reference(net: str, state_path: str) -> lpips.LPIPS:
    """The lpips package with a random trunk replaced by the torchvision weights in ``state_path``."""
    model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    state = torch.load(state_path)
    # lpips keeps torchvision's features[i] under their original index i inside its slices
    model.net.load_state_dict({key: state["features." + key.split(".", 2)[1] + "." + key.split(".", 2)[2]]
                               for key in model.net.state_dict()})  # fmt: skip
    return model


@pytest.mark.parametrize("space", sorted(LPIPS_NETS))
def test_lpips_spaces_equal_the_lpips_package(space: str, backbone_weights: dict[str, str]) -> None:
    architecture, net = LPIPS_NETS[space]
    reference = lpips_reference(net, backbone_weights[architecture])
    preds, target = torch.rand(5, 3, 48, 40), torch.rand(5, 3, 48, 40)
    expected = reference(preds, target, normalize=True).flatten().double()
    ours = perception_mse(preds, target, space=space, weights=backbone_weights[architecture], reduction="none",
                          data_range=1.0)  # fmt: skip
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-7)
    # the metric over several batches is the mean LPIPS; the pixel component is reported but weighs 0
    metric = PerceptionMSE(space, weights=backbone_weights[architecture], data_range=1.0).set_dtype(torch.float64)
    metric.update(preds[:2], target[:2])
    metric.update(preds[2:], target[2:])
    torch.testing.assert_close(metric.compute(), expected.mean(), rtol=1e-5, atol=1e-8)
    summary = metric.compute_summary()
    assert summary["pixel"] > 0 and metric.space.component_weights["pixel"] == 0
    # [-1, 1] inputs as LPIPS takes them natively
    ours_m11 = perception_mse(preds * 2 - 1, target * 2 - 1, space=space, data_range=(-1, 1),
                              weights=backbone_weights[architecture], reduction="none")  # fmt: skip
    torch.testing.assert_close(ours_m11.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("space", sorted(ARCHITECTURES))
def test_backbone_layers_equal_torchvision_slices(space: str, backbone_weights: dict[str, str]) -> None:
    arch = ARCHITECTURES[space]
    model = getattr(torchvision.models, arch.builder)(weights=None).eval()
    missing, unexpected = model.load_state_dict(torch.load(backbone_weights[space]), strict=False)
    assert not unexpected and all(key.startswith("classifier.") for key in missing)  # the head is not needed
    preds, target = torch.rand(3, 3, 40, 40), torch.rand(3, 3, 40, 40)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ours = perception_mse_components(preds, target, space=space, weights=backbone_weights[space], reduction="none")
    assert list(ours) == ["pixel", *arch.default_layers]
    for name in arch.default_layers:
        head = model.features[: int(arch.layers[name].split(".")[1]) + 1]
        with torch.no_grad():
            expected = (head((preds - mean) / std) - head((target - mean) / std)).square().flatten(1).mean(1)
        torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(ours["pixel"], (preds - target).square().flatten(1).mean(1))


def test_layer_choice_and_component_weights(backbone_weights: dict[str, str]) -> None:
    path = backbone_weights["alexnet"]
    preds, target = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    space = get_space("alexnet", weights=path, layers=["relu2", "features.10"], component_weights={"relu2": 3.0})
    assert space.component_names == ("pixel", "relu2", "features.10")
    parts = perception_mse_components(preds, target, space=space)
    total = perception_mse(preds, target, space=space)
    torch.testing.assert_close(total, parts["pixel"] + 3 * parts["relu2"] + parts["features.10"])


def test_one_forward_over_the_concatenated_batch(backbone_weights: dict[str, str]) -> None:
    metric = PerceptionMSE("squeezenet", weights=backbone_weights["squeezenet"])
    batch_sizes = []
    metric.space.module.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    metric.update(torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32))
    assert batch_sizes == [6]


def test_network_is_frozen_out_of_state_and_moves_with_the_metric(backbone_weights: dict[str, str]) -> None:
    metric = PerceptionMSE("vgg16", weights=backbone_weights["vgg16"])
    metric.train()
    assert not metric.space.module.training  # the network stays in eval mode whatever its holder does
    assert all(not t.requires_grad for t in metric.space.tensors())
    assert list(metric.state_dict()) == [] and list(metric.parameters()) == []
    # in-place ReLUs stay where the hooked layers are known to be safe, and go for other layer choices
    assert any(getattr(m, "inplace", False) for m in metric.space.module.modules())
    other = get_space("vgg16", weights=backbone_weights["vgg16"], layers=["features.2"])
    assert not any(getattr(m, "inplace", False) for m in other.module.modules())
    metric.to(torch.device("cpu"))
    assert {t.device.type for t in metric.space.tensors()} == {"cpu"}
    before = [t.clone() for t in metric.space.tensors()]
    with pytest.raises(ValueError, match="meta device"):
        metric.to("meta")
    assert metric.totals.device.type == "cpu"  # refused before anything moved
    assert all(torch.equal(a, b) for a, b in zip(before, metric.space.tensors(), strict=True))
    # a space held by a model: out of its state_dict, parameters and module tree (Lightning's eval-mode check)
    holder = torch.nn.Module()
    holder.metric = PerceptionMSE("squeezenet", weights=backbone_weights["squeezenet"])
    holder.space = get_space("squeezenet", weights=backbone_weights["squeezenet"])
    holder.train()
    assert list(holder.state_dict()) == [] and sum(1 for _ in holder.parameters()) == 0
    assert [name for name, module in holder.named_modules() if not module.training] == []
    assert not holder.space.module.training


def test_gradients_reach_preds_but_updates_build_no_graph(backbone_weights: dict[str, str]) -> None:
    preds = torch.rand(2, 3, 32, 32, requires_grad=True)
    target = torch.rand(2, 3, 32, 32)
    loss = perception_mse(preds, target, space="vgg16", weights=backbone_weights["vgg16"])
    loss.backward()
    assert preds.grad is not None and preds.grad.abs().sum() > 0
    metric = PerceptionMSE("vgg16", weights=backbone_weights["vgg16"])
    metric.update(preds, target)
    assert metric.totals.grad_fn is None


def test_custom_module_backbone_and_gradcheck() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(inplace=True), torch.nn.Conv2d(4, 3, 3), torch.nn.Tanh()
    ).double()
    space = Backbone(net, layers={"relu": "1", "out": "3"}, normalize="none")
    preds = torch.rand(2, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, 2, 7, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: perception_mse(p, target, space=space, reduction="none"), (preds,))
    # features captured before the in-place ReLU would have been overwritten without the freeze
    parts = perception_mse_components(preds.detach(), target, space=space, reduction="none")
    with torch.no_grad():
        first = lambda x: torch.relu(net[0](x))  # noqa: E731
        expected = (first(preds) - first(target)).square().flatten(1).mean(1)
    torch.testing.assert_close(parts["relu"], expected)
    via_metric = PerceptionMSE(net, layers=["1"], normalize="none")
    assert via_metric.space.component_names == ("pixel", "1")


def test_input_conventions(backbone_weights: dict[str, str]) -> None:
    path = backbone_weights["squeezenet"]
    preds, target = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    base = perception_mse_components(preds, target, space="squeezenet", weights=path, reduction="none")
    quantised_p, quantised_t = (preds * 255).round().to(torch.uint8), (target * 255).round().to(torch.uint8)
    as_uint8 = perception_mse_components(quantised_p, quantised_t, space="squeezenet", weights=path,
                                         data_range=255, reduction="none")  # fmt: skip
    as_float = perception_mse_components(quantised_p / 255, quantised_t / 255, space="squeezenet", weights=path,
                                         reduction="none")  # fmt: skip
    for name in base:
        if name != "pixel":  # features see [0, 1]; the pixel component stays in the data's own units
            torch.testing.assert_close(as_uint8[name], as_float[name], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(as_uint8["pixel"], as_float["pixel"] * 255**2, rtol=1e-6, atol=0)
    gray_p, gray_t = preds[:, :1], target[:, :1]
    gray = perception_mse_components(gray_p, gray_t, space="squeezenet", weights=path, reduction="none")
    rgb = perception_mse_components(gray_p.expand(-1, 3, -1, -1), gray_t.expand(-1, 3, -1, -1),
                                    space="squeezenet", weights=path, reduction="none")  # fmt: skip
    for name in base:
        if name != "pixel":
            torch.testing.assert_close(gray[name], rgb[name])


@pytest.mark.parametrize(
    ("preds", "pattern"),
    [
        (torch.rand(2, 2, 32, 32), r"expects RGB images \[N, 3, H, W\].*got 2 channels"),
        (torch.rand(2, 3, 16, 40), r"space 'alexnet' needs height and width of at least 31, got 16"),
        (torch.rand(2, 3, 32), r"space 'alexnet' expects images \[N, C, H, W\], got shape \(2, 3, 32\)"),
        (torch.rand(2, 3, 32, 32) * 255, r"target: .* values in \[0, 1\].*found target values .*pass the data_range"),
    ],
)
def test_bad_image_inputs(preds: torch.Tensor, pattern: str, backbone_weights: dict[str, str]) -> None:
    metric = PerceptionMSE("alexnet", weights=backbone_weights["alexnet"])
    before = metric.totals.clone()
    with pytest.raises(ValueError, match=pattern):
        metric.update(preds, preds.clone())
    assert torch.equal(before, metric.totals) and metric.update_count == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_of_feature_spaces_follow_nan_strategy(bad: float, backbone_weights) -> None:
    preds, target = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    preds[1, 0, 5, 5] = bad
    with pytest.raises(ValueError, match=r"preds: contains NaN or Inf in samples \[1\]"):
        perception_mse(preds, target, space="squeezenet", weights=backbone_weights["squeezenet"])
    values = perception_mse(preds, target, space="squeezenet", weights=backbone_weights["squeezenet"],
                            reduction="none", nan_strategy="ignore")  # fmt: skip
    assert values[1].isnan() and values[[0, 2]].isfinite().all()


def test_imagenet_weights_offline_error_and_cache(tmp_path, monkeypatch, backbone_weights) -> None:
    """weights='imagenet' goes through torchvision's enum and torch.hub's cache; only the download is stubbed."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    attempts = []

    def offline(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cache_file = imagenet_weights_path("squeezenet")
    assert cache_file == tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    with pytest.raises(
        RuntimeError, match=r"not in torchvision's cache \(.*squeezenet1_1-b8a52dc0.pth\).*weights=<path"
    ):
        get_space("squeezenet")
    assert attempts == ["https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"]
    # a file placed in the cache is what weights="imagenet" loads, with no download attempt
    state = torch.load(backbone_weights["squeezenet"])
    torch.save(state, cache_file)
    loaded = get_space("squeezenet").module.state_dict()
    assert all(torch.equal(loaded[key], state[key]) for key in loaded) and len(attempts) == 1


def test_bad_weight_files(tmp_path, backbone_weights: dict[str, str]) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"weights: expected 'imagenet', 'random' or a path to a state_dict file"):
        get_space("vgg16", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match=r"is not a readable torch state_dict file"):
        get_space("vgg16", weights=garbage)
    with pytest.raises(ValueError, match=r"is not a torchvision vgg16 state_dict: missing \['features."):
        get_space("vgg16", weights=backbone_weights["alexnet"])
    with pytest.raises(ValueError, match=r"layers: 'conv9' -> 'conv9' is not a submodule"):
        get_space("vgg16", weights=backbone_weights["vgg16"], layers=["conv9"])


def test_lpips_calibration_from_a_path_and_its_checks(tmp_path, backbone_weights: dict[str, str]) -> None:
    state = torch.load(lpips.__path__[0] + "/weights/v0.1/alex.pth", map_location="cpu")
    path = tmp_path / "alex.pth"
    torch.save(state, path)
    a = perception_mse(torch.rand(2, 3, 32, 32), torch.zeros(2, 3, 32, 32), space="lpips-alex",
                       weights=backbone_weights["alexnet"], calibration=path, data_range=1.0)  # fmt: skip
    assert a > 0
    state["lin1.model.1.weight"] = -state["lin1.model.1.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"calibration: .* has negative weights in lin1"):
        get_space("lpips-alex", weights=backbone_weights["alexnet"], calibration=path)
    state["lin1.model.1.weight"] = -state["lin1.model.1.weight"]
    del state["lin4.model.1.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"needs lin4.model.1.weight of shape \[1, 256, 1, 1\] .*found none"):
        get_space("lpips-alex", weights=backbone_weights["alexnet"], calibration=path)
    vgg = torch.load(lpips.__path__[0] + "/weights/v0.1/vgg.pth", map_location="cpu")
    torch.save(vgg, path)  # another network's calibration: refused when loaded, not a size mismatch at first use
    with pytest.raises(ValueError, match=r"needs lin1.model.1.weight of shape \[1, 192, 1, 1\] .*found shape \[1, 128"):
        get_space("lpips-alex", weights=backbone_weights["alexnet"], calibration=path)


# ---- Laplacian pyramid ---------------------------------------------------------------------------------------


def numpy_pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """Hand-written reference on one [C, H, W] image: scipy's 'mirror' is torch's 'reflect'."""
    kernel = np.array([1, 4, 6, 4, 1], dtype=np.float64) / 16

    def blur(x):
        return convolve1d(convolve1d(x, kernel, axis=-1, mode="mirror"), kernel, axis=-2, mode="mirror")

    bands = []
    for _ in range(levels - 1):
        small = blur(image)[:, ::2, ::2]
        up = np.zeros_like(image)
        up[:, ::2, ::2] = small
        bands.append(image - 4 * blur(up))
        image = small
    return [*bands, image]


@pytest.mark.parametrize("size", [(32, 32), (37, 45), (17, 17)])
def test_pyramid_equals_numpy_reference_and_reconstructs(size: tuple[int, int]) -> None:
    images = torch.rand(2, 3, *size, dtype=torch.float64)
    space = LaplacianPyramid(levels=5)
    bands = space.pyramid(images)
    for index in range(2):
        for ours, reference in zip(bands, numpy_pyramid(images[index].numpy(), 5), strict=True):
            np.testing.assert_allclose(ours[index].numpy(), reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(space.collapse(bands), images)  # collapsing the pyramid gives the image back


def test_pyramid_components_values_and_gradcheck() -> None:
    preds, target = torch.rand(2, 3, 24, 24, dtype=torch.float64), torch.rand(2, 3, 24, 24, dtype=torch.float64)
    parts = perception_mse_components(preds, target, space="pyramid", reduction="none")
    assert list(parts) == ["pixel", "band0", "band1", "band2", "band3", "lowpass"]
    reference = numpy_pyramid(preds[0].numpy(), 5), numpy_pyramid(target[0].numpy(), 5)
    for name, p, t in zip(list(parts)[1:], *reference, strict=True):
        assert parts[name][0].item() == pytest.approx(float(np.mean((p - t) ** 2)), rel=1e-12)
    split = LaplacianPyramid(levels=3, luma_chroma=True)
    assert split.component_names == ("pixel", "luma_band0", "luma_band1", "luma_lowpass", "chroma_band0",
                                     "chroma_band1", "chroma_lowpass")  # fmt: skip
    p = preds[:1, :, :9, :9].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: perception_mse(x, target[:1, :, :9, :9], space=split), (p,))


def test_pyramid_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"space 'pyramid' needs height and width \(5 levels\) of at least 17, got 16"):
        perception_mse(torch.rand(1, 3, 16, 40), torch.rand(1, 3, 16, 40), space="pyramid")
    with pytest.raises(ValueError, match=r"levels: expected an integer from 2 to 16 .*, got 1"):
        get_space("pyramid", levels=1)
    with pytest.raises(ValueError, match=r"luma_chroma=True needs RGB"):
        perception_mse(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32), space="pyramid", luma_chroma=True)


def test_whole_model_state_dict_files_load(tmp_path) -> None:
    full = torchvision.models.squeezenet1_1(weights=None)
    torch.save(full.state_dict(), tmp_path / "squeezenet.pth")
    loaded = load_backbone("squeezenet", tmp_path / "squeezenet.pth")
    assert torch.equal(loaded.features[12].expand3x3.weight, full.features[12].expand3x3.weight)


def test_random_weights_are_torchvisions_initialisation_seeded_and_reproducible() -> None:
    torch.manual_seed(3)
    before = torch.get_rng_state()
    a = load_backbone("squeezenet", "random")
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is untouched
    torch.manual_seed(0)
    b = torchvision.models.squeezenet1_1(weights=None)
    assert torch.equal(a.features[0].weight, b.features[0].weight)  # torchvision's own initialisation, seed 0
    preds, target = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    first, second = (PerceptionMSE("squeezenet", weights="random") for _ in range(2))
    first.update(preds, target)
    second.update(preds, target)
    assert torch.equal(first.compute(), second.compute())  # two metrics built alike agree


def test_a_space_built_or_moved_in_inference_mode_still_trains(backbone_weights: dict[str, str]) -> None:
    """Lightning validates (inference mode) before it trains: a space first used there must serve as a loss."""
    metric = PerceptionMSE("squeezenet", weights=backbone_weights["squeezenet"])
    with torch.inference_mode():
        metric.to("cpu")  # what the callback does at the start of each validation epoch
        perception_mse(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), space="alexnet", weights="random")
    preds = torch.rand(2, 3, 32, 32, requires_grad=True)
    for space in (metric.space, "alexnet"):
        options = {} if space is metric.space else {"weights": "random"}
        perception_mse(preds, torch.rand(2, 3, 32, 32), space=space, **options).backward()
    assert preds.grad is not None and preds.grad.abs().sum() > 0


CASTS = {
    "half": lambda m: m.half(),
    "bfloat16": lambda m: m.bfloat16(),
    "to(bfloat16)": lambda m: m.to(torch.bfloat16),
    "to(cpu, float16)": lambda m: m.to("cpu", torch.float16),
    "double": lambda m: m.double(),
    "float": lambda m: m.float(),
}


@pytest.mark.parametrize("cast", list(CASTS))
def test_casts_of_a_parent_leave_the_network_bit_identical(backbone_weights: dict[str, str], cast: str) -> None:
    holder = torch.nn.Module()
    holder.metric = PerceptionMSE("lpips-squeeze", weights=backbone_weights["squeezenet"], data_range=1.0)
    holder.space = get_space("squeezenet", weights=backbone_weights["squeezenet"])
    preds, target = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    before = {name: perception_mse(preds, target, space=space, data_range=1.0) for name, space in
              (("metric", holder.metric.space), ("space", holder.space))}  # fmt: skip
    weights = [t.clone() for t in (*holder.metric.space.tensors(), *holder.space.tensors())]
    CASTS[cast](holder)
    after = [*holder.metric.space.tensors(), *holder.space.tensors()]
    assert all(torch.equal(a, b) for a, b in zip(weights, after, strict=True))
    for name, space in (("metric", holder.metric.space), ("space", holder.space)):
        assert torch.equal(perception_mse(preds, target, space=space, data_range=1.0), before[name])
    holder.metric.update(preds.half(), target.half())
    assert torch.isfinite(holder.metric.compute())


def test_set_dtype_casts_a_space_on_purpose(backbone_weights: dict[str, str]) -> None:
    space = get_space("squeezenet", weights=backbone_weights["squeezenet"]).set_dtype(torch.float64)
    assert {t.dtype for t in space.tensors()} == {torch.float64}
    assert space.feature_dtype(torch.rand(1)) == torch.float64
    space.float()  # a parent's cast still does not undo it
    assert {t.dtype for t in space.tensors()} == {torch.float64}


def test_shared_modules_and_clashing_names_are_rejected() -> None:
    class Shared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.relu = torch.nn.Conv2d(3, 3, 1), torch.nn.ReLU()

        def forward(self, x):
            return self.conv(self.relu(self.relu(x) - 0.5))

    space = Backbone(Shared(), layers=["relu", "conv"], normalize="none")
    with pytest.raises(ValueError, match=r"layers: 'relu' \('relu'\) runs more than once per forward"):
        perception_mse(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4), space=space)
    with pytest.raises(ValueError, match=r"component names must be unique"):
        Backbone(Shared(), layers={"pixel": "conv"}, normalize="none")


@pytest.mark.parametrize(
    "layer_weights",
    [{"conv5_4": 1.0}, {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0}],
    ids=["ESRGAN", "Real-ESRGAN"],
)
def test_vgg19_reproduces_the_super_resolution_perceptual_losses(layer_weights, backbone_weights) -> None:
    """ESRGAN's and Real-ESRGAN's perceptual term as BasicSR defines it (torchvision VGG19 ``features``, ImageNet
    mean/std on [0, 1] inputs, conv outputs before their ReLU, MSE per layer over the batch, weighted sum), written
    out here from torchvision alone, equals the ``vgg19`` space with ``layers`` + ``component_weights`` +
    ``pixel_weight=0``: the metric over batches, and the loss."""
    model = torchvision.models.vgg19(weights=None).eval()
    model.load_state_dict(torch.load(backbone_weights["vgg19"]), strict=False)
    for module in model.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False  # the conv outputs must not be changed by the ReLU after them
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    layer_index = {"conv1_2": 2, "conv2_2": 7, "conv3_4": 16, "conv4_4": 25, "conv5_4": 34}  # BasicSR's vgg19 names

    def reference(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for name, weight in layer_weights.items():
                head = model.features[: layer_index[name] + 1]
                total += weight * torch.nn.functional.mse_loss(head((preds - mean) / std),
                                                               head((target - mean) / std)).double()  # fmt: skip
        return total

    options = {"weights": backbone_weights["vgg19"], "layers": list(layer_weights),
               "component_weights": layer_weights, "pixel_weight": 0.0}  # fmt: skip
    metric = PerceptionMSE("vgg19", data_range=1.0, **options).set_dtype(torch.float64)
    batches = [(torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)) for _ in range(2)]
    for preds, target in batches:
        metric.update(preds, target)
    whole = reference(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]))
    torch.testing.assert_close(metric.compute(), whole, rtol=2e-5, atol=0)
    preds, target = batches[0]
    loss = perception_mse(preds, target, space="vgg19", **options)
    torch.testing.assert_close(loss.double(), reference(preds, target), rtol=2e-5, atol=0)
