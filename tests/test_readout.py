"""The memory-readout fusion: it reads its exemplars, equals the baseline at initialisation and
without exemplars, and the guide curriculum feeds it the right exemplars."""

import pytest
import torch
from test_jras_core import TINY_RETRIEVER, TINY_UNET, synthetic_samples

from napari_jras.core.errors import JRASError, ModelError
from napari_jras.core.fusion import make_guide
from napari_jras.core.model import JRASModel, ModelConfig
from napari_jras.core.readout import MemoryReadout, readout_loss, trust_readout
from napari_jras.core.train import (
    CURRICULUM,
    JointTrainer,
    SliceSet,
    TrainConfig,
    corrupted_copy,
    seed_everything,
)


def _model(fusion="readout", use_retrieval=True, backbone="unet", options=TINY_UNET):
    return JRASModel(ModelConfig(num_classes=3, size=32, backbone=backbone, fusion=fusion,
                                 use_retrieval=use_retrieval, backbone_options=dict(options),
                                 retriever=dict(TINY_RETRIEVER)))


def _guide(images, masks, present=None):
    b, k = images.shape[:2]
    guide = make_guide(images, masks, torch.full((b, k), 1.0 / k), torch.zeros(b, k),
                       torch.zeros(b, k, dtype=torch.long), 3)
    if present is not None:
        guide.present = present
    return guide


