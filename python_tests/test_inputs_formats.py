"""Task and corpus inputs in the formats of the ecosystem: JSON lines, Parquet (file or folder) and Hugging
Face ``datasets`` folders (Dataset, DatasetDict with ``FOLDER:SPLIT``) read the same records with the same
checks; errors are one line naming the file and row; missing optional packages name the extra."""
from __future__ import annotations

import json
import sys

import pytest

from radit_fast._util import sha256_file
from radit_fast.cli.main import main
from radit_fast.data.tasks import load_tasks
from radit_fast.io import RaditError, write_jsonl
from radit_fast.records import iter_records, record_source, records_sha256
from radit_fast.retrieval.corpus import iter_corpus

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

TASKS = [
    {"id": "q1", "input": "Where is Paris?", "output": [{"answer": "France", "provenance": [{"id": "d1"}]}]},
    {"id": "q2", "input": "Pick the planet", "output": [{"answer": "Mars"}], "choices": ["Mars", "Oak"]},
    {"id": "q3", "input": "What colour is the sky?", "output": [{"answer": "blue"}, {"answer": "Blue"}],
     "context": "The sky is blue."},
]
CORPUS = [
    {"id": "d1", "title": "Paris", "text": "Paris is the capital of France. " * 3},
    {"id": "d2", "text": "one two three four five six seven eight nine ten eleven"},
    {"id": "d7", "title": "Sky", "text": "The sky is blue."},
]


def _table(rows):
    """Columns from the union of the rows' fields (``from_pylist``/``from_list`` take only the first row's)."""
    return pa.Table.from_batches([pa.RecordBatch.from_struct_array(pa.array(rows))])


def _parquet(path, rows):
    pq.write_table(_table(rows), path)
    return path


def _dataset(path, rows):
    datasets.Dataset(_table(rows)).save_to_disk(str(path))
    return path


def _ds(rows):
    return datasets.Dataset(_table(rows))


def _inputs(tmp_path, rows, name):
    """The same records as JSON lines, a Parquet file, a Parquet folder and a datasets folder."""
    out = {"jsonl": tmp_path / f"{name}.jsonl", "parquet": _parquet(tmp_path / f"{name}.parquet", rows),
           "datasets": _dataset(tmp_path / f"{name}_ds", rows)}
    write_jsonl(out["jsonl"], rows)
    folder = tmp_path / f"{name}_pq"
    folder.mkdir()
    _parquet(folder / "part-0.parquet", rows[:2])
    _parquet(folder / "part-1.parquet", rows[2:])
    out["parquet_folder"] = folder
    return out


@pytest.mark.parametrize("fmt", ["parquet", "parquet_folder", "datasets"])
def test_tasks_read_the_same_in_every_format(tmp_path, fmt):
    paths = _inputs(tmp_path, TASKS, "tasks")
    ref = load_tasks(paths["jsonl"])
    assert [e.id for e in ref] == ["q1", "q2", "q3"]
    got = load_tasks(paths[fmt])
    assert got == ref
    assert record_source(paths[fmt]).kind == ("datasets" if fmt == "datasets" else "parquet")


@pytest.mark.parametrize("fmt", ["parquet", "parquet_folder", "datasets"])
def test_corpus_reads_the_same_in_every_format(tmp_path, fmt):
    paths = _inputs(tmp_path, CORPUS, "corpus")
    ref = list(iter_corpus(paths["jsonl"], 4))
    got = list(iter_corpus(paths[fmt], 4))
    assert [p for _, p in got] == [p for _, p in ref]
    assert [n for n, _ in got] == [n for n, _ in ref]  # rows are numbered like lines: 1, 2, 3
    assert [p.id for _, p in ref][:3] == ["d1#0", "d1#1", "d1#2"]


def test_integer_ids_in_a_column(tmp_path):
    rows = [{"id": 10 + i, "title": "", "text": f"text {i}"} for i in range(3)]
    assert [p.id for _, p in iter_corpus(_parquet(tmp_path / "ints.parquet", rows))] == ["10", "11", "12"]


def test_parquet_detected_by_content_not_name(tmp_path):
    path = _parquet(tmp_path / "tasks.data", TASKS)
    assert record_source(path).kind == "parquet"
    assert [e.id for e in load_tasks(path)] == ["q1", "q2", "q3"]


