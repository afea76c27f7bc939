"""Task and corpus records: JSON lines with precise errors, Parquet files or folders and Hugging Face
``datasets`` folders. :func:`iter_records` is the one place that detects the format; :func:`records_sha256`
identifies an input's content (what a resumed run checks its inputs against).

Errors are one-line :class:`~radit_fast.io.RaditError` messages naming the file and the line or row.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from radit_fast._util import update_from_file
from radit_fast.io import RaditError, json_error, require_file

def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON-lines file.

    Raises RaditError naming the file and the line for a missing file, a line that is not UTF-8, invalid
    JSON or a non-object line. A UTF-8 byte-order mark on the first line is skipped.
    """
    path = require_file(path)
    # bytes, decoded line by line: a text-mode file decodes 8 KB blocks, so its errors name no line
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise RaditError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                                 f"{e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RaditError(f"{path}:{lineno}: malformed JSON ({json_error(e)})") from None
            if not isinstance(obj, dict):
                raise RaditError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All objects of a JSON-lines file (see :func:`iter_jsonl` for the errors)."""
    return [obj for _, obj in iter_jsonl(path)]


EXTRA_HINT = "pip install radit-fast[hf]"
PARQUET_MAGIC = b"PAR1"
_BATCH_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class RecordSource:
    """Where :func:`iter_records` reads from: ``kind`` is "jsonl", "parquet" (``files``: one file or a
    folder's ``*.parquet`` in name order) or "datasets" (a ``save_to_disk`` folder, ``split`` of a
    DatasetDict)."""

    kind: str
    path: Path
    files: tuple[Path, ...] = ()
    split: str | None = None


def _import_optional(module: str, package: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RaditError(f"{what} needs the package {package} ({EXTRA_HINT})") from None


def record_source(path: str | os.PathLike, what: str = "") -> RecordSource:
    """Detect the format of a task/corpus input (see :func:`iter_records`); RaditError when unusable. ``what``
    names the option in the message, e.g. ``"--corpus"``."""
    spec = str(path)
    opt = f" ({what})" if what else ""
    p, split = Path(spec), None
    if not p.exists():
        head, sep, tail = spec.rpartition(":")
        if sep and head and tail and Path(head).is_dir():
            p, split = Path(head), tail
        else:
            raise RaditError(f"{spec}: no such file or folder{opt}")
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return RecordSource("datasets", p, split=split)
        parquet = tuple(sorted(f for f in p.iterdir() if f.suffix == ".parquet" and f.is_file()))
        if parquet and split is None:
            return RecordSource("parquet", p, parquet)
        raise RaditError(f"{spec}: is a folder, not a file; not a Hugging Face datasets folder (no "
                         f"dataset_dict.json or state.json, written by save_to_disk) nor a folder of .parquet "
                         f"files{opt}")
    with p.open("rb") as f:
        magic = f.read(4)
    return RecordSource("parquet" if magic == PARQUET_MAGIC else "jsonl", p, (p,))


def _drop_nulls(value: Any) -> Any:
    """Columnar formats store an absent field as null: drop null fields of objects (recursively)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _iter_parquet(src: RecordSource) -> Iterator[tuple[int, dict[str, Any]]]:
    pq = _import_optional("pyarrow.parquet", "pyarrow", f"{src.path}: reading Parquet")
    row = 0
    for file in src.files:
        try:
            batches = pq.ParquetFile(file).iter_batches(batch_size=_BATCH_ROWS)
            for batch in batches:
                for obj in batch.to_pylist():
                    row += 1
                    yield row, _drop_nulls(obj)
        except (OSError, ValueError) as e:  # pyarrow.ArrowException derives from these
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RaditError(f"{file}: not a readable Parquet file ({first})") from None


def _iter_datasets(src: RecordSource) -> Iterator[tuple[int, dict[str, Any]]]:
    datasets = _import_optional("datasets", "datasets", f"{src.path}: reading a Hugging Face datasets folder")
    try:
        ds = datasets.load_from_disk(str(src.path))
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RaditError(f"{src.path}: not a readable datasets folder ({first})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = sorted(ds)
        if src.split is None and len(splits) != 1:
            raise RaditError(f"{src.path}: a DatasetDict with splits {', '.join(splits)}: choose one as "
                             f"{src.path}:SPLIT")
        split = src.split if src.split is not None else splits[0]
        if split not in ds:
            raise RaditError(f"{src.path}: no split {split!r} (splits: {', '.join(splits)})")
        ds = ds[split]
    elif src.split is not None:
        raise RaditError(f"{src.path}: a single Dataset, not a DatasetDict: drop the split {src.split!r}")
    row = 0
    for batch in ds.iter(batch_size=_BATCH_ROWS):
        names = list(batch)
        for values in zip(*(batch[n] for n in names)):
            row += 1
            yield row, _drop_nulls(dict(zip(names, values)))


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(number, object)`` for each record of a task or corpus input, whatever its format:

    * JSON lines (the default; ``number`` = line, see :func:`iter_jsonl`);
    * Parquet: a file (detected by its magic bytes, whatever its name) or a folder of ``*.parquet`` files
      (read in name order); ``number`` = 1-based row over the files;
    * a Hugging Face ``datasets`` folder written by ``save_to_disk``: a Dataset, or a DatasetDict with
      the split chosen as ``FOLDER:SPLIT`` (or its only split); ``number`` = 1-based row.

    In the columnar formats a null field reads as an absent one (Arrow has no "absent"). Errors are one
    line naming the file (and line or row); Parquet needs ``pyarrow`` and datasets folders ``datasets``
    (``pip install radit-fast[hf]``), imported only for those formats.
    """
    src = record_source(path)
    if src.kind == "jsonl":
        yield from iter_jsonl(src.path)
    elif src.kind == "parquet":
        yield from _iter_parquet(src)
    else:
        yield from _iter_datasets(src)


def records_sha256(path: str | os.PathLike) -> str:
    """sha256 of an input's content: a file's own digest; for a folder, of every file with its relative
    name, plus the split. What a resumed run checks its inputs against."""
    src = record_source(path)
    files = [src.path] if src.path.is_file() else sorted(f for f in src.path.rglob("*") if f.is_file())
    h = hashlib.sha256()
    if src.path.is_dir():
        h.update(f"split={src.split}\0".encode())
    for f in files:
        if src.path.is_dir():
            h.update(f.relative_to(src.path).as_posix().encode() + b"\0")
        update_from_file(h, f)
    return h.hexdigest()
