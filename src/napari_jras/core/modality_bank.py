"""A bank for a new modality, before any model of it is trained (the zero-training start).

A person segments images of a modality no trained model covers with LiteMedSAM box prompts
(:mod:`.zero_shot`), corrects them and accepts them; the accepted slices go into an ordinary
:class:`~napari_jras.core.bank.ExemplarBank` at ``<home>/banks/<name>/``, embedded by
LiteMedSAM's frozen TinyViT image encoder, average-pooled (the features of the ``litemedsam``
retriever encoder, without a trained head). Their retriever version, :data:`VERSION`, carries the
checkpoint's SHA-256 prefix, so embeddings of another encoder are never mixed in. The bank is
searchable at once (:func:`search`), listed by ``napari-jras bank list`` and turned into
training data by ``napari-jras bank export``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import corrections
from .backbones.litemedsam_net import CHECKPOINT_SHA256, INPUT_SIZE
from .bank import DB_FILE, ExemplarBank, Hit
from .errors import BankError

BANKS_DIR = "banks"
"""Folder of the modality banks under the napari-jras home."""
SIZE = INPUT_SIZE
"""Side of the stored slices: LiteMedSAM's encoder input."""
EMBED_DIM = 256
"""Length of the embeddings: the TinyViT neck's channels, average-pooled."""
VERSION = f"litemedsam-pooled-{CHECKPOINT_SHA256[:12]}"
"""Retriever version of every embedding in a modality bank."""
BOX_CLASS_NAMES = ("background",) + tuple(f"structure {i}" for i in range(1, 9))
"""Class names before any model exists (box start): the k-th box of a slice paints class k."""
DEFAULT_NAME = "new-modality"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def default_name(modality: str | None) -> str:
    """The bank name offered for an image: its modality (``mri``, ``ct``, ``us``), else
    :data:`DEFAULT_NAME`."""
    return modality if modality and modality != "auto" and _NAME.match(modality) \
        else DEFAULT_NAME


def bank_dir(name: str, home: str | Path | None = None) -> Path:
    """``<home>/banks/<name>``; refuses a name that is not a plain token.

    Args:
        name: letters, digits, ``.``, ``_``, ``-`` (up to 64, starting with a letter or digit).
        home: the napari-jras home (default: :func:`~napari_jras.core.workspace.home_dir`).

    Raises:
        BankError: a name with other characters (a path, spaces, empty).
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise BankError(f"Invalid bank name {name!r}: use letters, digits, '.', '_' and '-' "
                        "(up to 64, starting with a letter or digit)")
    if home is None:
        from .workspace import home_dir

        home = home_dir()
    return Path(home).expanduser() / BANKS_DIR / name


def names(home: str | Path | None = None) -> list[str]:
    """The modality banks that exist under the home, by name."""
    root = bank_dir(DEFAULT_NAME, home).parent
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if _NAME.match(p.name) and (p / DB_FILE).is_file())


def open_bank(name: str, class_names: Sequence[str] = BOX_CLASS_NAMES,
              home: str | Path | None = None) -> ExemplarBank:
    """The modality bank ``name``, created (with ``class_names``) when it does not exist.

    Args:
        name: the bank's name (a plain token, see :func:`bank_dir`).
        class_names: the class names of a new bank (an existing bank keeps its own).
        home: the napari-jras home (default: :func:`~napari_jras.core.workspace.home_dir`).

    Returns:
        The open (writable) bank; the caller closes it.

    Raises:
        BankError: a bad name, a non-empty folder that is no bank, or a bank that is not a
            modality bank (another side or embedding length, or embeddings of another
            retriever version than :data:`VERSION`).
    """
    path = bank_dir(name, home)
    if not (path / DB_FILE).is_file():
        if path.exists() and (path.is_file() or any(path.iterdir())):
            raise BankError(f"{path} exists and is not an exemplar bank: choose another name")
        return ExemplarBank.create(path, SIZE, len(class_names), EMBED_DIM, list(class_names))
    bank = ExemplarBank.open(path)
    try:
        check(bank)
    except BaseException:
        bank.close()
        raise
    return bank


def check(bank: ExemplarBank) -> None:
    """Refuse a bank whose slices or embeddings are not a modality bank's (:data:`VERSION`)."""
    version = bank.retriever_version
    if bank.size != SIZE or bank.embed_dim != EMBED_DIM or version not in (None, VERSION):
        raise BankError(
            f"The bank at {bank.path} is not a LiteMedSAM modality bank ({bank.size} px, "
            f"{bank.embed_dim}-long embeddings of retriever version {version}; a modality bank "
            f"has {SIZE} px and {EMBED_DIM}-long embeddings of {VERSION}): choose another name")


@lru_cache(maxsize=1)
def _encoder() -> torch.nn.Module:
    from .retrieval import LiteMedSAMEncoder

    return LiteMedSAMEncoder(SIZE, trainable_blocks=0).eval()


@torch.no_grad()
def embed(images: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Unit-length embeddings (N, :data:`EMBED_DIM`) of (N, H, W) images in [0, 1].

    Images of another side are resized (bilinear) to :data:`SIZE` first.

    Raises:
        ModelError: the LiteMedSAM weights are missing or not the released file.
    """
    pixels = torch.as_tensor(np.asarray(images, np.float32))[:, None]
    if pixels.shape[-2:] != (SIZE, SIZE):
        pixels = F.interpolate(pixels, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    encoder = _encoder()
    out = [encoder(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
    vectors = torch.cat(out) if out else torch.zeros(0, EMBED_DIM)
    return F.normalize(vectors, dim=1).numpy().astype(np.float32)


def add_accepted(bank: ExemplarBank, image: np.ndarray, labels: np.ndarray,
                 slices: Sequence[int] | None = None, modality: str | None = None,
                 source: str = "", case_id: str = "", author: str = "",
                 patient_id: str | None = None) -> list[int]:
    """Store accepted slices as :meth:`Workspace.accept <napari_jras.core.workspace.Workspace.accept>`
    records them (origin ``correction``; accepting a case's slice again replaces it), embedded
    with :func:`embed`.

    Args:
        bank: an open modality bank.
        image: the full 2-D or 3-D (Z-first) image.
        labels: its accepted labels, same shape.
        slices: the slices to store (default: every slice with foreground).
        modality: the intensity normalisation (default ``auto``).
        source, case_id, author, patient_id: provenance (see :func:`.corrections.prepare`).

    Returns:
        The new exemplar ids.
    """
    check(bank)
    accepted = corrections.prepare(image, labels, bank.num_classes, bank.size,
                                   modality or "auto", slices, source, case_id, author, patient_id)
    return corrections.store(bank, accepted, embed(accepted.images), VERSION)


def search(bank: ExemplarBank, images: np.ndarray, k: int = 3) -> list[list[Hit]]:
    """The ``k`` stored slices most similar (cosine of :func:`embed`) to each image, best first.

    Args:
        bank: an open modality bank.
        images: (N, H, W) normalised images in [0, 1] (resized to :data:`SIZE`).
        k: the number of hits wanted per image (fewer when the bank holds fewer).

    Returns:
        One list of :class:`~napari_jras.core.bank.Hit` per image.

    Raises:
        BankError: an empty bank, or embeddings of another retriever version.
        ModelError: the LiteMedSAM weights are missing or not the released file.
    """
    return bank.search(embed(images), k, VERSION)
