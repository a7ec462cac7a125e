"""Names of the files and folders of a run folder (docs/cli.md, "The run folder").

One place for every name, so that the writer (training), the readers (loading, resuming,
provenance, the assistant) and ``--overwrite`` never disagree. Changing a name breaks old run
folders: these are part of the on-disk format.
"""

from __future__ import annotations

CONFIG_FILE = "config.json"  # ModelConfig: everything needed to rebuild the network
WEIGHTS_FILE = "model.safetensors"  # final weights (also in each checkpoint)
TRAIN_CONFIG_FILE = "train_config.json"  # TrainConfig, data summary, steps done, wall time
SETTINGS_FILE = "run_settings.json"  # the settings a resume must match
LOG_FILE = "log.jsonl"  # one JSON object per logged step
CHECKPOINTS_DIR = "checkpoints"  # resumable checkpoints, one folder per step
CHECKPOINT_PREFIX = "step_"  # checkpoint folders: step_00000200, ...
CHECKPOINT_GLOB = CHECKPOINT_PREFIX + "*"
TRAINER_STATE_FILE = "trainer.json"  # in a checkpoint: step, optimizer groups, scheduler, scaler
TRAINER_TENSORS_FILE = "trainer.safetensors"  # in a checkpoint: optimizer and RNG state
BANK_DIR = "bank"  # J-RAS only: the training exemplar bank
BANK_PARTIAL_DIR = ".bank.partial"  # the bank while it is being built


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint written at ``step``.

    Args:
        step: the optimisation step reached.

    Returns:
        ``step_`` and the step as eight digits (``step_00000200``): names sort by step.
    """
    return f"{CHECKPOINT_PREFIX}{step:08d}"
