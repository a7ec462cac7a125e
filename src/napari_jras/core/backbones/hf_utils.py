"""Pieces shared by the ``transformers`` backbones (SegFormer, SAM).

- :func:`load_pretrained`: weights from a local folder or a hub id, with a one-line
  :class:`ModelError` that says how to get them when they cannot be loaded (offline, bad path).
- :func:`architecture_record`: the model's ``transformers`` config as a JSON-safe dict, stored
  in the backbone options as ``hf_config`` so that a saved run rebuilds its architecture without
  the pretrained folder or the hub (the weights then come from the run's safetensors).
- :func:`grey_adapter`: a 1x1 convolution from the fused grey channels to the 3 ImageNet-normalised
  channels a pretrained RGB stem expects.

``transformers`` itself is imported by the backbone constructors, never at module import, so
importing napari-jras (and starting napari) does not pay for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: initial weight of the guide image relative to the query's where a pretrained filter is shared
GUIDE_IMAGE_SCALE = 0.1
#: initial scale of input channels a pretrained stem never saw (guide masks)
NEW_CHANNEL_SCALE = 0.01
#: keys of a ``transformers`` config that do not describe the architecture
_VOLATILE_KEYS = ("transformers_version", "architectures", "_name_or_path", "id2label",
                  "label2id", "dtype", "torch_dtype")
HOW_TO_GET_WEIGHTS = (
    "Download them on a machine with internet access with `hf download ID --local-dir DIR` "
    "(`huggingface-cli download ID --local-dir DIR` with older huggingface_hub) and give DIR, "
    "or give a folder written by `save_pretrained`.")


def load_pretrained(model_cls: Any, source: str, **kwargs: Any) -> Any:
    """``model_cls.from_pretrained(source, **kwargs)`` with a clear :class:`ModelError`.

    ``source`` is a local folder (a path starting with ``/``, ``.`` or ``~`` must exist) or a hub
    id, which works offline only when it is already in the local hub cache.

    Args:
        model_cls: a ``transformers`` model class.
        source: the folder or hub id.
        **kwargs: passed on to ``from_pretrained``.

    Returns:
        The loaded model.

    Raises:
        ModelError: ``source`` is empty or not text, the folder is missing, or loading fails
            (offline, not a ``transformers`` model); the message says how to get the weights.
    """
    if not isinstance(source, str) or not source:
        raise ModelError(f"option 'pretrained' must be a folder or hub id, got {source!r}")
    path = Path(source).expanduser()
    if source.startswith(("/", ".", "~")) and not path.is_dir():
        raise ModelError(f"The pretrained weights folder '{source}' was not found. "
                         f"{HOW_TO_GET_WEIGHTS}")
    try:
        return model_cls.from_pretrained(str(path) if path.is_dir() else source, **kwargs)
    except (OSError, ValueError) as exc:  # ValueError: a folder that is no transformers model
        reason = " ".join(str(exc).split())
        raise ModelError(f"Could not load the pretrained weights '{source}': {reason} "
                         f"{HOW_TO_GET_WEIGHTS}") from exc


def architecture_record(config: Any) -> dict[str, Any]:
    """The JSON-safe dict of a ``transformers`` config that rebuilds the same architecture."""
    record = json.loads(config.to_json_string(use_diff=True))
    return _strip(record)


def _strip(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        if key in _VOLATILE_KEYS:
            continue
        out[key] = _strip(value) if isinstance(value, dict) else value
    return out


def check_source(variant: str | None, pretrained: str | None,
                 hf_config: dict[str, Any] | None, variants: tuple[str, ...]) -> None:
    """Refuse contradictory architecture sources (``variant`` with ``pretrained``/``hf_config``).

    Args:
        variant: a named architecture, or None.
        pretrained: a folder or hub id, or None.
        hf_config: a recorded architecture (:func:`architecture_record`), or None.
        variants: the valid variant names.

    Raises:
        ModelError: an unknown variant, a variant given with another source, an ``hf_config``
            that is not a dict, or one with integers outside [-1, 16384] or lists longer than
            64 entries.
    """
    if variant is not None and variant not in variants:
        raise ModelError(f"option 'variant' must be one of {', '.join(variants)}; got {variant!r}")
    if variant is not None and (pretrained or hf_config is not None):
        raise ModelError("give either option 'variant' or 'pretrained' (whose architecture is "
                         "recorded in 'hf_config'), not both")
    if hf_config is not None and not isinstance(hf_config, dict):
        raise ModelError(f"option 'hf_config' must be a JSON object, got {type(hf_config).__name__}")
    if hf_config is not None:
        _check_sizes(hf_config, "hf_config")


#: bounds on every whole number and list length in an ``hf_config`` record: generous for the
#: published architectures, far below what exhausts a machine's memory while it is built
HF_MAX_INT = 16384
HF_MAX_LIST = 64


def _check_sizes(value: Any, where: str) -> None:
    """Refuse numbers (layer sizes, counts) and lists of an architecture record out of bounds."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_sizes(item, f"{where}.{key}")
    elif isinstance(value, list):
        if len(value) > HF_MAX_LIST:
            raise ModelError(f"option {where} has {len(value)} entries, more than {HF_MAX_LIST}")
        for item in value:
            _check_sizes(item, where)
    elif isinstance(value, int) and not isinstance(value, bool) and not -1 <= value <= HF_MAX_INT:
        raise ModelError(f"option {where} must be between -1 and {HF_MAX_INT}, got {value}")


