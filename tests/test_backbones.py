"""Backbone interface, registry, U-Net and TransUNet on tiny configurations."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from napari_jras.core.backbones import BACKBONES, Backbone, build_backbone, register_backbone
from napari_jras.core.errors import ModelError

NUM_CLASSES = 4
TINY = {
    "unet": {"base_channels": 4, "depth": 3},
    "transunet": {"base_channels": 4, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                  "img_size": 64},
}
CASES = [(name, mode) for name in TINY for mode in (True, False)]


def tiny(name: str, use_retrieval: bool = True, **extra) -> Backbone:
    torch.manual_seed(0)
    return build_backbone(name, NUM_CLASSES, use_retrieval, **{**TINY[name], **extra})


def inputs(batch: int, height: int, width: int, num_classes: int = NUM_CLASSES):
    query = torch.rand(batch, 1, height, width)
    guide_image = torch.rand(batch, 1, height, width)
    guide_mask = torch.softmax(torch.randn(batch, num_classes, height, width), dim=1)
    return query, guide_image, guide_mask


def test_registry_has_builtin_backbones():
    assert {"unet", "transunet"} <= set(BACKBONES)


@pytest.mark.parametrize("name,use_retrieval", CASES)
@pytest.mark.parametrize("size", [(64, 64), (67, 93), (5, 17)])
def test_output_has_input_size(name, use_retrieval, size):
    model = tiny(name, use_retrieval).eval()
    with torch.inference_mode():
        out = model(*inputs(2, *size))
    assert out.shape == (2, NUM_CLASSES, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,use_retrieval", CASES)
def test_in_channels(name, use_retrieval):
    assert tiny(name, use_retrieval).in_channels == (2 + NUM_CLASSES if use_retrieval else 1)


@pytest.mark.parametrize("name,use_retrieval", CASES)
def test_gradients_reach_every_parameter(name, use_retrieval):
    model = tiny(name, use_retrieval).train()
    query, guide_image, guide_mask = inputs(2, 40, 48)
    guide_mask.requires_grad_(True)
    target = torch.randint(0, NUM_CLASSES, (2, 40, 48))
    F.cross_entropy(model(query, guide_image, guide_mask), target).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing
    if use_retrieval:
        assert guide_mask.grad is not None and guide_mask.grad.abs().sum() > 0
    else:
        assert guide_mask.grad is None


@pytest.mark.parametrize("name", TINY)
def test_baseline_ignores_guides(name):
    model = tiny(name, use_retrieval=False).eval()
    query, guide_image, guide_mask = inputs(1, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(query), model(query, guide_image, guide_mask))


@pytest.mark.parametrize("name,use_retrieval", CASES)
def test_config_rebuilds_identically(name, use_retrieval):
    model = tiny(name, use_retrieval).eval()
    config = json.loads(json.dumps(model.config()))
    assert config["name"] == name and config["num_classes"] == NUM_CLASSES
    assert config["use_retrieval"] is use_retrieval
    rebuilt = build_backbone(**config).eval()
    assert type(rebuilt) is type(model)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(model.state_dict())
    x = inputs(1, 32, 48)
    with torch.inference_mode():
        assert torch.allclose(rebuilt(*x), model(*x), atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_wrong_guide_mask_channels(name):
    query, guide_image, _ = inputs(1, 32, 32)
    _, _, bad_mask = inputs(1, 32, 32, num_classes=3)
    with pytest.raises(ModelError, match="guide mask has 3 channels but the model has 4 classes"):
        tiny(name)(query, guide_image, bad_mask)


@pytest.mark.parametrize("name", TINY)
def test_bad_inputs(name):
    model = tiny(name)
    query, guide_image, guide_mask = inputs(1, 32, 32)
    with pytest.raises(ModelError, match="no guide image and guide mask"):
        model(query)
    with pytest.raises(ModelError, match="guide image has batch/size"):
        model(query, guide_image[..., :16], guide_mask)
    with pytest.raises(ModelError, match="query must have 1 channel"):
        model(query.repeat(1, 3, 1, 1), guide_image, guide_mask)
    with pytest.raises(ModelError, match=r"shape \(B, C, H, W\)"):
        model(query[0], guide_image, guide_mask)


def test_unknown_backbone_lists_available():
    with pytest.raises(ModelError, match="Unknown backbone 'vnet'; available: .*transunet.*unet"):
        build_backbone("vnet", NUM_CLASSES, True)


@pytest.mark.parametrize("name", TINY)
def test_unknown_option(name):
    with pytest.raises(ModelError, match="Unknown option\\(s\\) widht"):
        build_backbone(name, NUM_CLASSES, True, widht=3)


@pytest.mark.parametrize("name,options,message", [
    ("unet", {"norm": "layer"}, "option 'norm' must be one of"),
    ("unet", {"depth": 0}, "option 'depth' must be a whole number between 1 and 6"),
    ("unet", {"dropout": 1.5}, "option 'dropout' must be a number in"),
    ("transunet", {"hidden_size": 30, "num_heads": 4}, "divisible by num_heads"),
    ("transunet", {"img_size": 8}, "option 'img_size' must be a whole number between 16 and"),
    # bounded: these exhausted the memory while the network was built (depth 40 was killed)
    ("unet", {"depth": 40}, "option 'depth' must be a whole number between 1 and 6, got 40"),
    ("unet", {"base_channels": 10**6}, "option 'base_channels' must be a whole number between"),
    ("unet", {"base_channels": 256, "depth": 4}, "4096 channels is more than 2048"),
    ("unet", {"base_channels": 16.0}, "option 'base_channels' must be a whole number"),
    ("unet", {"depth": True}, "option 'depth' must be a whole number"),
    ("unet", {"depth": "4"}, "option 'depth' must be a whole number"),
    ("transunet", {"num_layers": 10**4}, "option 'num_layers' must be a whole number between"),
    ("transunet", {"hidden_size": 10**6}, "option 'hidden_size' must be a whole number between"),
    ("transunet", {"mlp_ratio": float("nan")}, "option 'mlp_ratio' must be a number in"),
    ("transunet", {"img_size": 10**5}, "option 'img_size' must be a whole number between"),
])
def test_invalid_option_values(name, options, message):
    with pytest.raises(ModelError, match=message):
        build_backbone(name, NUM_CLASSES, True, **options)


def test_num_classes_must_be_at_least_two():
    with pytest.raises(ModelError, match="num_classes must be an integer >= 2"):
        build_backbone("unet", 1, True)
    with pytest.raises(ModelError, match="<= 256, got 1000000000"):
        build_backbone("unet", 10**9, True)


@pytest.mark.parametrize("options", [{"norm": "batch"}, {"norm": "instance"},
                                     {"upsample": "transpose", "dropout": 0.2}])
def test_unet_variants(options):
    model = tiny("unet", **options).train()
    out = model(*inputs(2, 24, 40))
    assert out.shape == (2, NUM_CLASSES, 24, 40)


def test_register_backbone_rejects_non_backbones_and_name_clashes():
    with pytest.raises(TypeError):
        register_backbone(torch.nn.Conv2d)

    class Other(Backbone):
        name = "unet"

    with pytest.raises(ValueError, match="already registered"):
        register_backbone(Other)
    assert BACKBONES["unet"] is not Other