def test_dataset_dict_split_is_chosen_by_path_or_is_the_only_one(tmp_path):
    dd = datasets.DatasetDict({"train": _ds(TASKS[:2]),
                               "test": _ds(TASKS[2:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [e.id for e in load_tasks(f"{tmp_path / 'dd'}:train")] == ["q1", "q2"]
    assert [e.id for e in load_tasks(f"{tmp_path / 'dd'}:test")] == ["q3"]
    with pytest.raises(RaditError, match=r"splits test, train: choose one as .*dd:SPLIT"):
        load_tasks(tmp_path / "dd")
    with pytest.raises(RaditError, match=r"no split 'dev' \(splits: test, train\)"):
        load_tasks(f"{tmp_path / 'dd'}:dev")
    datasets.DatasetDict({"validation": _ds(TASKS)}).save_to_disk(str(tmp_path / "one"))
    assert len(load_tasks(tmp_path / "one")) == 3
    _dataset(tmp_path / "single", TASKS)
    with pytest.raises(RaditError, match="a single Dataset, not a DatasetDict"):
        load_tasks(f"{tmp_path / 'single'}:train")


def test_record_errors_name_the_file_and_row(tmp_path):
    bad = [TASKS[0], {"id": "q9", "input": "", "output": [{"answer": "x"}]}]
    path = _parquet(tmp_path / "bad.parquet", bad)
    with pytest.raises(RaditError, match=rf"^{path}:2 \(id 'q9'\): empty field 'input'"):
        load_tasks(path)
    dup = _dataset(tmp_path / "dup", [TASKS[0], TASKS[1], TASKS[0]])
    with pytest.raises(RaditError, match=rf"^{dup}:3: duplicate id 'q1'"):
        load_tasks(dup)
    wrong = _parquet(tmp_path / "wrong.parquet", [{"id": "q1", "input": "x", "output": [{"answer": "a"}],
                                                    "label": 1}])
    with pytest.raises(RaditError, match=r"wrong.parquet:1 \(id 'q1'\)|wrong.parquet:1: unknown field"):
        load_tasks(wrong)
    corpus = _parquet(tmp_path / "corpus.parquet", [CORPUS[0], {"id": "d9", "title": "t", "text": "  "}])
    with pytest.raises(RaditError, match=rf"^{corpus}:2: empty text in document 'd9'"):
        list(iter_corpus(corpus))
    garbage = tmp_path / "broken.parquet"
    garbage.write_bytes(b"PAR1" + b"\0" * 64)
    with pytest.raises(RaditError, match=r"broken.parquet: not a readable Parquet file"):
        load_tasks(garbage)
    with pytest.raises(RaditError, match="no such file or folder"):
        load_tasks(tmp_path / "nothing.parquet")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(RaditError, match="not a Hugging Face datasets folder"):
        list(iter_records(tmp_path / "empty_dir"))


def test_missing_optional_packages_name_the_extra(tmp_path, monkeypatch):
    paths = _inputs(tmp_path, TASKS, "tasks")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if not installed
    with pytest.raises(RaditError, match=r"needs the package pyarrow \(pip install radit-fast\[hf\]\)"):
        load_tasks(paths["parquet"])
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(RaditError, match=r"needs the package datasets \(pip install radit-fast\[hf\]\)"):
        load_tasks(paths["datasets"])
    assert len(load_tasks(paths["jsonl"])) == 3  # JSON lines need neither


def test_cli_reports_record_errors_on_one_line(tmp_path, capsys):
    bad = _parquet(tmp_path / "corpus.parquet", [{"id": "d1", "title": "t"}])
    code = main(["index", "build", "--corpus", str(bad), "--out", str(tmp_path / "idx")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"radit: error: {bad}:1: missing field 'text'"
    code = main(["index", "build", "--corpus", f"{tmp_path}:nosplit", "--out", str(tmp_path / "idx")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("radit: error: ") and "\n" not in err


def test_records_sha256_identifies_content(tmp_path):
    paths = _inputs(tmp_path, TASKS, "tasks")
    assert records_sha256(paths["jsonl"]) == sha256_file(paths["jsonl"])  # unchanged for files
    first = records_sha256(paths["datasets"])
    assert first == records_sha256(paths["datasets"])
    _dataset(tmp_path / "other", TASKS[:2])
    assert records_sha256(tmp_path / "other") != first
    dd = datasets.DatasetDict({"a": _ds(TASKS), "b": _ds(TASKS)})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert records_sha256(f"{tmp_path / 'dd'}:a") != records_sha256(f"{tmp_path / 'dd'}:b")


def test_json_lines_unchanged(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(TASKS[0]) + "\n\n" + json.dumps({"id": "x", "input": "y", "output": None}) + "\n")
    with pytest.raises(RaditError, match=rf"^{path}:3 \(id 'x'\): missing field 'output'"):
        load_tasks(path)


@pytest.mark.slow
def test_train_retriever_reads_a_dataset_dict_split(tmp_path):
    """Stage 2 end to end with --train FOLDER:SPLIT: the examples, the resume fingerprint and the run."""
    from test_training_fixtures import cached_setup, retriever_config

    from radit_fast.records import read_jsonl
    from radit_fast.training import train_retriever

    p = cached_setup(tmp_path / "setup")
    rows = read_jsonl(p["train"])
    dd = datasets.DatasetDict({"train": _ds(rows), "validation": _ds(rows[:4])})
    dd.save_to_disk(str(tmp_path / "tasks"))
    cfg = retriever_config(p, tmp_path / "r", train=f"{tmp_path / 'tasks'}:train", save_every=2)
    out = train_retriever(cfg)
    assert (out / "modules.json").is_file() and len(read_jsonl(out / "metrics.jsonl")) >= 2
    (state_file,) = (out / "checkpoints").glob("*/trainer_state.json")
    state = json.loads(state_file.read_text())
    assert state["fingerprint"]["train_sha256"] == records_sha256(cfg.train)
