"""Issue 12, classes 1 and 4: write failures and concurrent writers, in the shared atomic-output helpers.

Write failures are made real three ways: a 1 MB tmpfs (root only; skipped elsewhere), ``RLIMIT_FSIZE`` in a
child process (EFBIG), and monkeypatched writes raising ENOSPC / EDQUOT / EROFS. Every writer must end with
one RaditError naming the path and the bytes, and leave no partial output.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from radit_fast.io import (
    RaditError, WriteError, atomic_dir, atomic_file, claimed_dir, open_npy, rename_noreplace, write_errno,
    write_json, write_jsonl,
)

REPO = Path(__file__).resolve().parents[1]


def _child(code: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------- class 4: races
def test_atomic_dir_never_replaces_a_folder_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "idx"
    with pytest.raises(RaditError, match=r"idx: appeared while this run was writing it"):
        with atomic_dir(out) as tmp:
            (tmp / "mine.txt").write_text("mine")
            out.mkdir()  # another run finished first
            (out / "theirs.txt").write_text("theirs")
    assert _leftovers(out) == ["theirs.txt"]  # the other run's output is intact
    assert _leftovers(tmp_path) == ["idx"]  # and this run's temporary folder is gone
    # an empty folder is a folder too (a plain rename(2) would silently replace it)
    empty = tmp_path / "empty"
    with pytest.raises(RaditError, match="appeared while"):
        with atomic_dir(empty) as tmp:
            empty.mkdir()
    # with overwrite the later run replaces it, and no hidden folder is left
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "mine.txt").write_text("mine")
    assert _leftovers(out) == ["mine.txt"] and _leftovers(tmp_path) == ["empty", "idx"]


def test_atomic_file_without_overwrite_refuses_before_and_after(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text("old\n")
    with pytest.raises(RaditError, match=r"r.jsonl: already exists"):
        write_jsonl(out, [{"a": 1}], overwrite=False)
    assert out.read_text() == "old\n"
    new = tmp_path / "new.jsonl"
    with pytest.raises(RaditError, match=r"new.jsonl: appeared while this run was writing it"):
        with atomic_file(new, overwrite=False) as f:
            f.write("mine\n")
            new.write_text("theirs\n")
    assert new.read_text() == "theirs\n" and _leftovers(tmp_path) == ["new.jsonl", "r.jsonl"]
    assert write_jsonl(tmp_path / "fresh.jsonl", [{"a": 1}], overwrite=False) == 1
    with pytest.raises(RaditError, match="is a folder"):
        write_json(tmp_path, {"a": 1})


def test_rename_noreplace_files_and_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a")
    b.write_text("b")
    with pytest.raises(FileExistsError):
        rename_noreplace(a, b)
    assert a.read_text() == "a" and b.read_text() == "b"
    rename_noreplace(a, tmp_path / "c")
    assert not a.exists() and (tmp_path / "c").read_text() == "a"
    (tmp_path / "d").mkdir()
    (tmp_path / "e").mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "d", tmp_path / "e")


def test_a_training_folder_is_held_for_the_whole_run(tmp_path):
    """Training writes into --out over hours (checkpoints, metrics): a second run on the same folder is refused
    while the first holds it, and a fresh run refuses a folder another run filled after its start-up check."""
    out = tmp_path / "run"
    with claimed_dir(out, fresh=True):
        (out / "metrics.jsonl").write_text("{}\n")
        with pytest.raises(RaditError, match=r"run: another run is writing this folder now"):
            with claimed_dir(out, fresh=False):
                pass
        proc = _child("import sys\nfrom radit_fast.io import claimed_dir\nwith claimed_dir(sys.argv[1], fresh=False):"
                      "\n    pass", str(out))
        assert proc.returncode != 0 and "another run is writing this folder now" in proc.stderr
    with pytest.raises(RaditError, match="appeared while this run was writing it"):
        with claimed_dir(out, fresh=True):
            pass
    with claimed_dir(out, fresh=False):  # --resume / --overwrite, once the other run ended
        pass


RACE = r"""
import sys, time
from pathlib import Path
from radit_fast.cli.main import main
import radit_fast.retrieval.build as build_mod

