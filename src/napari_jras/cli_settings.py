"""Command-line options generated from settings dataclasses (:mod:`napari_jras.core.settings`).

:func:`add_options` adds one option per field of ``ModelConfig`` / ``TrainConfig`` that has a
flag: name, type, choices and help (with the default) come from the field. Every option
defaults to None, so that :func:`config_values` can tell an option given from one left out:
left out, the field's own default applies. The dataclasses check the values (one-line errors);
argparse only parses them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from .core.errors import JRASError
from .core.settings import SettingField, settings_of, split_names


def parse_json_object(text: str | None, flag: str) -> dict[str, Any]:
    """Parse the JSON object given to ``flag``, with a one-line error for anything else.

    Args:
        text: the option's text (None or empty: ``{}``).
        flag: the option, named in the error.

    Returns:
        The parsed object.
    """
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JRASError(f"{flag} must be a JSON object, e.g. '{{\"width\": 16}}': {exc}") from exc
    if not isinstance(value, dict):
        raise JRASError(f"{flag} must be a JSON object, got {text!r}")
    return value


def _help(text: str, f: SettingField | None = None, default: Any = None) -> str:
    """``text``, the valid names and the default, escaped for argparse's %-formatting."""
    if f is not None and f.type is bool and default:
        text = f"turn off: {text}"
    if f is not None and f.meta.names is not None:
        text += f" (one of: {', '.join(f.valid_names())})"
    if default is not None and not isinstance(default, (bool, list, dict)):
        text += f" (default: {default})"
    return text.replace("%", "%%")


def _metavar(f: SettingField) -> str:
    """``JSON``, ``A,B,...`` or the flag in capitals (``--warmup-steps`` -> ``WARMUP_STEPS``)."""
    if f.type is dict:
        return "JSON"
    if f.type is list:
        return "A,B,..."
    return _key_dest(f.flag or f.name).upper()


def add_options(parser: argparse.ArgumentParser, cls: type,
                into: Mapping[str, Any] | None = None) -> None:
    """Add an option for each setting of dataclass ``cls`` that has a command-line flag.

    A bool setting becomes a switch that turns its default around; a list setting takes
    comma-separated names, a dict setting a JSON object (and its :class:`KeyOption` flags, one
    key each).

    Args:
        parser: the (sub)command's parser.
        cls: ``ModelConfig``, ``TrainConfig`` or another dataclass of :func:`setting` fields.
        into: field name -> argument group (e.g. a mutually exclusive group) to add it to.
    """
    for f in settings_of(cls):
        if f.flag is None:
            continue
        target = (into or {}).get(f.name, parser)
        default = None if f.required else f.default()
        kwargs: dict[str, Any] = {"dest": f.name, "default": None}
        if f.type is bool:
            kwargs.update(action="store_const", const=not default)
        elif f.meta.choices:
            kwargs["choices"] = list(f.meta.choices)
        else:
            kwargs["metavar"] = _metavar(f)
            if f.type in (int, float):
                kwargs["type"] = f.type
        target.add_argument(f.flag, help=_help(f.meta.help, f, default), **kwargs)
        for key, option in f.meta.keys.items():
            target.add_argument(option.flag, type=option.type, default=None,
                                dest=_key_dest(option.flag),
                                help=_help(option.help, default=default.get(key)))


def _key_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def config_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings of ``cls`` from parsed options, as keyword arguments of ``cls``.

    An option left out gives the field's default (a required field is left out); a dict
    setting is its default updated by its key flags, then by the JSON object given.

    Args:
        args: options parsed by a parser that :func:`add_options` filled for ``cls``.
        cls: the dataclass.

    Returns:
        Field name -> value, for every field with a command-line flag.
    """
    values: dict[str, Any] = {}
    for f in settings_of(cls):
        if f.flag is None:
            continue
        given = getattr(args, f.name)
        if f.type is dict:
            keys = {key: getattr(args, _key_dest(option.flag))
                    for key, option in f.meta.keys.items()}
            values[f.name] = {**f.default(), **{k: v for k, v in keys.items() if v is not None},
                              **parse_json_object(given, f.flag)}
        elif given is not None and given != "":
            values[f.name] = split_names(given) if f.type is list else given
        elif not f.required:
            values[f.name] = f.default()
    return values
