"""Build the bundled sample (``src/napari_jras/_sample``) and the test cases (``tests/data``).

Run once from the repository root, with the project's shared data folder at hand::

    python docs/make_sample_data.py --data ../shared/data

The package never reads the shared data folder at run time: this script copies a few real cases
into the repository, cropped or downscaled so that each output stays well under 2 MB.

Outputs
-------
``src/napari_jras/_sample/``
    ACDC patient002 (a validation patient: the built-in model, trained on ``acdc/train``, never
    saw it), end-diastole (``frame01``) and end-systole (``frame02``) frames, all slices,
    full field of view (256 x 232 px). Intensities are kept exactly as distributed
    (uint16, min-max scaled per volume by the public preprocessing); zlib-compressed TIFF.
``tests/data/``
    ``acdc/``      ACDC patient045 frame01 (validation patient), cropped to 112 x 112 px, TIFF;
    ``nifti/``     ACDC patient045 frame02, same crop, as NIfTI with spacing (10, 1.5, 1.5) mm;
    ``busi/``      BUSI benign_100, breast ultrasound, downscaled 2x, PNG;
    ``covid_ct/``  COVID-19 CT slice 52 (MedSeg), native size, PNG.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = ROOT / "src" / "napari_jras" / "_sample"
TEST_DIR = ROOT / "tests" / "data"


def heart_crop(label: np.ndarray, size: int) -> tuple[slice, slice]:
    """In-plane window of ``size`` px centred on the labelled heart, kept inside the image."""
    _, ys, xs = np.nonzero(label)
    slices = []
    for coords, extent in ((ys, label.shape[1]), (xs, label.shape[2])):
        if extent <= size:
            slices.append(slice(0, extent))
            continue
        centre = (int(coords.min()) + int(coords.max())) // 2
        start = int(np.clip(centre - size // 2, 0, extent - size))
        slices.append(slice(start, start + size))
    return slices[0], slices[1]


def write_tiff(path: Path, data: np.ndarray) -> None:
    tifffile.imwrite(path, data, compression="zlib", predictor=data.dtype != np.uint8)


def acdc_pair(data: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    image = tifffile.imread(data / "acdc" / "val" / f"{case}_image.tif")
    label = tifffile.imread(data / "acdc" / "val" / f"{case}_label.tif")
    return image, label


def make_sample(data: Path) -> None:
    SAMPLE_DIR.mkdir(parents=True, exist_ok=True)
    frames = {}
    for case in ("patient002_frame01", "patient002_frame02"):
        frames[case] = acdc_pair(data, case)
    # the full field of view: the built-in model was trained on whole ACDC slices, and a crop
    # around the heart changes the apparent heart size enough to cost it Dice
    for case, (image, label) in frames.items():
        write_tiff(SAMPLE_DIR / f"{case}_image.tif", image)
        write_tiff(SAMPLE_DIR / f"{case}_label.tif", label)
        print(case, image.shape)


def make_tests(data: Path) -> None:
    import nibabel  # noqa: F401  (fail early if missing)

    from napari_jras.core.io import write_volume

    for sub in ("acdc", "nifti", "busi", "covid_ct"):
        (TEST_DIR / sub).mkdir(parents=True, exist_ok=True)
    # ACDC volume (TIFF) and its other frame as NIfTI with a known spacing
    img1, lab1 = acdc_pair(data, "patient045_frame01")
    img2, lab2 = acdc_pair(data, "patient045_frame02")
    ys, xs = heart_crop(np.maximum(lab1 > 0, lab2 > 0), 112)
    write_tiff(TEST_DIR / "acdc" / "patient045_frame01_image.tif", np.ascontiguousarray(img1[:, ys, xs]))
    write_tiff(TEST_DIR / "acdc" / "patient045_frame01_label.tif", np.ascontiguousarray(lab1[:, ys, xs]))
    spacing = (10.0, 1.5, 1.5)
    write_volume(TEST_DIR / "nifti" / "patient045_frame02_image.nii.gz", img2[:, ys, xs], spacing)
    write_volume(TEST_DIR / "nifti" / "patient045_frame02_label.nii.gz", lab2[:, ys, xs], spacing)
    # BUSI ultrasound, downscaled 2x (image: area average; label: nearest)
    from skimage.transform import downscale_local_mean

    src = data / "busi" / "benign"
    image = iio.imread(src / "benign_100_image.png")
    label = iio.imread(src / "benign_100_label.png")
    h, w = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
    small = downscale_local_mean(image[:h, :w].astype(np.float32), (2, 2))
    iio.imwrite(TEST_DIR / "busi" / "benign_100_image.png", np.round(small).astype(np.uint8))
    iio.imwrite(TEST_DIR / "busi" / "benign_100_label.png", label[:h:2, :w:2].astype(np.uint8))
    # COVID-19 CT slice, native size
    for kind in ("image", "label"):
        shutil.copyfile(data / "covid_ct" / "train" / f"52_{kind}.png",
                        TEST_DIR / "covid_ct" / f"52_{kind}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                        help="the shared data folder (acdc/, busi/, covid_ct/)")
    parser.add_argument("--only", choices=("sample", "tests"), default=None)
    args = parser.parse_args()
    if args.only in (None, "sample"):
        make_sample(args.data)
    if args.only in (None, "tests"):
        make_tests(args.data)
    for folder in (SAMPLE_DIR, TEST_DIR):
        total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"{folder.relative_to(ROOT)}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
