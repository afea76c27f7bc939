"""KILT JSON lines exactly as released (Petroni et al., 2021; ``{task}-{split}-kilt.jsonl``).

One example per line::

    {"id": "-404...", "input": "who sings i feel it coming with the weeknd",
     "output": [{"answer": "Daft Punk"},
                {"provenance": [{"wikipedia_id": "50738566", "title": "I Feel It Coming",
                                 "section": "Section::::Abstract.", "start_paragraph_id": 1,
                                 "start_character": 0, "end_paragraph_id": 1, "end_character": 180,
                                 "bleu_score": 0.96}]}],
     "meta": {}}

Outputs may hold an answer, a provenance list, both, and a ``meta`` object. Test files (``*-test_input``)
have no ``output``. Each output's provenance is one *evidence set* (:mod:`radit_fast.evaluation.kilt`).

Mapping to :class:`~radit_fast.data.tasks.Example`: ``answers`` are the output answers (deduplicated, file
order); ``provenance`` the Wikipedia page ids (retrieval metrics at page level); ``meta`` is
``{"task", "kilt": the line's own meta, "evidence": [[{"wikipedia_id", "title", "start_paragraph_id",
"end_paragraph_id"}, ...] per output with provenance]}``. FEVER becomes multiple choice between ``"true"``
(SUPPORTS) and ``"false"`` (REFUTES), the fact-checking template's answers. The task comes from the file
name (KILT's names, e.g. ``structured_zeroshot`` is zsRE, ``aidayago2`` is AIDA) or is given.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from radit_fast.data.tasks import Example, read_examples
from radit_fast.io import RaditError
from radit_fast.records import iter_jsonl

#: KILT file-name prefix -> task name (the keys of radit_fast.data.prompts.TASK_TEMPLATES).
KILT_TASKS = {"nq": "nq", "triviaqa": "triviaqa", "hotpotqa": "hotpotqa", "fever": "fever",
              "structured_zeroshot": "zsre", "zsre": "zsre", "trex": "trex", "wow": "wow", "eli5": "eli5",
              "aidayago2": "aida", "aida": "aida"}
FEVER_LABELS = {"SUPPORTS": "true", "REFUTES": "false"}
TOP_FIELDS = ("id", "input", "output", "meta")
OUTPUT_FIELDS = ("answer", "provenance", "meta")
PROVENANCE_KEPT = ("wikipedia_id", "title", "start_paragraph_id", "end_paragraph_id")
_NAME = re.compile(r"^([a-z0-9_]+?)-(train|dev|test)")


def kilt_task_of(path: str | os.PathLike) -> str | None:
    """The task of a released KILT file name (``nq-dev-kilt.jsonl`` -> ``nq``), else None."""
    m = _NAME.match(Path(path).name)
    return KILT_TASKS.get(m.group(1)) if m else None


def looks_like_kilt(path: str | os.PathLike) -> bool:
    """A KILT release name, or a first line whose provenance carries ``wikipedia_id``."""
    if kilt_task_of(path) is not None:
        return True
    for _, obj in iter_jsonl(path):
        outs = obj.get("output") if isinstance(obj.get("output"), list) else []
        return any(isinstance(o, dict) and any(isinstance(p, dict) and "wikipedia_id" in p
                                               for p in o.get("provenance") or []) for o in outs)
    return False


def parse_kilt(obj: dict[str, Any], where: str, task: str | None, *, require_answers: bool = True) -> Example:
    """One released KILT object as an Example (see the module docstring); RaditError naming ``where``."""
    bad = sorted(set(obj) - set(TOP_FIELDS))
    if bad:
        raise RaditError(f"{where}: unknown field(s) {bad} (a KILT line has {', '.join(TOP_FIELDS)})")
    if obj.get("id") is None or str(obj["id"]).strip() == "":
        raise RaditError(f"{where}: missing field 'id'")
    ex_id = str(obj["id"])
    where = f"{where} (id {ex_id!r})"
    text = obj.get("input")
    if not isinstance(text, str) or not text.strip():
        hint = " (TriviaQA is released without its questions: fill them in with KILT's get_triviaqa_input.py)" \
            if task == "triviaqa" else ""
        raise RaditError(f"{where}: missing or empty 'input'{hint}")
    outputs = obj.get("output", [])
    if not isinstance(outputs, list):
        raise RaditError(f"{where}: 'output' must be a list")
    answers: list[str] = []
    evidence: list[list[dict[str, Any]]] = []
    pages: list[str] = []
    for j, out in enumerate(outputs):
        if not isinstance(out, dict) or set(out) - set(OUTPUT_FIELDS):
            raise RaditError(f"{where}: output[{j}] must be an object with {', '.join(OUTPUT_FIELDS)}")
        if "answer" in out:
            a = out["answer"]
            if not isinstance(a, str) or not a.strip():
                raise RaditError(f"{where}: output[{j}].answer must be a non-empty string")
            if task == "fever":
                if a not in FEVER_LABELS:
                    raise RaditError(f"{where}: FEVER answer {a!r} is not SUPPORTS or REFUTES")
                a = FEVER_LABELS[a]
            if a not in answers:
                answers.append(a)
        if "provenance" in out:
            prov = out["provenance"]
            if not isinstance(prov, list):
                raise RaditError(f"{where}: output[{j}].provenance must be a list")
            entry = []
            for k, p in enumerate(prov):
                if not isinstance(p, dict) or str(p.get("wikipedia_id", "")).strip() == "":
                    raise RaditError(f"{where}: output[{j}].provenance[{k}] has no 'wikipedia_id'")
                kept = {key: p[key] for key in PROVENANCE_KEPT if key in p}
                kept["wikipedia_id"] = str(p["wikipedia_id"]).strip()
                entry.append(kept)
                if kept["wikipedia_id"] not in pages:
                    pages.append(kept["wikipedia_id"])
            evidence.append(entry)
    if require_answers and not answers:
        raise RaditError(f"{where}: no answer (a test_input file? read it with require_answers=False)")
    choices = list(FEVER_LABELS.values()) if task == "fever" else None
    meta = {"task": task, "kilt": obj.get("meta"), "evidence": evidence}
    return Example(id=ex_id, input=text.strip(), answers=answers, provenance=pages, choices=choices, meta=meta)


def load_kilt(path: str | os.PathLike, *, task: str | None = None, require_answers: bool = True) -> list[Example]:
    """Read a released KILT file; ``task`` (a key or value of :data:`KILT_TASKS`) defaults to the file name's."""
    if task is not None:
        if task not in KILT_TASKS:
            raise RaditError(f"unknown KILT task {task!r} (known: {', '.join(sorted(set(KILT_TASKS)))})")
        task = KILT_TASKS[task]
    else:
        task = kilt_task_of(path)
    return read_examples(path, lambda obj, where: parse_kilt(obj, where, task, require_answers=require_answers))
