"""Every model and training setting has a documented range (docs/cli.md, "Configuration
reference"); values outside it, or of the wrong type, are refused with one line naming the field
before anything is built, allocated or written."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_jras_core import TINY_RETRIEVER, TINY_UNET, synthetic_samples

from napari_jras.core.checkpoint import load_model, save_model
from napari_jras.core.data import SliceSample
from napari_jras.core.errors import DataError, JRASError, ModelError
from napari_jras.core.fusion import fusion_weights
from napari_jras.core.model import JRASModel, ModelConfig
from napari_jras.core.train import JointTrainer, SliceSet, TrainConfig

TINY = {"num_classes": 3, "size": 32, "backbone_options": TINY_UNET,
        "retriever": dict(TINY_RETRIEVER)}

BAD_MODEL = [
    ({"num_classes": 10**9},
     "num_classes must be a whole number between 2 and 256, got 1000000000"),
    ({"num_classes": 3.0}, "num_classes must be a whole number"),
    ({"num_classes": True}, "num_classes must be a whole number"),
    ({"size": 10**5}, "size must be a whole number between 16 and 2048, got 100000"),
    ({"size": 64.5}, "size must be a whole number between 16 and 2048, got 64.5"),
    ({"size": "64"}, "size must be a whole number"),
    ({"k": 2.5}, "K must be between 1 and 8"),
    ({"k": True}, "K must be between 1 and 8"),
    ({"tau": 1e-6}, r"tau must be a number in \[0.01, 10\], got 1e-06"),
    ({"tau": float("nan")}, "tau must be a number in"),
    ({"tau": "0.1"}, "tau must be a number in"),
    ({"use_retrieval": "yes"}, "use_retrieval must be true or false"),
    ({"align_shift": float("inf")}, "align_shift must be a number in"),
    ({"modality": "xray"}, "modality must be one of auto, mri, ct, us"),
    ({"class_names": ["background", "", "LV"]}, "class names must be non-empty text"),
    ({"class_names": ["background", 7, "LV"]}, "class names must be non-empty text"),
    ({"class_names": ["background", "LV", "LV"]}, "class names must differ"),
    ({"class_names": "background,LV,RV"}, "class names given for 3 classes"),
    ({"backbone": "vnet"}, "Unknown backbone 'vnet'"),
    ({"backbone_options": {"widht": 3}},
     r"Unknown option\(s\) widht for backbone 'unet'; valid options: base_channels, depth"),
    ({"backbone_options": [1]}, "backbone_options must be a JSON object"),
    ({"retriever": {"encoder": "cnn", "embed_dim": 0}},
     "retriever option 'embed_dim' must be a whole number between 2 and 2048, got 0"),
    ({"retriever": {"embed_dim": 10**7}}, "retriever option 'embed_dim' must be a whole number"),
    ({"retriever": {"width": 10**5}}, "retriever option 'width' must be a whole number"),
    ({"retriever": {"input_size": 10**5}}, "retriever option 'input_size' must be a whole"),
    ({"retriever": {"input_size": 32.5}}, "retriever option 'input_size' must be a whole"),
    ({"retriever": {"encoder": "resnet"}}, "retriever option 'encoder' must be one of cnn, hf"),
    ({"retriever": {"center": "yes"}}, "retriever option 'center' must be true or false"),
    ({"retriever": {"colour": 1}},
     r"Unknown retriever option\(s\) colour; valid: encoder, embed_dim, width"),
    ({"retriever": [1]}, "retriever option.* must be a JSON object"),
    ({"format_version": "1"}, "format_version must be a whole number"),
]


@pytest.mark.parametrize("changes,message", BAD_MODEL, ids=[str(c) for c, _ in BAD_MODEL])
def test_model_config_out_of_range_is_refused(changes, message):
    with pytest.raises(ModelError, match=message):
        ModelConfig(**{**TINY, **changes})


@pytest.mark.parametrize("changes,message", [
    ({"size": 64.5}, "size must be a whole number"),
    ({"num_classes": 10**9}, "num_classes must be a whole number between 2 and 256"),
    ({"backbone_options": {"base_channels": 4, "depth": 40}}, "option 'depth' must be a whole"),
    ({"tau": 1e-6}, "tau must be a number in"),
])
def test_config_json_out_of_range_is_refused_before_building(changes, message, tmp_path,
                                                             monkeypatch):
    run = tmp_path / "run"
    save_model(run, JRASModel(ModelConfig(**TINY)))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, **changes}))

    def no_build(*args, **kwargs):
        raise AssertionError("a layer was built")

    monkeypatch.setattr("napari_jras.core.model.build_retriever", no_build)
    monkeypatch.setattr("napari_jras.core.model.build_backbone", no_build)
    with pytest.raises(ModelError, match=message):
        load_model(run)


def test_old_run_configs_still_load(tmp_path):
    run = tmp_path / "run"
    save_model(run, JRASModel(ModelConfig(**TINY)))
    config = json.loads((run / "config.json").read_text())
    del config["retriever"]["center"]  # saved before centring existed
    (run / "config.json").write_text(json.dumps(config))
    assert load_model(run).config.retriever["center"] is False


@pytest.mark.parametrize("tau", [1e-6, 1e-30, 1e-40, 1e-45])
def test_tiny_tau_gives_finite_weights(tau):
    scores = torch.tensor([[0.9, 0.8, -math.inf], [0.5, 0.5, 0.1]])
    weights = fusion_weights(scores, tau)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]))


def test_fusion_weights_are_finite_in_half_precision():
    scores = torch.tensor([[0.99, 0.2, -0.9]], dtype=torch.float16)
    weights = fusion_weights(scores, 1e-5)  # 0.99 / 1e-5 overflows float16
    assert torch.isfinite(weights).all() and abs(float(weights.sum()) - 1) < 1e-6


BAD_TRAIN = [
    ({"steps": 0}, "steps must be a whole number between 1 and"),
    ({"steps": -1}, "steps must be"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"batch_size": 0}, "batch_size must be a whole number between 1 and 4096"),
    ({"batch_size": 10**6}, "batch_size must be"),
    ({"lr": float("nan")}, r"lr must be a number in \(0, 1\], got nan"),
    ({"lr": -1.0}, "lr must be a number in"),
    ({"lr": 0.0}, "lr must be a number in"),
    ({"lr": "0.1"}, "lr must be a number in"),
    ({"weight_decay": -0.1}, "weight_decay must be a number in"),
    ({"warmup_fraction": 2.0}, "warmup_fraction must be a number in"),
    ({"contrastive_tau": 0.0}, "contrastive_tau must be a number in"),
    ({"contrastive_every": -1}, "contrastive_every must be a whole number between 0"),
    ({"contrastive_candidates": 1}, "contrastive_candidates must be a whole number between 2"),
    ({"contrastive_positives": 64}, "contrastive_positives .64. must be fewer than"),
    ({"retriever_warmup_steps": -5}, "retriever_warmup_steps must be"),
    ({"refresh_every": -1}, "refresh_every must be"),
    ({"log_every": -1}, "log_every must be a whole number between 0"),
    ({"checkpoint_every": 1.5}, "checkpoint_every must be a whole number"),
    ({"val_every": -1}, "val_every must be"),
    ({"seed": -1}, "seed must be a whole number between 0"),
    ({"guide_dropout": 1.5}, r"guide_dropout must be a number in \[0, 1\)"),
    ({"guide_dropout": 1.0}, "guide_dropout must be a number in"),
    ({"guide_dropout": 0.5, "neighbour_guides": 0.6},
     r"guide_dropout \+ neighbour_guides \+ own_guides must not exceed 1"),
    ({"own_guides": -0.1}, r"own_guides must be a number in \[0, 1\]"),
    ({"class_sampling": 2}, r"class_sampling must be a number in \[0, 1\]"),
    ({"image_dropout": 1.0}, "image_dropout must be a number in"),
    ({"amp": "no"}, "amp must be true or false"),
    ({"augment": 1}, "augment must be true or false"),
    ({"device": 3}, "device must be a name"),
    ({"extra": []}, "extra must be a JSON object"),
]


@pytest.mark.parametrize("changes,message", BAD_TRAIN, ids=[str(c) for c, _ in BAD_TRAIN])
def test_train_config_out_of_range_is_refused(changes, message):
    with pytest.raises(JRASError, match=message):
        TrainConfig(**changes)


def test_log_and_checkpoint_every_zero_mean_at_the_end_only(tmp_path):
    model = JRASModel(ModelConfig(**TINY))
    trainer = JointTrainer(model, SliceSet(synthetic_samples(), 3),
                           TrainConfig(steps=3, batch_size=2, log_every=0, checkpoint_every=0,
                                       contrastive_every=0, augment=False, device="cpu"),
                           run_dir=tmp_path)
    history = trainer.fit()
    assert [r["step"] for r in history if r["phase"] == "train"] == [3]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000003"]


def test_one_patient_cannot_train_jras_but_can_train_a_baseline():
    one = [SliceSample(s.image, s.label, "p0_a", "p0", s.slice_index, "x")
           for s in synthetic_samples(n_patients=1)]
    with pytest.raises(DataError, match="needs slices of at least 2 patients, found only 1 "
                                        r"\(p0\).*--no-retrieval"):
        JointTrainer(JRASModel(ModelConfig(**TINY)), SliceSet(one, 3), TrainConfig(steps=1))
    baseline = JRASModel(ModelConfig(**TINY, use_retrieval=False))
    JointTrainer(baseline, SliceSet(one, 3), TrainConfig(steps=1, device="cpu")).fit()