def _blobs(n=2, size=32):
    """Images whose bright discs are class 1 and dark squares class 2, at random places."""
    g = torch.Generator().manual_seed(1)
    images = torch.full((n, size, size), 0.5)
    labels = torch.zeros((n, size, size), dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        cy, cx = torch.randint(8, size - 8, (2,), generator=g).tolist()
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 25
        images[i][disc], labels[i][disc] = 1.0, 1
        sy, sx = torch.randint(2, size - 8, (2,), generator=g).tolist()
        square = (yy >= sy) & (yy < sy + 6) & (xx >= sx) & (xx < sx + 6) & ~disc
        images[i][square], labels[i][square] = 0.0, 2
    return images, labels


def test_auto_fusion_is_readout_for_unet_and_old_runs_load_as_concat():
    assert _model("auto").config.fusion == "readout"
    assert ModelConfig(num_classes=3, backbone="segformer").fusion == "concat"
    old = _model("concat").config.to_dict()
    del old["fusion"]  # a run folder written before the readout fusion existed
    assert ModelConfig.from_dict(old).fusion == "concat"
    with pytest.raises(ModelError, match="fusion"):
        ModelConfig(num_classes=3, fusion="attention")


def test_zero_initialised_readout_equals_the_baseline_with_and_without_exemplars():
    seed_everything(0)
    jras, base = _model(), _model(use_retrieval=False)
    jras.segmenter.load_state_dict(base.segmenter.state_dict())
    jras.eval(), base.eval()
    x = torch.rand(2, 1, 32, 32)
    guide = _guide(torch.rand(2, 2, 32, 32), torch.randint(0, 3, (2, 2, 32, 32)))
    with torch.no_grad():
        assert torch.equal(jras(x, guide), base(x))
        assert torch.equal(jras(x, None), base(x))
        empty = _guide(guide.exemplars, guide.exemplar_masks, torch.zeros(2, 2, dtype=torch.bool))
        assert torch.equal(jras(x, empty), base(x))


def test_readout_of_the_query_itself_reproduces_its_mask():
    """With the query's own slice and mask as the only exemplar and identity keys, ``P_read``
    is that mask: the propagated segmentation comes from the exemplar, not the weights."""
    readout = MemoryReadout(feature_channels=8, num_classes=3, key_dim=8)
    with torch.no_grad():
        readout.key.weight.copy_(torch.eye(8)[:, :, None, None] * 20)
        readout.key.bias.zero_()
    # one-hot position features: every position has its own key
    h = w = 8
    codes = torch.randn(8, h * w)
    feats = codes.view(1, 8, h, w)
    mask = torch.randint(0, 3, (1, 1, h, w))
    p_read, confidence = readout.read(feats, feats[:, None], mask, torch.ones(1, 1, dtype=bool))
    assert torch.equal(p_read.argmax(1), mask[:, 0])
    assert float(confidence.mean()) > 0.5
    # another exemplar mask gives another readout: the readout is not ignored
    other = (mask + 1) % 3
    p_other, _ = readout.read(feats, feats[:, None], other, torch.ones(1, 1, dtype=bool))
    assert torch.equal(p_other.argmax(1), other[:, 0])


def test_fine_values_reproduce_the_full_resolution_mask_pooled_ones_lose_its_detail():
    """Read from the query itself, ``fine`` values give back every pixel of a mask finer than
    the key grid; ``pooled`` values (runs saved before) can only give its 1/4-scale blur."""
    h = w = 8
    codes = torch.randn(8, h * w).view(1, 8, h, w)
    mask = torch.randint(0, 3, (1, 1, 4 * h, 4 * w))  # detail below the 1/4 scale
    present = torch.ones(1, 1, dtype=bool)
    reads = {}
    for values in ("fine", "pooled"):
        readout = MemoryReadout(feature_channels=8, num_classes=3, values=values, key_dim=8)
        with torch.no_grad():
            readout.key.weight.copy_(torch.eye(8)[:, :, None, None] * 20)
            readout.key.bias.zero_()
            reads[values], confidence = readout.read(codes, codes[:, None], mask, present)
            skip, logits = readout.inject(reads[values], confidence)
        assert skip.shape == (1, 8, h, w)
        assert logits.shape == (1, 3, *reads[values].shape[-2:])
    assert reads["fine"].shape == (1, 3, 4 * h, 4 * w)
    assert torch.equal(reads["fine"].argmax(1), mask[:, 0])
    assert reads["pooled"].shape == (1, 3, h, w)
    upsampled = torch.nn.functional.interpolate(reads["pooled"], scale_factor=4.0)
    assert float((upsampled.argmax(1) == mask[:, 0]).float().mean()) < 0.8
    # pooled back to the key scale, the fine readout is the pooled one (same skip input)
    assert torch.allclose(torch.nn.functional.avg_pool2d(reads["fine"], 4), reads["pooled"],
                          atol=1e-5)


def test_new_runs_read_fine_values_and_older_readout_runs_load_pooled():
    model = _model()
    assert model.config.readout_values == "fine" and model.readout.fine
    assert model.config.readout_prior == "local" and model.readout.locality is not None
    old = model.config.to_dict()
    # a run folder from before the options
    del old["readout_values"], old["readout_prior"], old["readout_trust"]
    loaded = JRASModel(ModelConfig.from_dict(old))
    assert loaded.config.readout_trust == 0.0  # older runs predict as they did
    assert loaded.config.readout_values == "pooled" and not loaded.readout.fine
    assert loaded.config.readout_prior == "none" and loaded.readout.locality is None
    state = {k: v for k, v in model.state_dict().items() if k != "readout.locality"}
    loaded.load_state_dict(state)  # an older run's weights load strictly
    with pytest.raises(ModelError, match="readout_values"):
        ModelConfig(num_classes=3, readout_values="sharp")
    with pytest.raises(ModelError, match="readout_prior"):
        ModelConfig(num_classes=3, readout_prior="global")


def test_readout_matches_the_affinity_written_out():
    """The fused, query-major affinity equals the formula: softmax over all exemplar positions
    of -||q - e||^2 / sqrt(D) - lambda d^2 + log w_k, empty slots excluded; the readout is the
    affinity-weighted exemplar masks and the confidence the log-scaled peak."""
    torch.manual_seed(0)
    b, k, f, h, w, c = 3, 2, 6, 4, 5, 3
    readout = MemoryReadout(f, c, values="pooled")
    query, exemplars = torch.randn(b, f, h, w), torch.randn(b, k, f, h, w)
    masks = torch.randint(0, c, (b, k, h, w))
    present = torch.tensor([[True, True], [True, False], [False, False]])
    weights = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.5, 0.5]])
    p_read, confidence = readout.read(query, exemplars, masks, present, weights)

    kq = readout.key(query).flatten(2).transpose(1, 2)  # B,P,D
    ke = readout.key(exemplars.flatten(0, 1)).reshape(b, k, -1, h * w)
    ke = ke.permute(0, 1, 3, 2).reshape(b, k * h * w, -1)  # B,KM,D
    grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)
    grid = grid.reshape(-1, 2).float()
    moved = torch.cdist(grid, grid).pow(2).repeat(1, k)  # P,KM
    lam = torch.nn.functional.softplus(readout.locality)
    onehot = torch.nn.functional.one_hot(masks, c).reshape(b, -1, c)  # B,KM,C
    for i in range(2):  # the third query has no exemplar: zero readout and confidence
        logits = (-torch.cdist(kq[i], ke[i]).pow(2) / kq.shape[-1] ** 0.5 - lam * moved
                  + torch.log(weights[i]).repeat_interleave(h * w))
        logits[:, ~present[i].repeat_interleave(h * w)] = -torch.inf
        affinity = logits.softmax(-1)
        expected = (affinity @ onehot[i].float()).T.reshape(c, h, w)
        assert torch.allclose(p_read[i], expected, atol=1e-5)
        peak = affinity.max(-1).values
        expected_conf = (torch.log(peak * k * h * w) / torch.log(torch.tensor(k * h * w + 1.0)))
        assert torch.allclose(confidence[i].flatten(), expected_conf.clamp(0, 1), atol=1e-5)
    assert float(p_read[2].abs().max()) == 0 and float(confidence[2].abs().max()) == 0


