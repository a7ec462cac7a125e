"""Read and write medical images and labels (TIFF, PNG, NIfTI) and find paired cases.

Layouts understood by :func:`find_cases`:

* paired folder (recursive): ``<stem>_image.<ext>`` next to ``<stem>_label.<ext>``;
* nnU-Net: ``imagesTr/<case>_0000.nii.gz`` with ``labelsTr/<case>.nii.gz``;
* a single image file (optionally with its ``_label`` sibling).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError, DataWarning

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".tiff", ".tif", ".png")
DEFAULT_PATIENT_REGEX = r"^(.*?)(?:_frame\d+|_slice\d+)?$"
MAX_VOXELS_ENV = "NAPARI_JRAS_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 1 << 30  # ~1.07e9 voxels, e.g. 1024^3: 4 GiB as float32


def split_extension(path: str | Path) -> tuple[str, str]:
    """Split ``path``'s name into (stem, extension), treating ``.nii.gz`` as one extension.

    Returns:
        The stem as written and the extension with its dot: lower case, ``""`` when there is
        none (``a_image.NII.GZ`` gives ``("a_image", ".nii.gz")``).
    """
    name = Path(path).name
    lower = name.lower()
    for ext in IMAGE_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)], ext
    return Path(name).stem, Path(name).suffix.lower()


def is_supported(path: str | Path) -> bool:
    """True when ``path`` has an extension napari-jras can read."""
    return split_extension(path)[1] in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Volume:
    """An image or label array with its voxel spacing (Z, Y, X order; None when unknown)."""

    data: np.ndarray
    spacing: tuple[float, ...] | None = None


def read_volume(path: str | Path) -> Volume:
    """Read a 2-D or 3-D array from TIFF, PNG or NIfTI, Z first for volumes.

    NIfTI volumes are returned as (Z, Y, X) with spacing in millimetres. Raises
    :class:`DataError` for missing, unreadable or unsupported files.

    Args:
        path: a ``.tif``/``.tiff``, ``.png``, ``.nii`` or ``.nii.gz`` file.

    Returns:
        The array as stored (dtype unchanged; a PNG's grey channel only; a 2-D NIfTI
        transposed to (Y, X)) and its spacing: from the NIfTI header, from ImageJ TIFF
        metadata (None for other TIFFs), None for PNG.

    Raises:
        DataError: the file is missing, a folder, empty, of another type, damaged or
            truncated, unreadable (permission, memory), a colour PNG, or larger than
            :func:`max_voxels`.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"File not found: {path}")
    if path.is_dir():
        raise DataError(f"Expected a file but got a folder: {path}")
    ext = split_extension(path)[1]
    if ext not in IMAGE_EXTENSIONS:
        raise DataError(
            f"Unsupported file type '{ext or path.name}' for {path}; "
            f"supported: {', '.join(IMAGE_EXTENSIONS)}"
        )
    try:
        if path.stat().st_size == 0:
            raise DataError(f"Cannot read {path}: the file is empty (0 bytes)")
        if ext in (".tif", ".tiff"):
            return _read_tiff(path)
        if ext == ".png":
            return _read_png(path)
        return _read_nifti(path)
    except DataError:
        raise
    except PermissionError as exc:
        raise DataError(f"Cannot read {path}: permission denied") from exc
    except MemoryError as exc:
        raise DataError(f"Cannot read {path}: not enough memory for an image this large") from exc
    except Exception as exc:  # corrupted or truncated files raise many different types
        raise DataError(f"Cannot read {path}: the file is damaged or not a valid {ext} ({exc})") from exc


def max_voxels() -> int:
    """Largest image (in voxels) :func:`read_volume` loads: ``$NAPARI_JRAS_MAX_VOXELS`` or 2^30."""
    try:
        return max(1, int(os.environ.get(MAX_VOXELS_ENV, DEFAULT_MAX_VOXELS)))
    except ValueError:
        return DEFAULT_MAX_VOXELS


