"""The joint trainer: alternating supervised (Dice + CE) and segmentation-aware contrastive steps.

* Supervised step: the query is embedded, its top-K exemplars (never its own patient) are fused
  into a guide, the segmenter predicts; the loss updates the segmenter and, through the fusion
  weights, the retriever.
* Contrastive step (retriever only): InfoNCE where, for each query, the candidate exemplars whose
  masks overlap most with the query's ground truth are the positives.
* Optional warm-up: NT-Xent on two augmented views of each slice.
* Bank embeddings are refreshed with the current retriever on a schedule, not per step.

Under torchrun (see ``docs/multi_gpu.md``) the trainer runs DistributedDataParallel: every rank
draws the same global batch from the shared seeded generator and trains on its own contiguous
part of it, gradients are averaged, bank embeddings are computed shard-wise and all-gathered,
and only rank 0 writes logs, checkpoints and progress. With one process nothing changes.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed as ddp
from .backbones import embedding_cache
from .device import autocast
from .errors import DataError, JRASError
from .fusion import Guide, soft_topk_guide
from .memory import check_training_memory
from .metrics import mean_dice
from .model import JRASModel
from .progress import CancelFn, Progress, ProgressFn
from .readout import readout_loss
from .retrieval import embed_images, retriever_version
from .run_files import LOG_FILE
from .train_checkpoint import TrainingState, load_checkpoint, newest_checkpoint, save_checkpoint
from .train_losses import info_nce, mask_relevance, nt_xent, relevance_masks, segmentation_loss
from .train_sampling import (
    SliceSampler,
    SliceSet,
    drop_guides,
    neighbour_exclusion,
    plan_guides,
    with_own_exemplar,
)
from .train_schedule import restore_schedule, warmup_cosine

if TYPE_CHECKING:  # the settings' module imports this one to re-export the trainer
    from .train import TrainConfig



def every(step: int, period: int) -> bool:
    """Whether something done every ``period`` steps happens at ``step`` (never when 0)."""
    return period > 0 and step % period == 0


class _StepRunner(nn.Module):
    """Holds the model so that a whole training step is one ``forward`` call.

    DistributedDataParallel synchronises gradients of what runs inside its wrapped module's
    forward; the J-RAS steps use the retriever and the segmenter in different combinations
    (supervised: both, through the fusion weights; contrastive and warm-up: the retriever only),
    so the step function itself is passed in and run inside the forward.
    """

    def __init__(self, model: JRASModel):
        super().__init__()
        self.model = model

    def forward(self, step: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """Run ``step(*args)`` (a loss function using ``self.model``)."""
        return step(*args)


class JointTrainer:
    """Trains a :class:`JRASModel` on a :class:`SliceSet` that also serves as the retrieval bank.

    Inside a torchrun process group the model is trained with DistributedDataParallel; the
    cancel flag of any rank stops every rank at the same step.

    Args:
        model: the model to train (moved to the training device).
        train: the training slices, also the bank queries retrieve from.
        config: the settings (the curriculum resolved for the model's fusion).
        run_dir: where ``log.jsonl`` and the checkpoints go (None: nothing is written).
        val: validation slices, scored every ``config.val_every`` steps.
        sample_weights: one weight per training slice, to oversample some (e.g. fresh
            corrections during fine-tuning).
        progress: receives the record of every logged step.
        cancel: polled before every step; True stops the run cleanly after the current step
            (a checkpoint is written when ``run_dir`` is set).
    """

    def __init__(self, model: JRASModel, train: SliceSet, config: TrainConfig,
                 run_dir: str | Path | None = None, val: SliceSet | None = None,
                 sample_weights: Sequence[float] | None = None,
                 progress: ProgressFn | None = None, cancel: CancelFn | None = None):
        config = config.resolved(model.config.fusion if model.config.use_retrieval else "concat")
        self.config = config
        self.device = ddp.training_device(config.device)
        self.world_size = ddp.world_size()
        if config.batch_size < self.world_size:
            raise JRASError(f"batch_size {config.batch_size} is the global batch, split across "
                            f"{self.world_size} processes: it must be at least {self.world_size}")
        if model.config.use_retrieval and len(train.patient_names) < 2:
            raise DataError(
                f"J-RAS training needs slices of at least 2 patients, found only "
                f"{len(train.patient_names)} ({train.patient_names[0]}): a query never retrieves "
                "exemplars of its own patient. Add patients (check --patient-regex), or train "
                "the baseline with --no-retrieval")
        check_training_memory(model, -(-config.batch_size // self.world_size), self.device,
                              config.contrastive_candidates, len(train))
        self.model = model.to(self.device)
        self.train_set = train
        self.val_set = val
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress
        self.cancel = cancel or (lambda: False)
        self.use_retrieval = model.config.use_retrieval
        self.generator = torch.Generator().manual_seed(config.seed)
        self.sampler = SliceSampler(train, self.generator, config.class_sampling, config.augment,
                                    self.device, sample_weights)
        if self.use_retrieval and config.freeze_retriever:
            for p in model.retriever.parameters():
                p.requires_grad_(False)
        self._runner: nn.Module = _StepRunner(model)
        if self.world_size > 1:
            # contrastive and warm-up steps leave the segmenter unused
            self._runner = DistributedDataParallel(
                self._runner, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, config.steps, config.warmup_fraction)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self._fp16())
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.bank_images = train.images.to(self.device)
        self.bank_labels = train.labels.to(self.device)
        self.bank_patients = train.patients.to(self.device)
        self.bank_cases = train.cases.to(self.device)
        self.bank_slices = train.slice_indices.to(self.device)
        self.bank_emb: torch.Tensor | None = None
        self.relevance_masks = relevance_masks(train.labels, train.num_classes).to(self.device)
        steps_per_epoch = max(1, len(train) // config.batch_size)
        self.refresh_every = config.refresh_every or steps_per_epoch
        self._started = 0.0

    def _fp16(self) -> bool:
        return (self.config.amp and self.device.type == "cuda"
                and not torch.cuda.is_bf16_supported())

    # -- retrieval ------------------------------------------------------------------------
    def refresh_embeddings(self) -> None:
        """Re-embed the whole training bank with the current retriever (and re-centre it).

        Distributed: each rank embeds its share of the bank and the shares are all-gathered, so
        every rank retrieves from bit-identical embeddings. Called by all ranks together.
        """
        if self.use_retrieval:
            retriever = self.model.retriever
            part = embed_images(retriever, ddp.shard(self.bank_images), device=self.device,
                                features=True).to(self.device)
            features = ddp.all_gather_rows(part, len(self.bank_images))
            with torch.no_grad():
                retriever.set_center(features)  # the bank's mean: identical on every rank
                self.bank_emb = retriever.normalize(features)

    def guide_for(self, x: torch.Tensor, patients: torch.Tensor,
                  neighbours_of: torch.Tensor | None = None) -> Guide:
        """Guide for queries ``x`` (B,H,W) that may not retrieve exemplars of ``patients``.

        Args:
            x: (B,H,W) query images on the training device.
            patients: (B,) each query's patient (index into the bank's patients; -1: none).
            neighbours_of: (B,) for queries that get a neighbour guide, the training-slice index
                of the query (-1 for the others): such a query retrieves only the slices next
                to it in its own volume (never itself), as if the annotator had accepted them.

        Returns:
            The fused top-K guide of every query.
        """
        cfg = self.model.config
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_retriever):
            q = self.model.embed(x[:, None])
        exclude = patients[:, None].to(self.device) == self.bank_patients[None, :]
        if neighbours_of is not None:
            exclude = neighbour_exclusion(neighbours_of.to(self.device), exclude,
                                          self.bank_slices, self.bank_cases, self.bank_patients)
        return soft_topk_guide(q, self.bank_emb, self.bank_images, self.bank_labels,
                               cfg.num_classes, cfg.k, cfg.tau, exclude, query=x,
                               max_shift=cfg.max_shift)

    # -- steps ----------------------------------------------------------------------------
    def supervised_step(self) -> float:
        """One Dice + CE step on the segmenter (and the retriever through the fusion weights).

        Each query draws its guide from the curriculum: none (``guide_dropout``), its own
        volume's adjacent slices (``neighbour_guides``), its own slice warped with a corrupted
        mask in the first slot (``own_guides``), or other patients' exemplars (the rest).
        """
        cfg = self.config
        idx = self.sampler.sample(cfg.batch_size)
        x, y = self.sampler.batch(idx)
        # drawn for the global batch before sharding, so every rank's generator stays in step
        plan = plan_guides(idx, x, y, cfg, self.generator, self.use_retrieval,
                           self.model.readout is not None)
        idx, x, y = ddp.shard(idx), ddp.shard(x), ddp.shard(y)
        keep, neighbours_of = ddp.shard(plan.keep), ddp.shard(plan.neighbours_of)
        own, own_pair, drop_deep = ddp.shard(plan.own), plan.own_pair, plan.drop_deep
        if drop_deep is not None:
            drop_deep = ddp.shard(drop_deep).to(self.device)
        if own_pair is not None:
            own_pair = (ddp.shard(own_pair[0]), ddp.shard(own_pair[1]))
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._runner(self._supervised_loss, x, y, self.train_set.patients[idx], keep,
                            neighbours_of if cfg.neighbour_guides > 0 else None, own, own_pair,
                            drop_deep)
        self._backward(loss)
        return float(loss.detach())

    def _supervised_loss(self, x: torch.Tensor, y: torch.Tensor, patients: torch.Tensor,
                         keep: torch.Tensor, neighbours_of: torch.Tensor | None,
                         own: torch.Tensor,
                         own_pair: tuple[torch.Tensor, torch.Tensor] | None,
                         drop_deep: torch.Tensor | None = None) -> torch.Tensor:
        with autocast(self.device, self.config.amp):
            guide = self.guide_for(x, patients, neighbours_of) if self.use_retrieval else None
            if guide is not None and own_pair is not None and bool(own.any()):
                guide = with_own_exemplar(guide, own.to(self.device), *own_pair,
                                          self.model.num_classes)
            if guide is not None and not bool(keep.all()):
                guide = drop_guides(guide, keep.to(self.device))
            if self.model.readout is None:
                return segmentation_loss(self.model(x[:, None], guide), y)
            logits, p_read = self.model.forward_readout(x[:, None], guide, drop_deep)
            loss = segmentation_loss(logits, y)
            if p_read is not None and self.config.readout_weight > 0:
                loss = loss + self.config.readout_weight * readout_loss(p_read, y, guide.present)
            return loss

    def contrastive_step(self) -> float:
        """One segmentation-aware InfoNCE step on the retriever alone."""
        cfg = self.config
        idx = self.sampler.sample(cfg.batch_size)
        cand = torch.randperm(len(self.train_set), generator=self.generator)[:cfg.contrastive_candidates]
        x, _ = self.sampler.batch(idx)
        idx, x = ddp.shard(idx), ddp.shard(x)
        relevance = mask_relevance(self.relevance_masks[idx.to(self.device)],
                                   self.relevance_masks[cand.to(self.device)])
        valid = (self.train_set.patients[idx][:, None] != self.train_set.patients[cand][None, :]).to(self.device)
        relevance = relevance.masked_fill(~valid, -1.0)
        top = relevance.topk(min(cfg.contrastive_positives, relevance.shape[1]), dim=1).indices
        positives = torch.zeros_like(valid).scatter_(1, top, True)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._runner(self._contrastive_loss, x, cand, positives, valid)
        self._backward(loss)
        return float(loss.detach())

    def _contrastive_loss(self, x: torch.Tensor, cand: torch.Tensor, positives: torch.Tensor,
                          valid: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.config.amp):
            q = self.model.embed(x[:, None])
            c = self.model.embed(self.bank_images[cand.to(self.device)][:, None])
            return info_nce(q.float(), c.float(), positives, valid, self.config.contrastive_tau)

    def warmup_step(self) -> float:
        """One self-supervised NT-Xent step (two augmented views per slice)."""
        idx = self.sampler.sample(max(2, self.config.batch_size))
        x1, _ = self.sampler.batch(idx)
        x2, _ = self.sampler.batch(idx)
        x1, x2 = ddp.shard(x1), ddp.shard(x2)  # negatives: the other slices of this rank's part
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._runner(self._warmup_loss, x1, x2)
        self._backward(loss)
        return float(loss.detach())

    def _warmup_loss(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.config.amp):
            return nt_xent(self.model.embed(x1[:, None]).float(),
                           self.model.embed(x2[:, None]).float(), self.config.contrastive_tau)

    def _backward(self, loss: torch.Tensor) -> None:
        if ddp.any_rank(not torch.isfinite(loss)):
            raise JRASError(f"Training diverged (loss {float(loss)}) at step {self.step}; "
                            "lower the learning rate")
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    # -- loop -----------------------------------------------------------------------------
    def fit(self) -> list[dict[str, Any]]:
        """Run (or resume) training to ``config.steps``.

        Returns:
            Every record this trainer has logged (loss, learning rate, ETA...; one per logged
            step).
        """
        cfg = self.config
        self._started = time.perf_counter()
        start_step = self.step
        if self.use_retrieval and not cfg.freeze_retriever and self.step == 0:
            for i in range(cfg.retriever_warmup_steps):
                loss = self.warmup_step()
                if every(i + 1, cfg.log_every):
                    [loss] = ddp.mean_over_ranks([loss])
                    self._log({"phase": "warmup", "warmup_step": i + 1, "loss_warmup": loss})
                if ddp.any_rank(self.cancel()):
                    break
        if self.bank_emb is None:
            self.refresh_embeddings()
        sup_acc, con_acc, n_acc = 0.0, 0.0, 0
        while self.step < cfg.steps:
            if ddp.any_rank(self.cancel()):
                self._log({"phase": "cancelled"})
                break
            # augmented images are seen once: keeping their frozen-encoder outputs is useless
            with embedding_cache.bypassed(cfg.augment):
                sup_acc += self.supervised_step()
                if (self.use_retrieval and not cfg.freeze_retriever
                        and every(self.step, cfg.contrastive_every)):
                    con_acc += self.contrastive_step()
            n_acc += 1
            self.scheduler.step()
            self.step += 1
            if self.use_retrieval and self.step % self.refresh_every == 0:
                self.refresh_embeddings()
            if every(self.step, cfg.log_every) or self.step == cfg.steps:
                sup, con = ddp.mean_over_ranks([sup_acc / n_acc, con_acc / n_acc])
                record = {"phase": "train", "loss": sup, "lr": self.scheduler.get_last_lr()[0]}
                if self.use_retrieval and cfg.contrastive_every and not cfg.freeze_retriever:
                    record["loss_contrastive"] = con
                done = self.step - start_step
                elapsed = time.perf_counter() - self._started
                record["eta_s"] = elapsed / max(done, 1) * (cfg.steps - self.step)
                if self.world_size > 1:
                    record["world_size"] = self.world_size
                if (self.val_set is not None and every(self.step, cfg.val_every)
                        and ddp.is_main()):
                    record["val_dice"] = self.validate()
                self._log(record)
                sup_acc, con_acc, n_acc = 0.0, 0.0, 0
            if self.run_dir is not None and every(self.step, cfg.checkpoint_every):
                self._checkpoint()
        if self.step >= cfg.steps:
            self.refresh_embeddings()
        if self.world_size > 1:
            self._check_ranks_in_sync()
        if self.run_dir is not None:
            self._checkpoint()
        return self.history

    def _checkpoint(self) -> None:
        """Rank 0 writes a checkpoint; the other ranks wait for it."""
        if ddp.is_main():
            self.save_checkpoint()
        ddp.barrier()

    def _check_ranks_in_sync(self) -> None:
        """Log a fingerprint of every rank's weights; warn if the replicas differ."""
        checksums = ddp.gather_strings(retriever_version(self.model))
        in_sync = len(set(checksums)) == 1
        self._log({"phase": "sync_check", "world_size": self.world_size,
                   "checksums": checksums, "in_sync": in_sync})
        if not in_sync:
            warnings.warn(f"The {self.world_size} training processes ended with different "
                          f"weights ({checksums}); rank 0's are saved", RuntimeWarning,
                          stacklevel=2)

    def _log(self, record: dict[str, Any]) -> None:
        record = {"step": self.step, "total": self.config.steps,
                  "time_s": round(time.perf_counter() - self._started, 3), **record}
        self.history.append(record)
        if not ddp.is_main():
            return
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / LOG_FILE, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.progress is not None:
            self.progress(Progress.from_record(record))

    @torch.no_grad()
    def predict_set(self, data: SliceSet, batch_size: int = 16) -> torch.Tensor:
        """Label maps for every slice of ``data`` (retrieving from the training bank).

        Args:
            data: the slices (their patients' exemplars are not retrieved).
            batch_size: slices per forward pass.

        Returns:
            (N,H,W) int64 label maps on the CPU.
        """
        self.model.eval()
        if self.use_retrieval and self.bank_emb is None:
            self.refresh_embeddings()
        out = []
        for i in range(0, len(data), batch_size):
            x = data.images[i:i + batch_size].to(self.device)
            patients = torch.tensor([self._bank_patient(data, j)
                                     for j in range(i, min(i + batch_size, len(data)))])
            with autocast(self.device, self.config.amp):
                guide = self.guide_for(x, patients) if self.use_retrieval else None
                out.append(self.model(x[:, None], guide).argmax(1).cpu())
        return torch.cat(out)

    def _bank_patient(self, data: SliceSet, j: int) -> int:
        name = data.samples[j].patient_id
        names = self.train_set.patient_names
        return names.index(name) if name in names else -1

    def validate(self) -> float:
        """Mean foreground Dice over validation cases (slices regrouped into volumes).

        Classes absent from a case (prediction and truth) do not count; NaN when no case has any.
        """
        pred = self.predict_set(self.val_set).numpy()
        gt = self.val_set.labels.numpy()
        cases: dict[str, list[int]] = {}
        for j, s in enumerate(self.val_set.samples):
            cases.setdefault(s.case_id, []).append(j)
        scores = np.array([mean_dice(pred[ix], gt[ix], self.model.num_classes)
                           for ix in cases.values()])
        scores = scores[~np.isnan(scores)]  # cases without any foreground, predicted or true
        return float(scores.mean()) if scores.size else float("nan")

    # -- checkpoints ----------------------------------------------------------------------
    def _state(self) -> TrainingState:
        return TrainingState(self.model, self.optimizer, self.scheduler, self.scaler,
                             self.generator)

    def save_checkpoint(self, keep: int = 2) -> Path:
        """Write model + optimizer + RNG state for resuming; the newest ``keep`` are kept.

        Args:
            keep: how many checkpoints of ``run_dir`` to keep.

        Returns:
            The checkpoint folder (``run_dir/checkpoints/step_NNNNNNNN``).
        """
        assert self.run_dir is not None
        return save_checkpoint(self.run_dir, self.step, self._state(), self.bank_emb,
                               asdict(self.config), keep)

    def resume(self) -> bool:
        """Load the newest complete checkpoint of ``run_dir``; False when there is none.

        Distributed: every rank loads the same checkpoint (``run_dir`` must be on a file system
        all nodes see); ranks that found different ones raise :class:`JRASError` together.
        Checkpoints of older versions (without the scheduler's state) resume at the same
        learning rate.

        Returns:
            Whether a checkpoint was loaded.
        """
        if self.run_dir is None:
            return False
        ckpt = newest_checkpoint(self.run_dir)
        found = ddp.gather_strings(ckpt.name if ckpt is not None else "")
        if len(set(found)) > 1:
            raise JRASError(f"The training processes see different checkpoints in {self.run_dir} "
                            f"({found}): put --out on a file system every node shares")
        if ckpt is None:
            return False
        restored = load_checkpoint(ckpt, self._state())
        if restored.bank_embeddings is not None:
            self.bank_emb = restored.bank_embeddings.to(self.device)
        restore_schedule(self.scheduler, restored.scheduler, self.config.steps,
                         self.config.warmup_fraction)
        self.step = restored.step
        return True
