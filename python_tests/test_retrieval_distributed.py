"""`radit index build` under torchrun with 2 CPU processes (gloo) equals a single-process build."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from radit_fast.retrieval import Index, IndexBuildConfig, build_index

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _corpus(path: Path) -> Path:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rows = [{"id": f"doc{i}", "title": f"Title {i}",
             "text": " ".join(words[(i * j) % len(words)] for j in range(5 + 3 * i))} for i in range(21)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.skipif(not TORCHRUN.exists(),
                    reason="torchrun not installed")
def test_two_process_build_matches_single_process(tmp_path):
    corpus = _corpus(tmp_path / "corpus.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "--module", "radit_fast.cli.main", "--verbose",
           "index", "build", "--corpus", str(corpus), "--out", str(tmp_path / "dist"), "--chunk-words", "20",
           "--batch-size", "4", "--precision", "fp32", "--dist-timeout", "1h"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 encodes rows" in proc.stderr  # both ranks encoded a shard
    assert proc.stderr.count("gloo timeout 3600 s") == 2  # --dist-timeout reached both process groups
    dist = Index.load(tmp_path / "dist")
    assert dist.manifest["world_size"] == 2
    assert not (tmp_path / "dist" / "shards").exists()
    single = Index.load(build_index(corpus, tmp_path / "single",
                                    IndexBuildConfig(chunk_words=20, batch_size=4, precision="fp32")))
    assert len(dist) == len(single) > 21  # some documents were chunked
    assert [p.id for p in dist.store] == [p.id for p in single.store]
    np.testing.assert_allclose(np.asarray(dist.embeddings, np.float32), np.asarray(single.embeddings, np.float32),
                               atol=2e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "dist", "single"]


def test_a_failing_rank_fails_the_whole_build_and_leaves_nothing(tmp_path):
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "--module", "radit_fast.cli.main",
           "index", "build", "--corpus", str(bad), "--out", str(tmp_path / "idx")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("radit: error:")]
    assert errors == ["radit: error: " + str(bad) + ":2: duplicate id 'a' (first at line 1)"]  # rank 0 only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]