go, me = Path(sys.argv[1]), sys.argv[2]
real = build_mod.write_store

def slow_store(corpus, folder, chunk_words):
    (go.parent / f"started-{me}").touch()
    while not all((go.parent / f"started-{w}").exists() for w in ("a", "b")):
        time.sleep(0.05)  # both runs have passed their existence check
    n = real(corpus, folder, chunk_words)
    (folder / f"writer-{me}").touch()
    return n

build_mod.write_store = slow_store
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_two_index_builds_racing_for_one_out(tmp_path):
    """Both runs pass the start-up check; exactly one may finish, the other must not replace its index."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"passage number {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "idx"
    argv = ["index", "build", "--corpus", str(corpus), "--out", str(out), "--precision", "fp32"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / "go"), me, *argv], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for me in ("a", "b")]
    results = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        results.append((p.returncode, err))
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    lines = [ln for ln in loser.splitlines() if ln.startswith("radit: error:")]
    assert len(lines) == 1 and "appeared while this run was writing it" in lines[0] and "Traceback" not in loser
    winner = "a" if results[0][0] == 0 else "b"
    assert (out / f"writer-{winner}").exists() and not (out / f"writer-{'b' if winner == 'a' else 'a'}").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".idx")] == []


# ------------------------------------------------------------------------------- class 1: errno mapping
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG])
def test_atomic_file_turns_write_errors_into_one_line(tmp_path, monkeypatch, code):
    out = tmp_path / "sub" / "metrics.json"

    def fail(fd):  # delayed allocation (ext4, NFS) reports a full disk at fsync
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(WriteError) as info:
        write_json(out, {"x": "y" * 100})
    msg = str(info.value)
    assert msg.startswith(f"{out}: cannot write: ") and "\n" not in msg and "partial output was removed" in msg
    assert {errno.ENOSPC: "no space left", errno.EDQUOT: "quota", errno.EROFS: "read-only",
            errno.EFBIG: "file too large"}[code] in msg
    monkeypatch.undo()
    assert _leftovers(out.parent) == []


def test_atomic_dir_names_the_output_and_the_bytes(tmp_path, monkeypatch):
    out = tmp_path / "idx"
    with pytest.raises(WriteError) as info:
        with atomic_dir(out) as tmp:
            (tmp / "part").write_bytes(b"x" * 5000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "index.faiss"))
    msg = str(info.value)
    assert msg.startswith(f"{out}: cannot write: no space left on the device (it needs more than the 5,000 bytes")
    assert _leftovers(tmp_path) == []
    # a library's own error text (safetensors, faiss) is recognised too
    assert write_errno(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")) \
        == errno.ENOSPC
    assert write_errno(RuntimeError("unrelated")) is None and write_errno(OSError(errno.ENOENT, "x")) is None


def test_open_npy_reserves_the_bytes_before_mapping(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    # 8 x 128 float16 = 2,048 bytes after the 128-byte .npy header
    with pytest.raises(WriteError, match=r"/idx/emb.npy: cannot write: no space left on the device \(it needs 2,176"):
        with atomic_dir(tmp_path / "idx") as tmp:
            open_npy(tmp / "emb.npy", np.float16, (8, 128))
    # the error names the final folder, not the temporary one
    monkeypatch.undo()
    arr = open_npy(tmp_path / "ok.npy", np.float16, (8, 128))
    arr[:] = 1.5
    arr.flush()
    del arr
    assert np.load(tmp_path / "ok.npy").sum() == 1.5 * 8 * 128


FSIZE = r"""
import resource, sys
import numpy as np
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from radit_fast.cli.main import main
import radit_fast.cli.retrieval as cli
from radit_fast.retrieval import Passage, build_index_from_embeddings, precomputed_identity

def build(args):
    x = np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32)
    build_index_from_embeddings(args.out, [Passage(f"p{i}", "", "text " * 20) for i in range(2000)], x,
                                doc_encoder=precomputed_identity("e", 64))
