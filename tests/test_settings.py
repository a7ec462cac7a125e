"""Settings declared once (core/settings.py): the checks, and the ``napari-jras train`` options
generated from ModelConfig's and TrainConfig's fields (cli_settings.py)."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from napari_jras.cli import build_parser
from napari_jras.cli_settings import add_options, config_values
from napari_jras.core import backbones
from napari_jras.core.errors import DataError, JRASError, ModelError
from napari_jras.core.model import ModelConfig
from napari_jras.core.settings import (
    KeyOption,
    check_settings,
    setting,
    setting_field,
    settings_of,
    split_names,
)
from napari_jras.core.train import TrainConfig

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


@dataclasses.dataclass
class Toy:
    """A settings dataclass as a new config would declare it."""

    count: int = setting(3, low=1, high=9, help="how many")
    ratio: float | None = setting(None, low=0.0, high=1.0, open_high=True, help="a fraction")
    mode: str = setting("fast", choices=("fast", "slow"), help="speed")
    name: str = setting("x", names=lambda: ["x", "y"], check=False, help="a name")
    loud: bool = setting(True, flag="--quiet-toy", help="print")
    tags: list[str] = setting(default_factory=list, help="tags")
    options: dict = setting(default_factory=lambda: {"a": 1, "b": 2},
                            keys={"b": KeyOption("--bee", int, "the b")}, help="JSON")
    hidden: int = setting(5, low=0, high=10, flag=None, help="not on the command line")

    def __post_init__(self) -> None:
        check_settings(self, DataError)


def toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_options(parser, Toy)
    return parser


def toy_values(*argv: str) -> dict:
    return config_values(toy_parser().parse_args(list(argv)), Toy)


# --- the fields and their checks --------------------------------------------------------------
def test_settings_of_resolves_types_defaults_and_flags():
    fields = {f.name: f for f in settings_of(Toy)}
    assert [f.name for f in settings_of(Toy)] == [f.name for f in dataclasses.fields(Toy)]
    assert (fields["ratio"].type, fields["ratio"].optional) == (float, True)
    assert (fields["tags"].type, fields["options"].type) == (list, dict)
    assert fields["options"].default() == {"a": 1, "b": 2}
    assert fields["options"].default() is not fields["options"].default()  # fresh each time
    assert [fields[n].flag for n in ("count", "loud", "hidden")] == ["--count", "--quiet-toy", None]
    assert fields["name"].valid_names() == ("x", "y") and fields["mode"].valid_names() == (
        "fast", "slow")
    model = {f.name: f for f in settings_of(ModelConfig)}
    assert model["num_classes"].required and not model["size"].required
    with pytest.raises(TypeError, match="num_classes has no default"):
        model["num_classes"].default()
    assert setting_field(TrainConfig, "steps").default() == 2000
    with pytest.raises(KeyError):
        setting_field(TrainConfig, "extra")  # a plain field, no setting


@pytest.mark.parametrize("changes,message", [
    ({"count": 0}, r"count must be a whole number between 1 and 9, got 0"),
    ({"count": 2.0}, "count must be a whole number"),
    ({"count": True}, "count must be a whole number"),
    ({"ratio": 1.0}, r"ratio must be a number in \[0, 1\), got 1.0"),
    ({"ratio": float("nan")}, "ratio must be a number in"),
    ({"mode": "medium"}, "mode must be one of fast, slow; got 'medium'"),
    ({"loud": "yes"}, "loud must be true or false"),
    ({"hidden": 11}, "hidden must be a whole number between 0 and 10"),
])
def test_check_settings_refuses_out_of_range_values_with_the_error_given(changes, message):
    with pytest.raises(DataError, match=message):
        Toy(**changes)


def test_check_settings_accepts_none_where_allowed_and_skips_unchecked_fields():
    assert Toy(ratio=None, name="anything").ratio is None
    assert Toy(ratio=0.5).ratio == 0.5


def test_config_dataclasses_check_with_their_own_errors():
    with pytest.raises(ModelError, match="size must be a whole number between 16 and 2048"):
        ModelConfig(num_classes=2, size=8)
    with pytest.raises(JRASError, match="batch_size must be a whole number between 1 and 4096"):
        TrainConfig(batch_size=0)


def test_split_names():
    assert split_names(" bg, a ,b") == ["bg", "a", "b"]
    assert split_names("bg,,a,") == ["bg", "", "a", ""]  # kept: the config refuses them
    assert split_names("bg,,a, ", drop_empty=True) == ["bg", "a"]


# --- generated command-line options ------------------------------------------------------------
def test_options_left_out_give_the_field_defaults():
    assert toy_values() == {"count": 3, "ratio": None, "mode": "fast", "name": "x",
                            "loud": True, "tags": [], "options": {"a": 1, "b": 2}}
    assert Toy(**toy_values()) == Toy()


def test_options_given_reach_their_fields():
    values = toy_values("--count", "4", "--ratio", "0.5", "--mode", "slow", "--name", "y",
                        "--quiet-toy", "--tags", "p, q", "--bee", "7", "--options", '{"c": 3}')
    assert values == {"count": 4, "ratio": 0.5, "mode": "slow", "name": "y", "loud": False,
                      "tags": ["p", "q"], "options": {"a": 1, "b": 7, "c": 3}}
    # the JSON object wins over a key flag
    assert toy_values("--bee", "7", "--options", '{"b": 9}')["options"] == {"a": 1, "b": 9}


def test_option_parsing_errors():
    with pytest.raises(SystemExit):  # argparse: not a number, not a choice
        toy_parser().parse_args(["--count", "many"])
    with pytest.raises(SystemExit):
        toy_parser().parse_args(["--mode", "medium"])
    with pytest.raises(JRASError, match=r"--options must be a JSON object, e.g. .*: Expecting"):
        toy_values("--options", "{bad")
    with pytest.raises(JRASError, match=r"--options must be a JSON object, got '\[1\]'"):
        toy_values("--options", "[1]")
    with pytest.raises(SystemExit):
        toy_parser().parse_args(["--hidden", "3"])  # flag=None: not an option


def test_help_shows_help_names_and_defaults(capsys):
    with pytest.raises(SystemExit):
        toy_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--count COUNT how many (default: 3)" in text
    assert "--name NAME a name (one of: x, y) (default: x)" in text
    assert "--quiet-toy turn off: print" in text
    assert "--bee BEE the b (default: 2)" in text
    assert "--options JSON JSON" in text and "--tags A,B,... tags" in text


def train_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", "--data", "d", "--out", "o", *argv])


def test_train_without_options_trains_with_the_dataclass_defaults():
    args = train_args()
    assert TrainConfig(**config_values(args, TrainConfig)) == TrainConfig()
    model = config_values(args, ModelConfig)
    assert "num_classes" not in model  # from the labels
    assert ModelConfig(num_classes=3, **model) == ModelConfig(num_classes=3)


def _example(f) -> tuple[list[str], object]:
    """Command-line words setting ``f`` to a value other than its default, and that value."""
    if f.type is bool:
        return [f.flag], not f.default()
    if f.type is int:
        value = int(f.meta.low) + 1 if f.required or f.default() != int(f.meta.low) + 1 else 2
        return [f.flag, str(value)], value
    if f.type is float:
        value = 0.125 if f.required or f.default() != 0.125 else 0.25
        return [f.flag, str(value)], value
    if f.type is list:
        return [f.flag, "bg, a"], ["bg", "a"]
    if f.type is dict:
        return [f.flag, '{"zz": 1}'], {**f.default(), "zz": 1}
    value = next(n for n in (f.valid_names() or ("other",)) if n != f.default())
    return [f.flag, value], value


@pytest.mark.parametrize("cls", [ModelConfig, TrainConfig])
def test_every_train_option_reaches_its_field(cls):
    """Each field with a flag is a ``napari-jras train`` option that sets exactly that field
    (a field added with a flag is on the command line without another edit)."""
    flagged = [f for f in settings_of(cls) if f.flag is not None]
    assert len(flagged) >= 8
    for f in flagged:
        words, value = _example(f)
        values = config_values(train_args(*words), cls)
        assert values[f.name] == value, f.name
        others = config_values(train_args(), cls)
        assert {k: v for k, v in values.items() if k != f.name} == {
            k: v for k, v in others.items() if k != f.name}, f.name


def test_train_option_names_are_kept():
    """The flags of issue-15's refactor are those the CLI had (docs/cli.md)."""
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    assert flags == {
        "-h", "--help", "--data", "--val", "--out", "--backbone", "--backbone-options",
        "--no-retrieval", "--k", "--tau", "--align-shift", "--epochs", "--steps", "--size",
        "--batch-size", "--lr", "--seed", "--modality", "--num-classes", "--class-names",
        "--pretrained", "--embed-dim", "--retriever-options", "--contrastive-every",
        "--warmup-steps", "--freeze-retriever", "--fusion", "--readout-values", "--readout-prior", "--readout-trust",
        "--guide-dropout",
        "--neighbour-guides", "--own-guides", "--class-sampling", "--readout-weight",
        "--image-dropout", "--no-augment", "--no-amp", "--overwrite", "--no-resume",
        "--checkpoint-every", "--val-every", "--log-every", "--patient-regex",
        "--group-duplicates", "--device", "--quiet"}


def test_docs_describe_every_train_option():
    text = DOCS.read_text()
    section = text[text.index("## `train`"):text.index("## `evaluate`")]
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    missing = [s for a in train._actions for s in a.option_strings
               if s.startswith("--") and s != "--help" and f"`{s}" not in section]
    assert not missing, f"docs/cli.md does not describe {missing}"


def test_backbone_choices_come_from_the_registry(monkeypatch, capsys):
    monkeypatch.setitem(backbones.BACKBONES, "vnet", backbones.BACKBONES["unet"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    names = re.search(r"--backbone BACKBONE .*?\(one of: ([^)]*)\)", text).group(1)
    assert names.split(", ") == sorted(backbones.BACKBONES)
    assert "vnet" in names and "litemedsam" in names


def test_steps_and_epochs_still_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        train_args("--steps", "3", "--epochs", "2")
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("cls", [ModelConfig, TrainConfig])
def test_configuration_reference_lists_every_setting(cls):
    text = DOCS.read_text()
    reference = text[text.index("## Configuration reference"):]
    missing = [f.name for f in settings_of(cls)
               if f"`{f.name}`" not in reference and f"(`{f.flag}`)" not in reference]
    assert not missing, f"docs/cli.md, Configuration reference, does not list {missing}"
