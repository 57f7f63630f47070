"""py-spy in record mode around a stretch of a phase, and a summary of what it saw.

`Profile` samples one process (the instance) at 100 Hz without stopping it
(`--nonblocking`) and writes collapsed stacks; `summarise` folds them into the functions
that were on the CPU themselves (self) and those under which time was spent (total),
so the hot spots can be read without a flame-graph viewer.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from pathlib import Path

RATE = 100


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profile:
    def __init__(self, *, pid: int, path: Path) -> None:
        self.path = path
        self._pid = pid
        self._process: subprocess.Popen | None = None

    def start(self) -> bool:
        binary = py_spy()
        if binary is None:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [binary, "record", "--pid", str(self._pid), "--rate", str(RATE), "--nonblocking",
             "--format", "raw", "--output", str(self.path)],
            stdout=subprocess.DEVNULL, stderr=open(f"{self.path}.log", "wb"),
        )
        return True

    def stop(self) -> dict | None:
        if self._process is None:
            return None
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)
        if not self.path.exists():
            return None
        return summarise(self.path)


def _frame_name(frame: str) -> str:
    """`function (path/to/module.py:123)` → `function (module.py)`, to fold lines."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0]
    parts = file.split("/")
    tail = "/".join(parts[-2:]) if len(parts) > 1 else file
    return f"{name} ({tail})"


# Frames every sample passes through (start-up, the event loop itself): left out of the
# totals, where they would only push the informative lines down.
_PLUMBING = ("<frozen runpy>", "click/core.py", "asyncio/runners.py", "reconciler/cli.py",
             "BaseEventLoop.run_forever", "BaseEventLoop.run_until_complete",
             "BaseEventLoop._run_once", "Handle._run")


def summarise(path: Path, *, top: int = 30) -> dict:
    """Self and total sample shares per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            if not any(marker in frame for marker in _PLUMBING):
                total[frame] += count

    def shares(counter: collections.Counter[str]) -> list[list]:
        return [[name, round(100.0 * n / samples, 1)] for name, n in counter.most_common(top)]

    return {"samples": samples, "file": str(path), "self_percent": shares(own),
            "total_percent": shares(total)}
