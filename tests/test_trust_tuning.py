"""readout_trust chosen per model on the validation volumes at the end of training."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import TINY_MODEL

from napari_jras.cli import main
from napari_jras.core.engine import InferenceEngine, load_engine
from napari_jras.core.errors import JRASError
from napari_jras.core.io import find_cases, read_volume
from napari_jras.core.metrics import mean_dice
from napari_jras.core.pipeline import train_run
from napari_jras.core.train import TrainConfig
from napari_jras.core.trust_tuning import best_trust, neighbour_dice, tune_readout_trust
from napari_jras.core.volume_memory import diagnostic_memory

REGEX = r"^(p\d+|patient\d+)_"


@pytest.fixture(scope="module")
def val_dir(data_dir, tmp_path_factory):
    """One 3-D ACDC case (patient045, a patient none of the pseudo-patients is named after)."""
    folder = tmp_path_factory.mktemp("val")
    for suffix in ("image", "label"):
        shutil.copy(data_dir / "acdc" / f"patient045_frame01_{suffix}.tif", folder)
    return folder


def test_neighbour_dice_scores_each_value_as_a_prediction_with_it_would(tiny_run, val_dir):
    engine = InferenceEngine.from_run(tiny_run, device="cpu")
    dice, volumes = neighbour_dice(engine, find_cases(val_dir), grid=(0.0, 1.0))
    assert volumes == 1 and list(dice) == [0.0, 1.0]
    assert engine.readout_trust == pytest.approx(0.75)  # left as it was
    with pytest.raises(JRASError, match="between 0 and 1"):  # a grid value out of range
        neighbour_dice(engine, find_cases(val_dir), grid=(0.5, 1.5))
    assert engine.readout_trust == pytest.approx(0.75)
    image = read_volume(val_dir / "patient045_frame01_image.tif").data
    label = read_volume(val_dir / "patient045_frame01_label.tif").data.astype(np.uint8)
    for trust in (0.0, 1.0):
        pred = InferenceEngine.from_run(tiny_run, device="cpu", readout_trust=trust).predict(
            image, exclude_patient="patient045", guide_source="neighbour",
            memory=diagnostic_memory("neighbour", label))
        assert dice[trust] == pytest.approx(mean_dice(pred.labels, label, 4))


def test_best_trust_prefers_the_network_on_ties():
    assert best_trust({0.0: 0.5, 0.5: 0.7, 1.0: 0.7}) == 0.5
    assert best_trust({0.0: 0.8, 0.75: 0.7}) == 0.0
    assert best_trust({0.0: 0.6, 0.25: 0.65, 0.75: 0.9, 1.0: 0.85}) == 0.75


def test_single_slices_cannot_tune_the_trust(tiny_run, data_dir):
    tuning = tune_readout_trust(tiny_run, find_cases(data_dir / "busi"), device="cpu")
    assert tuning["chosen"] is None and "more than one slice" in tuning["reason"]


def test_train_with_val_writes_the_chosen_trust_and_a_given_one_is_kept(acdc_slices_dir, val_dir,
                                                                       tmp_path):
    out = tmp_path / "run"
    config = dict(TINY_MODEL, use_retrieval=True, modality="mri")
    train_run(acdc_slices_dir, out, config, TrainConfig(steps=3, batch_size=4, seed=0),
              val=val_dir, patient_regex=REGEX)
    tuning = json.loads((out / "train_config.json").read_text())["readout_trust_tuning"]
    assert tuning["volumes"] == 1 and tuning["guide_source"] == "neighbour"
    assert set(tuning["dice"]) == {str(t) for t in tuning["grid"]}
    chosen = best_trust({float(t): d for t, d in tuning["dice"].items()})
    assert tuning["chosen"] == chosen
    assert json.loads((out / "config.json").read_text())["readout_trust"] == chosen
    assert load_engine(out, device="cpu").readout_trust == chosen
    # a value the user gives is kept; the finished run resumes (the trust decides no weight)
    assert main(["train", "--data", str(acdc_slices_dir), "--val", str(val_dir), "--out",
                 str(out), "--backbone", "unet", "--backbone-options",
                 json.dumps(TINY_MODEL["backbone_options"]), "--size", "32", "--k", "2",
                 "--retriever-options", json.dumps(TINY_MODEL["retriever"]), "--class-names",
                 ",".join(TINY_MODEL["class_names"]), "--modality", "mri", "--steps", "3",
                 "--batch-size", "4", "--patient-regex", REGEX, "--readout-trust", "0.5",
                 "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["readout_trust"] == 0.5
    assert "readout_trust_tuning" not in json.loads((out / "train_config.json").read_text())


@pytest.mark.parametrize("how", ["switched off", "cancelled"])
def test_no_tuning_when_switched_off_or_cancelled(acdc_slices_dir, val_dir, tmp_path, how):
    config = dict(TINY_MODEL, use_retrieval=True, modality="mri")
    options = ({"tune_trust": False} if how == "switched off"
               else {"cancel": lambda: True})  # cancelled before its first step
    out = train_run(acdc_slices_dir, tmp_path / "run", config,
                    TrainConfig(steps=2, batch_size=4, seed=0), val=val_dir,
                    patient_regex=REGEX, **options)
    assert json.loads((out / "config.json").read_text())["readout_trust"] == 0.75
    assert "readout_trust_tuning" not in json.loads((out / "train_config.json").read_text())
