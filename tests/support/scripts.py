"""Run a script of benchmarks/ or tools/ as a user would (``python -m benchmarks.seg_step``), and read the tables
it prints.

The scripts are not imported by the tests: each runs as a module in its own interpreter (``sys.executable -m``,
the repo root as working directory, so ``tests.support`` and ``lib_seg`` import as packages), so that a broken
import, a wrong command-line default or a crash in the script's own code fails the test exactly as it fails the
person who runs it.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600  # a hang must fail; no test asserts on time (a busy 2-core CI machine is slow)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> Run:
        """Fail with the script's own output when it did not exit 0."""
        assert self.returncode == 0, f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        return self


def run_module(module: str, *args: str) -> Run:
    """``python -m module args...`` from the repo root; its exit status and output."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text`` (a run of lines that start and end with ``|``), in order: its
    body rows as lists of stripped cells, the header and its rule dropped."""
    tables: list[list[list[str]]] = []
    block: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        line = line.strip()
        if line.startswith("|") and line.endswith("|"):
            block.append([cell.strip() for cell in line[1:-1].split("|")])
            continue
        if block:
            is_rule = len(block) >= 2 and set("".join(block[1])) <= {"-", ":"}
            tables.append(block[2:] if is_rule else block)
            block = []
    return tables
