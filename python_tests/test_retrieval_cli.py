"""`radit index build` / `radit retrieve` end to end, and every user error as one line + exit code 2."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from radit_fast.cli.main import main  # noqa: E402
from radit_fast.retrieval import Passage, build_index_from_embeddings, precomputed_identity  # noqa: E402

pytestmark = pytest.mark.slow

DOCS = [
    ("Paris", "Paris is the capital and largest city of France, on the river Seine."),
    ("Jupiter", "Jupiter is the fifth planet from the Sun and the largest planet in the Solar System."),
    ("Hamlet", "Hamlet is a tragedy written by William Shakespeare about the prince of Denmark."),
    ("Penicillin", "Penicillin is an antibiotic discovered by Alexander Fleming in 1928 from a mould."),
    ("Chess", "Chess is a board game for two players with sixteen pieces each on an eight by eight board. " * 4),
]


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("radit: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    corpus = write_lines(tmp / "corpus.jsonl", [{"id": f"d{i}", "title": t, "text": x} for i, (t, x) in enumerate(DOCS)])
    assert main(["index", "build", "--corpus", str(corpus), "--out", str(tmp / "idx"), "--chunk-words", "30",
                 "--batch-size", "4", "--precision", "fp32"]) == 0
    return tmp / "idx"


def test_build_and_retrieve_with_recall(index_dir, tmp_path, capsys):
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["count"] == 4 + 3 and manifest["chunk_words"] == 30 and manifest["index"]["factory"] == "Flat"
    assert set(manifest["versions"]) >= {"faiss", "torch", "transformers", "radit_fast"}
    assert all(len(rec["sha256"]) == 64 for rec in manifest["files"].values())
    queries = write_lines(tmp_path / "q.jsonl", [
        {"id": "q1", "input": "Who wrote Hamlet?", "output": [{"answer": "Shakespeare", "provenance": [{"id": "d2"}]}]},
        {"id": 2, "input": "a board game with sixteen pieces", "output": [{"provenance": [{"id": "d4"}]}]},
        {"id": "q3", "input": "the capital of France"},
    ])
    code, out, err = run(capsys, "retrieve", "--index", index_dir, "--queries", queries, "--k", 3, "--out",
                         tmp_path / "r.jsonl")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q1", "2", "q3"]
    assert all(len(r["passages"]) == 3 for r in rows)
    assert set(rows[0]["passages"][0]) == {"id", "score", "title", "text"}
    assert all(p["score"] >= q["score"] for r in rows for p, q in zip(r["passages"], r["passages"][1:]))
    assert rows[0]["passages"][0]["id"] == "d2" and rows[1]["passages"][0]["id"].startswith("d4#")
    assert "recall@1 1.0000" in out and "recall@3 1.0000" in out and "2 of 3 queries with provenance" in out
    code, out, _ = run(capsys, "index", "info", "--index", index_dir)
    assert code == 0 and json.loads(out)["count"] == 7


@pytest.mark.parametrize("rows, message", [
    (['{"id": "a", "text": "x"}', '{"id": "b", "text": "y"'], "corpus.jsonl:2: malformed JSON"),
    (['{"id": "a", "title": "t"}'], "corpus.jsonl:1: missing field 'text'"),
    (['{"id": "a", "text": "x"}', '{"id": "b", "text": "y"}', '{"id": "a", "text": "z"}'],
     "corpus.jsonl:3: duplicate id 'a' (first at line 1)"),
    (['{"id": "a", "text": ""}'], "corpus.jsonl:1: empty text"),
    ([], "corpus.jsonl: no documents"),
])
def test_bad_corpus_is_one_line_and_leaves_no_index(tmp_path, capsys, rows, message):
    corpus = write_lines(tmp_path / "corpus.jsonl", rows)
    code, _, err = run(capsys, "index", "build", "--corpus", corpus, "--out", tmp_path / "idx")
    assert code == 2
    assert message in error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]  # no partial folder


def test_build_refuses_existing_output_bad_factory_and_missing_corpus(index_dir, tmp_path, capsys):
    corpus = write_lines(tmp_path / "corpus.jsonl", ['{"id": "a", "text": "x"}'])
    code, _, err = run(capsys, "index", "build", "--corpus", corpus, "--out", index_dir)
    assert code == 2 and "already exists (pass --overwrite" in error_line(err)
    code, _, err = run(capsys, "index", "build", "--corpus", corpus, "--out", tmp_path / "o", "--index-factory", "Bogus")
    assert code == 2 and "invalid --index-factory 'Bogus'" in error_line(err)
    code, _, err = run(capsys, "index", "build", "--corpus", tmp_path / "nope.jsonl", "--out", tmp_path / "o")
    assert code == 2 and "nope.jsonl: no such file" in error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_interrupted_build_leaves_nothing(tmp_path, capsys, monkeypatch):
    import radit_fast.retrieval.build as build_mod

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "encode_rows", interrupt)
    corpus = write_lines(tmp_path / "corpus.jsonl", ['{"id": "a", "text": "x"}'])
    code, _, err = run(capsys, "index", "build", "--corpus", corpus, "--out", tmp_path / "idx")
    assert code == 130 and "radit: interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_retrieve_errors(index_dir, tmp_path, capsys):
    good = write_lines(tmp_path / "q.jsonl", [{"id": "q", "input": "Hamlet"}])
    out = tmp_path / "r.jsonl"
    cases = [
        (["--index", tmp_path / "missing", "--queries", good], "missing: no such index folder"),
        (["--index", index_dir, "--queries", good, "--k", 8], "--k 8 is larger than the index (7 passages)"),
        (["--index", index_dir, "--queries", write_lines(tmp_path / "b1.jsonl", ['{"id": "q"}'])],
         "b1.jsonl:1: missing field 'input'"),
        (["--index", index_dir, "--queries", write_lines(tmp_path / "b2.jsonl", ['{"id": "q", "input": "x"}', "[1]"])],
         "b2.jsonl:2: expected a JSON object"),
        (["--index", index_dir, "--queries", tmp_path / "none.jsonl"], "none.jsonl: no such file"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, "retrieve", *argv, "--out", out)
        assert code == 2 and message in error_line(err), (argv, err)
    assert not out.exists()


def test_corrupt_index_and_mismatched_encoder(index_dir, tmp_path, capsys):
    import shutil

    good = write_lines(tmp_path / "q.jsonl", [{"id": "q", "input": "Hamlet"}])
    bad = tmp_path / "bad"
    shutil.copytree(index_dir, bad)
    with open(bad / "embeddings.f16.npy", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    code, _, err = run(capsys, "retrieve", "--index", bad, "--queries", good, "--out", tmp_path / "r.jsonl")
    assert code == 2 and "embeddings.f16.npy: sha256 checksum mismatch" in error_line(err)

    other = build_index_from_embeddings(tmp_path / "other", [Passage("a", "", "x")], np.ones((1, 384), np.float32),
                                        doc_encoder=precomputed_identity("someone/other-encoder", 384))
    code, _, err = run(capsys, "retrieve", "--index", other, "--queries", good, "--out", tmp_path / "r.jsonl",
                       "--k", 1, "--query-encoder", "default")
    line = error_line(err)
    assert code == 2 and "query encoder does not match index" in line and "someone/other-encoder" in line
    small = build_index_from_embeddings(tmp_path / "small", [Passage("a", "", "x")], np.ones((1, 8), np.float32),
                                        doc_encoder=precomputed_identity("sentence-transformers/all-MiniLM-L6-v2", 8))
    code, _, err = run(capsys, "retrieve", "--index", small, "--queries", good, "--out", tmp_path / "r.jsonl", "--k", 1)
    assert code == 2 and "has dim 384 but index" in error_line(err)


def test_console_script_exit_code_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "radit_fast.cli.main", "retrieve", "--index", str(tmp_path / "x"),
                           "--queries", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "r.jsonl")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("radit: error:") and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "radit_fast.cli.main", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "index" in proc.stdout and "retrieve" in proc.stdout


def test_non_utf8_corpus_and_queries_are_one_line_with_file_and_line(index_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "caf\xe9 au lait"}\n')
    code, _, err = run(capsys, "index", "build", "--corpus", corpus, "--out", tmp_path / "idx")
    assert code == 2 and "corpus.jsonl:2: not valid UTF-8 (byte 0xe9 at byte 25 of the line)" in error_line(err)
    queries = tmp_path / "q.jsonl"
    queries.write_bytes(b'{"id": "q1", "input": "Hamlet"}\n\n{"id": "q2", "input": "\xff"}\n')
    code, _, err = run(capsys, "retrieve", "--index", index_dir, "--queries", queries, "--out", tmp_path / "r.jsonl")
    assert code == 2 and "q.jsonl:3: not valid UTF-8 (byte 0xff" in error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "q.jsonl"]


def test_missing_cuda_is_one_line_for_build_and_retrieve(index_dir, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    good = write_lines(tmp_path / "q.jsonl", [{"id": "q", "input": "Hamlet"}])
    code, _, err = run(capsys, "retrieve", "--index", index_dir, "--queries", good, "--out", tmp_path / "r.jsonl",
                       "--device", "cuda")
    assert code == 2 and error_line(err) == "radit: error: --device cuda: no CUDA device is available"
    corpus = write_lines(tmp_path / "corpus.jsonl", ['{"id": "a", "text": "x"}'])
    code, _, err = run(capsys, "index", "build", "--corpus", corpus, "--out", tmp_path / "idx", "--device", "cuda")
    assert code == 2 and error_line(err) == "radit: error: --device cuda: no CUDA device is available"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "q.jsonl"]


def test_duplicate_query_ids_are_refused(index_dir, tmp_path, capsys):
    for rows, message in [
        ([{"id": "q", "input": "a"}, {"id": "r", "input": "b"}, {"id": "q", "input": "c"}],
         "dup.jsonl:3: duplicate id 'q' (first at line 1)"),
        ([{"id": 2, "input": "a"}, {"id": "2", "input": "b"}], "dup.jsonl:2: duplicate id '2' (first at line 1)"),
    ]:
        queries = write_lines(tmp_path / "dup.jsonl", rows)
        code, _, err = run(capsys, "retrieve", "--index", index_dir, "--queries", queries,
                           "--out", tmp_path / "r.jsonl")
        assert code == 2 and message in error_line(err)
    assert not (tmp_path / "r.jsonl").exists()


def test_query_encoder_without_its_own_settings_takes_the_index_settings(tmp_path, capsys):
    """`index build --encoder X --pooling cls` then `retrieve --query-encoder X`: X (no radit_encoder.json) is loaded
    with the pooling/normalisation the index was built with, not with its own defaults (mean, normalised)."""
    from radit_fast.retrieval import Retriever

    x = np.random.default_rng(0).standard_normal((3, 384)).astype(np.float32)
    ident = precomputed_identity("sentence-transformers/all-MiniLM-L6-v2", 384, pooling="cls", normalize=False)
    ident["max_length"] = 128
    folder = build_index_from_embeddings(tmp_path / "idx", [Passage(f"p{i}", "", f"t{i}") for i in range(3)], x,
                                         doc_encoder=ident)
    queries = write_lines(tmp_path / "q.jsonl", [{"id": "q", "input": "Hamlet"}])
    code, _, err = run(capsys, "retrieve", "--index", folder, "--queries", queries, "--out", tmp_path / "r.jsonl",
                       "--k", 2, "--query-encoder", "default")
    assert code == 0, err
    enc = Retriever.load(folder, "default").query_encoder
    assert (enc.pooling, enc.normalize, enc.max_length) == ("cls", False, 128)
    # explicit flags still win, and are checked against the index
    code, _, err = run(capsys, "retrieve", "--index", folder, "--queries", queries, "--out", tmp_path / "r.jsonl",
                       "--k", 2, "--query-encoder", "default", "--pooling", "mean")
    assert code == 2 and "pooling 'mean' != 'cls'" in error_line(err)
    # an encoder saved with radit_encoder.json keeps its own settings
    enc.configure(pooling="mean", normalize=True).save_pretrained(tmp_path / "qenc")
    code, _, err = run(capsys, "retrieve", "--index", folder, "--queries", queries, "--out", tmp_path / "r.jsonl",
                       "--k", 2, "--query-encoder", tmp_path / "qenc")
    assert code == 2 and "pooling 'mean' != 'cls'; normalize True != False" in error_line(err)


def test_dist_timeout_reaches_the_process_group(tmp_path, capsys, monkeypatch):
    import radit_fast.retrieval.build as build_mod
    from radit_fast.io import RaditError

    seen = []

    def init_distributed(device=None, *, timeout_s):
        seen.append(timeout_s)
        raise RaditError("stop here")

    monkeypatch.setattr(build_mod, "init_distributed", init_distributed)
    corpus = write_lines(tmp_path / "corpus.jsonl", ['{"id": "a", "text": "x"}'])
    for extra in ([], ["--dist-timeout", "90m"], ["--dist-timeout", "7200"], ["--dist-timeout", "1.5h"],
                  ["--dist-timeout", "2d"]):
        code, _, err = run(capsys, "index", "build", "--corpus", corpus, "--out", tmp_path / "idx", *extra)
        assert code == 2 and "stop here" in error_line(err)
    assert seen == [24 * 3600.0, 5400.0, 7200.0, 5400.0, 2 * 86400.0]
    for bad in ("0", "-5m", "soon", "12x"):
        with pytest.raises(SystemExit) as info:
            main(["index", "build", "--corpus", str(corpus), "--out", str(tmp_path / "idx"), "--dist-timeout", bad])
        assert info.value.code == 2
    assert "--dist-timeout" in capsys.readouterr().err


SIGTERM_DURING_BUILD = r"""
import os, signal, sys
import radit_fast.retrieval.build as build_mod
from radit_fast.cli.main import main

