"""The bank's pixel store: one compressed ``.npz`` per exemplar, or one pack file for many.

Every exemplar's pixels are one ``.npz`` archive (``image`` uint8 0..255, ``mask`` uint8 class
indices, ``size`` x ``size``). It lives either

* in its own file ``pixels/<id>.npz`` (format 1, and every exemplar added since the last pack):
  written under a temporary name and renamed into place before its row is committed, deleted
  with its row; or
* inside the pack file ``pixels-<token>.pack`` named by the ``pixel_pack`` metadata entry: the
  archives one after the other, located by the ``packed_pixels`` table (id, byte offset, byte
  length). A pack is never changed once written; packing again writes a new one under a new name
  and switches to it in one transaction, so a crash leaves either the old or the new pack in use.

Removing a packed exemplar deletes its rows; its bytes stay in the pack until the next pack.
The archives are byte-for-byte the same in both places (each carries its own CRC checksums).
Nothing stored in the bank is used as a path unchecked: files are named after integer ids and
the pack name must match :data:`PACK_NAME`.
"""

from __future__ import annotations

import io
import re
import uuid
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..checkpoint import atomic_write_bytes
from ..errors import BankError

PIXELS_DIR = "pixels"
PIXEL_NAME = re.compile(r"^(\d+)\.npz$|^\.(\d+)\.partial$")
PACK_NAME = re.compile(r"^pixels-[0-9a-f]{32}\.pack$")
PACK_LEFTOVER = re.compile(r"^pixels-[0-9a-f]{32}\.pack$|^\.pixels-[0-9a-f]{32}\.pack\..*\.partial$")


def _write_pixels(file: Path, image: np.ndarray, mask: np.ndarray) -> None:
    """Write one exemplar's pixels through a temporary file (crash-safe, never recreating a
    deleted bank folder); raises :class:`StorageError` without leaving the temporary file."""
    buffer = io.BytesIO()  # one write is much faster than savez's many small ones
    np.savez_compressed(buffer, image=image, mask=mask)
    atomic_write_bytes(file, buffer.getbuffer(), tmp=file.with_name(f".{file.stem}.partial"),
                       make_parents=False, what="the exemplar pixels")