def test_locality_prior_starts_near_copying_in_place_and_is_learned():
    """With keys that see nothing (all positions alike), the locality prior alone reads each
    query position from the same exemplar position: the exemplar's mask is copied in place,
    and lambda trains with the readout loss."""
    h = w = 8
    readout = MemoryReadout(feature_channels=4, num_classes=3, key_dim=4)
    with torch.no_grad():
        readout.key.weight.zero_()
        readout.key.bias.zero_()
    features = torch.randn(1, 4, h, w)
    mask = torch.zeros(1, 1, 4 * h, 4 * w, dtype=torch.long)
    mask[..., 8:20, 4:16], mask[..., 18:30, 14:28] = 1, 2
    p_read, _ = readout.read(features, features[:, None], mask, torch.ones(1, 1, dtype=bool))
    agreement = float((p_read.argmax(1) == mask[:, 0]).float().mean())
    assert agreement > 0.95
    without = MemoryReadout(feature_channels=4, num_classes=3, prior="none", key_dim=4)
    with torch.no_grad():
        without.key.weight.zero_()
        without.key.bias.zero_()
    p_flat, _ = without.read(features, features[:, None], mask, torch.ones(1, 1, dtype=bool))
    assert float((p_flat.argmax(1) == mask[:, 0]).float().mean()) < agreement - 0.2
    readout_loss(p_read, mask[:, 0], torch.ones(1, 1, dtype=bool)).backward()
    assert readout.locality.grad is not None and float(readout.locality.grad.abs()) > 0


def test_readout_loss_trains_correspondence_and_the_model_uses_its_exemplars():
    """A few steps of the readout loss alone make the keys match a shifted exemplar to its
    query; the trained model's prediction then changes with the exemplar it is given."""
    seed_everything(0)
    model = _model()
    images, labels = _blobs(4)
    shifted_images = torch.roll(images, shifts=(2, -3), dims=(1, 2))
    shifted_labels = torch.roll(labels, shifts=(2, -3), dims=(1, 2))
    guide = _guide(images[:, None], labels[:, None])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(50):
        _, p_read = model.forward_readout(shifted_images[:, None], guide)
        loss = readout_loss(p_read, shifted_labels, guide.present)
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.6 * first
    model.eval()
    with torch.no_grad():
        _, p_read = model.forward_readout(shifted_images[:, None], guide)
        wrong = _guide(images[:, None], torch.zeros_like(labels)[:, None])
        _, p_wrong = model.forward_readout(shifted_images[:, None], wrong)
    assert not torch.allclose(p_read, p_wrong)
    assert float(p_wrong[:, 1:].max()) < 1e-4  # an empty exemplar propagates background only


def test_readout_needs_an_encoder_decoder_backbone():
    with pytest.raises(ModelError, match="readout"):
        JRASModel(ModelConfig(num_classes=3, size=32, backbone="segformer", fusion="readout",
                              backbone_options={"variant": "tiny"},
                              retriever=dict(TINY_RETRIEVER)))


def test_transunet_supports_the_readout():
    model = _model(backbone="transunet", options={"base_channels": 4, "hidden_size": 16,
                                                  "num_layers": 1, "num_heads": 2,
                                                  "img_size": 32})
    guide = _guide(torch.rand(1, 2, 32, 32), torch.randint(0, 3, (1, 2, 32, 32)))
    logits, p_read = model.forward_readout(torch.rand(1, 1, 32, 32), guide)
    assert logits.shape == (1, 3, 32, 32) and p_read.shape == (1, 3, 32, 32)  # fine values


