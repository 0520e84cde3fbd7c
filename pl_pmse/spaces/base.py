"""The Space protocol (the registry of space names is in :mod:`pl_pmse.spaces.registry`).

A space maps a batch to named components. The raw component (``"pixel"`` or ``"waveform"``) is the input
itself; derived components (network layers, pyramid bands, spectrograms) come from ``features``, run ONCE on
``cat([preds, target])`` (on the difference for a linear space; per side when only one side needs a graph).
Perception MSE is ``sum_c weight_c * MSE_c`` over the components.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import checks


class Space(nn.Module):
    """Base class of perception spaces.

    Subclasses set the class attributes below, pass the default weights of their derived components to
    ``__init__`` and implement :meth:`features`. A space is a measuring instrument:

    - its network (:meth:`networks`) is frozen, always in eval mode and held outside the module tree, so it is in
      no ``state_dict``, ``parameters()`` or ``named_modules()`` of a model that holds the space (Lightning's
      "modules in eval mode" check does not see it); the space's own ``train()``/``eval()`` flag changes nothing;
    - it follows its parents' device moves but not their dtype casts (``.half()``, ``.to(torch.bfloat16)``,
      Lightning's ``16-true``/``bf16-true``): its values stay bit-identical. :meth:`set_dtype` casts on purpose.

    Args:
        feature_weights: default weight of each derived component, in order.
        raw_weight: default weight of the raw component.
        component_weights: user overrides, ``{component name: weight >= 0}``; a weight of 0 keeps the
            component in the breakdown but out of the total.

    Example:
        >>> class Gradient(Space):
        ...     name = "gradient"
        ...     def __init__(self):
        ...         super().__init__({"dx": 1.0})
        ...     def features(self, x):
        ...         return {"dx": x.diff(dim=-1)}
        >>> Gradient().component_names
        ('pixel', 'dx')
    """

    name: str = "custom"
    raw_name: str = "pixel"
    modality: str | None = None  # "image", "audio", or None (any data): chooses the callback's panel set
    expected_range: tuple[float, float] = (0.0, 1.0)
    layout: str = "a batch [N, ...]"
    allowed_ndim: tuple[int, ...] | None = None
    # where two input conventions are common (LPIPS: [0, 1] and [-1, 1]), why data_range must be stated and how
    data_range_advice: str | None = None
    range_hint: str = "e.g. data_range=255 for 8-bit images or data_range=(-1, 1)"  # for data outside the range
    linear: bool = False  # features(a) - features(b) == features(a - b): measured on the difference, in one pass
    # features made by elementwise float arithmetic only (the same bits on every device and in any batch): summed
    # in exact integers on accelerators (see pl_pmse.reduction); networks and FFTs are equal to rounding there
    exact_features: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every subclass constructor records its arguments (see :meth:`configuration`)."""
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording_options(cls.__dict__["__init__"])  # type: ignore[method-assign]

    def __init__(
        self,
        feature_weights: Mapping[str, float] | None = None,
        raw_weight: float = 1.0,
        component_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        checks.check_component_names([self.raw_name, *(feature_weights or {})])
        defaults = {self.raw_name: raw_weight, **(feature_weights or {})}
        self.component_weights: dict[str, float] = checks.check_weights(component_weights, defaults)

    @property
    def sample_rate(self) -> int | None:
        """The audio's sample rate in Hz where the space knows it (``mel``), else None."""
        return None

    def profile_options(self) -> dict[str, Any]:
        """Options of the callback's :class:`~pl_pmse.profile.ErrorProfile` that follow the space (``mel``: its
        mel analysis, so that the mel-band profile shows the bands the space measures), else ``{}``."""
        return {}

    def configuration(self) -> dict[str, str]:
        """Every setting that decides what the space measures, as text: its class, the arguments it was built
        with, its component weights and a checksum of its tensors (network weights, filter banks).

        Compared across processes before the first sync and with saved or merged metric states.

        Example:
            >>> from pl_pmse.spaces import get_space
            >>> get_space("mel", sample_rate=16000, hop_length=64).configuration()["hop_length"]
            '64'
        """
        options = {**self.__dict__.get("_options", {}), **self.resolved_options()}
        tensors = self.tensors()
        checksum = self._tensors_checksum(tensors)
        return {
            "space": f"{self.name} ({type(self).__qualname__})",
            **{key: _as_text(value) for key, value in options.items()},
            "component_weights": repr(self.component_weights),
            "tensors": f"{len(tensors)} tensors, {sum(t.numel() for t in tensors)} values, crc32 {checksum:08x}",
        }

    def _tensors_checksum(self, tensors: list[Tensor]) -> int:
        """crc32 of the tensors' exact bytes, on the CPU (the same on every device and in every process); computed
        once per state of the weights: kept with the tensors it was computed from and their version counters (which
        every in-place change, ``load_state_dict`` included, advances), so building a second metric on this space,
        or checking it again, hashes nothing (a wav2vec2 large took 1.4 s each time)."""
        try:  # a tensor's storage and version: a cast or a move (``.data`` swapped) changes the first
            states = [(t._version, t.dtype, t.shape, t.device, t.data_ptr()) for t in tensors]
        except RuntimeError:  # an inference tensor keeps no version counter: hashed every time
            states = None
        cached = self.__dict__.get("_checksum_of")
        same = cached is not None and states is not None and cached[1] == states
        if same and all(a is b for a, b in zip(cached[0], tensors, strict=True)):
            return cached[2]
        checksum = 0
        for tensor in tensors:
            checksum = zlib.crc32(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes(), checksum)
        self.__dict__["_checksum_of"] = (list(tensors), states, checksum) if states is not None else None
        return checksum

    def resolved_options(self) -> dict[str, Any]:
        """Options whose given value stands for another (``hop_length=None`` for ``n_fft // 4``): their values in
        use, so that spaces built alike compare equal in :meth:`configuration`."""
        return {}

    @property
    def component_names(self) -> tuple[str, ...]:
        """All component names, the raw component first."""
        return tuple(self.component_weights)

    def networks(self) -> tuple[nn.Module, ...]:
        """The frozen networks held outside the module tree (a :class:`Backbone`'s); none here."""
        return ()

    def tensors(self) -> list[Tensor]:
        """Every parameter and buffer the space measures with, its networks' first."""
        modules = (*self.networks(), self)
        return [tensor for module in modules for tensor in (*module.parameters(), *module.buffers())]

    def set_dtype(self, dtype: torch.dtype) -> Space:
        """Cast the floating-point tensors (networks included) to ``dtype``: the one way to change a space's
        precision, as ``Metric.set_dtype`` is torchmetrics' for metric states."""
        cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
        with torch.inference_mode(False):
            for module in (self, *self.networks()):
                nn.Module._apply(module, cast)
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> Space:
        """Device moves reach the space and its networks; dtype casts from a parent do not (see the class doc).

        ``fn`` is tried on a probe of the space's dtype and device: when it changes the dtype, only the device move
        it makes is applied. The meta device is refused (a measuring instrument needs its values)."""
        floats = [t for t in self.tensors() if t.is_floating_point()]
        dtype, device = (floats[0].dtype, floats[0].device) if floats else (torch.float32, torch.device("cpu"))
        probe = fn(torch.zeros((), dtype=dtype, device=device))
        checks.check_measuring_device(probe.device, f"space {self.name!r}.to")
        if probe.dtype != dtype:
            fn = lambda t: t.to(probe.device)  # noqa: E731
        with torch.inference_mode(False):  # moved inside validation, the weights stay normal tensors (loss use)
            super()._apply(fn, recurse)
            for network in self.networks():
                network._apply(fn)
        return self

    def to(self, *args: Any, **kwargs: Any) -> Space:
        """``nn.Module.to``; a device that cannot hold a measurement (meta, MPS) is refused before anything moves."""
        checks.check_move(f"space {self.name!r}.to", *args, **kwargs)
        return super().to(*args, **kwargs)

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """Derived components of a batch ``x`` already mapped to ``expected_range``: ``{name: [N, ...]}``."""
        return {}

    def views(self, x: Tensor) -> dict[str, Tensor]:
        """What the space sees in each sample, for the callback's panels (the audio set's ``panels/{set}_views``):
        ``{title: [N, rows, frames]}`` (drawn as a map, lowest row at the bottom) or ``[N, frames]`` (a curve) over
        the sample's duration; none here."""
        return {}

    def check_input(self, x: Tensor) -> None:
        """Space-specific shape checks on ``preds`` (which has the same shape as ``target``)."""
        if self.allowed_ndim is not None:
            checks.check_ndim(x, self.allowed_ndim, self.layout, self.name)
        if len(self.component_weights) > 1:
            checks.check_device(x, self.tensors(), self.name)

    def layout_hint(self, x: Tensor) -> str:
        """A hint added to a shape error when ``x`` looks laid out another way (channels last), else ``""``."""
        return ""

    def feature_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype features are computed in: the network's, else the input's (at least float32)."""
        for tensor in self.tensors():
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32

    def to_expected_range(self, x: Tensor, data_range: tuple[float, float] | None) -> Tensor:
        """Cast to the feature dtype and map ``data_range`` linearly onto ``expected_range``."""
        x = x.to(self.feature_dtype(x))
        if data_range is None or data_range == self.expected_range:
            return x
        (low, high), (to_low, to_high) = data_range, self.expected_range
        return (x - low) * ((to_high - to_low) / (high - low)) + to_low

    def pairs(
        self,
        preds: Tensor,
        target: Tensor,
        data_range: tuple[float, float] | None = None,
        validate_args: bool = True,
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        """``{component: (preds_component, target_component)}``; ``(difference, None)`` for a :attr:`linear` space.

        Features are computed in the cheapest way that gives the same numbers (to rounding): a linear space
        transforms the difference once; a side that autograd does not need (a target without grad, in a training
        loss) is computed without a graph; otherwise ONE batched call of :meth:`features` on ``cat([preds, target])``.
        ``validate_args`` checks the value range (a host synchronisation).
        """
        out: dict[str, tuple[Tensor, Tensor | None]] = {self.raw_name: (preds, target)}
        if len(self.component_weights) == 1:
            return out
        mapped = [self.to_expected_range(x, data_range) for x in (preds, target)]
        if validate_args:
            overshoot = checks.check_value_range(*mapped, self.expected_range, self.name, data_range, self.range_hint)
            if overshoot is not None and not getattr(self, "_overshoot_warned", False):
                self._overshoot_warned = True  # once per space: a fit's every batch may overshoot
                warnings.warn(
                    f"preds: space {self.name!r}: {overshoot.describe(self.expected_range)} (this warning is shown "
                    f"once per space)",
                    UserWarning,
                    stacklevel=2,
                )
        if self.linear:
            return {**out, **{name: (value, None) for name, value in self.features(mapped[0] - mapped[1]).items()}}
        graph = [torch.is_grad_enabled() and x.requires_grad for x in mapped]
        if graph[0] != graph[1]:  # a training loss: the side autograd does not need runs without a graph, first
            tracked = graph.index(True)  # (so that backward follows the tracked side's forward)
            with torch.no_grad():
                constant = self.features(mapped[1 - tracked])
            features = self.features(mapped[tracked])
            sides = (features, constant) if tracked == 0 else (constant, features)
            return {**out, **{name: (sides[0][name], sides[1][name]) for name in features}}
        n = preds.shape[0]
        both = self.features(torch.cat(mapped))
        return {**out, **{name: (value[:n], value[n:]) for name, value in both.items()}}

    def extra_repr(self) -> str:
        return f"component_weights={self.component_weights}"


def _recording_options(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a constructor so that the outermost one (the built class's) records its bound arguments."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def recording(self: Space, *args: Any, **kwargs: Any) -> None:
        if "_options" not in self.__dict__:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            options = {k: v for k, v in bound.arguments.items() if k != "self"}
            for name, parameter in signature.parameters.items():
                if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                    options.update(options.pop(name))
            object.__setattr__(self, "_options", options)  # before nn.Module.__init__: a plain attribute
        init(self, *args, **kwargs)

    return recording


def _as_text(value: Any) -> str:
    """An option as text; modules and tensors are named only (their values are in the tensor checksum)."""
    if isinstance(value, (nn.Module, Tensor)):
        return f"<{type(value).__name__}>"
    if isinstance(value, Mapping) and any(isinstance(v, (nn.Module, Tensor)) for v in value.values()):
        return f"<{type(value).__name__} of {len(value)} tensors>"
    if isinstance(value, list):  # a list and a tuple of the same values are the same option
        value = tuple(value)
    return repr(value)
