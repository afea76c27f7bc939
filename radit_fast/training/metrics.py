"""Metrics as JSON lines in ``OUT/metrics.jsonl`` (one object per logged step, plus events), and optionally the
same curves as TensorBoard event files in ``OUT/tensorboard/`` (``--report-to tensorboard``; local files, no
network).

TensorBoard tags: a training row's numeric fields as ``train/<field>`` (``loss``, ``lr``, ``grad_norm``,
throughput, ...), an evaluation row's (``"event": "eval"``) as ``eval/<field>``; the global step is the row's
``step``. Rows of other events (checkpoint, resume) and non-numeric fields are not plotted.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from radit_fast.io import RaditError, write_jsonl
from radit_fast.records import read_jsonl

TENSORBOARD_DIR = "tensorboard"
_NOT_PLOTTED = ("step", "time", "event")


def scalar_rows(row: dict[str, Any]) -> list[tuple[str, float]]:
    """``(tag, value)`` of the fields of a metrics row that TensorBoard plots (see the module docstring)."""
    event = row.get("event")
    if event not in (None, "eval") or "step" not in row:
        return []
    prefix = "eval" if event == "eval" else "train"
    out = []
    for key, value in row.items():
        if key in _NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out.append((f"{prefix}/{key}", float(value)))
    return out


class MetricsWriter:
    """Append-only JSON-lines writer; only the main process writes (``enabled=False`` elsewhere).

    On resume, :meth:`truncate_after` drops the lines of steps after the checkpoint, so the file reads as
    one uninterrupted run; TensorBoard is told the same (``purge_step``: its readers drop the events
    after the checkpoint that the interrupted run wrote).
    """

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True, report_to: str = "none") -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.report_to = report_to
        self._f = None
        self._tb = None
        self._purge_step: int | None = None

    @property
    def tensorboard_dir(self) -> Path:
        return self.path.parent / TENSORBOARD_DIR

    def truncate_after(self, step: int) -> None:
        if not self.enabled:
            return
        self._purge_step = step + 1 if step > 0 else None
        if not self.path.exists():
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

    def _tensorboard(self) -> Any:
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RaditError("--report-to tensorboard needs the package tensorboard "
                                 "(pip install radit-fast[tensorboard])") from None
            self._tb = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=self._purge_step)
            self._purge_step = None  # purge once: a writer reopened later keeps this run's events
        return self._tb

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = self.path.open("a", encoding="utf-8")
        row = {**row, "time": round(time.time(), 3)}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self.report_to == "tensorboard":
            scalars = scalar_rows(row)
            if scalars:
                tb = self._tensorboard()
                for tag, value in scalars:
                    tb.add_scalar(tag, value, global_step=int(row["step"]), walltime=row["time"])
                tb.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All metric rows of a ``metrics.jsonl`` file."""
    return read_jsonl(path)
