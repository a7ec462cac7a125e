"""The layout rules of docs/architecture.md, checked: a Qt-free core, small modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "napari_jras"
MAX_LINES = 600


def test_core_and_cli_import_no_qt_or_napari():
    code = ("import importlib, pkgutil, sys\n"
            "import napari_jras.core as core, napari_jras.cli\n"
            "for m in pkgutil.walk_packages(core.__path__, 'napari_jras.core.'):\n"
            "    importlib.import_module(m.name)\n"
            "gui = ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', 'vispy', 'magicgui')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & set(gui)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_module_is_longer_than_the_limit():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"