def grey_adapter(in_channels: int) -> nn.Conv2d:
    """1x1 convolution from ``in_channels`` grey channels (query first) to 3 RGB channels.

    Initialised so that the query alone maps to the ImageNet-normalised RGB image (R = G = B =
    query); the other channels start with small random weights, so gradients reach them at once.

    Args:
        in_channels: grey input channels (the query first).

    Returns:
        A new ``Conv2d(in_channels, 3, 1)``.
    """
    conv = nn.Conv2d(in_channels, 3, 1)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    with torch.no_grad():
        nn.init.normal_(conv.weight, std=NEW_CHANNEL_SCALE)
        conv.weight[:, 0, 0, 0] = 1.0 / std
        conv.bias.copy_(-mean / std)
    return conv


def expand_rgb_stem(conv: nn.Conv2d, in_channels: int, image_channels: int) -> nn.Conv2d:
    """A copy of the pretrained RGB convolution ``conv`` that takes ``in_channels`` channels.

    The inputs are ``image_channels`` grey images in [0, 1] (query, then guide image) followed
    by new channels (guide masks). The query gets the RGB filters summed with the ImageNet
    normalisation folded in (so a grey query gives the pretrained response to the normalised
    grey RGB image, up to the zero padding at the border); the guide image gets the same filter
    scaled by :data:`GUIDE_IMAGE_SCALE`; new channels start at ``NEW_CHANNEL_SCALE`` times the
    pretrained weights' standard deviation.

    Args:
        conv: the pretrained stem convolution, with 3 input channels.
        in_channels: input channels of the new convolution.
        image_channels: 1 (query only) or 2 (query and guide image).

    Returns:
        A new convolution with ``conv``'s output channels, kernel, stride and padding, a
        bias, on ``conv``'s device and dtype.

    Raises:
        ModelError: ``conv`` does not take 3 input channels.
    """
    weight = conv.weight.detach()
    if weight.shape[1] != 3:
        raise ModelError(f"the pretrained stem has {weight.shape[1]} input channels, expected 3 "
                         "(RGB); use stem='adapter'")
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=True).to(weight.device, weight.dtype)
    mean = torch.tensor(IMAGENET_MEAN, dtype=weight.dtype, device=weight.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=weight.dtype, device=weight.device).view(1, 3, 1, 1)
    grey = (weight / std).sum(dim=1)
    bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(conv.out_channels)
    with torch.no_grad():
        nn.init.normal_(new.weight, std=NEW_CHANNEL_SCALE * float(weight.std()))
        new.weight[:, 0] = grey
        if image_channels > 1:
            new.weight[:, 1] = GUIDE_IMAGE_SCALE * grey
        new.bias.copy_(bias - (weight * mean / std).sum(dim=(1, 2, 3)))
    return new
