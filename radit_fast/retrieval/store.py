"""The passage store: row -> {id, title, text} with random access, without loading the corpus into memory.

Files in an index folder:

* ``passages.jsonl``  one JSON object ``{"id", "title", "text"}`` per row, in row order;
* ``offsets.npy``     int64 ``[n + 1]``, byte offset of each row's line (last entry = file size);
* ``id_hash.npy``     uint64 ``[n]``, sorted 64-bit BLAKE2b hashes of the passage ids;
* ``id_rows.npy``     int64 ``[n]``, the row of each hash in ``id_hash.npy`` order.

The ``.npy`` files are memory-mapped, so opening a store costs O(1) memory and looking up a row or an id
costs one ``pread`` (plus a binary search for ids). The id map needs 16 bytes per passage on disk and no
Python dict, so it scales to hundreds of millions of passages; hash collisions are resolved by reading the
candidate rows. Duplicate ids are detected the same way when the store is written.
"""
from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from radit_fast.io import RaditError, save_npy
from radit_fast.retrieval.corpus import Passage, doc_id

PASSAGES_FILE = "passages.jsonl"
OFFSETS_FILE = "offsets.npy"
ID_HASH_FILE = "id_hash.npy"
ID_ROWS_FILE = "id_rows.npy"
STORE_FILES = (PASSAGES_FILE, OFFSETS_FILE, ID_HASH_FILE, ID_ROWS_FILE)


def id_hash(passage_id: str) -> int:
    """64-bit hash of a passage id (BLAKE2b, stable across runs and platforms)."""
    return int.from_bytes(hashlib.blake2b(passage_id.encode("utf-8"), digest_size=8).digest(), "little")


def store_ram_bytes(n: int) -> int:
    """Bytes a fully paged-in store index needs (offsets + id map); passage text stays on disk."""
    return 8 * (n + 1) + 16 * n


def first_duplicate(hashes: np.ndarray, same: Callable[[int, int], bool]) -> tuple[int, int] | None:
    """The first pair of positions ``(i, j)``, ``i < j``, whose 64-bit hashes are equal and for which
    ``same(i, j)`` confirms equal keys (hash collisions are told apart by it); None when all keys are unique.
    Memory: one sort of the hashes (8 bytes per key, no Python set), so it scales to hundreds of millions."""
    order = np.argsort(hashes, kind="stable")
    sorted_h = hashes[order]
    found = None
    for i in np.flatnonzero(sorted_h[1:] == sorted_h[:-1]):
        a, b = sorted(int(r) for r in order[i : i + 2])
        if same(a, b) and (found is None or b < found[1]):
            found = (a, b)
    return found


class PassageStoreWriter:
    """Append passages in row order; :meth:`close` writes the offsets and id map and rejects duplicate ids.

    ``source`` (a file name) and the line numbers given to :meth:`add` are only used in error messages.
    With ``documents=True`` (a corpus read by lines, each line one document chunked into passages
    ``{doc}#{n}``) it also rejects two lines with the same *document* id, whatever their chunking: a long
    document and a short one with the same id have no passage id in common, yet their provenance is
    ambiguous.
    """

    def __init__(self, folder: str | os.PathLike, source: str = "corpus", *, documents: bool = False):
        self.folder = Path(folder)
        self.source = source
        self.documents = documents
        self._f = open(self.folder / PASSAGES_FILE, "wb")  # noqa: SIM115 (closed in close())
        self._offsets = array("q", [0])
        self._hashes = array("Q")
        self._lines = array("q")
        self._doc_hashes = array("Q")   # one per document (line): hash of its document id
        self._doc_rows = array("q")     # the row of its first passage

    def add(self, passage: Passage, lineno: int = 0) -> int:
        line = json.dumps(passage.as_dict(), ensure_ascii=False).encode("utf-8") + b"\n"
        row = len(self._hashes)
        if self.documents and (row == 0 or self._lines[-1] != lineno):
            self._doc_hashes.append(id_hash(doc_id(passage.id)))
            self._doc_rows.append(row)
        self._f.write(line)
        self._offsets.append(self._offsets[-1] + len(line))
        self._hashes.append(id_hash(passage.id))
        self._lines.append(lineno)
        return row

    def __len__(self) -> int:
        return len(self._hashes)

    def abort(self) -> None:
        """Close the passages file after a failure (the caller removes the folder)."""
        self._f.close()

    def close(self) -> int:
        """Finish the files; returns the number of passages. Raises RaditError on a duplicate id."""
        self._f.close()
        offsets = np.frombuffer(self._offsets, dtype=np.int64)
        hashes = np.frombuffer(self._hashes, dtype=np.uint64)
        self._check_duplicates(hashes, offsets)
        order = np.argsort(hashes, kind="stable")
        save_npy(self.folder / OFFSETS_FILE, offsets)
        save_npy(self.folder / ID_HASH_FILE, hashes[order])
        save_npy(self.folder / ID_ROWS_FILE, order.astype(np.int64))
        return len(hashes)

    def _check_duplicates(self, hashes: np.ndarray, offsets: np.ndarray) -> None:
        with open(self.folder / PASSAGES_FILE, "rb") as f:

            def read_id(row: int) -> str:
                f.seek(int(offsets[row]))
                return json.loads(f.readline())["id"]

            if self.documents:
                rows = np.frombuffer(self._doc_rows, dtype=np.int64)
                doc = lambda i: doc_id(read_id(int(rows[i])))  # noqa: E731
                dup = first_duplicate(np.frombuffer(self._doc_hashes, dtype=np.uint64), lambda a, b: doc(a) == doc(b))
                if dup is not None:
                    first, again = (self._lines[int(rows[i])] for i in dup)
                    raise RaditError(f"{self.source}:{again}: duplicate id {doc(dup[0])!r} (first at line "
                                     f"{first})")
            dup = first_duplicate(hashes, lambda a, b: read_id(a) == read_id(b))
            if dup is not None:
                first, again = (self._lines[r] for r in dup)
                raise RaditError(f"{self.source}:{again}: duplicate id {read_id(dup[0])!r} (first at line {first})")


