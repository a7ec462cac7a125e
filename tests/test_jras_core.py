"""Retriever, fusion, joint trainer and checkpoints on tiny configs (CPU, seconds)."""

import numpy as np
import pytest
import torch

from napari_jras.core.checkpoint import load_model, save_model
from napari_jras.core.data import SliceSample
from napari_jras.core.errors import ModelError
from napari_jras.core.fusion import align_exemplars, alignment_shifts, soft_topk_guide
from napari_jras.core.model import JRASModel, ModelConfig
from napari_jras.core.retrieval import Retriever, retriever_version
from napari_jras.core.train import JointTrainer, SliceSet, TrainConfig, seed_everything

TINY_UNET = {"base_channels": 4, "depth": 2}
TINY_RETRIEVER = {"encoder": "cnn", "embed_dim": 16, "width": 4}


def synthetic_samples(n_patients=4, per_patient=3, size=32, seed=0):
    """Discs of varying radius/position: patient p's slices share a position."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    samples = []
    for p in range(n_patients):
        cy, cx = rng.integers(10, size - 10, 2)
        for z in range(per_patient):
            r = 4 + z
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            ring = ((yy - cy) ** 2 + (xx - cx) ** 2 < (r + 3) ** 2) & ~disc
            label = (disc * 2 + ring * 1).astype(np.uint8)
            image = (0.2 + 0.6 * disc + 0.3 * ring + rng.normal(0, 0.05, (size, size))).clip(0, 1)
            samples.append(SliceSample(image.astype(np.float32), label, f"patient{p}_frame01",
                                       f"patient{p}", z, "synthetic"))
    return samples


def tiny_model(use_retrieval=True, k=2, fusion="auto"):
    return JRASModel(ModelConfig(num_classes=3, size=32, k=k, use_retrieval=use_retrieval,
                                 backbone="unet", backbone_options=TINY_UNET,
                                 retriever=dict(TINY_RETRIEVER), fusion=fusion))


def test_retriever_embeddings_are_unit_norm():
    r = Retriever(**TINY_RETRIEVER, input_size=32)
    z = r(torch.rand(5, 1, 40, 48))
    assert z.shape == (5, 16)
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-5)


def test_fusion_weights_softmax_and_guide_onehot():
    q = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    images = torch.rand(6, 16, 16)
    masks = torch.randint(0, 3, (6, 16, 16))
    g = soft_topk_guide(q, bank, images, masks, num_classes=3, k=3, tau=0.1)
    sims = q @ bank.t()
    top = sims.topk(3, dim=1)
    assert torch.equal(g.indices, top.indices)
    assert torch.allclose(g.weights, torch.softmax(top.values / 0.1, 1), atol=1e-6)
    assert torch.allclose(g.mask.sum(1), torch.ones(2, 16, 16), atol=1e-5)
    expected = (g.weights[0, :, None, None] * images[g.indices[0]]).sum(0)
    assert torch.allclose(g.image[0, 0], expected, atol=1e-6)


def test_fusion_rejects_bad_k_and_empty_bank():
    q = torch.randn(1, 4)
    with pytest.raises(ModelError, match="K must be between"):
        soft_topk_guide(q, torch.randn(3, 4), torch.rand(3, 8, 8), torch.zeros(3, 8, 8, dtype=torch.long), 2, k=9)
    with pytest.raises(ModelError, match="empty"):
        soft_topk_guide(q, torch.zeros(0, 4), torch.rand(0, 8, 8), torch.zeros(0, 8, 8, dtype=torch.long), 2, k=2)
    with pytest.raises(ModelError, match="needs the query images"):
        soft_topk_guide(q, torch.randn(3, 4), torch.rand(3, 8, 8),
                        torch.zeros(3, 8, 8, dtype=torch.long), 2, k=2, max_shift=2)


def test_embed_images_restores_training_mode_when_embedding_fails():
    from napari_jras.core.retrieval import embed_images

    retriever = Retriever(encoder="cnn", embed_dim=8, width=4, input_size=16)
    retriever.train()
    with pytest.raises(ModelError):
        embed_images(retriever, torch.rand(2, 3, 5, 16, 16))  # 5-D: the encoder refuses it
    assert retriever.training


def _blob_pair(shift, size=32):
    """A query with a bright blob and an exemplar with the same blob moved by ``-shift``."""
    query = torch.zeros(size, size)
    query[10:17, 12:21] = 1.0
    query[12:14, 14:16] = 0.5  # texture, so the best shift is unique
    exemplar = torch.roll(query, (-shift[0], -shift[1]), dims=(0, 1))
    return query, exemplar


@pytest.mark.parametrize("shift", [(0, 0), (3, -4), (-5, 2)])
def test_alignment_moves_exemplars_onto_the_query(shift):
    query, exemplar = _blob_pair(shift)
    images = torch.stack([exemplar, query])[None]  # B=1, K=2
    masks = (images > 0).long() * torch.tensor([1, 2])[None, :, None, None]
    assert alignment_shifts(query[None], images, 6).tolist() == [[list(shift), [0, 0]]]
    moved_images, moved_masks = align_exemplars(query[None], images, masks, 6)
    assert torch.equal(moved_images[0, 0], query) and torch.equal(moved_images[0, 1], query)
    assert torch.equal(moved_masks[0, 0], (query > 0).long())
    assert moved_masks.dtype == masks.dtype


def test_alignment_respects_max_shift_fills_background_and_can_be_off():
    query, exemplar = _blob_pair((5, 0))
    images, masks = exemplar[None, None], (exemplar > 0).long()[None, None] * 3
    assert alignment_shifts(query[None], images, 2)[0, 0, 0].abs() <= 2
    moved, moved_masks = align_exemplars(query[None], images + 1.0, masks, 6)  # shifted by +5 rows
    assert torch.all(moved[0, 0, :5] == 0) and torch.all(moved_masks[0, 0, :5] == 0)
    off = align_exemplars(query[None], images, masks, 0)
    assert off[0] is images and off[1] is masks


def test_aligned_guide_keeps_weights_and_their_gradient():
    query, exemplar = _blob_pair((4, 4))
    bank_images = torch.stack([exemplar, torch.rand(32, 32)])
    bank_masks = (bank_images > 0.99).long()
    q = torch.nn.functional.normalize(torch.randn(1, 8), dim=1).requires_grad_()
    bank = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
    plain = soft_topk_guide(q, bank, bank_images, bank_masks, 2, k=2)
    aligned = soft_topk_guide(q, bank, bank_images, bank_masks, 2, k=2, query=query[None],
                              max_shift=8)
    assert torch.equal(plain.weights, aligned.weights) and not torch.equal(plain.image, aligned.image)
    aligned.mask[:, 1].sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_align_shift_is_validated_and_defaults_off():
    assert ModelConfig(num_classes=2).max_shift == 0
    assert ModelConfig(num_classes=2, size=96, align_shift=0.25).max_shift == 24
    with pytest.raises(ModelError, match="align_shift"):
        ModelConfig(num_classes=2, align_shift=0.8)


def test_exclusion_never_retrieves_excluded_even_if_identical():
    bank = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    exclude = torch.zeros(1, 5, dtype=torch.bool)
    exclude[0, 2] = True
    g = soft_topk_guide(bank[2:3], bank, torch.rand(5, 8, 8), torch.zeros(5, 8, 8, dtype=torch.long), 2, k=4, exclude=exclude)
    assert 2 not in g.indices[0, torch.isfinite(g.scores[0])].tolist()


def test_supervised_step_gives_retriever_gradients():
    seed_everything(0)
    model = tiny_model()
    trainer = JointTrainer(model, SliceSet(synthetic_samples(), 3),
                           TrainConfig(steps=1, batch_size=4, contrastive_every=0, augment=False))
    trainer.refresh_embeddings()
    trainer.supervised_step()
    grads = [p.grad for p in model.retriever.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_training_never_retrieves_own_patient(monkeypatch):
    seed_everything(0)
    model = tiny_model(k=4)
    data = SliceSet(synthetic_samples(), 3)
    # the own-volume parts of the guide curriculum (neighbours, own slice) are off: every
    # other query must retrieve other patients only
    trainer = JointTrainer(model, data, TrainConfig(steps=6, batch_size=4, log_every=2,
                                                    neighbour_guides=0.0, own_guides=0.0))
    seen = []
    original = trainer.guide_for

    def spy(x, patients, *rest):
        guide = original(x, patients, *rest)
        for row, p in enumerate(patients.tolist()):
            valid = torch.isfinite(guide.scores[row])
            seen.append((p, data.patients[guide.indices[row][valid].cpu()].tolist()))
        return guide

    monkeypatch.setattr(trainer, "guide_for", spy)
    trainer.fit()
    assert seen
    for patient, retrieved in seen:
        assert patient not in retrieved


def test_training_is_deterministic_and_resumes(tmp_path):
    def run(run_dir, stop_after=None, resume=False):
        seed_everything(3)
        model = tiny_model()
        trainer = JointTrainer(model, SliceSet(synthetic_samples(), 3),
                               TrainConfig(steps=4, batch_size=4, checkpoint_every=10, log_every=1, seed=3),
                               run_dir=run_dir,
                               cancel=(lambda: trainer.step >= stop_after) if stop_after else None)
        if resume:
            assert trainer.resume()
        trainer.fit()
        return model, trainer

    full, _ = run(tmp_path / "a")
    again, _ = run(tmp_path / "b")
    for (k, v), (_, w) in zip(full.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    # cancelled after 2 steps (a checkpoint is written), then resumed: same weights as straight
    _, stopped = run(tmp_path / "c", stop_after=2)
    assert stopped.step == 2
    resumed, trainer = run(tmp_path / "c", resume=True)
    assert trainer.step == 4
    for (k, v), (_, w) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(v, w, atol=1e-6), k


def test_training_reduces_loss_and_cancel_stops():
    seed_everything(0)
    model = tiny_model()
    trainer = JointTrainer(model, SliceSet(synthetic_samples(), 3),
                           TrainConfig(steps=40, batch_size=6, lr=3e-3, log_every=5, augment=False))
    history = trainer.fit()
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0]
    calls = []
    trainer2 = JointTrainer(tiny_model(), SliceSet(synthetic_samples(), 3),
                            TrainConfig(steps=100, batch_size=2),
                            cancel=lambda: calls.append(1) or len(calls) > 3)
    trainer2.fit()
    assert trainer2.step < 100


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    model = tiny_model()
    save_model(tmp_path, model)
    loaded = load_model(tmp_path)
    assert retriever_version(loaded.retriever) == retriever_version(model.retriever)
    cfg = (tmp_path / "config.json").read_text().replace('"base_channels": 4', '"base_channels": 8')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(ModelError, match="do not match"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="damaged"):
        load_model(tmp_path)
    with pytest.raises(ModelError, match="not a napari-jras model"):
        load_model(tmp_path / "..")


def test_corrupted_weights_and_pickle_are_refused(tmp_path):
    model = tiny_model()
    save_model(tmp_path, model)
    torch.save(model.state_dict(), tmp_path / "model.safetensors")  # a pickle in disguise
    with pytest.raises(ModelError, match="is a pickle .*never loads pickle"):
        load_model(tmp_path)


def test_safetensors_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """Regression: a header of 0x..80 bytes made the first byte equal a pickle's (0x80)."""
    from safetensors.torch import save_file

    from napari_jras.core.checkpoint import load_tensors

    for name_length in range(1, 300):  # find a header length whose low byte is 0x80
        save_file({"w" * name_length: torch.zeros(2)}, tmp_path / "w.safetensors")
        if (tmp_path / "w.safetensors").read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no header length ending in 0x80 found")
    assert torch.equal(load_tensors(tmp_path / "w.safetensors")["w" * name_length], torch.zeros(2))


