"""Segmentation backbones behind one interface (:class:`Backbone`) and a name registry.

Backbone modules decorate their class with :func:`register_backbone`; importing this package
imports the built-in ones so they are available to :func:`build_backbone`.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import ModelError
from .base import Backbone

BACKBONES: dict[str, type[Backbone]] = {}
_FIXED_ARGS = ("self", "num_classes", "use_retrieval")


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: make ``cls`` buildable by :func:`build_backbone` under ``cls.name``.

    Returns:
        ``cls`` itself (registering the same class twice is harmless).

    Raises:
        TypeError: ``cls`` is not a :class:`Backbone` subclass.
        ValueError: another class is registered under the same name.
    """
    if not (isinstance(cls, type) and issubclass(cls, Backbone)):
        raise TypeError(f"{cls!r} is not a Backbone subclass")
    if BACKBONES.get(cls.name, cls) is not cls:
        raise ValueError(f"A different backbone is already registered as '{cls.name}'")
    BACKBONES[cls.name] = cls
    return cls


def backbone_class(name: str) -> type[Backbone]:
    """The backbone class registered as ``name``; :class:`ModelError` for an unknown name.

    ``name`` is matched in lower case.
    """
    cls = BACKBONES.get(str(name).lower())
    if cls is None:
        raise ModelError(f"Unknown backbone '{name}'; available: {', '.join(sorted(BACKBONES))}")
    return cls


def check_backbone_options(name: str, options: Any) -> type[Backbone]:
    """Refuse an unknown backbone, option names it does not take (listing the valid ones) and
    option values out of range (:meth:`Backbone.check_options`); builds nothing.

    Args:
        name: registered backbone name (case-insensitive).
        options: the backbone's keyword options (without ``num_classes`` and
            ``use_retrieval``); missing ones take the constructor's defaults for the check.

    Returns:
        The backbone class.

    Raises:
        ModelError: an unknown backbone, ``options`` not a dict, an unknown option name or
            a value out of range.
    """
    cls = backbone_class(name)
    if not isinstance(options, dict):
        raise ModelError(f"backbone_options must be a JSON object, got {type(options).__name__}")
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed = [n for n, p in params.items() if n not in _FIXED_ARGS and p.kind in
                   (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ModelError(
                f"Unknown option(s) {', '.join(unknown)} for backbone '{cls.name}'; "
                f"valid options: {', '.join(allowed) or 'none'}"
            )
    bound = inspect.signature(cls.__init__).bind_partial(**options)
    bound.apply_defaults()
    cls.check_options({k: v for k, v in bound.arguments.items() if k not in _FIXED_ARGS})
    return cls


def build_backbone(name: str, num_classes: int, use_retrieval: bool, **options: Any) -> Backbone:
    """Build the backbone registered as ``name``; ``build_backbone(**model.config())`` rebuilds it.

    Raises :class:`ModelError` for an unknown name or option, or an invalid option value.

    Args:
        name: registered backbone name (case-insensitive).
        num_classes: classes including background, 2..256.
        use_retrieval: True: the backbone takes the guide image and mask too (stacked onto
            the query, or as prompts for SAM); False: the query alone.
        **options: the backbone's keyword options.

    Returns:
        The new backbone (weights random or pretrained, as the options say).
    """
    cls = check_backbone_options(name, options)
    return cls(num_classes, use_retrieval, **options)


def accepts_pretrained(name: str) -> bool:
    """Whether the backbone registered as ``name`` takes a ``pretrained`` option (weights)."""
    cls = BACKBONES.get(str(name).lower())
    return cls is not None and "pretrained" in inspect.signature(cls.__init__).parameters


# Built-in backbones register themselves on import (they need the names defined above).
from .litemedsam import LiteMedSAMBackbone  # noqa: E402
from .sam import SAM  # noqa: E402
from .segformer import SegFormer  # noqa: E402
from .transunet import TransUNet  # noqa: E402
from .unet import UNet  # noqa: E402

__all__ = ["BACKBONES", "SAM", "Backbone", "LiteMedSAMBackbone", "SegFormer", "TransUNet", "UNet",
           "accepts_pretrained", "backbone_class", "build_backbone", "check_backbone_options",
           "register_backbone"]
