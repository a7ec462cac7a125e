"""Settings declared once, as dataclass fields with metadata: the checks, the CLI and the panel.

A field made with :func:`setting` carries a :class:`Setting`: help text, command-line flag,
value range, choices, whether the training panel shows it. :func:`check_settings` checks a
dataclass instance against those ranges (with :mod:`.ranges`: one line naming the field);
``napari_jras.cli_settings`` turns the fields into ``napari-jras train`` options and
``napari_jras._widgets.settings_form`` into the training panel's magicgui form. Adding a
setting to :class:`~napari_jras.core.model.ModelConfig` or
:class:`~napari_jras.core.train.TrainConfig` is therefore one edit: its field.

Qt-free and argparse-free.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING
from typing import Any

from .errors import JRASError, ModelError
from .ranges import check_bool, check_choice, check_int, check_number

METADATA_KEY = "napari_jras.setting"


@dataclasses.dataclass(frozen=True)
class KeyOption:
    """A command-line flag for one key of a dict-valued setting (``--embed-dim`` of
    ``retriever``); its default is the key's value in the setting's default."""

    flag: str
    type: type
    help: str


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a config field means and where it may be set.

    ``flag``: the command-line flag; ``""`` is ``--`` plus the name with dashes, ``None`` keeps
    the field off the command line. A bool field's flag turns the default around
    (``--no-amp``). ``low``/``high`` (with ``open_low``/``open_high``) bound a number;
    ``choices`` are enforced (by argparse and :func:`check_settings`); ``names`` lists valid
    values checked elsewhere (the backbone registry). ``check=False``: the dataclass checks
    the value itself, with a message of its own. ``panel``: shown in the training panel;
    ``step``: the panel's spin-box increment. ``keys``: flags of single keys of a dict field.
    """

    help: str
    flag: str | None = ""
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] = ()
    names: Callable[[], Sequence[str]] | None = None
    check: bool = True
    panel: bool = False
    step: float | None = None
    keys: Mapping[str, KeyOption] = dataclasses.field(default_factory=dict)


def setting(default: Any = MISSING, *, default_factory: Callable[[], Any] | Any = MISSING,
            **meta: Any) -> Any:
    """A dataclass field with a :class:`Setting` in its metadata.

    Args:
        default: the field's default (leave out for a required field).
        default_factory: builds the default of a mutable field (list, dict).
        **meta: the :class:`Setting` attributes (``help`` is required).

    Returns:
        A :func:`dataclasses.field`.
    """
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={METADATA_KEY: Setting(**meta)})


@dataclasses.dataclass(frozen=True)
class SettingField:
    """One field of a settings dataclass: name, value type, default and :class:`Setting`.

    ``type`` is the field's type without ``None`` (``int``, ``float``, ``str``, ``bool``,
    ``list`` or ``dict``); ``optional``: None is allowed.
    """

    name: str
    type: type
    optional: bool
    meta: Setting
    field: dataclasses.Field = dataclasses.field(repr=False)

    @property
    def required(self) -> bool:
        """True when the field has no default."""
        return self.field.default is MISSING and self.field.default_factory is MISSING

    def default(self) -> Any:
        """The field's default (a fresh copy of a mutable one); :class:`TypeError` if required."""
        if self.field.default is not MISSING:
            return self.field.default
        if self.field.default_factory is not MISSING:
            return self.field.default_factory()
        raise TypeError(f"{self.name} has no default")

    @property
    def flag(self) -> str | None:
        """The command-line flag (None: not on the command line)."""
        if self.meta.flag == "":
            return "--" + self.name.replace("_", "-")
        return self.meta.flag

    def valid_names(self) -> tuple[str, ...]:
        """The enforced choices, else the listed valid names, else ``()``."""
        if self.meta.choices:
            return self.meta.choices
        return tuple(self.meta.names()) if self.meta.names is not None else ()


def _base_type(hint: Any) -> tuple[type, bool]:
    """``(int, True)`` for ``int | None``; the origin (``list``, ``dict``) of a generic."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"settings support one type or that type | None, not {hint}")
        hint = args[0]
    return typing.get_origin(hint) or hint, optional


@functools.cache
def settings_of(cls: type) -> tuple[SettingField, ...]:
    """The fields of dataclass ``cls`` that carry a :class:`Setting`, in definition order.

    Args:
        cls: a dataclass whose fields were made with :func:`setting`.

    Returns:
        One :class:`SettingField` per such field.
    """
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(METADATA_KEY)
        if meta is not None:
            base, optional = _base_type(hints[f.name])
            found.append(SettingField(f.name, base, optional, meta, f))
    return tuple(found)


def setting_field(cls: type, name: str) -> SettingField:
    """The :class:`SettingField` ``name`` of ``cls``; :class:`KeyError` when there is none."""
    for f in settings_of(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def check_settings(config: Any, error: type[JRASError] = ModelError) -> None:
    """Check each setting of dataclass instance ``config`` against its :class:`Setting`.

    Choices, true/false for bools, and ``low``..``high`` for numbers (whole numbers for ``int``
    fields); None passes where the field allows it. Fields with ``check=False`` are left to
    the dataclass.

    Args:
        config: a dataclass instance whose fields were made with :func:`setting`.
        error: the exception raised, with one line naming the field (:mod:`.ranges`).
    """
    for f in settings_of(type(config)):
        value, meta = getattr(config, f.name), f.meta
        if not meta.check or (value is None and f.optional):
            continue
        if meta.choices:
            check_choice(value, f.name, meta.choices, error)
        elif f.type is bool:
            check_bool(value, f.name, error)
        elif f.type is int and meta.low is not None and meta.high is not None:
            check_int(value, f.name, int(meta.low), int(meta.high), error)
        elif f.type is float and meta.low is not None and meta.high is not None:
            check_number(value, f.name, meta.low, meta.high, error, open_low=meta.open_low,
                         open_high=meta.open_high)


def split_names(text: str, *, drop_empty: bool = False) -> list[str]:
    """The comma-separated names of ``text``, stripped (``"a, b"`` -> ``["a", "b"]``).

    Args:
        text: names separated by commas.
        drop_empty: leave out empty names (else they are kept, for the check to refuse).

    Returns:
        The names in order.
    """
    names = [n.strip() for n in text.split(",")]
    return [n for n in names if n] if drop_empty else names
