"""File input/output shared by every layer: JSON lines with precise errors, task/corpus records from JSON
lines, Parquet or Hugging Face ``datasets`` folders (:func:`iter_records`, the one place that detects the
format), atomic files and folders.

User errors (malformed files, missing fields, mismatched models) raise :class:`RaditError`; the CLI turns
them into a one-line message and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class RaditError(ValueError):
    """An error caused by the user's input or files; its message is shown as is, on one line."""


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON-lines file.

    Raises RaditError naming the file and the line for a missing file, a line that is not UTF-8, invalid
    JSON or a non-object line. A UTF-8 byte-order mark on the first line is skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise RaditError(f"{path}: no such file")
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
                raise RaditError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise RaditError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All objects of a JSON-lines file (see :func:`iter_jsonl` for the errors)."""
    return [obj for _, obj in iter_jsonl(path)]


# ---- records: JSON lines, Parquet, Hugging Face `datasets` folders ----
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


def record_source(path: str | os.PathLike) -> RecordSource:
    """Detect the format of a task/corpus input (see :func:`iter_records`); RaditError when unusable."""
    spec = str(path)
    p, split = Path(spec), None
    if not p.exists():
        head, sep, tail = spec.rpartition(":")
        if sep and head and tail and Path(head).is_dir():
            p, split = Path(head), tail
        else:
            raise RaditError(f"{spec}: no such file or folder")
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return RecordSource("datasets", p, split=split)
        parquet = tuple(sorted(f for f in p.iterdir() if f.suffix == ".parquet" and f.is_file()))
        if parquet and split is None:
            return RecordSource("parquet", p, parquet)
        raise RaditError(f"{spec}: not a Hugging Face datasets folder (no dataset_dict.json or state.json, "
                         "written by save_to_disk) nor a folder of .parquet files")
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
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file beside ``path`` and rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON lines atomically; returns the number of rows."""
    n = 0
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write one JSON document atomically (indented, UTF-8)."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders that :func:`atomic_dir` left beside ``path`` in processes that died.

    They are named ``.{name}.{host}-{pid}.{random}.partial``; only those made on this host by a process that
    no longer exists are removed (a live process with the same pid keeps its folder, and so does another
    host's build on a shared file system). A process killed with SIGKILL, or by a power cut, leaves one.
    Returns the removed folders.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.([A-Za-z0-9_-]+)-(\d+)\.[A-Za-z0-9_]{{8}}\.partial")
    host, removed = _host_tag(), []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m and m.group(1) == host and p.is_dir() and not _pid_alive(int(m.group(2))):
            logger.info("removing %s, left by an interrupted run (pid %s)", p, m.group(2))
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename.

    On any failure (an exception, Ctrl-C, or SIGTERM through the CLI, which turns it into SystemExit) the
    temporary folder is removed, so no half-written output is left behind; folders of processes that died
    without cleaning up (SIGKILL) are removed by the next ``atomic_dir`` on the same ``path``
    (:func:`remove_stale_partials`). Raises RaditError when ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise RaditError(f"{path}: already exists (choose another --out or remove it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_host_tag()}-{os.getpid()}.", suffix=".partial",
                                dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
