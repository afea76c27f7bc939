"""Corpus reading and chunking (DPR/Atlas records ``{"id", "title", "text"}``: JSON lines, Parquet or ``datasets``).

A document of at most ``chunk_words`` words stays one passage with its own id. A longer document is split
into ``ceil(words / chunk_words)`` chunks of near-equal size (each at most ``chunk_words`` words, no tiny
tail chunk) with ids ``"{doc id}#{n}"``, n = 0, 1, ...; a passage id without such a suffix is the document
id. Document ids may contain ``'#'`` (titles such as ``"C#"``), but may not end with ``'#'`` and digits:
that suffix is reserved for chunks, so :func:`doc_id` (which strips the last ``'#'`` only when digits alone
follow it) is unambiguous.

>>> chunk_words("a b c d e", 2)
['a b', 'c d', 'e']
>>> chunk_words("a b c d e f g", 3)
['a b c', 'd e', 'f g']
>>> doc_id("123#4"), doc_id("123"), doc_id("C#"), doc_id("C##2"), doc_id("a#b#3")
('123', '123', 'C#', 'C#', 'a#b')
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from radit_fast.io import RaditError
from radit_fast.records import iter_records

DEFAULT_CHUNK_WORDS = 200


@dataclass(frozen=True)
class Passage:
    """One retrievable unit: a whole short document or one chunk of a long one."""

    id: str
    title: str
    text: str

    @property
    def doc_id(self) -> str:
        return doc_id(self.id)

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "title": self.title, "text": self.text}


def doc_id(passage_id: str) -> str:
    """The document id of a passage id: without its chunk suffix ``#n`` (the last ``'#'``, when only the
    ASCII digits of n follow it)."""
    head, sep, tail = str(passage_id).rpartition("#")
    return head if sep and tail.isascii() and tail.isdigit() else str(passage_id)


def passage_text(title: str, text: str) -> str:
    """A passage as the models read it (Atlas style: ``title + " " + text``, the text alone without a title):
    the string the document encoder embeds, and the ``{chunk}`` of the LM's ``Background:`` line in
    training, LSR scoring and evaluation (:mod:`radit_fast.data.prompts`)."""
    return f"{title} {text}" if title else text


def chunk_words(text: str, max_words: int) -> list[str]:
    """Split ``text`` on whitespace into ``ceil(n / max_words)`` near-equal chunks of at most ``max_words``."""
    if max_words < 1:
        raise RaditError(f"--chunk-words must be >= 1, got {max_words}")
    words = text.split()
    n_chunks = max(1, -(-len(words) // max_words))
    base, extra = divmod(len(words), n_chunks)
    out, start = [], 0
    for i in range(n_chunks):
        end = start + base + (1 if i < extra else 0)
        out.append(" ".join(words[start:end]))
        start = end
    return out


def _field(obj: dict, name: str, where: str, *, required: bool = True) -> str:
    if name not in obj:
        if required:
            raise RaditError(f"{where}: missing field {name!r}")
        return ""
    value = obj[name]
    if name == "id" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise RaditError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def iter_corpus(
    path: str | os.PathLike, chunk_size: int = DEFAULT_CHUNK_WORDS
) -> Iterator[tuple[int, Passage]]:
    """Yield ``(line_number, passage)`` for every passage of a corpus, chunking long documents.

    The corpus is JSON lines, Parquet or a Hugging Face ``datasets`` folder (:func:`radit_fast.records.iter_records`;
    for those two the number is the 1-based row).

    Each line needs ``id`` (string or integer, not ending with ``'#'`` and digits) and a non-empty ``text``;
    ``title`` is optional (empty when absent). Errors name the file and line. Duplicate ids are detected by the passage
    store writer (scalably, by hash), not here.
    """
    if chunk_size < 1:
        raise RaditError(f"--chunk-words must be >= 1, got {chunk_size}")
    for lineno, obj in iter_records(path):
        where = f"{path}:{lineno}"
        pid = _field(obj, "id", where)
        if not pid.strip():
            raise RaditError(f"{where}: empty id")
        if doc_id(pid) != pid:
            raise RaditError(f"{where}: document id {pid!r} ends with '#' and digits, which is reserved for "
                             "chunk ids ('{doc id}#{n}')")
        title = _field(obj, "title", where, required=False)
        text = _field(obj, "text", where)
        if not text.strip():
            raise RaditError(f"{where}: empty text in document {pid!r}")
        if len(text.split()) <= chunk_size:
            yield lineno, Passage(pid, title, text)
            continue
        for n, chunk in enumerate(chunk_words(text, chunk_size)):
            yield lineno, Passage(f"{pid}#{n}", title, chunk)
