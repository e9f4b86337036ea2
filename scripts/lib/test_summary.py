#!/usr/bin/env python3
"""Adds up the test counts in cargo test and pytest logs into one closing line.

    test_summary.py KIND LOG STATUS [KIND LOG STATUS ...]     KIND: cargo | pytest

Prints `total: N passed, M failed, K skipped`. A phase that exited non-zero without a counted failure
(a build error, a crashed or empty test run) counts as one failure, so the line never reads clean
when a phase failed. Standard library only: it must work when the virtual environment does not.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

CARGO_RESULT = re.compile(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored;")
PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)\b")
PYTEST_CLOSING = re.compile(r"\bin \d+(\.\d+)?s\b")


@dataclass
class Counts:
    passed: int = 0
    failed: int = 0
    skipped: int = 0

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.passed + other.passed, self.failed + other.failed, self.skipped + other.skipped)


def cargo_counts(text: str) -> Counts:
    total = Counts()
    for passed, failed, ignored in CARGO_RESULT.findall(text):
        total += Counts(int(passed), int(failed), int(ignored))
    return total


def pytest_counts(text: str) -> Counts:
    """Reads pytest's closing line (e.g. `3 failed, 40 passed, 1 skipped in 2.1s`)."""
    closing = [line for line in text.splitlines() if PYTEST_CLOSING.search(line) and PYTEST_COUNT.search(line)]
    counts = Counts()
    if not closing:
        return counts
    for number, word in PYTEST_COUNT.findall(closing[-1]):
        n = int(number)
        if word in ("passed", "xpassed"):
            counts.passed += n
        elif word in ("failed", "error", "errors"):
            counts.failed += n
        else:
            counts.skipped += n
    return counts


PARSERS = {"cargo": cargo_counts, "pytest": pytest_counts}


def summarize(phases: list[tuple[str, str, int]]) -> tuple[Counts, list[str]]:
    total, notes = Counts(), []
    for kind, text, status in phases:
        counts = PARSERS[kind](text)
        if status != 0 and counts.failed == 0:
            notes.append(f"{kind} exited {status} without a failing test (build error or no tests?): counted as 1 failure")
            counts.failed = 1
        total += counts
    return total, notes


def main(argv: list[str]) -> int:
    if not argv or len(argv) % 3 or any(k not in PARSERS for k in argv[::3]):
        print(__doc__, file=sys.stderr)
        return 2
    phases = []
    for kind, log, status in zip(argv[::3], argv[1::3], argv[2::3]):
        path = Path(log)
        text = path.read_text(errors="replace") if path.exists() else ""
        phases.append((kind, text, int(status)))
    total, notes = summarize(phases)
    for note in notes:
        print(f"note: {note}")
    print(f"total: {total.passed} passed, {total.failed} failed, {total.skipped} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
