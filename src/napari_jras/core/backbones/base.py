"""The interface every segmentation backbone implements (U-Net, TransUNet, SegFormer, SAM).

A backbone maps a query image, optionally with a retrieved guide image and soft one-hot guide
mask, to per-class logits at the input size. With ``use_retrieval=True`` its input is the channel
concatenation ``[query, guide image, guide mask]`` (``2 + num_classes`` channels); the baseline
(``use_retrieval=False``) sees the query channel only and ignores any guides it is given, so the
same calling code serves both modes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ranges
from ..errors import ModelError

MAX_CLASSES = 256  # labels are stored as 8-bit values


class Backbone(nn.Module):
    """Base class of the segmentation backbones.

    Subclasses set ``name`` (the registry key) and ``size_multiple`` (the network's total
    stride, which may depend on the options), pass their keyword options to
    ``super().__init__`` so :meth:`config` can rebuild them, and implement :meth:`segment`.
    Subclasses that need the guides separately (e.g. as a prompt) override :meth:`forward`
    instead.

    Args:
        num_classes: classes including background, 2..256.
        use_retrieval: whether the input carries the guide image and mask.
        **options: the subclass's keyword options, recorded for :meth:`config`.

    Raises:
        ModelError: ``num_classes`` is not a whole number in 2..256.
    """

    name: ClassVar[str]
    size_multiple: int = 1

    def __init__(self, num_classes: int, use_retrieval: bool, **options: Any) -> None:
        super().__init__()
        if (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                or not 2 <= num_classes <= MAX_CLASSES):
            raise ModelError(
                f"num_classes must be an integer >= 2 (background + at least one class) and "
                f"<= {MAX_CLASSES}, got {num_classes!r}"
            )
        self.num_classes = num_classes
        self.use_retrieval = bool(use_retrieval)
        self._options = dict(options)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Refuse option values out of range (``options``: every keyword option, defaults filled).

        Runs before anything is built: from :class:`ModelConfig` and from the constructor.

        Raises:
            ModelError: a value out of range (nothing to check in this base class).
        """

    @classmethod
    def task_options(cls, size: int, options: dict[str, Any]) -> dict[str, Any]:
        """Defaults that follow the model's working ``size``, for options ``options`` leaves unset.

        Empty here; e.g. SAM's encoder input side follows ``size`` instead of the 1024 of the
        published model.

        Args:
            size: the model's working image side in pixels.
            options: the options the user gave.

        Returns:
            Option defaults to use; options given in ``options`` override them.
        """
        return {}

    @property
    def in_channels(self) -> int:
        """Input channels: query + guide image + one guide-mask channel per class, or query only."""
        return 2 + self.num_classes if self.use_retrieval else 1

    def config(self) -> dict[str, Any]:
        """JSON-serialisable options that rebuild this backbone with ``build_backbone(**config)``."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "use_retrieval": self.use_retrieval,
            **self._options,
        }

    def stack_inputs(self, query: Tensor, guide_image: Tensor | None = None,
                     guide_mask: Tensor | None = None) -> Tensor:
        """Validate the inputs and concatenate them to ``(B, in_channels, H, W)``.

        Without retrieval the guides are ignored and the query is returned as is.

        Args:
            query: (B, 1, H, W) float tensor.
            guide_image: (B, 1, H, W) float tensor (required with retrieval).
            guide_mask: (B, num_classes, H, W) float tensor (required with retrieval).

        Returns:
            (B, in_channels, H, W) in ``query``'s dtype.

        Raises:
            ModelError: a missing guide with retrieval, or an input that is not a 4-D
                floating-point tensor of the expected channels, batch size and H, W.
        """
        _check_tensor(query, "query", 1)
        if not self.use_retrieval:
            return query
        if guide_image is None or guide_mask is None:
            missing = " and ".join(n for n, t in (("guide image", guide_image),
                                                   ("guide mask", guide_mask)) if t is None)
            raise ModelError(f"This model uses retrieval but no {missing} was given")
        _check_tensor(guide_image, "guide image", 1)
        _check_tensor(guide_mask, "guide mask", None)
        if guide_mask.shape[1] != self.num_classes:
            raise ModelError(
                f"guide mask has {guide_mask.shape[1]} channels but the model has "
                f"{self.num_classes} classes"
            )
        for label, t in (("guide image", guide_image), ("guide mask", guide_mask)):
            if t.shape[0] != query.shape[0] or t.shape[2:] != query.shape[2:]:
                raise ModelError(
                    f"{label} has batch/size {(t.shape[0], *t.shape[2:])} but the query has "
                    f"{(query.shape[0], *query.shape[2:])}; resize exemplars to the query size"
                )
        return torch.cat([query, guide_image.to(query.dtype), guide_mask.to(query.dtype)], dim=1)

    def forward(self, query: Tensor, guide_image: Tensor | None = None,
                guide_mask: Tensor | None = None) -> Tensor:
        """Logits ``(B, num_classes, H, W)`` for a query ``(B, 1, H, W)`` in [0, 1].

        Any H, W works: the input is zero-padded to a multiple of ``size_multiple`` and the
        logits are cropped back. This is the contract of every backbone's ``forward``.

        Args:
            query: the query images ``(B, 1, H, W)``, floating point in [0, 1].
            guide_image: the retrieved guide image ``(B, 1, H, W)``; required with retrieval,
                ignored without.
            guide_mask: the soft one-hot guide mask ``(B, num_classes, H, W)`` (each pixel's
                class weights); required with retrieval, ignored without.

        Returns:
            Unnormalised class logits ``(B, num_classes, H, W)`` (softmax over dim 1).

        Raises:
            ModelError: the inputs fail :meth:`stack_inputs`.
        """
        x = self.stack_inputs(query, guide_image, guide_mask)
        height, width = x.shape[-2:]
        m = self.size_multiple
        pad_h, pad_w = (-height) % m, (-width) % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.segment(x)[..., :height, :width]

    def segment(self, x: Tensor) -> Tensor:
        """Logits for stacked inputs ``(B, in_channels, H, W)`` with H, W multiples of the stride.

        Args:
            x: the output of :meth:`stack_inputs`, zero-padded to multiples of
                ``size_multiple``.

        Returns:
            Logits ``(B, num_classes, H, W)`` at the padded size.
        """
        raise NotImplementedError


def _check_tensor(t: Tensor, label: str, channels: int | None) -> None:
    if not isinstance(t, Tensor):
        raise ModelError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 4:
        raise ModelError(f"{label} must have shape (B, C, H, W), got {tuple(t.shape)}")
    if channels is not None and t.shape[1] != channels:
        raise ModelError(f"{label} must have {channels} channel, got {t.shape[1]} ({tuple(t.shape)})")
    if not t.is_floating_point():
        raise ModelError(f"{label} must be a floating-point tensor, got {t.dtype}")


def check_int(value: Any, option: str, minimum: int = 1, maximum: int = 4096) -> int:
    """Return ``value`` if it is an integer in ``[minimum, maximum]``; else :class:`ModelError`.

    ``option`` names the option in the message; a bool is not an integer here.

    Args:
        value: the option's value as given.
        option: the option's name (the message says ``option '<option>'``).
        minimum: the smallest allowed value (inclusive).
        maximum: the largest allowed value (inclusive).

    Returns:
        ``value`` unchanged.

    Raises:
        ModelError: ``value`` is not an int (or is a bool) or lies outside the range.
    """
    return ranges.check_int(value, f"option '{option}'", minimum, maximum)


def check_fraction(value: Any, option: str) -> float:
    """Return ``value`` as a float if it lies in [0, 1), else raise :class:`ModelError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ModelError(f"option '{option}' must be a number in [0, 1), got {value!r}")
    return float(value)


def check_choice(value: Any, option: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise :class:`ModelError`.

    Args:
        value: the option's value as given.
        option: the option's name, for the message.
        choices: the allowed values.

    Returns:
        ``value`` unchanged.

    Raises:
        ModelError: ``value`` is not one of ``choices``.
    """
    if value not in choices:
        raise ModelError(f"option '{option}' must be one of {', '.join(choices)}; got {value!r}")
    return value
