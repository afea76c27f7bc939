"""MMLU (Hendrycks et al., 2021) in its released CSV layout.

``data/{dev,val,test}/{subject}_{split}.csv``, no header, one question per row::

    question,option A,option B,option C,option D,answer letter

The ``dev`` split (5 questions per subject) is the few-shot pool: the paper's 5-shot setting shows a
subject's 5 dev questions before each of its test questions (:func:`radit_fast.evaluation.scoring.
pick_demonstrations` takes them per subject, in file order). Examples are multiple choice with ``meta =
{"task": "mmlu", "subject", "answer_index"}``; the ``multiple_choice`` template lists the options with
letters and the LM's answer is the letter.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from radit_fast.data.tasks import Example
from radit_fast.io import RaditError

SPLITS = ("dev", "val", "test")
LETTERS = "ABCD"


def subject_files(root: str | os.PathLike, split: str) -> list[tuple[str, Path]]:
    """``(subject, file)`` of a split, sorted by subject: ``root/{split}/*_{split}.csv`` (or ``root`` itself
    when it is that folder, or a single CSV file)."""
    if split not in SPLITS:
        raise RaditError(f"MMLU split must be one of {', '.join(SPLITS)}, got {split!r}")
    p = Path(root)
    if p.is_file():
        files = [p]
    else:
        folder = p / split if (p / split).is_dir() else p
        files = sorted(folder.glob(f"*_{split}.csv"))
        if not files:
            raise RaditError(f"{p}: no MMLU files *_{split}.csv (expected {p}/{split}/SUBJECT_{split}.csv)")
    out = []
    for f in files:
        stem = f.stem
        subject = stem.rsplit("_", 1)[0] if stem.rsplit("_", 1)[-1] in SPLITS else stem
        out.append((subject, f))
    return out


def load_mmlu(root: str | os.PathLike, *, split: str = "test") -> list[Example]:
    """The examples of one MMLU split, subject by subject (file order within a subject)."""
    examples: list[Example] = []
    for subject, path in subject_files(root, split):
        with path.open(newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.reader(f), start=1):
                where = f"{path}:{i}"
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != 6:
                    raise RaditError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
                question, *options, letter = (c.strip() for c in row)
                if letter not in LETTERS:
                    raise RaditError(f"{where}: answer must be one of A, B, C, D, got {letter!r}")
                if not question or not all(options):
                    raise RaditError(f"{where}: empty question or option")
                idx = LETTERS.index(letter)
                examples.append(Example(id=f"{subject}-{split}-{i}", input=question, answers=[options[idx]],
                                        choices=options, meta={"task": "mmlu", "subject": subject,
                                                               "answer_index": idx}))
    if not examples:
        raise RaditError(f"{root}: no MMLU questions in the {split} split")
    return examples
