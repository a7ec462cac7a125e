"""End-to-end workflows shared by the CLI and the widgets: train, evaluate, predict, bank building."""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed as ddp
from .bank import ExemplarBank
from .checkpoint import atomic_write_json, save_model
from .data import SliceSample, as_slices, load_slices, num_classes_of
from .duplicates import THRESHOLD as DUPLICATE_THRESHOLD
from .duplicates import duplicate_groups, duplicate_pairs, thumbnails
from .engine import BANK_DIR, load_engine
from .errors import DataError, JRASError
from .io import (
    IMAGE_EXTENSIONS,
    Case,
    check_image,
    find_cases,
    is_supported,
    load_case,
    read_volume,
    refuse_same_names,
    split_extension,
    write_volume,
)
from .metrics import evaluate_case, summarize
from .model import JRASModel, ModelConfig
from .progress import CancelFn, Progress, ProgressFn
from .provenance import provenance
from .retrieval import embed_images, retriever_version
from .run_files import CONFIG_FILE, TRAIN_CONFIG_FILE
from .run_settings import check_resumable, clear_run, record_settings, training_settings
from .train import JointTrainer, SliceSet, TrainConfig, seed_everything
from .trust_tuning import tune_readout_trust
from .volume_memory import GUIDE_SOURCES, diagnostic_memory


def provenance_of(sample: SliceSample, origin: str = "training") -> dict[str, Any]:
    """Bank provenance record of a slice (file name only: no folder paths leave the machine)."""
    return {"case_id": sample.case_id, "patient_id": sample.patient_id,
            "slice_index": sample.slice_index, "source": Path(sample.source).name, "origin": origin}


