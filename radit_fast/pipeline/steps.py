"""Per-step caching for ``radit run``: each step owns a folder in the run folder and a ``step.json`` marker.

A step is done when its folder holds ``step.json`` whose fingerprint (the settings and the fingerprints of
the steps it reads) equals the current one; it is then skipped and its stored result returned. Otherwise
it runs again:

* ``atomic=True`` (default): the step writes into a temporary folder that replaces its folder only on
  success, so an interrupted step leaves nothing half-written.
* ``atomic=False``: the step writes in place (training steps, whose own checkpoints let an interrupted
  run resume mid-step); the marker is written last.

The marker also keeps the step's wall time, so a resumed run still reports the original timings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radit_fast.io import RaditError, atomic_dir, write_json
from radit_fast.records import record_source, records_sha256

log = logging.getLogger(__name__)

MARKER = "step.json"


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable object (keys sorted; paths and tuples as strings/lists)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Identity of an input for cache keys: its size and the sha256 of its content (not its path, so a
    copied or moved input still matches; hashing runs at about 1 GB/s). A Parquet or datasets folder
    (:func:`radit_fast.records.records_sha256`) counts the bytes of all its files."""
    src = record_source(path)
    size = src.path.stat().st_size if src.path.is_file() else sum(
        f.stat().st_size for f in src.path.rglob("*") if f.is_file())
    return {"size": size, "sha256": records_sha256(path)}


@dataclass
class StepResult:
    name: str
    dir: Path
    fingerprint: str
    result: Any
    seconds: float
    cached: bool


@dataclass
class StepRunner:
    """Runs named steps in ``out_dir`` with caching; collects their timings."""

    out_dir: Path
    force: bool = False
    results: dict[str, StepResult] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def step_dir(self, name: str) -> Path:
        return self.out_dir / name

    def cached(self, name: str, key: Mapping[str, Any]) -> StepResult | None:
        """The stored result of ``name`` when its marker matches ``key``; None otherwise."""
        marker = self.step_dir(name) / MARKER
        fp = fingerprint(dict(key))
        if self.force or not marker.is_file():
            return None
        try:
            meta = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if meta.get("fingerprint") != fp:
            log.info("step %s: settings changed since it last ran; running it again", name)
            return None
        return StepResult(name, self.step_dir(name), fp, meta.get("result"), float(meta.get("seconds", 0.0)),
                          True)

    def run(self, name: str, key: Mapping[str, Any], fn: Callable[[Path], Any], *,
            atomic: bool = True) -> StepResult:
        """Run ``fn(folder) -> JSON-serialisable result`` unless a matching result is cached.

        ``key`` holds everything the step's output depends on (settings, input fingerprints, upstream
        step fingerprints); it is hashed into the marker.
        """
        hit = self.cached(name, key)
        if hit is not None:
            log.info("step %s: done already (cached in %s)", name, hit.dir)
            self.results[name] = hit
            return hit
        fp = fingerprint(dict(key))
        final = self.step_dir(name)
        t0 = time.perf_counter()
        if atomic:
            with atomic_dir(final, overwrite=True) as tmp:
                result = fn(tmp)
                seconds = time.perf_counter() - t0
                write_json(tmp / MARKER, {"step": name, "fingerprint": fp, "key": dict(key),
                                          "seconds": seconds, "result": result})
        else:
            marker = final / MARKER
            if marker.exists():  # stale marker of other settings: the outputs it vouched for are stale too
                shutil.rmtree(final)
            final.mkdir(parents=True, exist_ok=True)
            result = fn(final)
            seconds = time.perf_counter() - t0
            write_json(marker, {"step": name, "fingerprint": fp, "key": dict(key), "seconds": seconds,
                                "result": result})
        log.info("step %s: done in %.1f s", name, seconds)
        res = StepResult(name, final, fp, result, seconds, False)
        self.results[name] = res
        return res

    def timings(self) -> dict[str, float]:
        return {name: round(r.seconds, 2) for name, r in self.results.items()}

    def require(self, name: str) -> StepResult:
        if name not in self.results:
            raise RaditError(f"step {name} has not run")
        return self.results[name]
