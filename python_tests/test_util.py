"""radit_fast._util: the one file digest, the cache root and the one file lock (waited for or refused)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from radit_fast import _util


def test_sha256_file_matches_hashlib_across_blocks(tmp_path):
    f = tmp_path / "x.bin"
    data = bytes(range(256)) * 41
    f.write_bytes(data)
    assert _util.sha256_file(f) == _util.sha256_file(f, block=7) == hashlib.sha256(data).hexdigest()
    h = hashlib.sha256(b"prefix")
    _util.update_from_file(h, f, block=5)
    assert h.hexdigest() == hashlib.sha256(b"prefix" + data).hexdigest()


def test_cache_root_follows_radit_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RADIT_CACHE", str(tmp_path / "c"))
    assert _util.cache_root() == tmp_path / "c"
    monkeypatch.delenv("RADIT_CACHE")
    assert _util.cache_root() == Path.home() / ".cache" / "radit_fast"


@pytest.mark.parametrize("kind", ["lock file", "folder"])
def test_file_lock_is_exclusive_and_released(tmp_path, kind):
    path = tmp_path / "new" / ".x.lock" if kind == "lock file" else tmp_path
    with _util.file_lock(path):
        assert path.exists()
        with pytest.raises(BlockingIOError):
            with _util.file_lock(path, blocking=False):
                pass
    with _util.file_lock(path, blocking=False):  # released at the end of the block
        pass
