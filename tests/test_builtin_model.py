"""The cardiac MRI model shipped in the package: loads offline and segments the sample well."""

import numpy as np
import pytest

from napari_jras._sample_data import sample_paths
from napari_jras.core.io import read_volume
from napari_jras.core.metrics import evaluate_case
from napari_jras.core.workspace import BUILTIN, Workspace, builtin_model_dir


@pytest.fixture(scope="module")
def builtin_prediction(tmp_path_factory):
    packaged = {p: p.stat().st_mtime_ns for p in builtin_model_dir().rglob("*")}
    workspace = Workspace.open(BUILTIN, home=tmp_path_factory.mktemp("home"))
    engine = workspace.engine("cpu")
    image_path, label_path = sample_paths("ED")
    image, label = read_volume(image_path).data, read_volume(label_path).data
    yield engine, (image, label), workspace.predict(image, modality="mri")
    workspace.close()
    # the packaged model is only read (it may live in a read-only site-packages)
    assert {p: p.stat().st_mtime_ns for p in builtin_model_dir().rglob("*")} == packaged


def test_builtin_bank_matches_its_retriever(builtin_prediction):
    engine, _, _ = builtin_prediction
    assert len(engine.bank) > 100
    assert not engine.bank.needs_embedding(engine.version)  # no re-embedding at start-up
    origins = {r["origin"] for r in engine.bank.records()}
    assert origins == {"training"}


def test_builtin_model_segments_the_sample(builtin_prediction):
    engine, (image, label), pred = builtin_prediction
    assert pred.labels.shape == image.shape
    assert engine.model.config.class_names == ["background", "RV", "myocardium", "LV"]
    # the sample patient (ACDC patient002) is not in the training data of the model
    assert "patient002" not in {r["patient_id"] for r in engine.bank.records()}
    scores = evaluate_case(pred.labels, label, engine.model.config.num_classes)
    assert scores["mean"]["dice"] > 0.6
    z = int(np.argmax((label > 0).sum(axis=(1, 2))))
    assert len(pred.exemplars[z]) == engine.model.config.k