def test_curriculum_defaults_and_overrides():
    readout = TrainConfig().resolved("readout")
    assert (readout.guide_dropout, readout.neighbour_guides, readout.own_guides) == tuple(
        CURRICULUM["readout"].values())
    concat = TrainConfig().resolved("concat")
    assert (concat.guide_dropout, concat.neighbour_guides, concat.own_guides) == (0.5, 0.0, 0.0)
    # an override keeps the proportions of the rest of the default curriculum
    half = TrainConfig(guide_dropout=0.5).resolved("readout")
    assert half.guide_dropout == 0.5
    d = CURRICULUM["readout"]
    assert half.neighbour_guides == pytest.approx(
        d["neighbour_guides"] * 0.5 / (1 - d["guide_dropout"]), abs=1e-6)
    assert half.neighbour_guides + half.own_guides < 0.5
    with pytest.raises(JRASError, match="exceed 1"):
        TrainConfig(guide_dropout=0.5, neighbour_guides=0.4, own_guides=0.2)


def test_own_exemplar_is_the_query_warped_with_a_damaged_mask():
    images, labels = _blobs(8)
    g = torch.Generator().manual_seed(0)
    warped, masks = corrupted_copy(images, labels, g)
    assert warped.shape == images.shape and masks.shape == labels.shape
    assert not torch.equal(masks, labels)
    agree = (masks == labels).float().mean()
    assert agree > 0.6  # still mostly right: an informative, imperfect exemplar


def test_class_aware_sampling_puts_rare_classes_in_every_batch():
    samples = synthetic_samples()
    for s in samples[1:]:  # class 2 only in the first slice
        s.label[s.label == 2] = 1
    data = SliceSet(samples, 3)
    model = _model(use_retrieval=False)
    with_rare = JointTrainer(model, data, TrainConfig(steps=1, batch_size=6, class_sampling=0.5))
    without = JointTrainer(model, data, TrainConfig(steps=1, batch_size=6, class_sampling=0.0))
    rare = lambda t: sum(int((data.labels[t.sampler.sample(6)] == 2).flatten(1).any(1).sum())  # noqa: E731
                         for _ in range(20))
    assert rare(with_rare) > rare(without) + 10


def test_training_steps_with_the_curriculum_reach_every_part():
    seed_everything(0)
    model = _model()
    data = SliceSet(synthetic_samples(), 3)
    trainer = JointTrainer(model, data, TrainConfig(steps=3, batch_size=8, log_every=1,
                                                    device="cpu"))
    assert trainer.config.own_guides == CURRICULUM["readout"]["own_guides"]
    history = trainer.fit()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history if "loss" in h)
    # the readout's injections have left zero: exemplars now change the prediction
    assert float(model.readout.to_skip.weight.abs().sum()) > 0


def test_image_dropout_zeroes_deep_features_of_chosen_queries_only():
    seed_everything(0)
    model = _model(options={**TINY_UNET, "depth": 3})
    with torch.no_grad():  # a readout that is not zero, so the guided path is visible
        model.readout.to_skip.weight.normal_()
    x = torch.rand(2, 1, 32, 32)
    guide = _guide(torch.rand(2, 2, 32, 32), torch.randint(0, 3, (2, 2, 32, 32)))
    model.eval()
    with torch.no_grad():
        full, _ = model.forward_readout(x, guide)
        dropped, _ = model.forward_readout(x, guide, torch.tensor([True, False]))
    assert not torch.allclose(full[0], dropped[0])
    torch.testing.assert_close(full[1], dropped[1])
    with pytest.raises(JRASError, match="image_dropout"):
        TrainConfig(image_dropout=1.0)


def test_trust_readout_mixes_the_propagated_mask_into_the_prediction():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, 16, 16, generator=g)
    p_read = torch.rand(3, 3, 4, 4, generator=g).softmax(1)
    up = torch.nn.functional.interpolate(p_read, size=(16, 16), mode="bilinear",
                                         align_corners=False)
    mixed = trust_readout(logits, p_read, torch.tensor([0.0, 1.0, 0.25]))
    assert torch.equal(mixed[0], logits[0])  # no trust: the network's logits unchanged
    mixed = mixed.softmax(1)
    assert torch.allclose(mixed[1], up[1], atol=1e-5)
    assert torch.allclose(mixed[2], 0.75 * logits[2].softmax(0) + 0.25 * up[2], atol=1e-5)
    with pytest.raises(ModelError, match="readout_trust"):
        ModelConfig(num_classes=3, readout_trust=1.5)
