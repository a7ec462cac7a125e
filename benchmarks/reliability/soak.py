"""Crash soak: run the SIGKILL crash tests again and again, with fresh seeds, until N kills.

Usage (from the repository root)::

    python benchmarks/reliability/soak.py --kills 100 --report benchmarks/results/reliability/soak.json

Each round runs ``pytest tests/test_reliability_crash.py`` with its own seed
(``NAPARI_JRAS_CRASH_SEED``; round i of a soak started with ``--seed S`` uses S + 1000 i), so
every round kills processes at other moments, and collects the kill counts each test writes
(``NAPARI_JRAS_CRASH_COUNTS``). A round passes when every crash test passed: after the kills,
every committed exemplar loaded with its exact pixels and embedding, the newest checkpoint
loaded and training / fine-tuning resumed to the end. Stops once ``--kills`` processes were
killed (or ``--max-rounds``); writes a JSON report with the seed, counts and result of every
round and exits 1 if any round failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
from napari_jras.core.provenance import provenance  # noqa: E402


def run_round(seed: int) -> dict:
    """One pytest run of the crash tests with ``seed``; its counts, result and duration."""
    with tempfile.TemporaryDirectory() as tmp:
        counts_file = Path(tmp) / "counts.jsonl"
        env = dict(os.environ, NAPARI_JRAS_CRASH_SEED=str(seed),
                   NAPARI_JRAS_CRASH_COUNTS=str(counts_file),
                   PYTHONPATH=os.pathsep.join([str(REPO / "src"),
                                               *filter(None, [os.environ.get("PYTHONPATH")])]))
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_reliability_crash.py"], cwd=REPO, env=env,
                              capture_output=True, text=True)
        tests = ([json.loads(line) for line in counts_file.read_text().splitlines()]
                 if counts_file.exists() else [])
    return {"seed": seed, "passed": proc.returncode == 0, "wall_s": round(time.monotonic() - start, 1),
            "killed": sum(t["killed"] for t in tests), "tests": tests,
            "summary": proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "",
            "output_tail": "" if proc.returncode == 0 else (proc.stdout + proc.stderr)[-3000:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100, help="stop after this many kills")
    parser.add_argument("--max-rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, help="first round's seed (default: random)")
    parser.add_argument("--report", type=Path, required=True, help="JSON report to write")
    args = parser.parse_args(argv)
    first = args.seed if args.seed is not None else random.SystemRandom().randrange(2**30)
    rounds: list[dict] = []
    start = time.monotonic()
    while sum(r["killed"] for r in rounds) < args.kills and len(rounds) < args.max_rounds:
        rounds.append(run_round(first + 1000 * len(rounds)))
        r = rounds[-1]
        per_test = ", ".join(f"{t['test']} {t['killed']}" for t in r["tests"])
        print(f"round {len(rounds)} seed {r['seed']}: {'passed' if r['passed'] else 'FAILED'}, "
              f"{r['killed']} killed ({per_test}), {r['wall_s']:.0f} s", flush=True)
    by_test: dict[str, dict[str, int]] = {}
    for r in rounds:
        for t in r["tests"]:
            agg = by_test.setdefault(t["test"], {"killed": 0, "finished": 0, "rounds": 0})
            agg["killed"] += t["killed"]
            agg["finished"] += t["finished"]
            agg["rounds"] += 1
    report = {"provenance": provenance(), "command": "python benchmarks/reliability/soak.py "
              + " ".join(sys.argv[1:] if argv is None else argv),
              "first_seed": first, "rounds": len(rounds),
              "rounds_passed": sum(r["passed"] for r in rounds),
              "killed": sum(r["killed"] for r in rounds), "by_test": by_test,
              "wall_s": round(time.monotonic() - start, 1), "round_results": rounds}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['killed']} processes killed in {len(rounds)} rounds, "
          f"{report['rounds_passed']} passed -> {args.report}")
    return 0 if report["rounds_passed"] == len(rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
