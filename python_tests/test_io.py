"""radit_fast.io: JSON lines with file:line errors (also for bytes that are not UTF-8) and atomic folders that
leave nothing behind, including the clean-up of folders left by processes that died."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from radit_fast import io
from radit_fast.io import RaditError, atomic_dir, remove_stale_partials
from radit_fast.records import iter_jsonl


def test_iter_jsonl_reports_the_line_of_bad_utf8_and_skips_a_bom(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n' + b'{"a": 2}\n' * 5000 + b'{"a": "\xc3"}\n')
    rows = iter_jsonl(f)
    assert next(rows) == (1, {"a": 1})
    with pytest.raises(RaditError, match=r"x.jsonl:5003: not valid UTF-8 \(byte 0xc3 at byte 8 of the line\)"):
        list(rows)
    f.write_bytes(b'{"a": 1}\r\n{"b": "\xc3\xa9"}\r\n')  # CRLF line ends, valid UTF-8
    assert list(iter_jsonl(f)) == [(1, {"a": 1}), (2, {"b": "é"})]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_dir_names_its_folder_after_host_and_pid_and_cleans_up(tmp_path):
    out = tmp_path / "idx"
    with pytest.raises(ValueError, match="boom"):
        with atomic_dir(out) as tmp:
            assert tmp.name.startswith(f".idx.{io._host_tag()}-{os.getpid()}.") and tmp.name.endswith(".partial")
            (tmp / "f").write_text("x")
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("y")
    assert [p.name for p in tmp_path.iterdir()] == ["idx"] and (out / "f").read_text() == "y"


def test_only_partials_of_dead_processes_on_this_host_for_this_name_are_removed(tmp_path):
    host, dead = io._host_tag(), _dead_pid()
    names = {
        f".idx.{host}-{dead}.abcdefgh.partial": True,          # died: removed
        f".idx.{host}-{os.getpid()}.abcdefgh.partial": False,  # alive
        f".idx.{host}-1.abcdefgh.partial": False,              # pid 1 exists (PermissionError counts as alive)
        f".idx.other-host-{dead}.abcdefgh.partial": False,     # another node's (shared file system)
        f".idx.v2.{host}-{dead}.abcdefgh.partial": False,      # belongs to --out idx.v2
        f".idx.{host}-{dead}.abc.partial": False,              # not a name atomic_dir makes
        ".idx.abcdefgh.partial": False,                        # made by an older version: owner unknown
        f".idx.{host}-{dead}.abcdefgh.partial.keep": False,
    }
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / f".idx.{host}-{dead}.filefile.partial").write_text("a file, not a folder")
    removed = remove_stale_partials(tmp_path / "idx")
    assert sorted(p.name for p in removed) == sorted(n for n, gone in names.items() if gone)
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {n for n, gone in names.items() if not gone} | {f".idx.{host}-{dead}.filefile.partial"}
    assert remove_stale_partials(tmp_path / "missing" / "idx") == []
