"""SegFormer (Xie et al. 2021) through ``transformers.SegformerForSemanticSegmentation``.

The fused input ``[query, guide image, guide mask]`` enters the Mix Transformer in one of two ways
(option ``stem``):

- ``"expand"`` (default): the first overlapping patch embedding takes all fused channels. With
  pretrained weights its RGB filters are copied (see :func:`expand_rgb_stem`: query = summed RGB
  filters with the ImageNet normalisation folded in, guide image = the same scaled by 0.1, guide
  masks = small random).
- ``"adapter"``: a 1x1 convolution maps the fused channels to 3 ImageNet-normalised channels in
  front of the untouched RGB stem (see :func:`grey_adapter`).

The decode head's logits (1/4 resolution) are upsampled bilinearly to the input size. The
architecture comes from ``variant`` (random init), from ``pretrained`` (a hub id or local folder;
its config is then recorded as ``hf_config``), or from ``hf_config`` alone (how a saved run is
rebuilt offline: the weights come from the run's safetensors, ``pretrained`` is not read again).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from . import register_backbone
from .base import Backbone, check_choice
from .hf_utils import (
    architecture_record,
    check_source,
    expand_rgb_stem,
    grey_adapter,
    load_pretrained,
)

#: MiT encoder hyper-parameters; "tiny" is for tests only
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_sizes": [8, 16, 32, 32], "depths": [1, 1, 1, 1],
             "num_attention_heads": [1, 1, 2, 2], "decoder_hidden_size": 16},
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2],
           "num_attention_heads": [1, 2, 5, 8], "decoder_hidden_size": 256},
    "b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2],
           "num_attention_heads": [1, 2, 5, 8], "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3],
           "num_attention_heads": [1, 2, 5, 8], "decoder_hidden_size": 768},
}
DEFAULT_VARIANT = "b0"
STEMS = ("expand", "adapter")


@register_backbone
class SegFormer(Backbone):
    """SegFormer with an expanded RGB stem or a 1x1 adapter for the fused channels.

    Options: ``variant`` (tiny, b0, b1, b2; default b0 without ``pretrained``), ``pretrained``
    (hub id such as ``nvidia/mit-b2`` or a local folder), ``stem`` (expand or adapter) and
    ``hf_config`` (filled in from ``pretrained``; rebuilds the architecture without it).

    Raises:
        ModelError: an invalid option, or ``pretrained`` weights that cannot be loaded.
    """

    name = "segformer"
    size_multiple = 32  # product of the MiT strides 4, 2, 2, 2

    def __init__(self, num_classes: int, use_retrieval: bool, *, variant: str | None = None,
                 pretrained: str | None = None, stem: str = "expand",
                 hf_config: dict[str, Any] | None = None):
        super().__init__(num_classes, use_retrieval, variant=variant, pretrained=pretrained,
                         stem=stem, hf_config=hf_config)
        self.check_options(self._options)
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        channels = self.in_channels if stem == "expand" else 3
        if hf_config is not None:
            config = SegformerConfig(**{**hf_config, "num_labels": num_classes,
                                        "num_channels": channels})
            self.model = SegformerForSemanticSegmentation(config)
        elif pretrained:  # a new classifier for num_classes replaces the checkpoint's
            self.model = load_pretrained(
                SegformerForSemanticSegmentation, pretrained, ignore_mismatched_sizes=True,
                id2label={i: str(i) for i in range(num_classes)})
            if stem == "expand":
                embed = self.model.segformer.stages[0].patch_embeddings
                embed.proj = expand_rgb_stem(embed.proj, channels, 2 if use_retrieval else 1)
                self.model.config.num_channels = channels
            self._options["hf_config"] = architecture_record(self.model.config)
        else:
            self._options["variant"] = variant = variant or DEFAULT_VARIANT
            config = SegformerConfig(**VARIANTS[variant], num_labels=num_classes,
                                     num_channels=channels)
            self.model = SegformerForSemanticSegmentation(config)
        self.adapter = grey_adapter(self.in_channels) if stem == "adapter" else nn.Identity()

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """``stem`` and the architecture source (``variant``, ``pretrained``, ``hf_config``)."""
        check_choice(options["stem"], "stem", STEMS)
        check_source(options["variant"], options["pretrained"], options["hf_config"],
                     tuple(VARIANTS))

    def segment(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes, H, W)``: the decode head's 1/4-scale logits upsampled."""
        logits = self.model(pixel_values=self.adapter(x)).logits
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
