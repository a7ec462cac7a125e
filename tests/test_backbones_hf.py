"""SegFormer and SAM backbones through ``transformers`` on tiny configurations (CPU, offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_jras.cli import main
from napari_jras.core.backbones import BACKBONES, accepts_pretrained, build_backbone
from napari_jras.core.backbones.hf_utils import GUIDE_IMAGE_SCALE, IMAGENET_MEAN, IMAGENET_STD
from napari_jras.core.backbones.sam import VARIANTS as SAM_VARIANTS
from napari_jras.core.backbones.sam import _sam_config, mask_boxes
from napari_jras.core.backbones.segformer import VARIANTS as SEGFORMER_VARIANTS
from napari_jras.core.checkpoint import load_model, load_tensors, save_model
from napari_jras.core.data import SliceSample
from napari_jras.core.errors import ModelError
from napari_jras.core.fusion import Guide
from napari_jras.core.model import JRASModel, ModelConfig
from napari_jras.core.train import JointTrainer, SliceSet, TrainConfig, seed_everything

transformers = pytest.importorskip("transformers")

NUM_CLASSES = 4
TINY = {
    "segformer": {"variant": "tiny"},
    "segformer_adapter": {"variant": "tiny", "stem": "adapter"},
    "sam": {"variant": "tiny"},
}
CASES = [(key, mode) for key in TINY for mode in (True, False)]


def tiny(key: str, use_retrieval: bool = True, **extra):
    torch.manual_seed(0)
    return build_backbone(key.split("_")[0], NUM_CLASSES, use_retrieval, **{**TINY[key], **extra})


def inputs(batch: int, height: int, width: int):
    torch.manual_seed(1)
    return (torch.rand(batch, 1, height, width), torch.rand(batch, 1, height, width),
            torch.softmax(4 * torch.randn(batch, NUM_CLASSES, height, width), dim=1))


def synthetic_samples() -> list[SliceSample]:
    """Two slices of each of four patients: a box (class 1) around a smaller one (class 2)."""
    rng = np.random.default_rng(0)
    samples = []
    for patient in range(4):
        for z in range(2):
            label = np.zeros((32, 32), np.uint8)
            label[6 + patient:22 + patient, 6:20 + z] = 1
            label[10 + patient:16 + patient, 10:15] = 2
            image = (0.2 + 0.3 * label + rng.normal(0, 0.05, label.shape)).astype(np.float32)
            samples.append(SliceSample(image, label, f"p{patient}_slice{z}", f"p{patient}", z,
                                       "synthetic"))
    return samples


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Random tiny transformers models written by ``save_pretrained`` (stand-ins for the hub)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(2)
    config = transformers.SegformerConfig(**SEGFORMER_VARIANTS["tiny"], num_labels=7)
    transformers.SegformerForSemanticSegmentation(config).save_pretrained(root / "segformer")
    transformers.SamModel(_sam_config(SAM_VARIANTS["tiny"], None)).save_pretrained(root / "sam")
    return {"segformer": root / "segformer", "sam": root / "sam"}


def test_registered_and_take_pretrained_weights():
    assert {"segformer", "sam"} <= set(BACKBONES)
    assert accepts_pretrained("segformer") and accepts_pretrained("SAM")
    assert not accepts_pretrained("unet") and not accepts_pretrained("nope")


@pytest.mark.parametrize("key,use_retrieval", CASES)
def test_output_has_input_size(key, use_retrieval):
    model = tiny(key, use_retrieval).eval()
    for size in [(32, 32), (37, 45), (5, 17)]:
        with torch.inference_mode():
            out = model(*inputs(2, *size))
        assert out.shape == (2, NUM_CLASSES, *size) and torch.isfinite(out).all()
    assert model.in_channels == (2 + NUM_CLASSES if use_retrieval else 1)


@pytest.mark.parametrize("key,use_retrieval", CASES)
def test_gradients_reach_trainable_parameters_and_guide_mask(key, use_retrieval):
    model = tiny(key, use_retrieval).train()
    query, guide_image, guide_mask = inputs(2, 24, 40)
    guide_mask.requires_grad_(True)
    target = torch.randint(0, NUM_CLASSES, (2, 24, 40))
    F.cross_entropy(model(query, guide_image, guide_mask), target).backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing
    if use_retrieval:
        assert guide_mask.grad is not None and guide_mask.grad.abs().sum() > 0
    else:
        assert guide_mask.grad is None


@pytest.mark.parametrize("key", TINY)
def test_baseline_ignores_guides(key):
    model = tiny(key, use_retrieval=False).eval()
    query, guide_image, guide_mask = inputs(1, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(query), model(query, guide_image, guide_mask))


@pytest.mark.parametrize("key,use_retrieval", CASES)
def test_config_rebuilds_identically(key, use_retrieval):
    model = tiny(key, use_retrieval).eval()
    config = json.loads(json.dumps(model.config()))
    assert config["variant"] == "tiny" and config["hf_config"] is None
    rebuilt = build_backbone(**config).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = inputs(1, 32, 48)
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(*x), model(*x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,options,message", [
    ("segformer", {"variant": "b9"}, "option 'variant' must be one of tiny, b0, b1, b2"),
    ("segformer", {"stem": "wide"}, "option 'stem' must be one of expand, adapter"),
    ("segformer", {"variant": "b0", "pretrained": "nvidia/mit-b0"}, "either option 'variant'"),
    ("sam", {"variant": "vit_h"}, "option 'variant' must be one of tiny, small, vit_b"),
    ("sam", {"variant": "tiny", "image_size": 10**5}, "'image_size' must be a whole number betw"),
    ("sam", {"hf_config": {"vision_config": {"num_hidden_layers": 10**9}}},
     r"hf_config.vision_config.num_hidden_layers must be between -1 and 16384"),
    ("segformer", {"hf_config": {"hidden_sizes": [8] * 1000}},
     "hf_config.hidden_sizes has 1000 entries"),
    ("sam", {"variant": "tiny", "image_size": 60}, "multiple of the patch size 8"),
    ("sam", {"variant": "tiny", "freeze_image_encoder": "yes"}, "true or false"),
    ("sam", {"hf_config": [1]}, "must be a JSON object"),
    ("sam", {"widht": 3}, r"Unknown option\(s\) widht"),
])
def test_invalid_options(name, options, message):
    with pytest.raises(ModelError, match=message):
        build_backbone(name, NUM_CLASSES, True, **options)


def test_pretrained_segformer_expands_the_rgb_stem(checkpoints):
    source = transformers.SegformerForSemanticSegmentation.from_pretrained(checkpoints["segformer"])
    rgb = source.segformer.stages[0].patch_embeddings.proj
    model = build_backbone("segformer", NUM_CLASSES, True, pretrained=str(checkpoints["segformer"]))
    stem = model.model.segformer.stages[0].patch_embeddings.proj
    assert stem.weight.shape[1] == 2 + NUM_CLASSES
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    grey = (rgb.weight / std).sum(1)
    torch.testing.assert_close(stem.weight[:, 0], grey)
    torch.testing.assert_close(stem.weight[:, 1], GUIDE_IMAGE_SCALE * grey)
    assert stem.weight[:, 2:].abs().max() < 0.1 * rgb.weight.abs().max()
    torch.testing.assert_close(stem.bias, rgb.bias - (rgb.weight * mean / std).sum((1, 2, 3)))
    ours, theirs = model.model.state_dict(), source.state_dict()
    copied = [k for k in theirs if k.startswith("segformer.") and "stages.0.patch_embeddings.proj"
              not in k]
    assert copied and all(torch.equal(ours[k], theirs[k]) for k in copied)
    assert model.model.decode_head.classifier.out_channels == NUM_CLASSES
    record = model.config()["hf_config"]
    assert record["num_channels"] == 2 + NUM_CLASSES and "id2label" not in record


def test_pretrained_segformer_adapter_keeps_the_stem(checkpoints):
    source = transformers.SegformerForSemanticSegmentation.from_pretrained(checkpoints["segformer"])
    model = build_backbone("segformer", NUM_CLASSES, False, pretrained=str(checkpoints["segformer"]),
                           stem="adapter")
    stem = model.model.segformer.stages[0].patch_embeddings.proj
    assert torch.equal(stem.weight, source.segformer.stages[0].patch_embeddings.proj.weight)
    assert model.adapter.in_channels == 1 and model.adapter.out_channels == 3


def test_pretrained_sam_loads_and_resizes_position_embeddings(checkpoints):
    source = transformers.SamModel.from_pretrained(checkpoints["sam"]).state_dict()
    model = build_backbone("sam", NUM_CLASSES, True, pretrained=str(checkpoints["sam"]))
    state = model.sam.state_dict()
    assert all(torch.equal(state[k], v) for k, v in source.items())
    smaller = build_backbone("sam", NUM_CLASSES, True, pretrained=str(checkpoints["sam"]),
                             image_size=32)
    assert smaller.config()["image_size"] == 32 and smaller.mask_size == 16
    assert smaller.sam.vision_encoder.pos_embed.shape == (1, 4, 4, 32)
    assert torch.equal(smaller.sam.mask_decoder.state_dict()["iou_token.weight"],
                       source["mask_decoder.iou_token.weight"])
    with torch.inference_mode():
        assert smaller.eval()(*inputs(1, 20, 28)).shape == (1, NUM_CLASSES, 20, 28)


@pytest.mark.parametrize("name", ["segformer", "sam"])
def test_unavailable_weights_say_how_to_get_them(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source, why in [("nobody/no-such-model", "Could not load"),
                        (str(tmp_path / "missing"), "was not found"),
                        (str(tmp_path), "Could not load")]:
        with pytest.raises(ModelError, match=why) as info:
            build_backbone(name, NUM_CLASSES, True, pretrained=source)
        assert "hf download" in str(info.value) and "--local-dir" in str(info.value)


@pytest.mark.parametrize("name,use_retrieval", [("segformer", True), ("sam", True),
                                                ("sam", False)])
def test_saved_run_rebuilds_without_the_pretrained_folder(name, use_retrieval, checkpoints,
                                                          tmp_path):
    folder = tmp_path / "weights"
    shutil.copytree(checkpoints[name], folder)
    config = ModelConfig(num_classes=NUM_CLASSES, backbone=name, size=32,
                         use_retrieval=use_retrieval, backbone_options={"pretrained": str(folder)},
                         retriever={"encoder": "cnn", "embed_dim": 16, "width": 4})
    model = JRASModel(config).eval()
    save_model(tmp_path / "run", model)
    shutil.rmtree(folder)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["backbone_options"]["pretrained"] == str(folder)
    assert saved["backbone_options"]["hf_config"]
    assert not any("prompt_encoder.shared_embedding" in k
                   for k in load_tensors(tmp_path / "run" / "model.safetensors"))
    again = load_model(tmp_path / "run")
    query, guide_image, guide_mask = inputs(2, 32, 32)
    guide = Guide(guide_image, guide_mask, torch.ones(2, 1), torch.ones(2, 1),
                  torch.zeros(2, 1, dtype=torch.long)) if use_retrieval else None
    with torch.inference_mode():
        torch.testing.assert_close(again(query, guide), model(query, guide), atol=1e-6, rtol=0)


def test_mask_boxes():
    masks = torch.zeros(3, 10, 20, dtype=torch.bool)
    masks[0, 2:5, 4:10] = True
    masks[1, 9, 19] = True
    boxes = mask_boxes(masks, 40)  # x scaled by 2, y by 4
    torch.testing.assert_close(boxes, torch.tensor([[8.0, 8.0, 19.0, 19.0],
                                                    [38.0, 36.0, 39.0, 39.0],
                                                    [0.0, 0.0, 39.0, 39.0]]))


def test_sam_prompts_follow_the_guide_and_classes_differ():
    model = tiny("sam").eval()
    query, guide_image, guide_mask = inputs(1, 32, 32)
    other = guide_mask.roll(shifts=12, dims=-1)
    with torch.inference_mode():
        out = model(query, guide_image, guide_mask)
        assert not torch.allclose(out, model(query, guide_image, other))
        baseline = tiny("sam", use_retrieval=False).eval()(query)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))  # background logit
    assert not torch.allclose(baseline[:, 1], baseline[:, 2])  # class tokens tell classes apart


def test_freezing_the_sam_image_encoder():
    model = tiny("sam", freeze_image_encoder=True)
    assert not any(p.requires_grad for p in model.sam.vision_encoder.parameters())
    assert all(p.requires_grad for p in model.adapter.parameters())
    assert model.class_tokens.requires_grad


@pytest.mark.parametrize("name", ["segformer", "sam"])
def test_supervised_step_gives_retriever_gradients(name):
    seed_everything(0)
    model = JRASModel(ModelConfig(num_classes=3, size=32, backbone=name,
                                  backbone_options={"variant": "tiny"},
                                  retriever={"encoder": "cnn", "embed_dim": 16, "width": 4}))
    trainer = JointTrainer(model, SliceSet(synthetic_samples(), 3),
                           TrainConfig(steps=1, batch_size=4, contrastive_every=0, augment=False))
    trainer.refresh_embeddings()
    trainer.supervised_step()
    grads = [p.grad for p in model.retriever.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


# --- command line ----------------------------------------------------------------------------
REGEX = r"^(p\d+)_"
CLI_TINY = ["--retriever-options", '{"width": 4, "input_size": 32}', "--embed-dim", "16",
            "--size", "32", "--steps", "2", "--batch-size", "4", "--patient-regex", REGEX,
            "--quiet", "--device", "cpu"]


@pytest.mark.parametrize("name", ["segformer", "sam"])
@pytest.mark.parametrize("baseline", [False, True], ids=["jras", "baseline"])
def test_cli_train_and_evaluate(name, baseline, acdc_slices_dir, tmp_path, capsys):
    out, report = tmp_path / "run", tmp_path / "report.json"
    argv = ["train", "--data", acdc_slices_dir, "--out", out, "--backbone", name,
            "--backbone-options", '{"variant": "tiny"}', *CLI_TINY,
            *(["--no-retrieval"] if baseline else [])]
    assert main([str(a) for a in argv]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == name and config["backbone_options"]["variant"] == "tiny"
    assert config["use_retrieval"] is not baseline
    assert main(["evaluate", "--model", str(out), "--data", str(acdc_slices_dir), "--report",
                 str(report), "--patient-regex", REGEX, "--device", "cpu", "--quiet"]) == 0
    summary = json.loads(report.read_text())["summary"]["mean"]
    assert 0.0 <= summary["dice"]["mean"] <= 1.0
    assert "Dice" in capsys.readouterr().out


def test_cli_pretrained_goes_to_the_backbone(checkpoints, acdc_slices_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", acdc_slices_dir, "--out", out, "--backbone", "segformer",
            "--pretrained", checkpoints["segformer"], "--no-retrieval", *CLI_TINY]
    assert main([str(a) for a in argv]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["backbone_options"]["pretrained"] == str(checkpoints["segformer"])
    missing = ["train", "--data", acdc_slices_dir, "--out", tmp_path / "other", "--backbone",
               "sam", "--pretrained", tmp_path / "missing", *CLI_TINY]
    capsys.readouterr()
    assert main([str(a) for a in missing]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was not found" in err[0] and "hf download" in err[0]