cli.cmd_index_build = build
sys.exit(main(["index", "build", "--corpus", sys.argv[2], "--out", sys.argv[3]]))
"""


@pytest.mark.parametrize("limit", [60_000, 400_000])  # the passage text fails first, then the embeddings
def test_file_size_limit_is_one_line_and_leaves_nothing(tmp_path, limit):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "x"}\n')
    out = tmp_path / "out" / "idx"
    (tmp_path / "out").mkdir()
    proc = _child(FSIZE, str(limit), str(corpus), str(out))
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("radit: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{out}" in lines[0] and "file too large" in lines[0] and f"file-size limit is {limit:,} bytes" in lines[0]
    assert _leftovers(tmp_path / "out") == []


def _tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "1m"):
        pytest.skip("mounting a tmpfs needs root (RLIMIT_FSIZE and monkeypatched tests cover the mapping)")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


FULL_DISK = r"""
import sys
import numpy as np
from radit_fast.io import RaditError
from radit_fast.retrieval import Passage, build_index_from_embeddings, precomputed_identity
x = np.random.default_rng(0).standard_normal((int(sys.argv[2]), 384)).astype(np.float32)
try:
    build_index_from_embeddings(sys.argv[1], [Passage(f"p{i}", "", "t") for i in range(len(x))], x,
                                doc_encoder=precomputed_identity("e", 384))
except RaditError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def test_full_disk_during_index_build_is_one_line_not_sigbus(small_disk):
    """1,500 x 384 float16 embeddings (1.15 MB) do not fit in 1 MB: a memory-mapped write into a sparse file
    dies with SIGBUS there; the reserved file fails with ENOSPC, named, and the partial folder is removed."""
    out = small_disk / "idx"
    proc = _child(FULL_DISK, str(out), "1500")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith(f"{out}/embeddings.f16.npy: cannot write: no space left")
    assert "it needs 1,152,128 bytes" in line
    assert _leftovers(small_disk) == []  # the partial index does not keep the disk full
    assert _child(FULL_DISK, str(out), "200").returncode == 0  # and a small one fits afterwards


def test_full_disk_for_json_lines_output(small_disk, capsys):
    out = small_disk / "r.jsonl"
    rows = ({"id": i, "text": "x" * 1000} for i in range(2000))
    with pytest.raises(WriteError, match=r"r.jsonl: cannot write: no space left on the device \(it needs more than"):
        write_jsonl(out, rows)
    assert _leftovers(small_disk) == []


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/model.safetensors"),
    RuntimeError("Error while serializing: I/O error: Disk quota exceeded (os error 122)"),
])
def test_cli_turns_any_writers_space_error_into_one_line(monkeypatch, capsys, exc):
    """Writers outside the atomic helpers (save_pretrained through safetensors, a library's own files) end
    the same way: one line, exit 2; an unrelated error still raises."""
    import radit_fast.cli.retrieval as cli
    from radit_fast.cli.main import main

    def fail(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_index_info", fail)
    assert main(["index", "info", "--index", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("radit: error: ") and "cannot write: " in err
    assert ("no space left" if isinstance(exc, OSError) else "disk quota exceeded") in err
    assert "removed" not in err  # nothing claims a clean-up it did not do
    monkeypatch.setattr(cli, "cmd_index_info", lambda args: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):
        main(["index", "info", "--index", "x"])


CKPT_FSIZE = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
import torch
from radit_fast.io import WriteError
from radit_fast.training.checkpoint import save_checkpoint
try:
    save_checkpoint(sys.argv[1], 3, params={"w": torch.zeros(50_000)}, optimizer_state=None, trainer_state={})
except WriteError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def test_checkpoint_write_failure_through_safetensors(tmp_path):
    """safetensors writes by itself (Rust) and reports EFBIG in its own error type: recognised by its text,
    named at the checkpoint folder, and the partial checkpoint removed."""
    proc = _child(CKPT_FSIZE, str(tmp_path / "checkpoints"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith(f"{tmp_path / 'checkpoints' / 'step-00000003'}")
    assert "file too large (file-size limit)" in line and "file-size limit is 100,000 bytes" in line
    assert _leftovers(tmp_path / "checkpoints") == []
