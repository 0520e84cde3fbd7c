"""What every weight-free space and the error profiles compute on fixed data, as exact bit patterns.

Run as a script (``python tests/kernel_bits.py``) it prints them as JSON, so that a test can compare runs that use
other CPU kernels: torch's scalar, AVX2 and AVX-512 code (``ATEN_CPU_CAPABILITY``) and MKL's code paths
(``MKL_CBWR``), the ways two machines' CPUs differ. :data:`FFT_RESULTS` and the tolerances are the README's claims
("What is the same where"); :class:`Float64FFT` plays a machine whose FFT rounds differently, on any CPU.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Results computed through torch's CPU FFT, which is MKL's: MKL takes other code paths on Intel (AVX-512) than on
# AMD (its generic one), so these are equal to float32 FFT rounding across CPU vendors, not the same bits.
FFT_RESULTS = frozenset(
    {"mel", "mel slaney", "mrstft", "audio-aspects"}
    | {f"{kind} profile {key}" for kind in ("image", "audio") for key in ("error", "target", "preds")}
)
# Integer inputs are summed in integer arithmetic: the same bits under every kernel.
EXACT_EVERYWHERE = frozenset({"pixel uint8"})
# The claimed agreement of the FFT results across CPUs, and of every float result under torch's scalar kernels (ARM,
# old x86), relative to each per-sample sum. Measured (tests/test_same_number.py): MKL's float32 FFT differs from a
# float64 FFT by at most 5.3e-7 of these sums, torch's scalar kernels from its AVX-512 ones by at most 2.7e-7.
ACROSS_CPUS_RTOL = 1e-5


class Float64FFT(TorchDispatchMode):
    """Every FFT computed in float64 and rounded to its own dtype: the results of a machine whose FFT rounds
    differently from this one's (nearly correctly rounded), on any CPU."""

    _FFTS = (torch.ops.aten._fft_r2c, torch.ops.aten._fft_c2c, torch.ops.aten._fft_c2r)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func.overloadpacket not in self._FFTS:
            return func(*args, **kwargs)
        out = kwargs.pop("out", None)
        signal = args[0]
        wide = signal.to(torch.complex128 if signal.is_complex() else torch.float64)
        result = func.overloadpacket.default(wide, *args[1:], **kwargs)
        real = signal.dtype.to_real() if signal.is_complex() else signal.dtype
        result = result.to(real if func.overloadpacket is torch.ops.aten._fft_c2r else real.to_complex())
        if out is None:
            return result
        return out.resize_(result.shape).copy_(result)


def bits(x: torch.Tensor) -> list[int]:
    """The exact bits of a float64 tensor, as integers (JSON keeps them exactly)."""
    return x.detach().double().flatten().contiguous().view(torch.int64).tolist()


def measurements(network: bool = False) -> dict[str, list[int]]:
    import torchaudio

    from pl_pmse import ErrorProfile
    from pl_pmse.functional import sample_stats
    from pl_pmse.spaces import get_space

    generator = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 48, 40, generator=generator)
    preds = (target + 0.1 * torch.randn(target.shape, generator=generator)).clamp(0, 1)
    time = torch.arange(8000) / 16000
    clean = torch.sin(2 * math.pi * 440 * time * (1 + time)).expand(3, -1) * torch.rand(3, 1, generator=generator)
    noisy = clean + 0.05 * torch.randn(clean.shape, generator=generator)
    images = (preds, target)
    cases = {
        "pixel": ("pixel", {}, images),
        "pixel float16": ("pixel", {}, (preds.half(), target.half())),
        "pixel uint8": ("pixel", {}, ((preds * 255).byte(), (target * 255).byte())),
        "pyramid": ("pyramid", {"levels": 4, "luma_chroma": True}, images),
        "aspects": ("aspects", {}, images),
        "waveform": ("waveform", {}, (noisy, clean)),
        "mel": ("mel", {"sample_rate": 16000, "n_fft": 512}, (noisy, clean)),
        "mel slaney": (
            "mel",
            {"sample_rate": 16000, "n_fft": 512, "norm": "slaney", "mel_scale": "slaney"},
            (noisy, clean),
        ),
        "mrstft": ("mrstft", {"fft_sizes": (128, 512)}, (noisy, clean)),
        "audio-aspects": ("audio-aspects", {"sample_rate": 16000, "n_fft": 512}, (noisy, clean)),
    }
    if network:
        cases["squeezenet"] = ("squeezenet", {"weights": "random"}, images)
    found = {}
    for name, (space, options, (p, t)) in cases.items():
        data_range = (0.0, 255.0) if p.dtype == torch.uint8 else None
        found[name] = bits(sample_stats(p, t, get_space(space, **options), data_range).sums)
    image_profile = ErrorProfile("image", 1.0, grid=8, bands=12)
    image_profile.update(*images)
    audio_profile = ErrorProfile("audio", sample_rate=16000, n_fft=256, n_mels=20)
    audio_profile.update(noisy, clean)
    for kind, profile in (("image", image_profile), ("audio", audio_profile)):
        for key, value in profile.compute().items():
            found[f"{kind} profile {key}"] = bits(value)
    for options in ({}, {"norm": "slaney", "mel_scale": "slaney"}):  # torchaudio's own filters, in these kernels
        ours = get_space("mel", sample_rate=16000, n_fft=512, **options).analysis.filters.fb
        theirs = torchaudio.functional.melscale_fbanks(257, 0.0, 8000.0, 80, 16000, **options)
        found[f"torchaudio filter bank {options} differs in"] = [int((ours != theirs).sum())]
    return found


if __name__ == "__main__":
    import sys

    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), **measurements("--network" in sys.argv)}))
