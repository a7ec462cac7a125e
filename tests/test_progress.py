"""The one progress event: records become events, the CLI prints the same lines as before."""

from __future__ import annotations

import dataclasses

import pytest

from napari_jras.cli import _progress_printer
from napari_jras.core.progress import Progress


def test_a_trainer_record_becomes_an_event():
    record = {"step": 40, "total": 200, "time_s": 3.5, "phase": "train", "loss": 0.25,
              "lr": 0.001, "loss_contrastive": 1.5, "eta_s": 14.2, "world_size": 2,
              "checksums": ["a", "b"], "in_sync": True}
    event = Progress.from_record(record)
    assert (event.stage, event.done, event.total, event.eta_s) == ("train", 40, 200, 14.2)
    assert event.metrics == {"time_s": 3.5, "loss": 0.25, "lr": 0.001, "loss_contrastive": 1.5,
                             "world_size": 2.0}
    assert event.detail == ""
    evaluate = Progress.from_record({"step": 2, "total": 3, "phase": "evaluate", "case": "p7"})
    assert evaluate == Progress("evaluate", 2, 3, detail="p7")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.done = 41  # type: ignore[misc]


def test_cli_progress_lines(capsys):
    show = _progress_printer(quiet=False)
    show(Progress.from_record({"step": 40, "total": 200, "phase": "train", "loss": 0.25,
                               "lr": 0.001, "loss_contrastive": 1.5, "val_dice": 0.8125,
                               "eta_s": 14.2}))
    show(Progress("evaluate", 2, 3, detail="patient002_frame01"))
    show(Progress("static", 1, 4, detail="p1", metrics={"dice": 0.9, "corrected": 120.0}))
    show(Progress("embed", 0, 12))
    assert capsys.readouterr().err.splitlines() == [
        "train 40/200  loss=0.2500  loss_contrastive=1.5000  val_dice=0.8125  eta=14s",
        "evaluate 2/3  patient002_frame01",
        "static 1/4  p1",
        "embed 0/12",
    ]
    assert _progress_printer(quiet=True) is None


def test_trainer_reports_events(acdc_slices_dir):
    from napari_jras.core.data import load_slices
    from napari_jras.core.io import find_cases
    from napari_jras.core.model import JRASModel, ModelConfig
    from napari_jras.core.train import JointTrainer, SliceSet, TrainConfig

    cases = find_cases(acdc_slices_dir)[:2]
    loads: list[Progress] = []
    samples = load_slices(cases, size=32, progress=loads.append)
    assert [(p.stage, p.done, p.total) for p in loads] == [("load", 1, 2), ("load", 2, 2)]
    assert [p.detail for p in loads] == [c.case_id for c in cases]
    model = JRASModel(ModelConfig(num_classes=4, size=32, use_retrieval=False,
                                  backbone_options={"base_channels": 4}))
    events: list[Progress] = []
    JointTrainer(model, SliceSet(samples, 4),
                 TrainConfig(steps=2, batch_size=2, log_every=1, checkpoint_every=0,
                             device="cpu"), progress=events.append).fit()
    train = [p for p in events if p.stage == "train"]
    assert [p.done for p in train] == [1, 2] and {p.total for p in train} == {2}
    assert all("loss" in p.metrics and p.eta_s is not None for p in train)