def check_size(shape: tuple[int, ...], source: str | Path) -> None:
    """Refuse to load an image whose header declares more than :func:`max_voxels` voxels.

    Args:
        shape: the array shape the file declares.
        source: the file, named in the message.

    Raises:
        DataError: the shape holds more voxels than the limit.
    """
    voxels = int(np.prod([int(n) for n in shape], dtype=np.float64))
    limit = max_voxels()
    if voxels > limit:
        raise DataError(
            f"{source} is too large to load: shape {tuple(int(n) for n in shape)} is "
            f"{voxels / 1e6:.0f} million voxels ({voxels * 4 / 2**30:.1f} GiB as float32), more "
            f"than the limit of {limit / 1e6:.0f} million: crop or downsample it first (or raise "
            f"{MAX_VOXELS_ENV})")


def _read_png(path: Path) -> Volume:
    import imageio.v3 as iio
    from PIL import Image

    try:
        with Image.open(path) as img:  # reads the header only
            check_size((img.height, img.width), path)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path} is too large to load ({exc})") from exc
    return Volume(_png_grey(np.asarray(iio.imread(path)), path))


def _png_grey(data: np.ndarray, path: Path) -> np.ndarray:
    """A PNG's pixels as one grey 2-D array: alpha dropped, grey stored as RGB taken once.

    A PNG holds one 2-D image, so a third axis is always colour (grey + alpha, RGB, RGBA):
    read as a 2-slice or 3-slice volume it made (H, W, 2) label files. A colour image (RGB
    channels that differ) is refused: napari-jras segments greyscale images.
    """
    if data.ndim != 3:
        return data
    if data.shape[-1] in (2, 4):  # LA, RGBA: the alpha channel holds no image data
        data = data[..., :-1]
    if data.shape[-1] == 3:
        if not (np.array_equal(data[..., 0], data[..., 1])
                and np.array_equal(data[..., 1], data[..., 2])):
            raise DataError(f"{path.name} looks like an RGB/RGBA image (a colour PNG, shape "
                            f"{data.shape}); napari-jras segments greyscale images: convert it "
                            "to grey first")
        data = data[..., :1]
    return data[..., 0]


def _read_tiff(path: Path) -> Volume:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if tif.series:
            check_size(tif.series[0].shape, path)
        data = tif.asarray()
        meta = tif.imagej_metadata or {}
        # a file cut inside its page chain reads as its first pages only: compare with the
        # shape the writer recorded (tifffile "shaped" or ImageJ metadata)
        expected = None
        shaped = tif.shaped_metadata
        if shaped and shaped[0].get("shape"):
            expected = int(np.prod(shaped[0]["shape"]))
        elif meta.get("images"):
            expected = int(meta["images"]) * int(np.prod(tif.pages[0].shape))
        if expected is not None and expected != data.size:
            raise DataError(f"Cannot read {path}: the file is damaged or truncated "
                            f"(expected {expected} values, found {data.size})")
        if data.ndim == 2 and "spacing" in meta and int(meta.get("images", 1)) == 1:
            data = data[None]  # a one-slice volume: ImageJ keeps a Z spacing for stacks only
        spacing = None
        tags = tif.pages[0].tags
        xres, yres = tags.get("XResolution"), tags.get("YResolution")
        if meta and ("spacing" in meta or meta.get("unit")) and xres is not None:
            def size(tag):
                num, den = tag.value
                return den / num if num else 1.0
            x = size(xres)
            y = size(yres) if yres is not None else x
            spacing = (float(meta.get("spacing", 1.0)), y, x)
    if spacing is not None and data.ndim == 2:
        spacing = spacing[1:]
    return Volume(np.asarray(data), spacing)


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    img = nib.load(str(path))
    check_size(img.shape, path)
    data = np.asarray(img.dataobj)
    zooms = tuple(float(z) for z in img.header.get_zooms()[: data.ndim])
    if data.ndim == 3:  # NIfTI is (X, Y, Z): napari-jras works Z first
        data = np.transpose(data, (2, 1, 0))
        zooms = zooms[::-1]
    elif data.ndim == 2:
        data = data.T
        zooms = zooms[::-1]
    return Volume(np.ascontiguousarray(data), zooms)


