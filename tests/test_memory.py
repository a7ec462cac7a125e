"""Training memory: estimated before allocating, refused with a clear message when it will not fit
(instead of the kernel killing the process); SAM's defaults fit a workstation."""

from __future__ import annotations

import json
import resource

import pytest
import torch
from test_jras_core import TINY_RETRIEVER, TINY_UNET, synthetic_samples

from napari_jras.cli import main
from napari_jras.core import memory
from napari_jras.core.backbones import SAM
from napari_jras.core.errors import JRASError
from napari_jras.core.memory import GIB, available_memory, estimate_training_memory
from napari_jras.core.model import JRASModel, ModelConfig
from napari_jras.core.train import JointTrainer, SliceSet, TrainConfig

REGEX = r"^(p\d+)_"


def tiny(**changes) -> JRASModel:
    return JRASModel(ModelConfig(**{"num_classes": 3, "size": 32, "backbone_options": TINY_UNET,
                                    "retriever": dict(TINY_RETRIEVER), **changes}))


def test_estimate_has_every_part_and_grows_with_the_batch():
    model = tiny()
    small = estimate_training_memory(model, 2, slices=10)
    large = estimate_training_memory(model, 32, slices=10)
    params = sum(p.numel() for p in model.parameters())
    assert small.parameters == params and small.weights == 4 * params
    assert small.optimizer == 12 * params  # gradient + two AdamW moments, all trainable
    assert small.data == 10 * (32 * 32 * 12 + 3 * 32 * 32 * 4)
    assert 0 < small.activations < large.activations
    # the largest step's activations grow with the batch (the contrastive step adds a
    # constant 64 candidates, which dominate at batch 2)
    assert 4 < large.activations / small.activations < 16
    assert large.total == large.weights + large.optimizer + large.activations + large.data
    assert model.training  # the mode is restored; the weights are still the real ones
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_estimate_allocates_nothing():
    model = tiny(size=2048, backbone_options={"base_channels": 64, "depth": 5})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    estimate = estimate_training_memory(model, 64)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert estimate.activations > 100 * GIB
    assert grown < 0.5 * GIB


def test_available_memory_reads_the_system():
    free = available_memory(torch.device("cpu"))
    assert free is None or free > 0
    assert available_memory(torch.device("meta")) is None


def test_training_that_will_not_fit_is_refused_before_allocating(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**20)

    def no_optimizer(*args, **kwargs):
        raise AssertionError("the optimizer was created")

    monkeypatch.setattr(torch.optim, "AdamW", no_optimizer)
    with pytest.raises(JRASError, match=r"needs about \d+\.\d GiB more memory .* but CPU has "
                                        r"0\.0 GiB free: lower --batch-size or --size"):
        JointTrainer(tiny(), SliceSet(synthetic_samples(), 3),
                     TrainConfig(steps=1, batch_size=64, device="cpu"), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    with pytest.raises(AssertionError, match="optimizer"):  # the check is off: it goes on
        JointTrainer(tiny(), SliceSet(synthetic_samples(), 3),
                     TrainConfig(steps=1, batch_size=64, device="cpu"))


def test_sam_encoder_size_follows_the_task():
    model = JRASModel(ModelConfig(num_classes=3, size=70, backbone="sam"))
    options = model.config.backbone_options
    assert options["variant"] == "small" and options["image_size"] == 72  # 70 -> patch 8
    assert SAM.task_options(70, {"variant": "vit_b"}) == {"image_size": 80}  # patch 16
    assert SAM.task_options(70, {"variant": "tiny", "image_size": 128}) == {}
    assert SAM.task_options(70, {"pretrained": "facebook/sam-vit-base"}) == {}  # its own size
    assert SAM.task_options(70, {"hf_config": {}}) == {}  # a saved run keeps its size
    explicit = JRASModel(ModelConfig(num_classes=3, size=32, backbone="sam",
                                     backbone_options={"variant": "tiny", "image_size": 64}))
    assert explicit.segmenter.image_size == 64


def test_sam_with_default_options_trains(acdc_slices_dir, tmp_path, capsys):
    """`--backbone sam` with every default was killed by the kernel (ViT-B at 1024 px)."""
    out = tmp_path / "sam"
    assert main(["train", "--data", str(acdc_slices_dir), "--out", str(out), "--backbone", "sam",
                 "--steps", "1", "--patient-regex", REGEX, "--device", "cpu", "--quiet"]) == 0
    options = json.loads((out / "config.json").read_text())["backbone_options"]
    assert options["variant"] == "small" and options["image_size"] == 128
    assert (out / "model.safetensors").is_file() and (out / "bank").is_dir()


def test_sam_vit_b_at_1024_is_refused_with_the_estimate(acdc_slices_dir, tmp_path, capsys,
                                                       monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 16 * GIB)  # a workstation
    out = tmp_path / "sam"
    assert main(["train", "--data", str(acdc_slices_dir), "--out", str(out), "--backbone", "sam",
                 "--backbone-options", '{"variant": "vit_b", "image_size": 1024}',
                 "--size", "64", "--steps", "1", "--patient-regex", REGEX, "--device", "cpu",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("napari-jras train: error: Training this "
                                               "configuration needs about "), err
    needed = float(err[0].split("needs about ")[1].split(" GiB")[0])
    assert needed > 32 and "SAM: a smaller 'image_size'" in err[0]
    assert not out.exists()
