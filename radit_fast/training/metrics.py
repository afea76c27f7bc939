"""Metrics as JSON lines in ``OUT/metrics.jsonl`` (one object per logged step, plus events)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from radit_fast.io import write_jsonl


class MetricsWriter:
    """Append-only JSON-lines writer; only the main process writes (``enabled=False`` elsewhere).

    On resume, :meth:`truncate_after` drops the lines of steps after the checkpoint, so the file reads as
    one uninterrupted run.
    """

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._f = None

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = []
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if row.get("step", 0) <= step:
                    keep.append(row)
        write_jsonl(self.path, keep)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = self.path.open("a", encoding="utf-8")
        row = {**row, "time": round(time.time(), 3)}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All metric rows of a ``metrics.jsonl`` file."""
    from radit_fast.io import read_jsonl

    return read_jsonl(path)