def write_volume(path: str | Path, data: np.ndarray, spacing: tuple[float, ...] | None = None) -> Path:
    """Write a 2-D/3-D array as TIFF or NIfTI (chosen by extension), atomically.

    The file is written next to its destination and renamed into place, so an interrupted
    write never leaves a half-written file under the final name.

    Args:
        path: destination ending in ``.tif``, ``.tiff``, ``.nii`` or ``.nii.gz``; missing
            parent folders are made.
        data: 2-D (Y, X) or 3-D (Z, Y, X) array.
        spacing: voxel size per axis of ``data`` (Z, Y, X order), in millimetres, or None.
            A TIFF records it as ImageJ metadata when ImageJ can hold the array (its dtype,
            more than one pixel wide), else it is dropped; a NIfTI as its zooms (1.0 when
            None), with int64/uint64 data stored in the smallest integer type that holds it.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DataError: another extension, an array that is not 2-D or 3-D, or a failed write
            (disk, permission, a dtype the format cannot store); any earlier file at
            ``path`` is intact.
    """
    path = Path(path)
    stem, ext = split_extension(path)
    if ext not in (".tif", ".tiff", ".nii", ".nii.gz"):
        raise DataError(f"Cannot write '{ext}': use .tif, .tiff, .nii or .nii.gz ({path})")
    data = np.asarray(data)
    if data.ndim not in (2, 3):
        raise DataError(f"Can only write 2-D or 3-D arrays, got shape {data.shape}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"Cannot create the folder of {path}: {exc.strerror or exc}") from exc
    tmp = path.with_name(f".{stem}.partial{ext}")
    try:
        if ext in (".tif", ".tiff"):
            import tifffile

            kwargs = {"photometric": "minisblack"}  # never RGB, whatever the first axis size
            out = data
            if spacing is not None:
                # ImageJ TIFFs (the only ones with a Z spacing) misread one-pixel-wide images
                out = _imagej_compatible(data) if data.shape[-1] > 1 else None
                if out is None:  # ImageJ cannot hold it: keep the data, drop the spacing
                    out = data
                else:
                    kwargs.update(
                        imagej=True,
                        resolution=(1.0 / spacing[-1], 1.0 / spacing[-2]),
                        metadata={"spacing": spacing[0], "unit": "mm", "axes": "ZYX"}
                        if data.ndim == 3 else {"unit": "mm"})  # Z slices, not channels
            tifffile.imwrite(tmp, out, compression=None if "imagej" in kwargs else "zlib", **kwargs)
        else:
            import nibabel as nib

            arr = np.transpose(data, (2, 1, 0)) if data.ndim == 3 else data.T
            if arr.dtype == np.int64 or arr.dtype == np.uint64:
                small = _smallest_int(arr)
                arr = arr.astype(small) if small is not None else arr
            zooms = tuple(spacing[::-1]) if spacing is not None else (1.0,) * arr.ndim
            affine = np.diag([*zooms, 1.0] if arr.ndim == 3 else [*zooms, 1.0, 1.0])
            img = nib.Nifti1Image(np.ascontiguousarray(arr), affine, dtype=arr.dtype)
            img.header.set_zooms(zooms)
            nib.save(img, str(tmp))
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"Cannot write {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # e.g. a data type the format cannot store
        tmp.unlink(missing_ok=True)
        raise DataError(f"Cannot write {path}: {exc}") from exc
    return path


def _smallest_int(data: np.ndarray):
    """Smallest integer dtype (int8..int32 / uint8..uint32) holding ``data``, else None."""
    if data.size == 0:
        return np.uint8
    lo, hi = int(data.min()), int(data.max())
    for dtype in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    return None


def _imagej_compatible(data: np.ndarray) -> np.ndarray | None:
    """``data`` as a type ImageJ TIFFs hold (uint8, uint16, float32), or None.

    uint8, uint16 and float32 stay as they are (a uint16 scan must not turn into 8-bit, which
    normalisation would treat as ultrasound); other integers become uint16 when they fit, small
    negative ones float32 (exact).
    """
    if data.dtype in (np.uint8, np.uint16, np.float32):
        return data
    if data.dtype.kind == "b":
        return data.astype(np.uint8)
    if data.dtype.kind in "iu":
        small = _smallest_int(data)
        if small in (np.uint8, np.uint16):
            return data.astype(np.uint16)
        if small is not None and np.dtype(small).itemsize <= 2:
            return data.astype(np.float32)  # small negative ints: exact in float32
        return None
    if data.dtype.kind == "f":
        as32 = data.astype(np.float32)
        return as32 if np.array_equal(as32, data, equal_nan=True) or data.dtype == np.float16 else None
    return None


def check_image(data: np.ndarray, source: str = "image") -> np.ndarray:
    """Validate an image array: 2-D or 3-D, real numbers, finite; returns it unchanged.

    Args:
        data: the image (anything ``np.asarray`` takes).
        source: what to call it in the messages (e.g. a file name).

    Returns:
        ``np.asarray(data)``.

    Raises:
        DataError: the image looks like RGB/RGBA (3-D, last axis 3 or 4, first axis longer
            than 4), is not 2-D or 3-D, has an empty axis, is not boolean/integer/float, or
            holds NaN or infinite values.
    """
    data = np.asarray(data)
    if data.ndim == 3 and data.shape[-1] in (3, 4) and data.shape[0] > 4:
        raise DataError(
            f"{source} looks like an RGB/RGBA image (shape {data.shape}); "
            "napari-jras segments greyscale images: convert it to grey first"
        )
    if data.ndim == 4:
        raise DataError(
            f"{source} is 4-D (shape {data.shape}); napari-jras takes 2-D images or 3-D volumes: "
            "select one time point or channel first"
        )
    if data.ndim not in (2, 3):
        raise DataError(f"{source} must be 2-D or 3-D, got {data.ndim}-D (shape {data.shape})")
    if min(data.shape) == 0:
        raise DataError(f"{source} is empty (shape {data.shape})")
    if data.dtype.kind not in "biuf":
        raise DataError(f"{source} has unsupported data type {data.dtype}")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        n = int((~np.isfinite(data)).sum())
        raise DataError(f"{source} contains {n} NaN or infinite values; fix or mask them first")
    return data


def check_label(label: np.ndarray, image_shape: tuple[int, ...] | None = None,
                num_classes: int | None = None, source: str = "label") -> np.ndarray:
    """Validate a label map and return it as ``uint8``/``int64`` class indices.

    Args:
        label: the label map; float values must be whole numbers.
        image_shape: shape the label must have (its image's), or None to skip the check.
        num_classes: classes including background (every value must be below it), or None.
        source: what to call the label in the messages.

    Returns:
        The labels as ``uint8`` when all are below 256 (or the map is empty), else ``int64``;
        not copied when the dtype already matches.

    Raises:
        DataError: the map is 4-D, of another shape than ``image_shape``, holds non-integer,
            NaN/inf or negative values or a class >= ``num_classes``, or is not numeric.
    """
    label = np.asarray(label)
    if label.ndim == 4:
        raise DataError(f"{source} is 4-D (shape {label.shape}); expected 2-D or 3-D")
    if image_shape is not None and tuple(label.shape) != tuple(image_shape):
        raise DataError(
            f"{source} shape {label.shape} does not match the image shape {tuple(image_shape)}"
        )
    if label.dtype.kind == "f":
        if not np.isfinite(label).all():
            raise DataError(f"{source} contains NaN or infinite values")
        if not np.array_equal(label, np.round(label)):
            raise DataError(
                f"{source} has non-integer values (e.g. {label[label != np.round(label)].flat[0]}); "
                "labels must be class indices 0, 1, 2, ..."
            )
    elif label.dtype.kind not in "biu":
        raise DataError(f"{source} has unsupported data type {label.dtype}")
    if label.size and label.min() < 0:
        raise DataError(f"{source} has negative values (min {label.min()}); labels must be >= 0")
    if num_classes is not None and label.size and label.max() >= num_classes:
        raise DataError(
            f"{source} has class value {int(label.max())} but the model knows only "
            f"{num_classes} classes (0..{num_classes - 1})"
        )
    out_dtype = np.uint8 if (not label.size or label.max() < 256) else np.int64
    return label.astype(out_dtype, copy=False)


@dataclass(frozen=True)
class Case:
    """One image (and optional label) file of a dataset, with its case and patient ids."""

    case_id: str
    patient_id: str
    image_path: Path
    label_path: Path | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)


