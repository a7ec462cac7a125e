"""Check that every number in the tables of docs/benchmarks.md comes from a committed report.

Usage (from the repository root)::

    python benchmarks/check_doc_numbers.py [--doc docs/benchmarks.md] [--results benchmarks/results]

Every table of the document must cite its reports: the links to files under ``--results``
in the text between the previous table and this one. Each number in the table's body rows
(header and separator rows excluded) must then appear in one of the cited reports that git
tracks: in the text of a Markdown report, or in a JSON report outside its per-case, per-run and
log lists (``cases``, ``reports``, ``log``, ``round_results``), so that a number cannot match by
chance among thousands of per-case values. A number matches when a report number rounds to it
at the precision it is written with (``0.675`` matches 0.67512; ``2e-06`` matches 1.9e-06;
``1,000`` is 1000; ``58%`` / ``58 %`` also matches 0.58). Prints each table without a cited
committed report and each number none of its reports holds, and exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a number as written in a table: sign, thousands separators, decimals, exponent, percent
DOC_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[-+]?\d+)?"
                        r"(?:\s?%)?(?![\w.])")
REPORT_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def committed_files(results: Path) -> list[Path]:
    """Files under ``results`` that git tracks (every file when git is not available)."""
    try:
        out = subprocess.run(["git", "-C", str(results), "ls-files", "-z", "."],
                             capture_output=True, text=True, check=True).stdout
        return [results / name for name in out.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        return sorted(p for p in results.rglob("*") if p.is_file())


SKIPPED_KEYS = ("cases", "reports", "log", "round_results")


def _json_numbers(data: object) -> list[float]:
    if isinstance(data, dict):
        return [v for k, item in data.items() if k not in SKIPPED_KEYS
                for v in _json_numbers(item)]
    if isinstance(data, list):
        return [v for item in data for v in _json_numbers(item)]
    if isinstance(data, bool) or data is None:
        return []
    if isinstance(data, (int, float)):
        return [float(data)]
    return [float(m) for m in REPORT_NUMBER.findall(str(data))]


def report_numbers(files: list[Path]) -> list[float]:
    """Every number of the Markdown and JSON ``files`` (JSON: outside ``SKIPPED_KEYS``), sorted."""
    values: list[float] = []
    for path in files:
        text = path.read_text(errors="replace")
        if path.suffix == ".json":
            values += _json_numbers(json.loads(text))
        elif path.suffix == ".md":
            text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # 177,868 -> 177868
            values += [float(m) for m in REPORT_NUMBER.findall(text)]
    return sorted(values)


def parse(token: str) -> tuple[float, float, bool]:
    """(value, tolerance, is_percent) of a number as written."""
    percent = token.endswith("%")
    text = token.rstrip("% ").replace(",", "").lstrip("+")
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    tolerance = 0.5 * 10.0 ** (int(exponent or 0) - decimals)
    return float(text), tolerance * (1 + 1e-9), percent


def tables(doc: Path) -> list[dict]:
    """The tables of ``doc``: first line, cited report paths and (line, token) numbers."""
    lines = doc.read_text().splitlines()
    separator = re.compile(r"\|[\s|:-]+\|?")
    found: list[dict] = []
    cited: set[Path] = set()
    inside = False
    for n, line in enumerate(lines, 1):
        if not line.lstrip().startswith("|"):
            inside = False
            cited |= {(doc.parent / target).resolve()
                      for target in re.findall(r"\]\(([^)#\s]+)", line)}
            continue
        if not inside:
            found.append({"line": n, "cites": cited, "numbers": []})
            cited, inside = set(), True
        if separator.fullmatch(line.strip()) or (n < len(lines)
                                                 and separator.fullmatch(lines[n].strip())):
            continue  # separator, or the header row above it
        for cell in line.strip().strip("|").split("|"):
            cell = re.sub(r"`[^`]*`|\]\([^)]*\)", " ", cell)  # code spans and link targets
            found[-1]["numbers"] += [(n, m.group(0)) for m in DOC_NUMBER.finditer(cell)]
    return found


def has(values: list[float], value: float, tolerance: float) -> bool:
    i = bisect.bisect_left(values, value - tolerance)
    return i < len(values) and values[i] <= value + tolerance


def problems(doc: Path, results: Path) -> list[str]:
    """What is wrong: tables citing no committed report, numbers their reports lack."""
    committed = {p.resolve() for p in committed_files(results)}
    out = []
    for table in tables(doc):
        sources = sorted(p for p in table["cites"] if p in committed)
        if not sources:
            out.append(f"{doc}:{table['line']}: the table cites no committed report under "
                       f"{results} (link one in the text above it)")
            continue
        values = report_numbers(sources)
        for line, token in table["numbers"]:
            value, tolerance, percent = parse(token)
            if not (has(values, value, tolerance)
                    or (percent and has(values, value / 100, tolerance / 100))):
                names = ", ".join(str(p.relative_to(results.resolve())) for p in sources)
                out.append(f"{doc}:{line}: {token} is in none of its reports ({names})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    found = problems(args.doc, args.results)
    for problem in found:
        print(problem)
    total = sum(len(t["numbers"]) for t in tables(args.doc))
    print(f"{len(tables(args.doc))} tables, {total} numbers: {len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
