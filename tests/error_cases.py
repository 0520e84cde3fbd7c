"""The bad-input matrix as data: each case raises a clear error. ``python -m tests.error_cases`` writes docs/errors.md.

tests/test_error_docs.py checks that every case still raises what the document says, so the table stays true.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from pl_pmse import PerceptionMSE, get_space, perception_mse
from pl_pmse.spaces import register_space

TMP = Path(tempfile.gettempdir()) / "pl-pmse-error-cases"


def _image(n: int = 2, channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(n, channels, size, size)


def _with(x: torch.Tensor, value: float, index: tuple = (1, 0, 0, 0)) -> torch.Tensor:
    x = x.clone()
    x[index] = value
    return x


def _mcd_update(clips: torch.Tensor) -> None:
    from pl_pmse import MelCepstralDistortion

    MelCepstralDistortion(sample_rate=16000).update(clips, clips)


def _squeezenet() -> str:
    path = TMP / "squeezenet.pth"
    if not path.exists():
        from pl_pmse.spaces import load_backbone

        TMP.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(load_backbone("squeezenet", "random").state_dict(), path)
    return str(path)


def _garbage() -> Path:
    TMP.mkdir(parents=True, exist_ok=True)
    path = TMP / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    return path


def _negative_calibration() -> Path:
    import lpips

    state = torch.load(Path(lpips.__file__).parent / "weights/v0.1/alex.pth", map_location="cpu")
    state["lin2.model.1.weight"] = -state["lin2.model.1.weight"]
    path = TMP / "alex_negative.pth"
    torch.save(state, path)
    return path


def _callback_batch(outputs: object) -> None:
    """Feed ``outputs`` to a callback the way Lightning does after a validation step."""
    from types import SimpleNamespace

    from pl_pmse import PerceptionMSECallback

    callback = PerceptionMSECallback("pixel")
    callback._start(None, "validate", [], SimpleNamespace(device=torch.device("cpu")))
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, global_rank=0)
    callback._batch(trainer, "validate", outputs, None, 0, 0)


def _fidelity(**options: object) -> object:
    from pl_pmse import ImageFidelity

    return ImageFidelity(**options)


def _callback(**options: object) -> None:
    from pl_pmse import PerceptionMSECallback

    PerceptionMSECallback(**options)


def _callback_state(state: object) -> None:
    from pl_pmse import PerceptionMSECallback

    PerceptionMSECallback().load_state_dict(state)


def _register_sink(name: str) -> None:
    from pl_pmse.sinks import register_sink

    register_sink(name, lambda logger: None)


def _load(source: PerceptionMSE, into: PerceptionMSE) -> None:
    source.persistent(True)
    source.update(*(torch.rand(2, 3, 32, 32) if source.space.modality != "audio" else torch.rand(2, 4096) - 0.5,) * 2)
    into.load_state_dict(source.state_dict())


def _merge(first: PerceptionMSE, second: PerceptionMSE | None = None) -> None:
    first.merge_state(first if second is None else second)


def _update(space: str = "pixel", **options: object) -> Callable[[torch.Tensor, torch.Tensor], None]:
    metric = PerceptionMSE(space, **options)
    return metric.update


def _profile(modality: str, **options: object) -> object:
    from pl_pmse import ErrorProfile

    return ErrorProfile(modality, **options)


def _update_with_a_layer_that_never_runs() -> None:
    class Unused(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.unused = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.stem(x)

    PerceptionMSE(Unused(), layers=["stem", "unused"]).update(_image(), _image())


def _update_with_cuda_inputs() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    metric = PerceptionMSE()
    with FakeTensorMode(allow_non_fake_inputs=True):  # CUDA tensors without a GPU
        metric.update(torch.rand(2, 3, 8, 8, device="cuda"), torch.rand(2, 3, 8, 8, device="cuda"))


def _compute_after_unchecked_nan() -> object:
    metric = PerceptionMSE(validate_args=False)
    metric.update(_with(_image(), float("nan")), _image())  # found on the device, reported at compute
    return metric.compute()


# (where, what is wrong, the call)
CASES: list[tuple[str, str, Callable[[], object]]] = [
    ("metric.update", "preds is not a tensor", lambda: _update()([[0.0, 1.0]], _image())),
    ("metric.update", "target is not a tensor", lambda: _update()(_image(), 3.0)),
    ("metric.update", "shapes differ", lambda: _update()(_image(2), _image(3))),
    ("metric.update", "a 0-dim tensor", lambda: _update()(torch.tensor(1.0), torch.tensor(1.0))),
    ("metric.update", "bool tensors", lambda: _update()(_image() > 0.5, _image() > 0.5)),
    ("metric.update", "complex tensors", lambda: _update()(torch.ones(2, 3, dtype=torch.cfloat), torch.ones(2, 3, dtype=torch.cfloat))),
    ("metric.update", "uint8 without data_range", lambda: _update()(torch.ones(2, 3, dtype=torch.uint8), torch.ones(2, 3, dtype=torch.uint8))),
    ("metric.update", "NaN in preds", lambda: _update()(_with(_image(), float("nan")), _image())),
    ("metric.update", "Inf in target", lambda: _update()(_image(), _with(_image(), float("inf"), (0, 2, 7, 7)))),
    ("metric.update", "squared error overflows float32", lambda: _update()(_image() * 1e30, -_image() * 1e30)),
    ("metric.update", "squared error overflows float64", lambda: _update()(_image().double() * 1e200, -_image().double() * 1e200)),
    ("metric.update", "float preds, uint8 target", lambda: _update(data_range=1.0)(_image(), (_image() * 255).to(torch.uint8))),
    ("metric.update", "channels-last images into the pyramid", lambda: _update("pyramid")(_image().permute(0, 2, 3, 1), _image().permute(0, 2, 3, 1))),
    ("metric.update", "[N, T, C] audio into mel", lambda: _update("mel", sample_rate=16000)(torch.zeros(2, 4000, 2), torch.zeros(2, 4000, 2))),
    ("metric.update", "16-bit audio as floats into mel", lambda: _update("mel", sample_rate=16000)(torch.rand(2, 4000) * 30000, torch.rand(2, 4000) * 30000)),
    ("metric.update", "a mask of floats", lambda: PerceptionMSE().update(_image(), _image(), mask=torch.ones(2))),
    ("metric.update", "a mask of another length", lambda: PerceptionMSE().update(_image(), _image(), mask=torch.ones(3, dtype=torch.bool))),
    ("metric.update", "preds and target on different devices", lambda: _update()(_image(), _image().to("meta"))),
    ("metric.update", "samples with no element", lambda: _update()(torch.zeros(2, 0), torch.zeros(2, 0))),
    ("metric.update", "images into an audio space", lambda: _update("waveform")(_image(), _image())),
    ("metric.update", "2 channels into an RGB network", lambda: _update("squeezenet", weights=_squeezenet())(_image(channels=2), _image(channels=2))),
    ("metric.update", "images too small for the network", lambda: _update("alexnet", weights="random")(_image(size=16), _image(size=16))),
    ("metric.update", "0..255 floats with the default range", lambda: _update("squeezenet", weights=_squeezenet())(_image() * 255, _image() * 255)),
    ("metric.update", "images too small for the pyramid", lambda: _update("pyramid")(_image(size=16), _image(size=16))),
    ("metric.update", "audio too short for the mel analysis", lambda: _update("mel", sample_rate=16000)(torch.zeros(2, 300), torch.zeros(2, 300))),
    ("metric.compute", "NaN in preds with validate_args=False", _compute_after_unchecked_nan),
    ("perception_mse", "unknown reduction", lambda: perception_mse(_image(), _image(), reduction="avg")),
    ("PerceptionMSE", "unknown nan_strategy", lambda: PerceptionMSE(nan_strategy="skip")),
    ("PerceptionMSE", "negative data_range", lambda: PerceptionMSE(data_range=-1.0)),
    ("PerceptionMSE", "data_range (max, min)", lambda: PerceptionMSE(data_range=(1, 0))),
    ("PerceptionMSE", "accumulate of another metric's batch",
     lambda: PerceptionMSE().accumulate(PerceptionMSE(data_range=1.0).batch_stats(torch.rand(2, 4), torch.rand(2, 4)))),
    ("PerceptionMSE", "data_range as a string", lambda: PerceptionMSE(data_range="255")),
    ("PerceptionMSE", "unknown space name", lambda: PerceptionMSE("vgg91")),
    ("PerceptionMSE", "an option the space does not take", lambda: PerceptionMSE("pixel", layers=["a"])),
    ("PerceptionMSE", "a weight for an unknown component", lambda: PerceptionMSE(component_weights={"relu1_2": 1.0})),
    ("PerceptionMSE", "a negative component weight", lambda: PerceptionMSE(component_weights={"pixel": -1})),
    ("PerceptionMSE", "mel without sample_rate", lambda: PerceptionMSE("mel")),
    ("PerceptionMSE", "mel with no mel bands", lambda: PerceptionMSE("mel", sample_rate=16000, n_mels=0)),
    ("PerceptionMSE", "mel bands beyond the FFT's frequencies", lambda: PerceptionMSE("mel", sample_rate=16000, n_fft=64, n_mels=80)),
    ("PerceptionMSE", "an FFT of 4M points", lambda: PerceptionMSE("mel", sample_rate=16000, n_fft=2**22)),
    ("PerceptionMSE", "a pyramid of a million levels", lambda: PerceptionMSE("pyramid", levels=10**6)),
    ("PerceptionMSE", "hubert with a zero sample_rate", lambda: PerceptionMSE("hubert", sample_rate=0)),
    ("PerceptionMSE", "hubert base with layer 13", lambda: PerceptionMSE("hubert", sample_rate=16000, layers=[13])),
    ("PerceptionMSE", "wav2vec2 with the weights of another network", lambda: PerceptionMSE("wav2vec2", sample_rate=16000, weights=_squeezenet())),
    ("PerceptionMSE", "audio-aspects without sample_rate", lambda: PerceptionMSE("audio-aspects")),
    ("PerceptionMSE", "audio-aspects with more cepstra than mel bands", lambda: PerceptionMSE("audio-aspects", sample_rate=16000, n_mels=20, n_cepstra=24)),
    ("MelCepstralDistortion", "clips shorter than n_fft // 2 + 1", lambda: _mcd_update(torch.zeros(2, 100))),
    ("PerceptionMSE", "an lpips space without data_range", lambda: PerceptionMSE("lpips-squeeze", weights=_squeezenet())),
    ("metric.to", "the meta device", lambda: PerceptionMSE().to("meta")),
    ("metric.to", "an Apple MPS device (no float64)", lambda: PerceptionMSE().to("mps")),
    ("space.to", "an Apple MPS device (no float64)", lambda: get_space("pyramid").to(torch.device("mps"))),
    ("metric.update", "CUDA inputs to a metric on the CPU", lambda: _update_with_cuda_inputs()),
    ("metric.load_state_dict", "a pyramid state into a pixel metric", lambda: _load(PerceptionMSE("pyramid"), PerceptionMSE())),
    ("metric.load_state_dict", "a state of the same size from another space", lambda: _load(PerceptionMSE("pyramid", levels=3), PerceptionMSE("mrstft"))),
    ("metric.load_state_dict", "a saved configuration that is not a dict", lambda: PerceptionMSE().load_state_dict({"totals": PerceptionMSE().totals, "configuration": "garbage"})),
    ("PerceptionMSECallback.load_state_dict", "None for the callback's state", lambda: _callback_state(None)),
    ("metric.merge_state", "pixel with waveform", lambda: _merge(PerceptionMSE(), PerceptionMSE("waveform"))),
    ("metric.merge_state", "data_range 1 with 255", lambda: _merge(PerceptionMSE(data_range=1.0), PerceptionMSE(data_range=255))),
    ("metric.merge_state", "a metric with itself", lambda: _merge(PerceptionMSE())),
    ("get_space", "pyramid with 1 level", lambda: get_space("pyramid", levels=1)),
    ("get_space", "a weights file that does not exist", lambda: get_space("vgg16", weights="/nonexistent/vgg16.pth")),
    ("get_space", "a weights file that is not a checkpoint", lambda: get_space("vgg16", weights=_garbage())),
    ("get_space", "weights of another architecture", lambda: get_space("vgg16", weights=_squeezenet())),
    ("get_space", "a layer the network does not have", lambda: get_space("squeezenet", weights=_squeezenet(), layers=["conv9"])),
    ("get_space", "negative LPIPS calibration weights", lambda: get_space("lpips-alex", weights="random", calibration=_negative_calibration())),
    ("get_space", "mrstft with repeated FFT sizes", lambda: get_space("mrstft", fft_sizes=(512, 512))),
    ("PerceptionMSECallback", "validation_step returned nothing", lambda: _callback_batch(None)),
    ("PerceptionMSECallback", "validation_step returned other keys", lambda: _callback_batch({"y_hat": _image(), "y": _image()})),
    ("PerceptionMSECallback", "validation_step returned non-tensors", lambda: _callback_batch({"preds": [1.0], "target": [1.0]})),
    ("PerceptionMSECallback", "a negative worst_k", lambda: _callback(worst_k=-1)),
    ("PerceptionMSECallback", "extract is not a function", lambda: _callback(extract="preds")),
    ("PerceptionMSECallback", "an unknown modality", lambda: _callback(modality="video")),
    ("PerceptionMSECallback", "sinks that are not Sink objects", lambda: _callback(sinks=["wandb"])),
    ("register_sink", "a logger class name with a space", lambda: _register_sink("My Logger")),
    ("PerceptionMSECallback", "an infinite panel_timeout", lambda: _callback(panel_timeout=float("inf"))),
    ("PerceptionMSECallback", "panel_timeout as a string", lambda: _callback(panel_timeout="10")),
    ("PerceptionMSECallback", "a zero panel_timeout", lambda: _callback(panel_timeout=0)),
    ("PerceptionMSECallback", "a panel_timeout past the platform's timers", lambda: _callback(panel_timeout=1e10)),
    ("PerceptionMSECallback", "a prefix with a NUL", lambda: _callback(prefix="val\x00pmse")),
    ("PerceptionMSECallback", "a prefix with an empty part", lambda: _callback(prefix="val//pmse")),
    ("PerceptionMSECallback", "a prefix ending in '/'", lambda: _callback(prefix="val/pmse/")),
    ("PerceptionMSECallback", "panels as a string", lambda: _callback(panels="yes")),
    ("PerceptionMSECallback", "worst_k as a string", lambda: _callback(worst_k="4")),
    ("PerceptionMSECallback", "a worst_k of 10**8 (the scores gathered would take 1.6 GB)", lambda: _callback(worst_k=10**8)),
    ("PerceptionMSECallback", "a zero panels_every_n_epochs", lambda: _callback(panels_every_n_epochs=0)),
    ("PerceptionMSECallback", "an error map grid of 10000", lambda: _callback(error_map_grid=10000)),
    ("PerceptionMSECallback", "a space option the space does not take", lambda: _callback(space_options={"layers": ["a"]})),
    ("ErrorProfile", "a grid of 10000 (57.6 GB of state)", lambda: _profile("image", grid=10000)),
    ("ErrorProfile", "a negative n_fft", lambda: _profile("audio", sample_rate=16000, n_fft=-4)),
    ("ErrorProfile", "n_fft=0", lambda: _profile("audio", sample_rate=16000, n_fft=0)),
    ("ErrorProfile", "an option of another modality", lambda: _profile("audio", sample_rate=16000, grid=8)),
    ("ImageFidelity", "images smaller than the SSIM window", lambda: _fidelity().update(_image(size=5), _image(size=5))),
    ("ImageFidelity", "images too small for sharpness", lambda: _fidelity(ssim=False).update(_image(size=7), _image(size=7))),
    ("ImageFidelity", "SSIM without data_range", lambda: _fidelity(data_range=None)),
    ("ImageFidelity", "a sharpness cutoff above Nyquist", lambda: _fidelity(cutoff=0.7)),
    ("ImageFidelity", "audio instead of images", lambda: _fidelity().update(torch.zeros(2, 400), torch.zeros(2, 400))),
    ("PerceptionMSECallback", "ssim as a string", lambda: _callback(ssim="on")),
    ("metric.update", "gray images into aspects", lambda: _update("aspects")(_image(channels=1), _image(channels=1))),
    ("register_space", "a built-in name", lambda: register_space("pixel")),
    ("register_space", "the factory where replace goes", lambda: register_space("mine", PerceptionMSE)),
    ("register_space", "replace as a string", lambda: register_space("pixel", replace="no")),
    ("register_sink", "the name of a built-in sink", lambda: _register_sink("WandbLogger")),
    ("get_space", "an LPIPS calibration file that does not exist", lambda: get_space("lpips-alex", weights="random", calibration="/nonexistent/bad.pth")),
    ("metric.update", "a hooked layer that never runs", _update_with_a_layer_that_never_runs),
]  # fmt: skip

DISTRIBUTED = (
    "DDP (any compute)",
    "ranks built different metrics",
    "RuntimeError",
    "PerceptionMSE: the configuration differs between processes (hop_length is 256 (rank 0), 64 (rank 1)); every "
    "rank must build the same PerceptionMSE",
)


def outcome(call: Callable[[], object]) -> tuple[str, str]:
    """The error type and message a call raises (temporary paths shown as <tmp>)."""
    torch.manual_seed(0)
    try:
        call()
    except (TypeError, ValueError, RuntimeError) as error:
        return type(error).__name__, str(error).replace(str(TMP), "<tmp>")
    raise AssertionError("no error raised")


def table() -> str:
    rows = [(where, what, *outcome(call)) for where, what, call in CASES] + [DISTRIBUTED]
    lines = [
        "# Errors and the messages users see",
        "",
        "Every rejected call raises before any state changes: the metric's state and update count stay as they",
        "were (tests/test_checks.py and tests/test_error_docs.py check both). Generated by",
        "`python -m tests.error_cases`; the test suite fails when a message here is out of date.",
        "",
        "| where | what is wrong | error | message |",
        "|---|---|---|---|",
    ]
    for where, what, kind, message in rows:
        escaped = message.replace("|", r"\|")
        lines.append(f"| `{where}` | {what} | `{kind}` | {escaped} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    (Path(__file__).resolve().parents[1] / "docs" / "errors.md").write_text(table())