real = build_mod.encode_rows

def encode_then_sigterm(store, encoder, lo, hi, path, **kw):
    real(store, encoder, lo, hi, path, **kw)  # the partial folder now holds the store and the embeddings
    print("pid:", os.getpid(), flush=True)
    print("partial:", *sorted(p.name for p in path.parent.parent.iterdir() if p.name.endswith(".partial")), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode: deterministic, no timing
    raise AssertionError("SIGTERM was not raised")

build_mod.encode_rows = encode_then_sigterm
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_a_build_leaves_nothing_and_stale_partials_are_removed(tmp_path):
    from radit_fast.io import _host_tag

    corpus = write_lines(tmp_path / "corpus.jsonl", [{"id": f"d{i}", "title": t, "text": x}
                                                     for i, (t, x) in enumerate(DOCS)])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".idx.{_host_tag()}-{dead.pid}.abcd_123.partial"  # a SIGKILLed build on this host
    live = tmp_path / f".idx.{_host_tag()}-{os.getpid()}.efgh_456.partial"  # a build still running
    other = tmp_path / f".idx.otherhost-{dead.pid}.ijkl_789.partial"  # another node's, on a shared file system
    for p in (stale, live, other):
        p.mkdir()
        (p / "passages.jsonl").write_text("x")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SIGTERM_DURING_BUILD, "index", "build", "--corpus", str(corpus),
                           "--out", str(tmp_path / "idx"), "--precision", "fp32"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "radit: terminated" in proc.stderr and "Traceback" not in proc.stderr
    pid = int(proc.stdout.split("pid:")[1].split()[0])
    during = set(proc.stdout.split("partial:")[1].split())  # the stale folder was gone before the build wrote
    ours = during - {live.name, other.name}
    assert len(during) == 3 and len(ours) == 1, during
    assert re.fullmatch(rf"\.idx\.{re.escape(_host_tag())}-{pid}\.[a-z0-9_]{{8}}\.partial", ours.pop())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["corpus.jsonl", live.name, other.name])