def test_baseline_model_has_no_retriever_and_ignores_guides():
    model = tiny_model(use_retrieval=False)
    assert model.retriever is None
    out = model(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, 3, 32, 32)
    with pytest.raises(ModelError):
        model.embed(torch.rand(1, 1, 32, 32))


def test_guide_dropout_trains_some_queries_without_their_guide(monkeypatch):
    seed_everything(0)
    model = tiny_model(fusion="concat")
    trainer = JointTrainer(model, SliceSet(synthetic_samples(), 3),
                           TrainConfig(steps=4, batch_size=64, guide_dropout=0.5, device="cpu",
                                       log_every=1, contrastive_every=0))
    trainer.refresh_embeddings()
    seen = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward",
                        lambda self, x, guide=None: seen.append(guide) or forward(self, x, guide))
    trainer.supervised_step()
    [guide] = seen
    dropped = guide.mask.flatten(1).sum(1) == 0  # a real guide mask sums to 1 per pixel
    assert 0 < int(dropped.sum()) < 64
    assert torch.all(guide.image[dropped] == 0)
    assert torch.allclose(guide.mask[~dropped].sum(1), torch.ones(1))
    with pytest.raises(Exception, match="guide_dropout"):
        TrainConfig(guide_dropout=1.0)


def test_centering_on_the_bank_mean_spreads_similarities_and_survives_save_load(tmp_path):
    from napari_jras.core.retrieval import build_retriever

    seed_everything(0)
    config = dict(TINY_RETRIEVER, center=True)
    model = JRASModel(ModelConfig(num_classes=3, size=32, backbone="unet",
                                  backbone_options=TINY_UNET, retriever=config))
    data = SliceSet(synthetic_samples(), 3)
    trainer = JointTrainer(model, data, TrainConfig(steps=1, device="cpu"))
    trainer.refresh_embeddings()  # sets the centre to the bank's mean feature
    retriever = model.retriever.eval()
    with torch.no_grad():
        features = retriever.features(data.images[:, None])
        raw = torch.nn.functional.normalize(features, dim=1)
    assert torch.allclose(retriever.center.mean, features.mean(0), atol=1e-5)
    assert torch.allclose(trainer.bank_emb, retriever(data.images[:, None]), atol=1e-5)
    off_diagonal = ~torch.eye(len(data), dtype=torch.bool)
    centred_sims = (trainer.bank_emb @ trainer.bank_emb.t())[off_diagonal]
    raw_sims = (raw @ raw.t())[off_diagonal]
    assert centred_sims.std() > 3 * raw_sims.std()  # no common component to hide differences

    save_model(tmp_path, model)
    loaded = load_model(tmp_path)
    assert torch.equal(loaded.retriever.center.mean, retriever.center.mean)
    assert retriever_version(loaded.retriever) == retriever_version(retriever)
    plain = build_retriever({k: v for k, v in retriever.config().items() if k != "center"})
    assert isinstance(plain.center, torch.nn.Identity)  # configs from before the option