def patient_of(case_id: str, patient_regex: str | None = None) -> str:
    """Patient id of a case id: the prefix before ``_frame``/``_slice``, or the regex's group 1.

    Args:
        case_id: the case's id (file stem without ``_image``).
        patient_regex: a regular expression matched at the start of ``case_id`` (group 1, or
            the whole match when it has no group, is the patient id); None for the default
            ``_frameNN``/``_sliceNN`` rule.

    Returns:
        The patient id; ``case_id`` itself when the regex does not match.
    """
    match = re.match(patient_regex or DEFAULT_PATIENT_REGEX, case_id)
    if not match:
        return case_id
    return match.group(1) if match.groups() else match.group(0)


def find_cases(root: str | Path, patient_regex: str | None = None,
               require_labels: bool = True) -> list[Case]:
    """Find the cases under ``root`` (paired folder, nnU-Net folder or a single file).

    Raises :class:`DataError` for a missing or empty folder, or (with ``require_labels``) an
    image without its label.

    Args:
        root: a folder (paired files searched recursively, or nnU-Net ``imagesTr`` /
            ``labelsTr``) or a single image file.
        patient_regex: how case ids map to patient ids (:func:`patient_of`).
        require_labels: refuse images without a label; when False their ``label_path`` is
            None.

    Returns:
        The cases, sorted by folder and name (nnU-Net: by image file name).

    Raises:
        DataError: ``root`` is missing, holds no images, an image lacks its label (with
            ``require_labels``), two files would be one case (:func:`refuse_same_names`), or
            a single file has an unsupported type.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"Path not found: {root}")
    if root.is_file():
        return [_single_file_case(root, patient_regex, require_labels)]
    if (root / "imagesTr").is_dir():
        return _find_nnunet(root, patient_regex, require_labels)
    images: dict[str, list[Path]] = {}
    labels: dict[str, list[Path]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and is_supported(p)):
        stem, _ = split_extension(path)
        rel = str(path.parent.relative_to(root))
        if stem.endswith("_image"):
            images.setdefault(f"{rel}/{stem[:-6]}", []).append(path)
        elif stem.endswith("_label"):
            labels.setdefault(f"{rel}/{stem[:-6]}", []).append(path)
    refuse_same_names(images, root)
    refuse_same_names(labels, root)
    if not images:
        hint = " (found label files without images)" if labels else ""
        raise DataError(
            f"No '<name>_image.<ext>' files found under {root}{hint}; expected pairs like "
            "case1_image.tif + case1_label.tif, or an nnU-Net imagesTr/labelsTr folder"
        )
    cases = []
    missing = []
    for key, (image_path,) in sorted(images.items()):
        label_path = labels.get(key, [None])[0]
        if label_path is None:
            missing.append(image_path.name)
        case_id = key.split("/")[-1]
        cases.append(Case(case_id, patient_of(case_id, patient_regex), image_path, label_path))
    if require_labels and missing:
        raise DataError(
            f"{len(missing)} image(s) under {root} have no matching '_label' file, e.g. {missing[0]}"
        )
    return cases


def refuse_same_names(groups: dict[str, list[Path]], root: Path) -> None:
    """Refuse files that would be one case (same folder and name, other extensions).

    ``groups`` maps a case key to its files. ``a_image.tif`` next to ``a_image.nii.gz`` made
    training silently drop one of them and ``predict`` write both to one ``a_label`` file.

    Args:
        groups: case key -> the files found for it (paths under ``root``).
        root: the dataset folder; the message shows paths relative to it.

    Raises:
        DataError: some key has more than one file (up to three such cases are listed).
    """
    same = [sorted(paths, key=str) for paths in groups.values() if len(paths) > 1]
    if same:
        listed = "; ".join(" and ".join(str(p.relative_to(root)) for p in paths)
                           for paths in same[:3])
        more = f" (and {len(same) - 3} more)" if len(same) > 3 else ""
        raise DataError(f"{len(same)} case name(s) under {root} belong to more than one file: "
                        f"{listed}{more}; keep one file per case (rename or move the others)")


def _single_file_case(path: Path, patient_regex: str | None, require_labels: bool) -> Case:
    stem, ext = split_extension(path)
    if ext not in IMAGE_EXTENSIONS:
        raise DataError(f"Unsupported file type '{ext}' for {path}")
    base = stem[:-6] if stem.endswith("_image") else stem
    label = path.with_name(f"{base}_label{ext}")
    label_path = label if label.exists() and label != path else None
    if require_labels and label_path is None:
        raise DataError(f"No label file found for {path} (expected {label.name})")
    return Case(base, patient_of(base, patient_regex), path, label_path)


def _find_nnunet(root: Path, patient_regex: str | None, require_labels: bool) -> list[Case]:
    labels_dir = root / "labelsTr"
    cases = []
    firsts: dict[str, list[Path]] = {}
    for path in sorted(p for p in (root / "imagesTr").iterdir() if is_supported(p)):
        stem, ext = split_extension(path)
        case_id = re.sub(r"_\d{4}$", "", stem)
        if stem != case_id and not stem.endswith("_0000"):
            continue  # extra modality channels of a case: only the first is used
        firsts.setdefault(case_id, []).append(path)
    refuse_same_names(firsts, root)
    for case_id, (path,) in firsts.items():
        ext = split_extension(path)[1]
        label = labels_dir / f"{case_id}{ext}"
        if require_labels and not label.exists():
            raise DataError(f"nnU-Net case {case_id} has no label {label}")
        cases.append(Case(case_id, patient_of(case_id, patient_regex), path,
                          label if label.exists() else None))
    if not cases:
        raise DataError(f"No images found in {root / 'imagesTr'}")
    return cases


def load_case(case: Case) -> tuple[Volume, np.ndarray | None]:
    """Read and validate a case's image and label (shapes must match).

    A binary mask stored as 0/255 is returned as classes 0/1 (:func:`binary_255_as_classes`).

    Returns:
        The image :class:`Volume` (data as stored) and the label map as class indices
        (:func:`check_label`: ``uint8`` or ``int64``), None when the case has no label.

    Raises:
        DataError: either file cannot be read, the image fails :func:`check_image`, or the
            label fails :func:`check_label` (including a shape other than the image's).
    """
    image = read_volume(case.image_path)
    check_image(image.data, source=str(case.image_path.name))
    label = None
    if case.label_path is not None:
        raw = read_volume(case.label_path).data
        label = binary_255_as_classes(
            check_label(raw, image.data.shape, source=str(case.label_path.name)))
    return image, label


def binary_255_as_classes(label: np.ndarray) -> np.ndarray:
    """A label map holding only 0 and 255 (a binary mask exported as an 8-bit image) as 0/1.

    Read as class indices it made a 256-class model; a :class:`DataWarning` says it was mapped.
    Any other label map is returned unchanged.

    Returns:
        A new ``uint8`` 0/1 array for a 0/255 mask (it must contain 255), else ``label``.
    """
    if not label.size or label.max() != 255 or not ((label == 0) | (label == 255)).all():
        return label
    warnings.warn(DataWarning("Label files holding a binary mask stored as 0/255 are read as "
                              "classes 0 (background) and 1 (foreground)"), stacklevel=2)
    return (label == 255).astype(np.uint8)
