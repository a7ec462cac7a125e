"""magicgui forms built from the settings dataclasses' fields (:mod:`napari_jras.core.settings`).

The training panel shows the fields of ``ModelConfig`` and ``TrainConfig`` whose
:class:`~napari_jras.core.settings.Setting` says ``panel=True``, with the same defaults, ranges,
choices and help as ``napari-jras train``: adding ``panel=True`` to a field adds it to the panel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from magicgui.widgets import Container, create_widget
from magicgui.widgets.bases import ValueWidget

from ..core.settings import SettingField, settings_of, split_names

SPIN_MAX = 2**31 - 1  # a Qt spin box holds 32-bit numbers


def panel_fields(cls: type) -> tuple[SettingField, ...]:
    """The settings of dataclass ``cls`` that the training panel shows (``panel=True``)."""
    return tuple(f for f in settings_of(cls) if f.meta.panel)


def _float_step(f: SettingField, default: float) -> float:
    """The spin-box increment: the field's ``step``, else a tenth of the default's magnitude."""
    if f.meta.step is not None:
        return f.meta.step
    return 10.0 ** math.floor(math.log10(abs(default))) / 10 if default else 0.01


def setting_widget(f: SettingField, choices: Sequence[str] | None = None) -> ValueWidget:
    """A magicgui widget for setting ``f`` holding its default, range and help.

    Args:
        f: the setting (a field of ``ModelConfig`` or ``TrainConfig``).
        choices: values to offer instead of the field's own choices or names (the panel's
            devices).

    Returns:
        A combo box for a setting with choices, a check box for a bool, a spin box for a
        number (within the field's range), a line edit for text and comma-separated names.

    Raises:
        TypeError: for a setting a form cannot hold (a JSON object, a number that may be None).
    """
    default = f.default()
    if f.type is dict or default is None:
        raise TypeError(f"{f.name} cannot be shown in a form (a JSON object or a value that "
                        "may be left unset)")
    options: dict[str, Any] = {}
    names = list(choices or f.valid_names())
    annotation: type = f.type
    if names:
        options["choices"] = names
    elif f.type is int:
        options.update(min=max(int(f.meta.low if f.meta.low is not None else -SPIN_MAX),
                               -SPIN_MAX),
                       max=min(int(f.meta.high if f.meta.high is not None else SPIN_MAX),
                               SPIN_MAX),
                       step=int(f.meta.step or 1))
    elif f.type is float:
        options.update(min=f.meta.low if f.meta.low is not None else -math.inf,
                       max=f.meta.high if f.meta.high is not None else math.inf,
                       step=_float_step(f, default))
    elif f.type is list:
        annotation, default = str, ", ".join(default)
    widget = create_widget(value=default, annotation=annotation, name=f.name,
                           label=f.name.replace("_", " ").capitalize(), options=options)
    widget.tooltip = f.meta.help
    return widget


def settings_form(classes: Sequence[type],
                  choices: Mapping[str, Sequence[str]] | None = None) -> Container:
    """A magicgui form of the panel settings (:func:`panel_fields`) of ``classes``, in order.

    Args:
        classes: settings dataclasses (``ModelConfig``, ``TrainConfig``).
        choices: setting name -> values to offer (see :func:`setting_widget`).

    Returns:
        A :class:`magicgui.widgets.Container`; ``form.<name>`` is a setting's widget.
    """
    return Container(widgets=[setting_widget(f, (choices or {}).get(f.name))
                              for cls in classes for f in panel_fields(cls)])


def form_values(form: Container, cls: type) -> dict[str, Any]:
    """The values of the panel settings of ``cls`` in ``form``, as keyword arguments of ``cls``.

    Comma-separated names become a list (empty names dropped; none given: left out, so the
    field's default applies).

    Args:
        form: a form made by :func:`settings_form` with ``cls`` among its classes.
        cls: the settings dataclass.

    Returns:
        Field name -> value.
    """
    values: dict[str, Any] = {}
    for f in panel_fields(cls):
        value = form[f.name].value
        if f.type is list:
            value = split_names(value, drop_empty=True)
            if not value:
                continue
        values[f.name] = value
    return values
