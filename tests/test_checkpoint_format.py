"""Telling safetensors from pickle by what a safetensors file is, not by its first byte."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch

from napari_jras.core.checkpoint import load_tensors, save_tensors, weights_format
from napari_jras.core.errors import ModelError


def _safetensors_with_header_length(path, length: int) -> None:
    """A valid safetensors file (one F32 tensor [0, 1]) whose JSON header is ``length`` bytes.

    The metadata is padded to reach the length; the safetensors writer itself pads headers to a
    multiple of 8, other writers (and the format) allow any length.
    """
    header = {"__metadata__": {"format": "pt", "pad": ""},
              "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    header["__metadata__"]["pad"] = "x" * (length - len(json.dumps(header, separators=(",", ":"))))
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) == length
    path.write_bytes(struct.pack("<Q", length) + text + struct.pack("<2f", 0.0, 1.0))


@pytest.mark.parametrize("high", [0x00, 0x25])
def test_every_low_byte_of_the_header_length_loads(tmp_path, high):
    """0x80 (the pickle PROTO opcode) and 'P' (zip magic) as first byte are safetensors too."""
    path = tmp_path / "w.safetensors"
    for low in range(256):
        length = high * 256 + low
        if length < 100:  # too short for the header of one tensor
            continue
        _safetensors_with_header_length(path, length)
        assert path.read_bytes()[0] == low
        assert weights_format(path) == "safetensors", length
        assert load_tensors(path)["w"].tolist() == [0.0, 1.0], length


def test_the_writers_own_files_load_for_every_padding(tmp_path):
    """save_tensors files whose header length ends in each multiple of 8 (0x80 included)."""
    seen = set()
    for pad in range(0, 260):
        path = tmp_path / "w.safetensors"
        save_tensors(path, {"w": torch.ones(3)}, {"format": "napari-jras", "pad": "x" * pad})
        seen.add(path.read_bytes()[0])
        assert load_tensors(path)["w"].tolist() == [1.0, 1.0, 1.0]
    assert 0x80 in seen and len(seen) == 32


def test_real_pickles_are_still_called_pickles(tmp_path):
    state = {"w": torch.ones(3)}
    zipped, raw, legacy = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    torch.save(state, zipped)
    raw.write_bytes(pickle.dumps(state, protocol=2))
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    for path in (zipped, raw, legacy):
        assert weights_format(path) == "pickle", path.name
        with pytest.raises(ModelError, match="is a pickle .*never loads pickle"):
            load_tensors(path)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        raw.write_bytes(pickle.dumps([1, 2], protocol=protocol))
        assert weights_format(raw) == "pickle", protocol


@pytest.mark.parametrize("content", [b"", b"\x00" * 5, b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00"
                                     b"\x00\x00[1, 2, 3, 4, 5, 6, 7]  ", b"PKzip but not quite"])
def test_other_bytes_are_damaged_not_pickle(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    assert weights_format(path) == "damaged"
    with pytest.raises(ModelError, match="damaged or not a safetensors file"):
        load_tensors(path)
