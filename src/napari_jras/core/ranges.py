"""Type and range checks of configuration values, each failing with one line naming the field.

Used by :class:`~napari_jras.core.model.ModelConfig`, the backbones' options, the retriever's
options and :class:`~napari_jras.core.train.TrainConfig`, so that a ``config.json`` or a command
line from someone else is refused before anything is built or allocated (the documented ranges
are in docs/cli.md, "Configuration reference").

Every check takes ``name``, what the message calls the value (e.g. ``option 'depth'`` or
``batch_size``), and ``error``, the :class:`JRASError` class it raises (default
:class:`ModelError`); it returns the value it accepted. The sections below name what each
check adds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .errors import JRASError, ModelError


def check_int(value: Any, name: str, low: int, high: int,
              error: type[JRASError] = ModelError) -> int:
    """Return ``value`` if it is a whole number (not a bool) in ``[low, high]``, else raise.

    Args:
        value: the value as given (a float such as ``4.0`` is refused too).
        low: the smallest allowed value (inclusive).
        high: the largest allowed value (inclusive).

    Raises:
        JRASError: ``error``: not an int, a bool, or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise error(f"{name} must be a whole number between {low} and {high}, got {value!r}")
    return value


def check_number(value: Any, name: str, low: float, high: float,
                 error: type[JRASError] = ModelError, *, open_low: bool = False,
                 open_high: bool = False) -> float:
    """Return ``value`` as a float if it is a finite number in the given interval, else raise.

    ``open_low`` / ``open_high`` exclude the bound itself.

    Args:
        value: the value as given (an int or float; a bool, NaN or inf is refused).
        low: the interval's lower bound.
        high: its upper bound.
        open_low: True: ``value`` must be greater than ``low``.
        open_high: True: ``value`` must be less than ``high``.

    Returns:
        ``float(value)``.

    Raises:
        JRASError: ``error``: not a finite number, or outside the interval.
    """
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and math.isfinite(value)
          and (low < value if open_low else low <= value)
          and (value < high if open_high else value <= high))
    if not ok:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise error(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def check_bool(value: Any, name: str, error: type[JRASError] = ModelError) -> bool:
    """Return ``value`` if it is ``True`` or ``False``, else raise."""
    if not isinstance(value, bool):
        raise error(f"{name} must be true or false, got {value!r}")
    return value


def check_choice(value: Any, name: str, choices: Sequence[str],
                 error: type[JRASError] = ModelError) -> str:
    """Return ``value`` if it is one of ``choices``, else raise.

    Args:
        value: the value as given; it must be a string.
        choices: the allowed strings (listed in the message).
    """
    if not isinstance(value, str) or value not in choices:
        raise error(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_keys(options: Any, name: str, known: Sequence[str],
               error: type[JRASError] = ModelError) -> dict[str, Any]:
    """Return ``options`` if it is a dict whose keys are all in ``known``, else raise.

    Args:
        options: a parsed JSON value (e.g. a backbone's ``options``).
        known: the accepted keys (listed in the message).

    Raises:
        JRASError: ``error``: ``options`` is not a dict, or holds an unknown key.
    """
    if not isinstance(options, dict):
        raise error(f"{name} must be a JSON object, got {type(options).__name__}")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise error(f"Unknown {name} {', '.join(map(str, unknown))}; valid: {', '.join(known)}")
    return options
