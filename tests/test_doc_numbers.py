"""docs/benchmarks.md: every table number comes from a committed report (check_doc_numbers.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from check_doc_numbers import main, parse, problems  # noqa: E402


def test_benchmarks_doc_numbers_are_in_committed_reports(capsys):
    assert main([]) == 0, capsys.readouterr().out


def test_parse_keeps_the_written_precision():
    assert parse("0.675") == (0.675, 0.0005 * (1 + 1e-9), False)
    assert parse("+0.109")[0] == 0.109 and parse("-0.458")[0] == -0.458
    assert parse("2e-06")[:2] == (2e-06, 0.5e-06 * (1 + 1e-9))
    assert parse("177,868")[0] == 177868 and parse("58 %")[2] and parse("25%")[0] == 25


def _git_repo(tmp_path: Path) -> tuple[Path, Path]:
    results = tmp_path / "results"
    results.mkdir()
    (results / "run.json").write_text(json.dumps({
        "summary": {"dice": 0.67512, "p": 1.9e-06, "share": 0.58},
        "cases": [{"dice": 0.912}]}))  # per-case values never match a table number
    (results / "table.md").write_text("| pixels | 177,868 |\n")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "results/run.json"], check=True)
    return tmp_path / "doc.md", results


def test_numbers_missing_from_the_cited_reports_are_reported(tmp_path):
    doc, results = _git_repo(tmp_path)
    doc.write_text("From [JSON](results/run.json) and [table](results/table.md):\n\n"
                   "| variant | Dice | p | share |\n|---|---|---|---|\n"
                   "| default | 0.675 | 2e-06 | 58% |\n| other | 0.912 | 0.3 | 12 % |\n\n"
                   "Uncited:\n\n| a | b |\n|---|---|\n| x | 0.5 |\n")
    found = problems(doc, results)
    assert any(":6: 0.912 " in p for p in found)  # only in the per-case list
    assert any(":6: 0.3 " in p for p in found) and any(":6: 12 % " in p for p in found)
    assert any(":10: the table cites no committed report" in p for p in found)
    assert len(found) == 4, found  # 0.675, 2e-06 and 58% match; the untracked table.md is ignored
