"""The registry of space names: ``register_space``, ``get_space``, ``available_spaces``.

The families (image, audio, backbones) register themselves when :mod:`pl_pmse.spaces` imports them; this module
imports only the Space protocol, so there is no import circle.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from .base import Space

_FACTORIES: dict[str, Callable[..., Space]] = {}
_MODULE_SPACE: list[Callable[..., Space]] = []  # what wraps a plain nn.Module (the Backbone, registered by its module)


def register_module_space(factory: Callable[..., Space]) -> Callable[..., Space]:
    """Register the space that wraps a plain ``nn.Module`` passed as ``space`` (:class:`Backbone` does this)."""
    _MODULE_SPACE[:] = [factory]
    return factory


def register_space(name: str, replace: bool = False) -> Callable[[Callable[..., Space]], Callable[..., Space]]:
    """Register a factory (a Space subclass or a function returning a Space) under ``name``.

    A name already registered (every built-in one included) is refused unless ``replace=True``: a registration
    changes what the name means for the whole process, so replacing one is said explicitly.

    Example:
        >>> @register_space("my-pixel")
        ... class MyPixel(Space):
        ...     name = "my-pixel"
        >>> get_space("my-pixel").component_names
        ('pixel',)
    """
    if not isinstance(name, str) or not name or not name.isprintable():
        raise ValueError(f"register_space: expected a non-empty printable name, got {name!r}")
    if not isinstance(replace, bool):  # register_space("x", Factory) would put the factory here and register nothing
        raise TypeError(
            f"register_space: replace expected True or False, got {replace!r}; register a factory with "
            f"register_space({name!r})(factory) or as a decorator, @register_space({name!r})"
        )
    if name in _FACTORIES and not replace:
        raise ValueError(
            f"register_space: {name!r} is registered already ({_FACTORIES[name].__module__}."
            f"{_FACTORIES[name].__qualname__}); pick another name, or pass replace=True to replace it for this process"
        )

    def decorator(factory: Callable[..., Space]) -> Callable[..., Space]:
        if not callable(factory):
            raise TypeError(f"register_space({name!r}): expected a Space subclass or a function, got {factory!r}")
        _FACTORIES[name] = factory
        return factory

    return decorator


def available_spaces() -> tuple[str, ...]:
    """The registered space names, sorted."""
    return tuple(sorted(_FACTORIES))


def get_space(space: str | nn.Module = "pixel", **options: object) -> Space:
    """Resolve ``space`` (a registered name, a :class:`Space`, or any ``nn.Module``) to a Space.

    ``options`` go to the space's constructor; an ``nn.Module`` becomes a
    :class:`~pl_pmse.spaces.backbones.Backbone` (pass ``layers=[...]``).
    """
    if isinstance(space, Space):
        if options:
            raise ValueError(f"space options {sorted(options)} only apply when space is given by name")
        return space
    if isinstance(space, nn.Module):
        return _MODULE_SPACE[0](space, **options)
    if not isinstance(space, str) or space not in _FACTORIES:
        raise ValueError(f"space: expected one of {list(available_spaces())}, a Space or an nn.Module, got {space!r}")
    factory = _FACTORIES[space]
    _check_options(space, factory, options)
    return factory(**options)


def space_options(name: str) -> tuple[str, ...]:
    """The keyword options a registered space accepts.

    Example:
        >>> space_options("pixel")
        ('component_weights',)
    """
    return tuple(p for p in inspect.signature(_FACTORIES[name]).parameters if p != "self")


def _check_options(name: str, factory: Callable[..., Space], options: Mapping[str, object]) -> None:
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        accepted = [p for p in parameters if p != "self"]
        raise TypeError(f"space {name!r}: unknown option(s) {unknown}; it accepts {accepted}")


def split_options(options: Mapping[str, object], names: Sequence[str]) -> tuple[dict, dict]:
    """Split keyword options into those named in ``names`` and the rest."""
    chosen = {k: v for k, v in options.items() if k in names}
    return chosen, {k: v for k, v in options.items() if k not in names}