def test_neighbour_guides_come_from_adjacent_slices_of_the_query_volume(monkeypatch):
    seed_everything(0)
    data = SliceSet(synthetic_samples(n_patients=4, per_patient=5), 3)
    trainer = JointTrainer(tiny_model(k=2), data,
                           TrainConfig(steps=2, batch_size=32, neighbour_guides=0.5,
                                       contrastive_every=0, device="cpu"))
    trainer.refresh_embeddings()
    seen = []
    original = trainer.guide_for

    def spy(x, patients, neighbours_of=None):
        guide = original(x, patients, neighbours_of)
        seen.append((neighbours_of, patients, guide))
        return guide

    monkeypatch.setattr(trainer, "guide_for", spy)
    trainer.supervised_step()
    [(rows, patients, guide)] = seen
    chosen = rows >= 0
    assert 0 < int(chosen.sum()) < 32
    for row, query in enumerate(rows.tolist()):
        got = guide.indices[row][torch.isfinite(guide.scores[row])].tolist()
        if query >= 0:  # same volume, 1 or 2 slices away, never the query itself
            assert got and all(data.cases[j] == data.cases[query] for j in got)
            assert all(1 <= abs(int(data.slice_indices[j] - data.slice_indices[query])) <= 2
                       for j in got)
        else:  # the others: never their own patient
            assert int(patients[row]) not in data.patients[got].tolist()
    with pytest.raises(Exception, match="neighbour_guides"):
        TrainConfig(guide_dropout=0.6, neighbour_guides=0.5)
