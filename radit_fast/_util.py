"""Infrastructure below every layer: file hashing, the cache root and the hub policy, file locks.

It imports nothing of the project, so any module may use it.

* :func:`sha256_file` is the one file digest (index manifests, checkpoints, model identities, the LSR
  cache); :func:`update_from_file` feeds a file into a running hash (digests over several files).
* :func:`cache_root` is where every cache lives (``$RADIT_CACHE``, default ``~/.cache/radit_fast``): the
  converted default LM, the LSR targets, the memoised file digests.
* :func:`file_lock` is the one advisory lock (``flock``): on a lock file, waited for (several ranks asking
  for the default LM at once), or on a folder itself, refused at once when held (a second run writing the
  same output folder). The lock ends with the process, also after SIGKILL.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Bytes read at a time when hashing a file.
HASH_BLOCK = 1 << 22


# --------------------------------------------------------------------------------------------- hashing
def update_from_file(h: Any, path: str | os.PathLike, block: int = HASH_BLOCK) -> None:
    """Feed the contents of the file ``path`` into the hash object ``h`` (``hashlib`` interface)."""
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)


def sha256_file(path: str | os.PathLike, block: int = HASH_BLOCK) -> str:
    """Hex sha256 of the contents of the file ``path``."""
    h = hashlib.sha256()
    update_from_file(h, path, block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- environment
def cache_root() -> Path:
    """Root folder of radit-fast's caches: ``$RADIT_CACHE`` or ``~/.cache/radit_fast``."""
    env = os.environ.get("RADIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "radit_fast"


def hub_offline() -> bool:
    """True unless the user explicitly allows the Hugging Face hub (``HF_HUB_OFFLINE=0``): this project never
    reaches it by default."""
    return os.environ.get("HF_HUB_OFFLINE", "1") not in {"0", "false", "False"}


# ------------------------------------------------------------------------------------------------ locks
@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``path`` until the block ends.

    ``path`` is an existing folder (locked itself, no lock file) or a lock file, created with its parent
    folder when missing. ``blocking=False`` raises BlockingIOError at once when another process holds the
    lock; ``blocking=True`` waits for it. Without ``fcntl`` (not POSIX) the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)  # releases the lock
