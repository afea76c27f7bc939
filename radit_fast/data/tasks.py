"""KILT-style task files (JSON lines, or the same records in Parquet or a ``datasets`` folder), read
strictly.

One example per line::

    {"id": "q1", "input": "Where is Paris?",
     "output": [{"answer": "France", "provenance": [{"id": "doc7"}]}],
     "choices": ["France", "Peru"],        # optional: multiple choice, each answer must be a choice
     "context": "Paris is ...",            # optional: gold background (reading comprehension)
     "meta": {...}}                         # optional, kept as is (KILT)

Every problem is a one-line RaditError naming ``file:line`` (``file:row`` for Parquet and datasets):
malformed JSON, a missing or empty field, a field of the wrong type, an unknown field (at the top level
and in ``output`` entries; provenance entries may carry KILT's other keys), an example without answers
(unless ``require_answers=False``), a duplicate id, an answer that is not one of the choices, an empty file.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from radit_fast.io import RaditError, write_jsonl
from radit_fast.records import iter_records

TOP_LEVEL_FIELDS = ("id", "input", "output", "choices", "context", "meta")
OUTPUT_FIELDS = ("answer", "provenance", "meta")


@dataclass(frozen=True)
class Example:
    """One task example; ``answers`` and ``provenance`` are deduplicated in file order."""

    id: str
    input: str
    answers: list[str]
    provenance: list[str] = field(default_factory=list)
    choices: list[str] | None = None
    context: str | None = None
    meta: Any = None

    @property
    def answer(self) -> str:
        """The first (reference) answer."""
        return self.answers[0]

    def to_json(self) -> dict[str, Any]:
        """The KILT JSON object of this example (one output entry per answer, all carrying the provenance)."""
        prov = [{"id": p} for p in self.provenance]
        outputs = [{"answer": a, "provenance": prov} for a in self.answers]
        if not outputs and prov:
            outputs = [{"provenance": prov}]
        obj: dict[str, Any] = {"id": self.id, "input": self.input, "output": outputs}
        if self.choices is not None:
            obj["choices"] = list(self.choices)
        if self.context is not None:
            obj["context"] = self.context
        if self.meta is not None:
            obj["meta"] = self.meta
        return obj


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _id_str(value: Any) -> str | None:
    """Ids may be strings or integers (some KILT dumps); booleans and the rest are refused."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    return value if _nonempty_str(value) else None


def parse_example(obj: dict[str, Any], where: str, *, require_answers: bool = True) -> Example:
    """Validate one decoded JSON object; ``where`` (``file:line``) starts every error message."""
    unknown = sorted(set(obj) - set(TOP_LEVEL_FIELDS))
    if unknown:
        raise RaditError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(TOP_LEVEL_FIELDS)})")
    if "id" not in obj:
        raise RaditError(f"{where}: missing field 'id'")
    ex_id = _id_str(obj["id"])
    if ex_id is None:
        raise RaditError(f"{where}: 'id' must be a non-empty string or an integer, got {obj['id']!r}")
    where = f"{where} (id {ex_id!r})"
    if not _nonempty_str(obj.get("input")):
        raise RaditError(f"{where}: {'empty' if 'input' in obj else 'missing'} field 'input' (a non-empty string)")

    answers: list[str] = []
    provenance: list[str] = []
    outputs = obj.get("output")
    if outputs is None:
        if require_answers:
            raise RaditError(f"{where}: missing field 'output' (a list of {{\"answer\", \"provenance\"}})")
        outputs = []
    if isinstance(outputs, dict):  # a single output object instead of a list: accept it
        outputs = [outputs]
    if not isinstance(outputs, list):
        raise RaditError(f"{where}: 'output' must be a list of objects, got {type(outputs).__name__}")
    for j, out in enumerate(outputs):
        if not isinstance(out, dict):
            raise RaditError(f"{where}: output[{j}] must be an object, got {type(out).__name__}")
        bad = sorted(set(out) - set(OUTPUT_FIELDS))
        if bad:
            raise RaditError(f"{where}: output[{j}] has unknown field(s) {', '.join(map(repr, bad))} "
                             f"(known: {', '.join(OUTPUT_FIELDS)})")
        if "answer" in out:
            if not _nonempty_str(out["answer"]):
                raise RaditError(f"{where}: output[{j}].answer must be a non-empty string, got {out['answer']!r}")
            if out["answer"] not in answers:
                answers.append(out["answer"])
        prov = out.get("provenance", [])
        if not isinstance(prov, list):
            raise RaditError(f"{where}: output[{j}].provenance must be a list, got {type(prov).__name__}")
        for k, p in enumerate(prov):
            pid = _id_str(p.get("id")) if isinstance(p, dict) else None
            if pid is None:
                raise RaditError(f"{where}: output[{j}].provenance[{k}] must be an object with a non-empty "
                                 f"'id' (a passage id), got {p!r}")
            if pid not in provenance:
                provenance.append(pid)
    if require_answers and not answers:
        raise RaditError(f"{where}: no answer (give output[].answer)")

    choices = obj.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or len(choices) < 2 or not all(_nonempty_str(c) for c in choices):
            raise RaditError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        if len(set(choices)) != len(choices):
            raise RaditError(f"{where}: 'choices' has duplicates")
        for a in answers:
            if a not in choices:
                raise RaditError(f"{where}: answer {a!r} is not one of the choices {choices!r}")
    context = obj.get("context")
    if context is not None and not _nonempty_str(context):
        raise RaditError(f"{where}: 'context' must be a non-empty string when given")
    return Example(id=ex_id, input=obj["input"], answers=answers, provenance=provenance,
                   choices=list(choices) if choices is not None else None, context=context,
                   meta=obj.get("meta"))


def read_examples(path: str | os.PathLike, parse: Callable[[dict[str, Any], str], Example]) -> list[Example]:
    """Every record of ``path`` (:func:`radit_fast.records.iter_records`) through ``parse(obj, "file:line")``; ids
    must be unique and the file non-empty (RaditError naming the line otherwise). Shared by every task reader."""
    examples: list[Example] = []
    first_line: dict[str, int] = {}
    for lineno, obj in iter_records(path):
        ex = parse(obj, f"{path}:{lineno}")
        if ex.id in first_line:
            raise RaditError(f"{path}:{lineno}: duplicate id {ex.id!r} (first on line {first_line[ex.id]})")
        first_line[ex.id] = lineno
        examples.append(ex)
    if not examples:
        raise RaditError(f"{path}: no examples (empty file)")
    return examples


def load_tasks(path: str | os.PathLike, *, require_answers: bool = True) -> list[Example]:
    """Read and validate a KILT-style task file (see the module docstring for the format and errors): JSON
    lines, Parquet or a Hugging Face ``datasets`` folder (:func:`radit_fast.records.iter_records`)."""
    return read_examples(path, lambda obj, where: parse_example(obj, where, require_answers=require_answers))


def write_tasks(path: str | os.PathLike, examples: Iterable[Example]) -> int:
    """Write examples as KILT JSON lines, atomically; returns the count."""
    return write_jsonl(path, (ex.to_json() for ex in examples))


def check_disjoint(first: Sequence[Example], second: Sequence[Example], *,
                   names: tuple[str, str] = ("train", "test")) -> None:
    """RaditError when two splits share example ids (e.g. training on test examples)."""
    shared = sorted({ex.id for ex in first} & {ex.id for ex in second})
    if shared:
        shown = ", ".join(map(repr, shared[:5])) + (" ..." if len(shared) > 5 else "")
        raise RaditError(f"the {names[0]} and {names[1]} splits share {len(shared)} example id(s): {shown}")
