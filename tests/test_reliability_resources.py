"""Resource limits: a large volume is predicted in slice batches, in bounded memory.

NumPy reports its allocations to ``tracemalloc``; torch's are not counted, but they only ever
hold one batch of slices. See docs/reliability.md ("Resource limits").
"""

from __future__ import annotations

import tracemalloc

import numpy as np

from napari_jras.core.engine import InferenceEngine
from napari_jras.core.model import JRASModel, ModelConfig
from napari_jras.core.normalize import NormalizedSlices, intensity_map, normalize

MIB = 2**20


def test_large_volume_is_predicted_in_bounded_memory():
    config = ModelConfig(num_classes=4, use_retrieval=False, size=32,
                         backbone_options={"base_channels": 4, "depth": 2})
    engine = InferenceEngine(JRASModel(config), device="cpu", batch_size=8)
    volume = np.random.default_rng(0).integers(0, 4000, (48, 512, 512), dtype=np.int16)
    engine.predict(volume[:1])  # warm-up outside the measurement
    tracemalloc.start()
    try:
        labels = engine.predict(volume).labels
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    # the labels (1 byte/voxel) + one input-sized copy for the percentiles + one batch;
    # normalising the whole volume at once took ~10x the input (float32 copies and temporaries)
    assert peak < 2 * volume.nbytes + 16 * MIB, f"peak {peak / MIB:.0f} MiB"


def test_batchwise_normalisation_equals_whole_volume():
    rng = np.random.default_rng(1)
    for volume, modality in ((rng.integers(-1000, 3000, (5, 20, 20), dtype=np.int16), "ct"),
                             (rng.integers(0, 4000, (5, 20, 20), dtype=np.uint16), "mri"),
                             (rng.integers(0, 255, (5, 20, 20), dtype=np.uint8), "auto"),
                             (rng.random((5, 20, 20)) * 50, "auto")):
        whole = normalize(volume, modality)
        parts = NormalizedSlices(volume, intensity_map(volume, modality))
        np.testing.assert_array_equal(np.concatenate([parts[[0, 1]], parts[2:5]]), whole)
        assert parts.shape == volume.shape and whole.dtype == np.float32
