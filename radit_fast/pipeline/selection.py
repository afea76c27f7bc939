"""Dev-split step selection for the tuning steps of ``radit run``: every candidate (a training step's
weights) is scored on dev, the best one is kept on disk; the test split is never seen.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from radit_fast.evaluation.report import task_average
from radit_fast.io import RaditError, write_json

log = logging.getLogger(__name__)


def select_metric(metrics: dict[str, float], name: str) -> float | None:
    """The value ``name`` selects on: a metric, or ``avg`` (:func:`~radit_fast.evaluation.report.task_average`)."""
    return task_average(metrics) if name == "avg" else metrics.get(name)


class Selector:
    """Remembers each candidate's dev metrics, keeps the best one on disk.

    State lives in ``folder/selection.json`` and the best candidate in ``folder/selected/``, so an
    interrupted training stage resumes with what it had already scored.
    """

    def __init__(self, folder: Path, what: str, metric: str) -> None:
        self.folder, self.what, self.metric = folder, what, metric
        self.path = folder / "selection.json"
        self.scores: dict[int, dict[str, float]] = {}
        if self.path.is_file():
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("metric") == metric:
                self.scores = {int(k): v for k, v in data.get("candidates", {}).items()}

    def has(self, step: int) -> bool:
        return step in self.scores

    def value(self, step: int) -> float:
        v = select_metric(self.scores[step], self.metric)
        return float("-inf") if v is None else v

    def best(self) -> int | None:
        if not self.scores or not (self.folder / "selected").is_dir():
            return None
        # ties go to the later step (more training)
        return max(self.scores, key=lambda s: (self.value(s), s))

    def offer(self, step: int, metrics: dict[str, float], save: Callable[[Path], Any]) -> None:
        """Record ``step``'s dev ``metrics``; when it is the best so far, ``save(folder)`` writes it as the
        selected candidate (through a temporary folder, so ``selected/`` is never half-written)."""
        prev = self.best()
        self.scores[step] = {k: v for k, v in metrics.items() if isinstance(v, float)}
        log.info("%s candidate at step %d: dev %s = %.4f", self.what, step, self.metric, self.value(step))
        if prev is None or (self.value(step), step) >= (self.value(prev), prev):
            tmp = self.folder / ".selected.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            save(tmp)
            shutil.rmtree(self.folder / "selected", ignore_errors=True)
            tmp.rename(self.folder / "selected")
            with contextlib.suppress(OSError):
                (self.folder / "selected" / "STEP").write_text(str(step))
        write_json(self.path, {"metric": self.metric, "candidates": {str(k): v for k, v in self.scores.items()}})

    def finish(self, folder: Path, extra: dict[str, Any]) -> dict[str, Any]:
        """The step's result: the selected step, its metrics and every candidate's value, plus ``extra``."""
        best = self.best()
        if best is None:
            raise RaditError(f"{self.what}: no candidate was scored on dev")
        return {"step": best, "metric": self.metric, "metrics": self.scores[best],
                "candidates": {str(k): select_metric(v, self.metric) for k, v in sorted(self.scores.items())},
                **extra}
