"""Readers for the paper's tasks in their native formats, each returning :class:`radit_fast.data.tasks.Example`.

* :mod:`~radit_fast.data.readers.kilt`: KILT JSON lines as released (NQ, TriviaQA, HotpotQA, FEVER, zsRE,
  T-REx, WoW, ELI5, AIDA), provenance kept per output (evidence sets, pages and paragraph spans);
* :mod:`~radit_fast.data.readers.mmlu`: MMLU's CSV layout (``{dev,val,test}/{subject}_{split}.csv``).

:func:`load_examples` picks the reader from the path (``format="auto"``); radit's own task files go to
:func:`radit_fast.data.tasks.load_tasks`. Hugging Face ``datasets`` folders (``save_to_disk``) are read by
the project's one record reader (``radit_fast.records.iter_records``), whose records then go through
:func:`radit_fast.data.readers.kilt.parse_kilt` like a KILT line: that call is not wired here yet.
"""
from __future__ import annotations

import os
from pathlib import Path

from radit_fast.data.readers.kilt import KILT_TASKS, kilt_task_of, load_kilt, looks_like_kilt
from radit_fast.data.readers.mmlu import load_mmlu
from radit_fast.data.tasks import Example, load_tasks
from radit_fast.io import RaditError

FORMATS = ("auto", "radit", "kilt", "mmlu")

__all__ = ["FORMATS", "KILT_TASKS", "kilt_task_of", "load_examples", "load_kilt", "load_mmlu"]


def detect_format(path: str | os.PathLike) -> str:
    """``"mmlu"`` for a folder of MMLU CSV files or one such file, ``"kilt"`` for a KILT file (named as
    released, or whose provenance carries ``wikipedia_id``), else ``"radit"`` (records in JSON lines, Parquet or
    a Hugging Face datasets folder)."""
    p = Path(path)
    if p.suffix == ".csv" or (p.is_dir() and next(p.rglob("*.csv"), None) is not None):
        return "mmlu"
    # other folders (a datasets folder, Parquet files) and FOLDER:SPLIT hold records: radit_fast.records.iter_records
    return "kilt" if p.is_file() and looks_like_kilt(p) else "radit"


def load_examples(path: str | os.PathLike, *, format: str = "auto", split: str = "test", task: str | None = None,
                  require_answers: bool = True) -> list[Example]:
    """Examples of a task file or folder in any supported format (``format`` in :data:`FORMATS`).

    ``split``: the MMLU split to read from a folder (``dev`` is its few-shot pool); ``task``: the KILT task
    when the file name does not tell it."""
    if format not in FORMATS:
        raise RaditError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "mmlu":
        return load_mmlu(path, split=split)
    if fmt == "kilt":
        return load_kilt(path, task=task, require_answers=require_answers)
    return load_tasks(path, require_answers=require_answers)
