"""The frozen-encoder cache: a hit is exactly the encoder's output, and nothing stale is served."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_jras.core.backbones import embedding_cache
from napari_jras.core.backbones.embedding_cache import FOLDER_ENV, clear_memory, encode_cached
from napari_jras.core.backbones.litemedsam import LiteMedSAMBackbone
from napari_jras.core.backbones.tinyvit import TinyViT


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(FOLDER_ENV, raising=False)
    clear_memory()
    yield
    clear_memory()


def frozen_encoder(seed: int = 0) -> TinyViT:
    torch.manual_seed(seed)
    encoder = TinyViT(img_size=32).eval()
    encoder.requires_grad_(False)
    return encoder


def counted(encoder: TinyViT) -> list[int]:
    """Images through the patch embedding (i.e. actually encoded), counted."""
    seen = [0]
    encoder.patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__(0, seen[0] + len(o)))
    return seen


def counted_layer(encoder: TinyViT, index: int) -> list[int]:
    """Images through stage ``index``, counted."""
    seen = [0]
    encoder.layers[index].register_forward_hook(
        lambda m, i, o: seen.__setitem__(0, seen[0] + len(o)))
    return seen


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_a_hit_is_the_encoders_output_and_only_new_images_are_encoded():
    encoder = frozen_encoder()
    seen = counted(encoder)
    first = images(2, 0)
    direct = encoder(first)
    assert torch.equal(encode_cached(encoder, first), direct)
    assert seen[0] == 4  # the direct call and the first cached call
    mixed = torch.cat([first[1:], images(1, 1)])
    out = encode_cached(encoder, mixed)
    assert seen[0] == 5  # only the new image
    assert torch.equal(out[0], direct[1])
    assert torch.allclose(out[1], encoder(mixed[1:])[0], atol=1e-6)


@torch.no_grad()
def test_new_weights_are_a_miss():
    encoder = frozen_encoder(0)
    pixels = images(1, 0)
    before = encode_cached(encoder, pixels)
    encoder.load_state_dict(frozen_encoder(1).state_dict())
    after = encode_cached(encoder, pixels)
    assert not torch.allclose(before, after)
    assert torch.equal(after, encoder(pixels))


def test_trainable_train_mode_or_gradients_are_never_cached():
    encoder = frozen_encoder()
    seen = counted(encoder)
    pixels = images(1, 0)
    encode_cached(encoder, pixels)  # gradients on: not cached
    encode_cached(encoder, pixels)
    assert seen[0] == 2
    with torch.no_grad():
        encoder.train()
        encode_cached(encoder, pixels)
        encoder.eval()
        encoder.layers[0].requires_grad_(True)
        encode_cached(encoder, pixels)
        assert seen[0] == 4
        # stages 1.. do not include the trainable stage 0: cached
        tokens = encoder(pixels, slice(None, 1))
        later = counted_layer(encoder, 1)
        rest = encode_cached(encoder, tokens, slice(1, None))
        assert torch.equal(encode_cached(encoder, tokens, slice(1, None)), rest)
        assert later[0] == 1


@torch.no_grad()
def test_partial_stages_and_the_whole_encoder_do_not_mix():
    encoder = frozen_encoder()
    pixels = images(1, 0)
    whole = encode_cached(encoder, pixels)
    part = encode_cached(encoder, pixels, slice(None, 2))
    assert whole.shape != part.shape
    assert torch.equal(part, encoder(pixels, slice(None, 2)))
    assert torch.equal(encode_cached(encoder, pixels), whole)


@torch.no_grad()
def test_folder_is_shared_between_processes_and_a_damaged_file_is_recomputed(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv(FOLDER_ENV, str(tmp_path))
    encoder = frozen_encoder()
    seen = counted(encoder)
    pixels = images(2, 0)
    direct = encode_cached(encoder, pixels)
    files = sorted(tmp_path.rglob("*.npy"))
    assert len(files) == 2 and not list(tmp_path.rglob("*.tmp.npy"))
    clear_memory()  # as a new process
    assert torch.equal(encode_cached(encoder, pixels), direct)
    assert seen[0] == 2
    files[0].write_bytes(b"not an array")
    clear_memory()
    assert torch.allclose(encode_cached(encoder, pixels), direct, atol=1e-5)  # batch of 1
    assert seen[0] == 3
    assert np.load(files[0]).shape == tuple(direct.shape[1:])


def test_memory_is_bounded_least_recently_used_first(monkeypatch):
    lru = embedding_cache._MemoryLRU(max_bytes=3 * 400)
    for name in "abc":
        lru.put(name, torch.zeros(100))
    lru.get("a")
    lru.put("d", torch.zeros(100))
    assert set(lru.entries) == {"a", "c", "d"} and lru.bytes == 1200


def test_frozen_litemedsam_encodes_each_training_slice_once():
    torch.manual_seed(0)
    model = LiteMedSAMBackbone(3, True, checkpoint_sha256="random weights for the test")
    seen = counted(model.sam.image_encoder)
    query = torch.rand(2, 1, 40, 40)
    guide = torch.rand(2, 1, 40, 40)
    mask = torch.softmax(torch.randn(2, 3, 40, 40), 1)
    model.train()
    first = model(query, guide, mask)
    first.sum().backward()  # trains the adapter and decoder; the cached embedding is constant
    assert seen[0] == 2
    model.eval()
    with torch.no_grad():
        again = model(query, guide, mask)
    assert seen[0] == 2
    assert torch.allclose(first, again, atol=1e-5)


@torch.no_grad()
def test_bypassed_neither_reads_nor_stores():
    encoder = frozen_encoder()
    seen = counted(encoder)
    x = images(2, 0)
    with embedding_cache.bypassed():
        assert torch.equal(encode_cached(encoder, x), encoder(x))
        encode_cached(encoder, x)
    assert seen[0] == 6 and not embedding_cache._memory.entries  # nothing stored
    encode_cached(encoder, x)
    with embedding_cache.bypassed(False):  # inactive: the cache works
        encode_cached(encoder, x)
    assert seen[0] == 8  # one miss, then one hit
    with embedding_cache.bypassed():
        encode_cached(encoder, x)  # not read either
    assert seen[0] == 10