def build_bank(bank_dir: str | Path, model: JRASModel, samples: Sequence[SliceSample],
               embeddings: np.ndarray | None = None, origin: str = "training",
               size: int | None = None) -> ExemplarBank:
    """Create a bank at ``bank_dir`` (replacing an old one) holding ``samples`` with embeddings.

    The bank is built in a temporary folder and renamed into place when complete. ``size``
    stores exemplars at a reduced resolution (default: the model size).

    Args:
        bank_dir: the bank folder to (re)create.
        model: a J-RAS model: its retriever embeds the slices, its config gives the classes.
        samples: labelled slices, all of one size (the model size).
        embeddings: ``(N, D)`` retriever embeddings of ``samples`` (e.g. the trainer's);
            None: computed here.
        origin: the provenance ``origin`` of every exemplar.
        size: side of the stored exemplars; None: the model size.

    Returns:
        The new bank, open.
    """
    bank_dir = Path(bank_dir)
    tmp = bank_dir.with_name(f".{bank_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = model.config
    images = np.stack([s.image for s in samples])
    masks = np.stack([s.label for s in samples])
    if embeddings is None:
        embeddings = embed_images(model.retriever, torch.from_numpy(images)).numpy()
    bank = ExemplarBank.create(tmp, size=size or cfg.size, num_classes=cfg.num_classes,
                               embed_dim=model.retriever.embed_dim, class_names=cfg.class_names)
    bank.add(images, masks, [provenance_of(s, origin) for s in samples],
             embeddings=np.asarray(embeddings, np.float32),
             retriever_version=retriever_version(model.retriever))
    bank.close()
    shutil.rmtree(bank_dir, ignore_errors=True)
    tmp.rename(bank_dir)
    return ExemplarBank.open(bank_dir)


def _data_summary(path: str | Path, cases: Sequence[Case], samples: Sequence[SliceSample]) -> dict:
    # the folder's name only: a shared run folder must not reveal where (whose) data lives
    return {"path": Path(path).name, "cases": len(cases),
            "patients": len({c.patient_id for c in cases}), "slices": len(samples)}


def train_run(data: str | Path, out: str | Path, model_config: dict[str, Any],
              train_config: TrainConfig, val: str | Path | None = None,
              patient_regex: str | None = None, resume: bool = True, epochs: int | None = None,
              group_duplicates: bool = False, progress: ProgressFn | None = None,
              cancel: CancelFn | None = None, tune_trust: bool = True) -> Path:
    """Train a J-RAS (or baseline) model on the cases under ``data`` into the run folder ``out``.

    ``model_config`` holds :class:`ModelConfig` fields; ``num_classes`` is read from the labels
    when absent. The run folder receives ``config.json``, ``model.safetensors``,
    ``train_config.json``, ``log.jsonl``, ``checkpoints/`` and (J-RAS only) the training ``bank/``.
    ``epochs`` (when given) sets the number of steps from the number of training slices.
    ``group_duplicates`` merges patients with near-duplicate slices into one pseudo-patient
    (:mod:`.duplicates`), so that training never retrieves a near-copy of its query.

    A run folder that already holds a run is resumed only when every setting that affects
    training matches (:mod:`.run_settings`); otherwise :class:`JRASError` names the differing
    settings before anything in it is touched. ``resume=False`` (``--overwrite``) removes the
    previous run's files first and starts afresh.

    Under torchrun (an initialised process group) every rank trains and rank 0 alone writes the
    run folder; the function returns on every rank once it is complete.

    A readout model trained with ``val`` volumes gets the ``readout_trust`` that scores best
    on them with neighbour guides (:func:`~.trust_tuning.tune_readout_trust`, written to
    ``config.json``; the scores go to ``train_config.json`` as ``readout_trust_tuning``),
    unless ``tune_trust`` is False (a value the user chose) or training was cancelled.

    Args:
        data: the training cases, a folder or one file (:func:`~.io.find_cases`).
        out: the run folder.
        model_config: :class:`ModelConfig` fields by name (JSON-like values).
        train_config: the training settings.
        val: validation cases (no patient shared with ``data``) for a logged validation
            Dice, or None.
        patient_regex: how case ids map to patient ids, or None.
        resume: continue a run of the same settings in ``out``; False clears ``out``'s
            previous run first.
        epochs: when given, ``steps = ceil(epochs * training slices / batch_size)``.
        group_duplicates: merge patients with near-duplicate slices.
        progress: receives the trainer's progress events.
        cancel: polled before every step; True ends training early, and the model trained
            so far is written as usual (``steps_done`` in ``train_config.json``).
        tune_trust: choose ``readout_trust`` on the ``val`` volumes (readout models only).

    Returns:
        ``out``.

    Raises:
        DataError: unusable data (:func:`~.data.load_slices`, :func:`~.data.num_classes_of`)
            or validation patients that also train.
        ModelError: an invalid model setting, checked before the data are read.
        JRASError: ``epochs`` < 1, or ``out`` holds a run with other settings.
    """
    out = Path(out)
    # every field checked before the data are read at that size (num_classes, when absent,
    # comes from the labels: a stand-in here)
    checked = ModelConfig(**{"num_classes": max(2, len(model_config.get("class_names") or ())),
                             **model_config})
    cases = find_cases(data, patient_regex)
    size, modality = checked.size, checked.modality
    samples = load_slices(cases, size=size, modality=modality)
    if group_duplicates:
        pseudo = duplicate_groups([s.patient_id for s in samples], [s.image for s in samples])
        samples = [replace(s, patient_id=pseudo[s.patient_id]) for s in samples]
    val_samples = None
    if val is not None:
        val_cases = find_cases(val, patient_regex)
        overlap = {c.patient_id for c in val_cases} & {c.patient_id for c in cases}
        if overlap:
            raise DataError(f"Validation patients also appear in the training data: "
                            f"{sorted(overlap)[:3]}")
        val_samples = load_slices(val_cases, size=size, modality=modality)
    if epochs is not None:
        if epochs < 1:
            raise JRASError(f"epochs must be at least 1, got {epochs}")
        steps = max(1, -(-epochs * len(samples) // train_config.batch_size))
        train_config = replace(train_config, steps=steps)
    config = dict(model_config)
    declared = config.get("num_classes") or len(config.get("class_names") or []) or None
    config["num_classes"] = num_classes_of(samples, declared)
    seed_everything(train_config.seed)
    model = JRASModel(ModelConfig(**config))
    train_set = SliceSet(samples, model.num_classes)
    val_set = SliceSet(val_samples, model.num_classes) if val_samples else None
    fusion = model.config.fusion if model.config.use_retrieval else "concat"
    settings = training_settings(model.config.to_dict(), asdict(train_config.resolved(fusion)),
                                 cases, patient_regex, group_duplicates)
    if resume:
        check_resumable(out, settings)
    elif ddp.is_main():
        clear_run(out)
    ddp.barrier()
    trainer = JointTrainer(model, train_set, train_config, run_dir=out, val=val_set,
                           progress=progress, cancel=cancel)
    if resume:
        trainer.resume()
    if ddp.is_main():
        record_settings(out, settings)
    started = time.time()
    trainer.fit()
    if ddp.is_main():
        save_model(out, model)
        summary = {
            "train": asdict(trainer.config), "data": _data_summary(data, cases, samples),
            "val": Path(val).name if val is not None else None, "steps_done": trainer.step,
            "group_duplicates": group_duplicates,
            "wall_time_s": round(time.time() - started, 1), "device": str(trainer.device),
            "world_size": trainer.world_size, "torch": torch.__version__,
            "machine": platform.machine()}
        atomic_write_json(out / TRAIN_CONFIG_FILE, summary)
        if model.config.use_retrieval:
            build_bank(out / BANK_DIR, model.cpu(), samples,
                       embeddings=trainer.bank_emb.cpu().numpy())
        cancelled = cancel is not None and cancel()
        if tune_trust and val is not None and model.config.uses_readout and not cancelled:
            tuning = tune_readout_trust(out, val_cases, device=str(trainer.device),
                                        progress=progress)
            if tuning["chosen"] is not None:
                atomic_write_json(out / CONFIG_FILE, replace(
                    model.config, readout_trust=tuning["chosen"]).to_dict())
            atomic_write_json(out / TRAIN_CONFIG_FILE, {**summary, "readout_trust_tuning": tuning})
    ddp.barrier()
    return out


def evaluate_run(model_dir: str | Path, data: str | Path, bank: str | Path | None = None,
                 device: str = "auto", patient_regex: str | None = None,
                 progress: ProgressFn | None = None, guide_source: str = "retrieved",
                 group_duplicates: bool | None = None, **engine_options: Any) -> dict[str, Any]:
    """Predict every case under ``data`` and score it: per-case and mean +- std Dice/HD95/HD.

    Queries never retrieve exemplars of their own patient, whatever the bank holds. With
    ``group_duplicates`` they do not retrieve near-duplicates of their image either (bank
    exemplars whose thumbnail correlates >= 0.95 with a slice of the case,
    :mod:`.duplicates`); None (default) turns this on for a retrieval model when every case
    is its own patient (2-D datasets without patient ids, such as BUSI or COVID-19 CT).
    The report carries its ``provenance`` (:mod:`.provenance`; ``guide_source`` is recorded
    there) and, per case, the patients and ids of the exemplars retrieved.
    ``guide_source`` (a diagnostic; see :mod:`.volume_memory`): ``retrieved`` (the default),
    ``none``, ``random`` (K random bank exemplars of other patients), ``neighbour`` (the
    ground truth of slices z +- 1 of the same volume, the only exemplars) or ``oracle`` (the
    slice's own ground truth).
    ``engine_options`` go to :class:`InferenceEngine` (``batch_size``, ``compile_model``,
    ``readout_only``: the readout's propagated mask alone, a diagnostic; ``readout_trust``:
    the weight of that mask for slices guided by their own volume's annotated slices;
    ``self_guide``: the two-pass prediction of volumes, :meth:`InferenceEngine.predict`,
    recorded true when a case took it; all
    recorded in the provenance).

    Args:
        model_dir: the run folder of the model.
        data: the labelled cases to score (:func:`~.io.find_cases`).
        bank: the bank to retrieve from; None: the run's own.
        device: the inference device.
        patient_regex: how case ids map to patient ids, or None.
        progress: receives an ``evaluate`` event per case.
        guide_source: see above.
        group_duplicates: exclude near-duplicates of each case; None: decide as above.
        **engine_options: see above.

    Returns:
        The report: ``provenance``, ``model``, ``bank`` (None for a baseline), ``data``,
        ``guide_source``, ``device``, ``summary`` (:func:`~.metrics.summarize`) and
        ``cases`` (:func:`~.metrics.evaluate_case` per case, with ``case_id``,
        ``patient_id``, ``image``, ``retrieved_patients``, ``retrieved_ids`` and
        ``excluded_duplicates``).

    Raises:
        JRASError: an unknown ``guide_source``, or the errors of :func:`load_engine`,
            :func:`~.io.find_cases` and :meth:`InferenceEngine.predict`.
    """
    if guide_source not in GUIDE_SOURCES:
        raise JRASError(f"--guide-source must be one of {', '.join(GUIDE_SOURCES)}, got "
                        f"{guide_source!r}")
    engine = load_engine(model_dir, bank=bank, device=device, **engine_options)
    cfg = engine.model.config
    cases = find_cases(data, patient_regex)
    if group_duplicates is None:
        group_duplicates = all(c.patient_id == c.case_id for c in cases)
    group_duplicates = bool(group_duplicates and engine.bank is not None)
    bank_thumbs = bank_ids = None
    if group_duplicates:
        bank_ids, bank_images, _ = engine.bank.load_all()
        bank_thumbs = thumbnails(list(bank_images))
    results = []
    self_guided = False  # did any case take the self-guided second pass?
    for i, case in enumerate(cases):
        image, label = load_case(case)
        near: list[int] = []
        if bank_thumbs is not None:
            pairs = duplicate_pairs(thumbnails(list(as_slices(image.data))), bank_thumbs)
            near = sorted({int(bank_ids[j]) for _, j in pairs})
        memory = diagnostic_memory(guide_source, label) if cfg.use_retrieval else None
        depth = image.data.shape[0] if image.data.ndim == 3 else 1
        self_guided = self_guided or engine.self_guides(depth, memory, guide_source)
        pred = engine.predict(image.data, exclude_patient=case.patient_id, exclude_ids=near,
                              guide_source=guide_source, memory=memory)
        result = evaluate_case(pred.labels, label, cfg.num_classes, spacing=image.spacing,
                               class_names=cfg.class_names)
        hits = [e for items in pred.exemplars.values() for e in items]
        results.append({"case_id": case.case_id, "patient_id": case.patient_id,
                        "image": case.image_path.name, **result,
                        "retrieved_patients": sorted({str(e.record.get("patient_id"))
                                                      for e in hits}),
                        "retrieved_ids": sorted({e.id for e in hits}),
                        "excluded_duplicates": near})
        if progress is not None:
            progress(Progress("evaluate", i + 1, len(cases), detail=case.case_id))
    return {
        "provenance": provenance(data=data, cases=cases, model_dir=model_dir,
                                 device=str(engine.device), guide_source=guide_source,
                                 readout_only=engine.readout_only,
                                 self_guide=self_guided,
                                 readout_trust=(engine.readout_trust if cfg.uses_readout
                                                else None),
                                 group_duplicates=group_duplicates,
                                 duplicate_threshold=DUPLICATE_THRESHOLD if group_duplicates
                                 else None),
        "model": {"path": str(model_dir), "config": cfg.to_dict()},
        "bank": ({"path": str(engine.bank.path), "exemplars": len(engine.bank)}
                 if engine.bank is not None else None),
        "data": {"path": str(data), "cases": len(cases)},
        "guide_source": guide_source,
        "device": str(engine.device),
        "summary": summarize(results),
        "cases": results,
    }


REPORT_KEYS = ("summary", "cases")
_MAX_REPORT_BYTES = 256 << 20


def check_report_path(path: str | Path) -> None:
    """Refuse an evaluation report path before evaluating: an existing file is replaced only
    when it is an earlier report (a JSON object with ``summary`` and ``cases``), so that a
    mistyped ``--report`` never overwrites a label file or a model's ``config.json``.

    Raises:
        DataError: a part of the folder path is a file, ``path`` is a folder, or an existing
            file that is not an earlier report.
    """
    path = Path(path)
    blocker = next((f for f in path.parents if f.exists() and not f.is_dir()), None)
    if blocker is not None:
        raise DataError(f"Cannot write {path}: a part of its folder path is a file, not a folder")
    if path.is_dir():
        raise DataError(f"--report {path} is a folder: give a file name, e.g. "
                        f"{path / 'report.json'}")
    if not path.exists():
        return
    try:
        old = (json.loads(path.read_bytes()) if path.stat().st_size <= _MAX_REPORT_BYTES
               else None)
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        old = None
    if not (isinstance(old, dict) and all(k in old for k in REPORT_KEYS)):
        raise DataError(f"--report {path} exists and is not an evaluation report: napari-jras "
                        "replaces only earlier reports; choose another file name")


def output_name(image_path: Path, ext: str = ".tif") -> str:
    """``<stem>_label<ext>`` for an input ``<stem>_image.<ext>`` or ``<stem>.<ext>``."""
    stem, _ = split_extension(image_path)
    base = stem.removesuffix("_image")
    return f"{base}_label{ext}"


def predict_files(model_dir: str | Path, inputs: str | Path, output: str | Path,
                  bank: str | Path | None = None, device: str = "auto", ext: str = ".tif",
                  progress: ProgressFn | None = None, overwrite: bool = False,
                  **engine_options: Any) -> list[Path]:
    """Segment one image file or every image under a folder; writes ``<stem>_label<ext>`` files.

    Images in subfolders of a folder input are written to the same subfolders of ``output``.
    Every output path is checked before anything is written (:func:`plan_outputs`): an existing
    file is replaced only with ``overwrite``, and an input of the run never.
    ``engine_options`` go to :class:`InferenceEngine` (``batch_size``, ``compile_model``,
    ...).

    Args:
        model_dir: the run folder of the model.
        inputs: one image file or a folder of images (:func:`find_images`).
        output: the folder the label files are written to (created as needed).
        bank: the bank to retrieve from; None: the run's own.
        device: the inference device.
        ext: the label files' extension (``.tif``, ``.nii.gz``...), which sets the format.
        progress: receives a ``predict`` event per image written.
        overwrite: replace existing label files of earlier predictions.
        **engine_options: see above.

    Returns:
        The label files written, in the order of the images.

    Raises:
        DataError: a refused input or output (:func:`plan_outputs`), or an unreadable image.
        ModelError: the model cannot be loaded (:func:`load_engine`).
        BankError: its bank cannot be used.
    """
    plan = plan_outputs(inputs, output, ext, overwrite)
    engine = load_engine(model_dir, bank=bank, device=device, **engine_options)
    written = []
    for i, (path, target) in enumerate(plan):
        image = read_volume(path)
        pred = engine.predict(check_image(image.data, path.name))
        written.append(write_volume(target, pred.labels, image.spacing))
        if progress is not None:
            progress(Progress("predict", i + 1, len(plan), detail=path.name))
    return written


def plan_outputs(inputs: str | Path, output: str | Path, ext: str = ".tif",
                 overwrite: bool = False) -> list[tuple[Path, Path]]:
    """(image, label file to write) for every image to predict, all checked before any write.

    Refused: an ``output`` that is a file; writing next to an input image that already has a
    label file (of any format: its ground truth; predicting into the input folder replaced
    ``q_label.tif``), whatever ``overwrite`` says; an existing file without ``overwrite``; an
    existing folder; a folder path that runs through a file. Two images that would write the
    same file are refused by :func:`find_images`.

    Args:
        inputs: one image file or a folder of images.
        output: the output folder; subfolders of a folder input are mirrored in it.
        ext: the label files' extension.
        overwrite: allow replacing existing files (never an input's label file).

    Returns:
        ``(image, label file)`` pairs, in the order of :func:`find_images`.

    Raises:
        DataError: any of the refusals above.
    """
    inputs, output = Path(inputs), Path(output)
    files = find_images(inputs)
    if output.exists() and not output.is_dir():
        raise DataError(f"--output {output} is a file: give a folder for the label files")
    plan = [(path, output / (path.parent.relative_to(inputs) if inputs.is_dir() else "")
             / output_name(path, ext)) for path in files]
    existing = []
    for path, target in plan:
        if target.parent.resolve() == path.parent.resolve():  # writing into the input folder
            labels = (path.with_name(output_name(path, e)) for e in IMAGE_EXTENSIONS)
            truth = next((label for label in labels if label.exists()), None)
            if truth is not None:
                verb = ("overwrite" if truth.resolve() == target.resolve()
                        else "add a second label file next to")
                raise DataError(f"Predicting {path.name} into its own folder would {verb} "
                                f"{truth}, the label file of that image (its ground truth?): "
                                "predictions "
                                "never replace or double input labels, even with --overwrite; "
                                "choose another --output folder")
        if target.is_dir():
            raise DataError(f"Cannot write {target}: a folder of that name is in the way")
        if target.exists():
            existing.append(target)
        blocker = next((f for f in target.parents if f.exists() and not f.is_dir()), None)
        if blocker is not None:
            raise DataError(f"Cannot write {target}: {blocker} is a file, not a folder")
    if existing and not overwrite:
        raise DataError(f"{len(existing)} output file(s) already exist (e.g. {existing[0]}): "
                        "use --overwrite to replace earlier predictions, or another --output "
                        "folder")
    return plan


def find_images(path: str | Path) -> list[Path]:
    """Images to predict: one file, or a folder's ``*_image.*`` files (else every image file).

    Refuses a folder where two images would give the same label file (``a_image.tif`` and
    ``a_image.nii.gz``, or ``a.tif`` and ``a.png``).

    Raises:
        DataError: ``path`` is missing, of an unsupported type, holds no image, or two of its
            images would give the same label file.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"Input not found: {path}")
    if path.is_file():
        if not is_supported(path):
            raise DataError(f"Unsupported file type: {path.name}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and is_supported(p))
    images = [p for p in files if split_extension(p)[0].endswith("_image")]
    images = images or [p for p in files if not split_extension(p)[0].endswith("_label")]
    if not images:
        raise DataError(f"No image files (.tif, .png, .nii.gz, ...) found under {path}")
    groups: dict[Path, list[Path]] = {}
    for image in images:
        groups.setdefault(image.with_name(output_name(image, "")), []).append(image)
    refuse_same_names(groups, path)
    return images