class PassageStore(Sequence):
    """Read-only random access to the passages of an index folder (see the module docstring).

    >>> store = PassageStore.open(folder)  # doctest: +SKIP
    >>> store[0].id, store.row_of("doc7#1"), [p.title for p in store.get([3, 1])]  # doctest: +SKIP
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self._offsets = np.load(self.folder / OFFSETS_FILE, mmap_mode="r")
            self._hash = np.load(self.folder / ID_HASH_FILE, mmap_mode="r")
            self._rows = np.load(self.folder / ID_ROWS_FILE, mmap_mode="r")
            self._fd = os.open(self.folder / PASSAGES_FILE, os.O_RDONLY)
        except (OSError, ValueError) as e:
            raise RaditError(f"{self.folder}: not a readable passage store ({e})") from None
        self._n = len(self._offsets) - 1
        if self._n < 0 or len(self._hash) != self._n or len(self._rows) != self._n:
            raise RaditError(f"{self.folder}: passage store files disagree on the number of passages")

    @classmethod
    def open(cls, folder: str | os.PathLike) -> PassageStore:
        return cls(folder)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, row):  # type: ignore[override]
        if isinstance(row, slice):
            return self.get(range(*row.indices(self._n)))
        return self._read(int(row))

    def _read(self, row: int) -> Passage:
        if not -self._n <= row < self._n:
            raise IndexError(f"passage row {row} out of range (store has {self._n} passages)")
        row %= self._n
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        obj = json.loads(os.pread(self._fd, end - start, start))
        return Passage(obj["id"], obj["title"], obj["text"])

    def get(self, rows: Iterable[int]) -> list[Passage]:
        """The passages at ``rows`` (any iterable of ints, e.g. a numpy or torch row vector)."""
        return [self._read(int(r)) for r in rows]

    def row_of(self, passage_id: str) -> int:
        """The row of a passage id; raises KeyError when the id is not in the store."""
        h = np.uint64(id_hash(passage_id))
        lo = int(np.searchsorted(self._hash, h, side="left"))
        hi = int(np.searchsorted(self._hash, h, side="right"))
        for i in range(lo, hi):
            row = int(self._rows[i])
            if self._read(row).id == passage_id:
                return row
        raise KeyError(passage_id)

    def rows_of(self, passage_ids: Iterable[str]) -> np.ndarray:
        """Rows of several passage ids (int64); raises KeyError naming the first unknown id."""
        return np.array([self.row_of(p) for p in passage_ids], dtype=np.int64)

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()

    def __getstate__(self):  # picklable for DataLoader workers: reopen in the child
        return {"folder": self.folder}

    def __setstate__(self, state):
        self.__init__(state["folder"])
