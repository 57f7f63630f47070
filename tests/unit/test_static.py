"""Mistakes a reader would catch, caught before anything runs: undefined and unused names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_code_has_no_undefined_or_unused_names() -> None:
    found = subprocess.run(
        [sys.executable, "-m", "pyflakes", "streams", "reconciler", "bench", "tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert found.stdout + found.stderr == ""
    assert found.returncode == 0
