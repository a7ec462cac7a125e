"""The optional pretrained retriever encoder (``encoder="hf"``): a tiny random ViT, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from napari_jras.cli import main
from napari_jras.core.bank import ExemplarBank
from napari_jras.core.checkpoint import load_model
from napari_jras.core.errors import ModelError
from napari_jras.core.pipeline import train_run
from napari_jras.core.retrieval import Retriever, retriever_version
from napari_jras.core.train import TrainConfig

transformers = pytest.importorskip("transformers")
LAYERS = 2


@pytest.fixture(scope="module")
def vit_dirs(tmp_path_factory) -> dict[int, Path]:
    """Tiny random ViTs saved with ``save_pretrained``, for 1- and 3-channel input."""
    root = tmp_path_factory.mktemp("vit")
    dirs = {}
    for channels in (1, 3):
        config = transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=8, num_channels=channels)
        torch.manual_seed(channels)
        transformers.ViTModel(config).save_pretrained(root / f"c{channels}")
        dirs[channels] = root / f"c{channels}"
    return dirs


def blocks_of(retriever: Retriever) -> nn.ModuleList:
    """The ViT's transformer layers."""
    [layers] = [m for m in retriever.encoder.model.modules()
                if isinstance(m, nn.ModuleList) and len(m) == LAYERS]
    return layers


@pytest.mark.parametrize("channels", [1, 3])
def test_hf_retriever_gives_unit_embeddings(vit_dirs, channels):
    retriever = Retriever(encoder="hf", pretrained=str(vit_dirs[channels]), embed_dim=16,
                          input_size=32)
    z = retriever(torch.rand(3, 1, 48, 40))
    assert z.shape == (3, 16) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    assert retriever.encoder.num_channels == channels and retriever.encoder.out_dim == 32


@pytest.mark.parametrize("trainable", [0, 1, 2])
def test_only_the_last_blocks_and_the_head_train(vit_dirs, trainable):
    retriever = Retriever(encoder="hf", pretrained=str(vit_dirs[1]), embed_dim=16,
                          trainable_blocks=trainable)
    open_ids = {id(p) for block in list(blocks_of(retriever))[LAYERS - trainable:]
                for p in block.parameters()}
    for name, p in retriever.encoder.named_parameters():
        assert p.requires_grad == (id(p) in open_ids), name
    assert all(p.requires_grad for p in retriever.head.parameters())


def test_train_save_and_reload_with_an_hf_retriever(vit_dirs, acdc_slices_dir, tmp_path):
    pretrained = str(vit_dirs[1])
    config = {"backbone": "unet", "backbone_options": {"base_channels": 4, "depth": 2},
              "size": 32, "k": 2, "modality": "mri",
              "retriever": {"encoder": "hf", "pretrained": pretrained, "embed_dim": 16,
                            "trainable_blocks": 1}}
    out = train_run(acdc_slices_dir, tmp_path / "run", config,
                    TrainConfig(steps=2, batch_size=4, checkpoint_every=100, augment=False),
                    patient_regex=r"^(p\d+)_")
    model = load_model(out)
    assert model.config.retriever["encoder"] == "hf"
    assert model.config.retriever["pretrained"] == pretrained
    with ExemplarBank.open(out / "bank") as bank:  # tagged by the in-memory trained retriever
        assert bank.retriever_version == retriever_version(model.retriever)
    init = transformers.ViTModel.from_pretrained(pretrained).state_dict()
    trained = model.retriever.encoder.model.state_dict()
    changed = {k for k in init if not torch.equal(init[k], trained[k])}
    assert changed and all(".1." in k for k in changed)  # only the last block moved
    again = load_model(out)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), again.embed(x), rtol=0, atol=0)


def test_bad_pretrained_paths_say_how_to_get_weights(tmp_path):
    for source, why in [(str(tmp_path / "missing"), "was not found"),
                        (str(tmp_path), "Unrecognized model"),
                        ("nobody/no-such-encoder", "Could not load")]:
        with pytest.raises(ModelError, match=why) as info:
            Retriever(encoder="hf", pretrained=source, embed_dim=16)
        assert "save_pretrained" in str(info.value) and "hf download" in str(info.value)
    with pytest.raises(ModelError, match="needs --pretrained"):
        Retriever(encoder="hf", embed_dim=16)


def test_cli_pretrained_error_is_one_line(acdc_slices_dir, tmp_path, capsys):
    assert main(["train", "--data", str(acdc_slices_dir), "--out", str(tmp_path / "run"),
                 "--pretrained", str(tmp_path / "missing"), "--size", "32", "--steps", "1",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("napari-jras train: error: ")
    assert "hf download" in err[0]
