"""FAISS index folders built from synthetic vectors: exact search vs torch top-k (ties tolerated), IVF,
stored float16 embeddings, manifest checks and atomic builds."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from radit_fast.io import RaditError
from radit_fast.retrieval import Index, Passage, build_index_from_embeddings, precomputed_identity
from radit_fast.retrieval.index import exact_topk
from radit_fast.retrieval.manifest import estimate_index_bytes
from radit_fast.retrieval.metrics import topk_mismatches


def check_knn_with_ties(data, queries, scores, rows, ref_scores, atol=1e-4):
    """Equal to the reference top-k up to permutations among tied scores (see metrics.topk_mismatches)."""
    bad = topk_mismatches(data, queries, scores, rows, ref_scores, atol)
    if bad:
        i = bad[0]
        raise AssertionError(f"{len(bad)} of {len(queries)} queries differ; first {i}: rows {rows[i]}, "
                             f"scores {scores[i]}, reference scores {ref_scores[i]}")


def _synthetic(n=300, d=16, seed=0, ties=True):
    rng = np.random.default_rng(seed)
    # small integers / 8 are exact in float16: duplicated rows give exact score ties
    x = (rng.integers(-8, 9, size=(n, d)) / 8).astype(np.float32)
    if ties:
        m = min(40, n // 2)
        x[n // 2 : n // 2 + m] = x[:m]
    q = (rng.integers(-8, 9, size=(25, d)) / 8).astype(np.float32)
    q[:5] = x[:5]
    return x, q


def _build(tmp_path, x, factory="Flat", name="idx", **kw):
    passages = (Passage(f"doc{i}" if i % 4 else f"doc{i}#0", f"T{i}", f"text {i}") for i in range(len(x)))
    return build_index_from_embeddings(tmp_path / name, passages, x, doc_encoder=precomputed_identity("synthetic", x.shape[1]),
                                       index_factory=factory, **kw)


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    x, q = _synthetic()
    return x, q, Index.load(_build(tmp_path_factory.mktemp("flat"), x))


@pytest.mark.parametrize("impl", ["auto", "faiss"])
def test_exact_search_equals_torch_topk_with_ties(flat, impl):
    x, q, index = flat
    k = 10
    ref_scores, _ = torch.topk(torch.from_numpy(q) @ torch.from_numpy(x).T, k, dim=1)
    scores, rows = index.search(q, k, impl=impl)
    assert (index._flat_matrix() is not None) and index._flat_matrix().shape == x.shape
    assert scores.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == (len(q), k)
    check_knn_with_ties(x, q, scores, rows, ref_scores.numpy())
    # the duplicated rows really produce ties, and queries that are data rows find themselves first
    assert any(len(set(s.tolist())) < k for s in scores)
    assert np.allclose(scores[:5, 0], (q[:5] * q[:5]).sum(1))


def test_reference_topk_is_blockwise_exact_and_the_checker_catches_errors(flat):
    x, q, _ = flat
    full_s, full_i = torch.topk(torch.from_numpy(q) @ torch.from_numpy(x).T, 7, dim=1)
    s, i = exact_topk(torch.from_numpy(q), torch.from_numpy(x), 7, block=13)
    check_knn_with_ties(x, q, s.numpy(), i.numpy(), full_s.numpy())
    wrong = i.numpy().copy()
    wrong[:, 0] = wrong[:, -1]  # a duplicate row: caught even when scores tie
    assert topk_mismatches(x, q, s.numpy(), wrong, full_s.numpy()) == list(range(len(q)))
    lower = s.numpy().copy()
    lower[3] -= 0.5
    assert 3 in topk_mismatches(x, q, lower, i.numpy(), full_s.numpy())


def test_doc_embeddings_are_the_stored_float16_matrix(flat):
    x, _, index = flat
    rows = torch.tensor([[3, 0, -1], [299, 5, 5]])
    d = index.doc_embeddings(rows)
    assert d.shape == (2, 3, 16) and d.dtype == torch.float32
    stored = np.load(index.folder / "embeddings.f16.npy", mmap_mode="r")
    assert isinstance(index.embeddings, np.memmap) and index.embeddings.dtype == np.float16
    assert torch.equal(d[0, 0], torch.from_numpy(stored[3].astype(np.float32)))
    assert torch.equal(d[0, 2], torch.zeros(16))  # missing row
    assert torch.equal(d[1, 0], torch.from_numpy(x[299]))  # x is exact in float16
    with pytest.raises(IndexError):
        index.doc_embeddings(torch.tensor([300]))


def test_search_argument_errors(flat):
    _, q, index = flat
    with pytest.raises(RaditError, match=r"k=301 is larger than the index \(300 passages\)"):
        index.search(q, 301)
    with pytest.raises(RaditError, match=r"queries must have shape \[B, 16\]"):
        index.search(q[:, :8], 3)


def test_passages_follow_rows(flat):
    _, q, index = flat
    _, rows = index.search(q[:2], 3)
    got = index.store.get(rows[0])
    assert [p.text for p in got] == [f"text {r}" for r in rows[0]]


def test_ivf_with_all_lists_probed_is_exact_and_manifest_predicts_memory(tmp_path):
    x, q = _synthetic(n=2000, d=16, seed=1)
    folder = _build(tmp_path, x, "IVF16,Flat", search_params="nprobe=16", train_size=1000)
    index = Index.load(folder)
    m = index.manifest
    assert m["index"]["train_size"] == 1000 and m["index"]["factory"] == "IVF16,Flat"
    ref, _ = torch.topk(torch.from_numpy(q) @ torch.from_numpy(x).T, 5, dim=1)
    scores, rows = index.search(q, 5)
    check_knn_with_ties(x, q, scores, rows, ref.numpy())
    mem = m["memory"]
    assert mem["index_bytes"] == (folder / "index.faiss").stat().st_size
    assert abs(mem["index_estimate_bytes"] - mem["index_bytes"]) < 0.05 * mem["index_bytes"] + 4096
    assert mem["embeddings_mmap_bytes"] == 2000 * 16 * 2
    # run-time parameters can be overridden at load time
    import faiss

    assert faiss.extract_index_ivf(index.faiss_index).nprobe == 16
    few = Index.load(folder, search_params="nprobe=1")
    assert faiss.extract_index_ivf(few.faiss_index).nprobe == 1
    assert (few.search(q, 5)[0] <= scores + 1e-5).all()  # probing fewer lists never finds better results
    with pytest.raises(RaditError, match="invalid search parameters 'nprobes=2'"):
        Index.load(folder, search_params="nprobes=2")


def test_estimates_for_common_factories():
    n, d = 10**6, 384
    assert estimate_index_bytes("Flat", n, d) == 4 * n * d
    assert estimate_index_bytes("IVF4096,Flat", n, d) == n * (4 * d + 8) + 4 * d * 4096
    assert estimate_index_bytes("IVF65536,PQ64", n, d) == n * (64 + 8) + 4 * d * 256 + 4 * d * 65536
    assert estimate_index_bytes("OPQ64_256,IVF1024,PQ64", n, d) == 4 * d * 256 + n * 72 + 4 * 256 * 256 + 4 * 256 * 1024
    assert estimate_index_bytes("HNSW32", n, d) > 4 * n * d
    assert estimate_index_bytes("LSH", n, d) is None


def test_bad_factory_and_failed_build_leave_nothing(tmp_path):
    x, _ = _synthetic(n=50)
    with pytest.raises(RaditError, match="invalid --index-factory 'IVF1x,Nope'"):
        _build(tmp_path, x, "IVF1x,Nope")
    with pytest.raises(RaditError, match="cannot train the index on 50 vectors"):
        _build(tmp_path, x, "IVF100,Flat")
    with pytest.raises(RaditError, match="duplicate id"):
        build_index_from_embeddings(tmp_path / "idx", [Passage("a", "", "x"), Passage("a", "", "y")], x[:2],
                                    doc_encoder=precomputed_identity("s", 16))
    assert list(tmp_path.iterdir()) == []  # no partial folders (atomic_dir)


def test_existing_folder_needs_overwrite(tmp_path):
    x, _ = _synthetic(n=30, ties=False)
    _build(tmp_path, x)
    with pytest.raises(RaditError, match="already exists"):
        _build(tmp_path, x)
    _build(tmp_path, x[::-1].copy(), overwrite=True)
    assert np.array_equal(np.load(tmp_path / "idx" / "embeddings.f16.npy"), x[::-1].astype(np.float16))


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "index.faiss").write_bytes(b"x" + (f / "index.faiss").read_bytes()[1:]), "index.faiss: sha256 checksum mismatch"),
    (lambda f: (f / "passages.jsonl").unlink(), "index file passages.jsonl is missing"),
    (lambda f: (f / "manifest.json").write_text("{not json"), "manifest.json: corrupt manifest"),
    (lambda f: (f / "manifest.json").unlink(), "not an index folder"),
    (lambda f: (f / "offsets.npy").write_bytes(b"short"), "offsets.npy: size 5 !="),
])
def test_corrupt_folders_are_refused(tmp_path, damage, message):
    x, _ = _synthetic(n=30, ties=False)
    folder = _build(tmp_path, x)
    damage(folder)
    with pytest.raises(RaditError, match=message):
        Index.load(folder)


def test_size_verification_is_cheaper_but_still_checks_sizes(tmp_path):
    x, _ = _synthetic(n=30, ties=False)
    folder = _build(tmp_path, x)
    with pytest.raises(RaditError, match="no such index folder"):
        Index.load(tmp_path / "missing")
    m = json.loads((folder / "manifest.json").read_text())
    m["files"]["index.faiss"]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(m))
    Index.load(folder, verify="size")
    with pytest.raises(RaditError, match="checksum mismatch"):
        Index.load(folder)


DELETE = object()


def _set(path, value):
    """Edit that sets manifest[path[0]][path[1]]... = value (or deletes it when value is DELETE)."""
    def edit(m):
        *parents, last = path
        for key in parents:
            m = m[key]
        if value is DELETE:
            del m[last]
        else:
            m[last] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(files=list(m["files"])),
     "field files must be an object {file name: {bytes, sha256}}, got a list"),
    (_set(("files", "index.faiss", "bytes"), DELETE),
     "field files['index.faiss'].bytes must be a non-negative integer, got nothing (the field is missing)"),
    (_set(("files", "index.faiss", "bytes"), "12"), "field files['index.faiss'].bytes must be a non-negative integer, "
                                                    "got a string '12'"),
    (_set(("files", "index.faiss", "sha256"), 5), "field files['index.faiss'].sha256 must be 64 lowercase hex digits"),
    (_set(("files", "index.faiss"), "abc"), "field files['index.faiss'] must be an object {bytes, sha256}"),
    (lambda m: m["files"].update({"../outside": m["files"]["index.faiss"]}),
     "field files['../outside'] must be a file"),
    (_set(("count",), 30.0), "field count must be a non-negative integer, got a number 30.0"),
    (_set(("count",), "30"), "field count must be a non-negative integer, got a string '30'"),
    (_set(("count",), True), "field count must be a non-negative integer, got a boolean True"),
    (_set(("dim",), 0), "field dim must be a positive integer, got an integer 0"),
    (_set(("dim",), None), "field dim must be a positive integer, got null"),
    (_set(("count",), DELETE), "corrupt manifest (missing 'count')"),
    (_set(("query_encoder",), "synthetic"), "field query_encoder must be an object, got a string 'synthetic'"),
    (_set(("query_encoder", "name"), DELETE), "field query_encoder.name must be a non-empty string, got nothing"),
    (_set(("doc_encoder", "pooling"), ["mean"]), "field doc_encoder.pooling must be a string or null, got a list"),
    (_set(("query_encoder", "normalize"), "yes"), "field query_encoder.normalize must be true or false or null"),
    (_set(("query_encoder", "dim"), "16"), "field query_encoder.dim must be an integer or null, got a string '16'"),
    (_set(("index",), []), "field index must be an object, got a list"),
    (_set(("index", "factory"), DELETE), "field index.factory must be a FAISS factory string, got nothing"),
    (_set(("index", "search_params"), 32), "field index.search_params must be a string, got an integer 32"),
    (_set(("memory",), 5), "field memory must be an object, got an integer 5"),
])
@pytest.mark.parametrize("verify", ["sha256", "none"])
def test_manifest_with_wrong_field_types_is_one_line_naming_the_field(tmp_path, edit, message, verify):
    x, _ = _synthetic(n=30, ties=False)
    folder = _build(tmp_path, x)
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RaditError) as info:
        Index.load(folder, verify=verify)
    text = str(info.value)
    assert "manifest.json: corrupt manifest (" in text and message in text and "\n" not in text, text