class PixelStore:
    """The pixels of one bank folder: per-exemplar files and (optionally) one pack file."""

    def __init__(self, path: Path, size: int) -> None:
        self._path = path
        self._size = size

    @property
    def folder(self) -> Path:
        """The folder of the per-exemplar files."""
        return self._path / PIXELS_DIR

    def file(self, exemplar_id: int) -> Path:
        """The per-exemplar file of ``exemplar_id`` (whether it exists or not)."""
        if isinstance(exemplar_id, bool) or not isinstance(exemplar_id, (int, np.integer)):
            raise BankError(f"The bank at {self._path} is damaged: exemplar id {exemplar_id!r} "
                            "is not a whole number")
        return self.folder / f"{int(exemplar_id)}.npz"

    def pack_file(self, name: str) -> Path:
        """The pack file called ``name`` (as stored in the metadata, checked first)."""
        if not isinstance(name, str) or not PACK_NAME.match(name):
            raise BankError(f"The bank at {self._path} is damaged: it names a pixel pack "
                            f"{name!r} that is not a pack file name")
        return self._path / name

    # --- writing --------------------------------------------------------------------------
    def write(self, ids: Sequence[int], images: np.ndarray, masks: np.ndarray) -> None:
        """Write the per-exemplar files of new exemplars; on failure none of them stays.

        Args:
            ids: the new exemplars' ids.
            images: (N, size, size) uint8 images.
            masks: (N, size, size) uint8 masks.
        """
        try:
            if not self.folder.is_dir():  # a packed bank shipped without the (empty) folder
                self.folder.mkdir()
            for i, image, mask in zip(ids, images, masks, strict=True):
                _write_pixels(self.file(i), image, mask)
        except BaseException:
            self.discard(ids)
            raise

    def discard(self, ids: Sequence[int]) -> None:
        """Delete the per-exemplar files of ``ids`` (missing ones are fine)."""
        for i in ids:
            self.file(i).unlink(missing_ok=True)

    def write_pack(self, blobs: Sequence[bytes]) -> tuple[str, list[tuple[int, int]]]:
        """Write a new pack file holding ``blobs`` one after the other (crash-safe).

        Returns:
            The pack's file name and the (byte offset, byte length) of each blob.
        """
        name = f"pixels-{uuid.uuid4().hex}.pack"
        spans, offset = [], 0
        for blob in blobs:
            spans.append((offset, len(blob)))
            offset += len(blob)
        atomic_write_bytes(self._path / name, b"".join(blobs), make_parents=False,
                           what="the exemplar pixel pack")
        return name, spans

    # --- reading --------------------------------------------------------------------------
    def read(self, ids: Sequence[int], packed: Mapping[int, tuple[int, int]],
             pack: str | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Image and mask of each exemplar, checked (uint8, ``size`` x ``size``).

        Args:
            ids: exemplar ids, in the order wanted.
            packed: (byte offset, byte length) in the pack of the ids stored there.
            pack: the pack's file name (None when the bank has no pack).

        Raises:
            BankError: pixels that are missing or damaged, naming the exemplar.
        """
        return [self._decode(i, blob, where) for i, blob, where in self._blobs(ids, packed, pack)]

    def raw(self, ids: Sequence[int], packed: Mapping[int, tuple[int, int]],
            pack: str | None) -> list[bytes]:
        """The stored archives of ``ids``, byte for byte, after checking that each decodes.

        Args:
            ids, packed, pack: as for :meth:`read`, which also lists the errors.
        """
        out = []
        for i, blob, where in self._blobs(ids, packed, pack):
            self._decode(i, blob, where)
            out.append(blob)
        return out

    def _blobs(self, ids: Sequence[int], packed: Mapping[int, tuple[int, int]],
               pack: str | None) -> Iterator[tuple[int, bytes, Path]]:
        with ExitStack() as stack:
            handle: BinaryIO | None = None
            for i in ids:
                if i not in packed:
                    file = self.file(i)
                    yield i, self._read_file(i, file), file
                    continue
                file = self.pack_file(pack)
                if handle is None:
                    handle = stack.enter_context(self._open(i, file))
                offset, length = packed[i]
                handle.seek(offset)
                blob = handle.read(length)
                if offset < 0 or len(blob) != length:
                    raise BankError(f"The pixels of exemplar {i} are damaged ({file} is cut "
                                    "short): restore the file or remove the exemplar")
                yield i, blob, file

    @staticmethod
    def _open(exemplar_id: int, file: Path) -> BinaryIO:
        try:
            return open(file, "rb")
        except FileNotFoundError as exc:
            raise BankError(f"The pixels of exemplar {exemplar_id} are missing ({file}): "
                            "restore the file or remove the exemplar") from exc
        except OSError as exc:
            raise BankError(f"The pixels of exemplar {exemplar_id} are damaged ({file}): "
                            "restore the file or remove the exemplar") from exc

    def _read_file(self, exemplar_id: int, file: Path) -> bytes:
        with self._open(exemplar_id, file) as handle:
            try:
                return handle.read()
            except OSError as exc:
                raise BankError(f"The pixels of exemplar {exemplar_id} are damaged ({file}): "
                                "restore the file or remove the exemplar") from exc

    def _decode(self, exemplar_id: int, blob: bytes, where: Path) -> tuple[np.ndarray, np.ndarray]:
        try:
            with np.load(io.BytesIO(blob)) as data:
                image, mask = data["image"], data["mask"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise BankError(f"The pixels of exemplar {exemplar_id} are damaged ({where}): "
                            "restore the file or remove the exemplar") from exc
        side = (self._size, self._size)
        if image.shape != side or mask.shape != side or image.dtype != np.uint8 \
                or mask.dtype != np.uint8:
            raise BankError(f"The pixels of exemplar {exemplar_id} are damaged ({where})")
        return image, mask

    # --- cleaning up ----------------------------------------------------------------------
    def clean_orphans(self, unpacked: set[int], pack: str | None) -> None:
        """Delete what no committed row uses: per-exemplar files of ids not in ``unpacked``,
        temporary files, and pack files other than ``pack`` (left by an interrupted add, remove
        or pack)."""
        if self.folder.is_dir():
            for file in self.folder.iterdir():
                match = PIXEL_NAME.match(file.name)
                if match and (match.group(2) or int(match.group(1)) not in unpacked):
                    file.unlink(missing_ok=True)
        for file in self._path.iterdir():
            if PACK_LEFTOVER.match(file.name) and file.name != pack:
                file.unlink(missing_ok=True)
