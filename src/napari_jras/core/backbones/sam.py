"""Segment Anything (Kirillov et al. 2023) through ``transformers.SamModel``, prompted by retrieval.

How the fused inputs enter SAM:

- **Image encoder**: a 1x1 adapter (:func:`grey_adapter`) maps [query, guide image] (the query
  alone in baseline mode) to 3 ImageNet-normalised channels, resized to the encoder's square
  ``image_size`` (1024 for the published SAM). Image embeddings are computed once per image.
- **Prompts, one mask per foreground class c**: the guide-mask channel c, resized to the prompt
  encoder's mask size (4x the embedding grid, 256 for SAM) and mapped linearly from [0, 1] to
  logits in [-10, 10], is the *dense mask prompt*; the bounding box of its > 0.5 region is the
  *box prompt* (the whole image when class c is absent from the guide). A learned token per
  class is appended to the sparse prompt so the decoder knows which class it segments (boxes of
  nested structures overlap, and in baseline mode all prompts are otherwise the same).
- **Baseline** (``use_retrieval=False``): a fixed prompt that needs no exemplar: the whole-image
  box, no mask prompt (SAM's learned "no mask" embedding) and the same class tokens. The
  baseline thus differs from J-RAS only by what retrieval provides.
- **Combining the masks**: the decoder gives one foreground logit f_c per class
  (``multimask_output=False``). The logits returned are ``[0, f_1, ..., f_{C-1}]``:
  softmax over them is the distribution of independent per-class sigmoid masks conditioned on
  at most one class per pixel (for two classes, exactly sigmoid(f_1)), so the background needs
  no parameters and Dice + cross-entropy train every f_c directly. They are upsampled
  bilinearly from the decoder's 4x-embedding resolution to the input size.

Gradients reach the guide mask through the dense prompt (the boxes are not differentiable), so
the retriever is trained through the fusion weights as with the other backbones. The tied
positional embedding SAM shares between its image and prompt encoders is saved once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError
from . import register_backbone
from .base import Backbone, check_int
from .hf_utils import architecture_record, check_source, grey_adapter, load_pretrained

#: (vision, prompt encoder, mask decoder) hyper-parameters; "tiny" is for tests only. The prompt
#: encoder's positional features (2 * num_pos_feats) must equal the decoder's hidden size, and
#: mask_input_channels = 16 as in SAM (its first layer norm has mask_input_channels // 4 channels). The
#: vision initializer_range is 0.02 for random init (transformers' 1e-10 suits pretrained
#: loading only: it leaves a fresh encoder's blocks at ~0 with vanishing gradients).
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "vision_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "output_channels": 32, "image_size": 64, "patch_size": 8,
                          "window_size": 4, "global_attn_indexes": [1], "num_pos_feats": 16,
                          "mlp_dim": 64, "initializer_range": 0.02},
        "prompt_encoder_config": {"hidden_size": 32, "image_size": 64, "patch_size": 8,
                                  "mask_input_channels": 16},
        "mask_decoder_config": {"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2,
                                "iou_head_hidden_dim": 16},
    },
    "small": {
        "vision_config": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
                          "output_channels": 256, "image_size": 256, "patch_size": 8,
                          "window_size": 8, "global_attn_indexes": [1, 3], "num_pos_feats": 128,
                          "mlp_dim": 1024, "initializer_range": 0.02},
        "prompt_encoder_config": {"hidden_size": 256, "image_size": 256, "patch_size": 8,
                                  "mask_input_channels": 16},
        "mask_decoder_config": {},
    },
    "vit_b": {
        "vision_config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                          "global_attn_indexes": [2, 5, 8, 11], "image_size": 1024,
                          "patch_size": 16, "initializer_range": 0.02},
        "prompt_encoder_config": {"image_size": 1024, "patch_size": 16},
        "mask_decoder_config": {},
    },
}
DEFAULT_VARIANT = "small"  # random init: a workstation CPU trains it; vit_b is SAM's ViT-B
MAX_IMAGE_SIZE = 2048
MASK_PROMPT_LOGIT = 10.0  # guide probability p -> mask-prompt logit (2p - 1) * 10
CLASS_TOKEN_STD = 0.1
_TIED = ("sam.prompt_encoder.shared_embedding.positional_embedding",
         "sam.shared_image_embedding.positional_embedding")


@register_backbone
class SAM(Backbone):
    """SAM with retrieved guide masks as dense + box prompts, one mask per class.

    Options: ``variant`` (tiny, small or vit_b; default small without ``pretrained``),
    ``pretrained`` (hub id such as ``facebook/sam-vit-base`` or a local folder), ``image_size``
    (encoder input side; default: the checkpoint's with ``pretrained``, else in a
    :class:`JRASModel` the model's working size rounded up to the patch size (see
    :meth:`task_options`), else the variant's; another size interpolates a checkpoint's position
    embeddings), ``freeze_image_encoder`` (keep the encoder's weights fixed; the adapter,
    prompt encoder, decoder and class tokens still train) and ``hf_config`` (filled in from
    ``pretrained``; rebuilds the architecture without it).

    Raises:
        ModelError: an invalid option, an ``image_size`` that is not a multiple of the patch
            size, ``pretrained`` weights that cannot be loaded or adapted to ``image_size``,
            or ``pretrained="litemedsam"`` (the ``litemedsam`` backbone).
    """

    name = "sam"

    def __init__(self, num_classes: int, use_retrieval: bool, *, variant: str | None = None,
                 pretrained: str | None = None, image_size: int | None = None,
                 freeze_image_encoder: bool = False, hf_config: dict[str, Any] | None = None):
        super().__init__(num_classes, use_retrieval, variant=variant, pretrained=pretrained,
                         image_size=image_size, freeze_image_encoder=freeze_image_encoder,
                         hf_config=hf_config)
        self.check_options(self._options)
        if isinstance(pretrained, str) and pretrained.lower() == "litemedsam":
            raise ModelError("LiteMedSAM is its own backbone, 'litemedsam' (the CLI maps "
                             "--backbone sam --pretrained litemedsam to it)")
        from transformers import SamModel

        if hf_config is not None:
            self.sam = SamModel(_sam_config(hf_config, image_size))
        elif pretrained:
            loaded = load_pretrained(SamModel, pretrained)
            config = _sam_config(architecture_record(loaded.config), image_size)
            self.sam = loaded if _same_size(config, loaded.config) else _resized(loaded, config)
            self._options["hf_config"] = architecture_record(self.sam.config)
        else:
            self._options["variant"] = variant = variant or DEFAULT_VARIANT
            self.sam = SamModel(_sam_config(VARIANTS[variant], image_size))
        vision, prompt = self.sam.config.vision_config, self.sam.config.prompt_encoder_config
        self.image_size = int(vision.image_size)
        self.mask_size = 4 * int(prompt.image_embedding_size)
        self._options["image_size"] = self.image_size
        if freeze_image_encoder:
            self.sam.vision_encoder.requires_grad_(False)
        self._freeze_unused()
        self.adapter = grey_adapter(2 if use_retrieval else 1)
        self.class_tokens = nn.Parameter(
            CLASS_TOKEN_STD * torch.randn(num_classes - 1, prompt.hidden_size))
        self.register_state_dict_post_hook(_drop_tied_copy)
        self.register_load_state_dict_pre_hook(_restore_tied_copy)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Architecture source, ``image_size`` 16..2048, ``freeze_image_encoder`` a bool.

        Raises:
            ModelError: one of them is invalid (:func:`~.hf_utils.check_source`).
        """
        check_source(options["variant"], options["pretrained"], options["hf_config"],
                     tuple(VARIANTS))
        if options["image_size"] is not None:
            check_int(options["image_size"], "image_size", 16, MAX_IMAGE_SIZE)
        if not isinstance(options["freeze_image_encoder"], bool):
            raise ModelError(f"option 'freeze_image_encoder' must be true or false, got "
                             f"{options['freeze_image_encoder']!r}")

    @classmethod
    def task_options(cls, size: int, options: dict[str, Any]) -> dict[str, Any]:
        """Random init: the encoder input side is ``size`` rounded up to the patch size.

        The variants' 1024 (ViT-B) would upsample a 128-pixel task 64-fold and need tens of GiB
        to train; a checkpoint (``pretrained``, ``hf_config``) keeps its own size.

        Args:
            size: the model's working image side in pixels.
            options: the options the user gave.

        Returns:
            ``{"image_size": ...}`` for a variant without an explicit ``image_size``, else
            ``{}``.
        """
        variant = options.get("variant") or DEFAULT_VARIANT
        if (options.get("image_size") is not None or options.get("pretrained")
                or options.get("hf_config") is not None or variant not in VARIANTS):
            return {}
        patch = VARIANTS[variant]["vision_config"]["patch_size"]
        return {"image_size": -(-size // patch) * patch}

    def _freeze_unused(self) -> None:
        """Freeze what these prompts never use: point prompts, the IoU head, the multimask
        outputs, and the mask (baseline) or no-mask (retrieval) embedding."""
        prompt = self.sam.prompt_encoder
        freeze_unused(prompt.point_embed[:2], prompt.not_a_point_embed, self.sam.mask_decoder,
                      prompt.no_mask_embed if self.use_retrieval else prompt.mask_embed)

    def forward(self, query: Tensor, guide_image: Tensor | None = None,
                guide_mask: Tensor | None = None) -> Tensor:
        """Logits ``(B, num_classes, H, W)``; see the module docstring for the prompts.

        Args:
            query: (B, 1, H, W) float images in [0, 1], any H, W.
            guide_image: (B, 1, H, W) guide image (required with retrieval).
            guide_mask: (B, num_classes, H, W) soft one-hot guide mask (required with
                retrieval).

        Returns:
            Logits (B, num_classes, H, W), the background's 0.

        Raises:
            ModelError: the inputs fail :meth:`stack_inputs`.
        """
        self.stack_inputs(query, guide_image, guide_mask)  # validates; guides unused in baseline
        batch, _, height, width = query.shape
        images = torch.cat([query, guide_image.to(query.dtype)], 1) if self.use_retrieval else query
        pixels = self.adapter(F.interpolate(images, size=(self.image_size, self.image_size),
                                            mode="bilinear", align_corners=False))
        per_class = self.num_classes - 1
        embeddings = self.sam.vision_encoder(pixels).last_hidden_state
        embeddings = embeddings.repeat_interleave(per_class, dim=0)
        boxes, masks = self._prompts(guide_mask.to(query.dtype) if self.use_retrieval else None,
                                     batch * per_class, query.device)
        sparse, dense = self.sam.prompt_encoder(input_points=None, input_labels=None,
                                                input_boxes=boxes, input_masks=masks)
        tokens = self.class_tokens.repeat(batch, 1)[:, None, None].to(sparse.dtype)
        positions = self.sam.get_image_wide_positional_embeddings()
        low_res, _ = self.sam.mask_decoder(
            image_embeddings=embeddings,
            image_positional_embeddings=positions.expand(embeddings.shape[0], -1, -1, -1),
            sparse_prompt_embeddings=torch.cat([sparse, tokens], dim=2),
            dense_prompt_embeddings=dense, multimask_output=False)
        return class_logits(low_res, batch, per_class, (height, width))

    def _prompts(self, guide_mask: Tensor | None, count: int,
                 device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Box prompts ``(count, 1, 4)`` and mask prompts ``(count, 1, S, S)`` (None: baseline)."""
        boxes, masks = guide_prompts(guide_mask, count, self.image_size, self.mask_size, device)
        return boxes[:, None], masks


def freeze_unused(point_embeddings: Sequence[nn.Module], not_a_point: nn.Module,
                  decoder: nn.Module, mask_input: nn.Module) -> None:
    """Freeze the SAM parts that box + mask prompts never train (shared by both SAM backbones).

    Args:
        point_embeddings: the prompt encoder's first two point embeddings (positive, negative).
        not_a_point: the prompt encoder's padding-point embedding.
        decoder: the mask decoder (its IoU head and multimask hypernetworks are frozen).
        mask_input: the mask-prompt path the mode does not use (the mask embedding for the
            baseline, the no-mask embedding with retrieval).
    """
    for module in [*point_embeddings, not_a_point, decoder.iou_prediction_head,
                   *decoder.output_hypernetworks_mlps[1:], mask_input]:
        module.requires_grad_(False)


def guide_prompts(guide_mask: Tensor | None, count: int, box_size: int, mask_size: int,
                  device: torch.device) -> tuple[Tensor, Tensor | None]:
    """SAM prompts of soft guide masks ``(B, C, H, W)``: one per foreground class (``count`` =
    B x (C - 1)), boxes ``(count, 4)`` in a ``box_size`` square and mask-prompt logits
    ``(count, 1, mask_size, mask_size)``; the baseline (no guide) gets whole-image boxes and no
    mask prompt.

    Args:
        guide_mask: (B, C, H, W) soft one-hot guide masks, or None for the baseline.
        count: number of prompts, B x (C - 1).
        box_size: side of the square the boxes are given in (the encoder input).
        mask_size: side of the mask prompt (4x the embedding grid).
        device: where the baseline's boxes are made.

    Returns:
        Boxes (count, 4) as (x1, y1, x2, y2) around each class's > 0.5 region (the whole
        square when it is empty; not differentiable), and the mask-prompt logits, guide
        probability p mapped to 10 (2p - 1), or None for the baseline.
    """
    if guide_mask is None:
        whole = torch.tensor([0.0, 0.0, box_size - 1.0, box_size - 1.0], device=device)
        return whole.expand(count, 4), None
    foreground = guide_mask[:, 1:].reshape(count, 1, *guide_mask.shape[-2:])
    boxes = mask_boxes(foreground[:, 0].detach() > 0.5, box_size)
    masks = F.interpolate(foreground, size=(mask_size, mask_size), mode="bilinear",
                          align_corners=False)
    return boxes, MASK_PROMPT_LOGIT * (2.0 * masks - 1.0)


def class_logits(low_res: Tensor, batch: int, per_class: int, size: tuple[int, int]) -> Tensor:
    """Per-class mask logits ``(B x per_class, 1, h, w)`` as ``(B, 1 + per_class, *size)``
    logits, the background's fixed at 0.

    Args:
        low_res: (B x per_class, 1, h, w) foreground logits; row b x per_class + c holds
            class c + 1 of image b.
        batch: B.
        per_class: number of foreground classes.
        size: (H, W) the logits are upsampled to (bilinear).

    Returns:
        (B, 1 + per_class, H, W) logits.
    """
    foreground = low_res.reshape(batch, per_class, *low_res.shape[-2:])
    logits = torch.cat([foreground.new_zeros(batch, 1, *foreground.shape[-2:]), foreground], 1)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def mask_boxes(masks: Tensor, size: int) -> Tensor:
    """Boxes ``(N, 4)`` as (x1, y1, x2, y2) of boolean masks ``(N, H, W)`` in a ``size`` square.

    An empty mask gets the whole square.

    Args:
        masks: (N, H, W) bool masks.
        size: side of the square the boxes are scaled to.

    Returns:
        (N, 4) float boxes; a pixel's full extent is covered, so a mask touching every border
        gives (0, 0, size - 1, size - 1).
    """
    _, height, width = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)

    def extent(hits: Tensor, length: int) -> tuple[Tensor, Tensor]:
        first = hits.float().argmax(dim=1)
        last = length - 1 - hits.flip(1).float().argmax(dim=1)
        return first.float(), last.float()

    y1, y2 = extent(rows, height)
    x1, x2 = extent(cols, width)
    sx, sy = size / width, size / height
    boxes = torch.stack([x1 * sx, y1 * sy, (x2 + 1) * sx - 1, (y2 + 1) * sy - 1], dim=1)
    whole = boxes.new_tensor([0.0, 0.0, size - 1.0, size - 1.0])
    return torch.where(rows.any(dim=1)[:, None], boxes, whole)


def _sam_config(record: dict[str, Any], image_size: int | None) -> Any:
    """A ``SamConfig`` from a record, with the encoder input side set to ``image_size``."""
    from transformers import SamConfig

    parts = {key: dict(record.get(key) or {}) for key in
             ("vision_config", "prompt_encoder_config", "mask_decoder_config")}
    if image_size is not None:
        patch = parts["vision_config"].get("patch_size", 16)
        if image_size % patch:
            raise ModelError(f"option 'image_size' ({image_size}) must be a multiple of the "
                             f"patch size {patch}")
        parts["vision_config"]["image_size"] = parts["prompt_encoder_config"]["image_size"] = \
            image_size
    parts["prompt_encoder_config"].pop("image_embedding_size", None)  # derived from image_size
    return SamConfig(**{**record, **parts})


def _same_size(config: Any, other: Any) -> bool:
    return config.vision_config.image_size == other.vision_config.image_size


def _resized(loaded: nn.Module, config: Any) -> nn.Module:
    """A SamModel for ``config`` holding ``loaded``'s weights, position embeddings interpolated."""
    from transformers import SamModel

    model = SamModel(config)
    target = model.state_dict()
    state = {}
    for key, value in loaded.state_dict().items():
        shape = target[key].shape
        if value.shape == shape:
            state[key] = value
        elif key.endswith("pos_embed"):  # (1, grid, grid, hidden)
            grid = F.interpolate(value.permute(0, 3, 1, 2), size=shape[1:3], mode="bicubic",
                                 align_corners=False)
            state[key] = grid.permute(0, 2, 3, 1)
        elif key.endswith(("rel_pos_h", "rel_pos_w")):  # (2 * grid - 1, head_dim)
            state[key] = F.interpolate(value.T[None], size=shape[0], mode="linear",
                                       align_corners=False)[0].T
        else:
            raise ModelError(f"cannot adapt pretrained weight {key} {tuple(value.shape)} to "
                             f"{tuple(shape)} for image_size {config.vision_config.image_size}")
    model.load_state_dict(state)
    return model


def _drop_tied_copy(module: nn.Module, state_dict: dict[str, Tensor], prefix: str,
                    local_metadata: Any) -> None:
    """State-dict hook: save SAM's tied positional embedding once (safetensors refuses aliases)."""
    copy, source = (state_dict.get(prefix + key) for key in _TIED)
    if copy is not None and source is not None and copy.data_ptr() == source.data_ptr():
        del state_dict[prefix + _TIED[0]]


def _restore_tied_copy(module: nn.Module, state_dict: dict[str, Tensor], prefix: str,
                       *args: Any) -> None:
    """Load-state-dict pre-hook: the tied copy dropped by :func:`_drop_tied_copy`."""
    source = state_dict.get(prefix + _TIED[1])
    if source is not None:
        state_dict.setdefault(prefix + _TIED[0], source)
