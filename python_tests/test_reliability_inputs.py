"""Issue 12, classes 2, 3, 5, 6, 7, 8 and 10: wrong kinds of model, k larger than the index, duplicate
document ids, crafted checkpoints, nothing created before the inputs pass, one-line errors, optional extras.

Every CLI failure must be exactly one line ``radit: error: ...`` with exit code 2, no usage block and no
traceback. Uses the tiny offline Llama / BERT / 24-passage index of test_training_fixtures.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from radit_fast.cli.main import main
from radit_fast.io import RaditError
from test_training_fixtures import cached_setup, lm_config, write_jsonl

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return cached_setup(tmp_path_factory.mktemp("reliab") / "tiny")


def one_line(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("radit: error:")]
    assert code == 2 and len(lines) == 1, (code, err)
    assert "Traceback" not in err and "usage:" not in err, err
    return lines[0]


def _train_argv(tiny, out, *extra, cmd="train-lm"):
    return [cmd, "--train", tiny["train"], "--index", tiny["index"], "--lm", tiny["lm"], "--out", out,
            "--max-steps", 1, "--batch-size", 4, "--max-length", 64, "--no-progress", *extra]


# -------------------------------------------------------------------------- class 8: one-line errors
@pytest.mark.parametrize("argv, message", [
    (["index", "build", "--corpus", "c", "--out", "o", "--chunk-words", "0"],
     "argument --chunk-words: expected a positive integer, got '0'"),
    (["index", "build", "--corpus", "c", "--out", "o", "--batch-size", "0"], "argument --batch-size"),
    (["index", "build", "--corpus", "c", "--out", "o", "--max-length", "0"], "argument --max-length"),
    (["retrieve", "--index", "i", "--queries", "q", "--out", "o", "--k", "-3"], "argument --k"),
    (["index", "build", "--out", "o"], "the following arguments are required: --corpus"),
    (["index", "build", "--corpus", "c", "--out", "o", "--device", "tpu"], "argument --device: invalid choice"),
    (["train-lm", "--k", "zero"], "argument --k"),
    (["eval", "--k", "x"], "argument --k"),
    (["no-such-command"], "invalid choice"),
])
def test_argparse_rejections_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("radit: error: ") and message in err, err


def test_a_folder_given_as_an_input_file_says_so(tiny, tmp_path, capsys):
    folder = tmp_path / "dir.jsonl"
    folder.mkdir()
    line = one_line(capsys, "index", "build", "--corpus", folder, "--out", tmp_path / "idx")
    # a folder is a valid input when it is a datasets or Parquet folder (radit_fast.records.record_source)
    assert f"{folder}: is a folder, not a file" in line and line.endswith("(--corpus)")
    line = one_line(capsys, "retrieve", "--index", tiny["index"], "--queries", folder, "--out", tmp_path / "r.jsonl")
    assert f"{folder}: is a folder, not a file" in line
    line = one_line(capsys, *_train_argv(tiny, tmp_path / "o", "--config", folder))
    assert f"{folder}: is a folder, not a file (config file)" in line
    line = one_line(capsys, "train-lm", "--train", folder, "--index", tiny["index"], "--lm", tiny["lm"],
                    "--out", tmp_path / "o")
    assert f"{folder}: is a folder, not a file" in line
    # an output file that is a folder
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "input": "x"}])
    line = one_line(capsys, "retrieve", "--index", tiny["index"], "--queries", queries, "--out", folder)
    assert "is a folder; --out must name a file" in line
    assert not (tmp_path / "idx").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad, reason", [
    ('{"id": "a", "text": "x\ty"}', "Invalid control character at column 23"),
    ('{"id": "a", "text": "x', "Unterminated string starting at column 21"),
    ('{"id": "a" "text": "x"}', "Expecting ',' delimiter at column 12"),
])
def test_json_errors_read_naturally(tmp_path, capsys, bad, reason):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "z", "text": "ok"}\n' + bad)  # the last line without its newline
    line = one_line(capsys, "index", "build", "--corpus", corpus, "--out", tmp_path / "idx")
    assert line.endswith(f"c.jsonl:2: malformed JSON ({reason})") and "at at" not in line


# -------------------------------------------------------------------- class 3: k larger than the index
def test_k_larger_than_the_index_is_refused_by_every_command(tiny, tmp_path, capsys):
    msg = "--k 25 is larger than the index (24 passages)"
    assert msg in one_line(capsys, *_train_argv(tiny, tmp_path / "lm", "--k", 25))
    assert msg in one_line(capsys, *_train_argv(tiny, tmp_path / "r", "--k", 25, "--cache-dir", tmp_path / "c",
                                                cmd="train-retriever"))
    assert msg in one_line(capsys, "eval", "--test", tiny["train"], "--index", tiny["index"], "--lm", tiny["lm"],
                           "--k", 25, "--out", tmp_path / "ev", "--no-progress")
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "input": "Paris?"}])
    assert msg in one_line(capsys, "retrieve", "--index", tiny["index"], "--queries", queries, "--k", 25,
                           "--out", tmp_path / "r.jsonl")
    assert not any(p.name in ("lm", "r", "ev", "r.jsonl", "c") for p in tmp_path.iterdir())


def test_check_k_is_the_one_rule():
    from radit_fast.retrieval.index import check_k

    check_k(24, 24)
    for k, match in ((25, r"--k 25 is larger than the index \(24 passages\)"), (0, "must be >= 1"),
                     (True, "must be >= 1")):
        with pytest.raises(RaditError, match=match):
            check_k(k, 24)
    with pytest.raises(RaditError, match=r"eval.k=30 is larger"):
        check_k(30, 24, "eval.k")


def test_training_sources_refuse_instead_of_clamping(tiny):
    from radit_fast.training import sources

    with pytest.raises(RaditError, match="--k 25 is larger than the index"):
        sources.open_index(tiny["index"], k=25)
    index = sources.open_index(tiny["index"], k=24)
    with pytest.raises(RaditError, match="--k 30 is larger than the index"):
        index.retrieve_rows(["Paris"], 30)
    assert index.retrieve_rows(["Paris"], 24).shape == (1, 24)


# --------------------------------------------------------------------------- class 2: model kinds
def test_an_encoder_is_not_a_causal_lm(tiny, tmp_path, capsys):
    from radit_fast.models import check_lm, load_lm

    with pytest.raises(RaditError, match=r"not a causal LM \(BertModel is an encoder"):
        check_lm(tiny["encoder"])
    with pytest.raises(RaditError, match="not a causal LM"):
        load_lm(tiny["encoder"])
    for cmd, extra in (("train-lm", []), ("train-retriever", ["--cache-dir", tmp_path / "c"])):
        argv = _train_argv(tiny, tmp_path / cmd, *extra, cmd=cmd)
        argv[argv.index("--lm") + 1] = tiny["encoder"]
        line = one_line(capsys, *argv)
        assert f"--lm {tiny['encoder']}: not a causal LM (BertModel is an encoder" in line
        assert not (tmp_path / cmd).exists()
    line = one_line(capsys, "eval", "--test", tiny["train"], "--lm", tiny["encoder"], "--k", 0,
                    "--out", tmp_path / "ev", "--no-progress")
    assert "not a causal LM" in line and not (tmp_path / "ev").exists()


def test_bert_with_a_masked_lm_head_or_without_architectures(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from radit_fast.models import check_lm, model_kind

    cfg = BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    BertForMaskedLM(cfg).save_pretrained(tmp_path / "mlm")
    with pytest.raises(RaditError, match=r"not a causal LM \(BertForMaskedLM is an encoder"):
        check_lm(tmp_path / "mlm")
    assert model_kind(BertConfig()) == "encoder" and model_kind(BertConfig(is_decoder=True)) == "causal-lm"
    assert model_kind(BertConfig(architectures=["BertLMHeadModel"])) == "causal-lm"


def test_a_causal_lm_is_not_an_encoder(tiny, tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "x"}])
    line = one_line(capsys, "index", "build", "--corpus", corpus, "--out", tmp_path / "idx", "--encoder", tiny["lm"])
    assert f"--encoder {tiny['lm']}: not an encoder (LlamaForCausalLM is a causal LM)" in line
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "input": "x"}])
    line = one_line(capsys, "retrieve", "--index", tiny["index"], "--queries", queries, "--out", tmp_path / "r.jsonl",
                    "--query-encoder", tiny["lm"])
    assert "--query-encoder" in line and "not an encoder" in line
    assert not (tmp_path / "idx").exists() and not (tmp_path / "r.jsonl").exists()


def test_weights_the_checkpoint_lacks_are_refused(tiny, tmp_path):
    """A causal-LM folder whose safetensors lack a layer would run with random weights there."""
    from safetensors.torch import load_file, save_file

    from radit_fast.models import load_lm

    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tiny["lm"], broken)
    tensors = load_file(str(broken / "model.safetensors"))
    dropped = [k for k in tensors if k.startswith("model.layers.1.mlp")]
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(broken / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(RaditError, match=r"the checkpoint lacks weights the model needs \(model.layers.1.mlp"):
        load_lm(broken)


# ------------------------------------------------------------------ class 5: duplicate document ids
def test_duplicate_document_ids_are_refused_whatever_the_chunking(tmp_path, capsys):
    from radit_fast.retrieval.build import check_corpus, write_store

    long = " ".join(f"w{i}" for i in range(30))
    for rows in ([{"id": "a", "text": long}, {"id": "b", "text": "x"}, {"id": "a", "text": "short"}],
                 [{"id": "a", "text": "short"}, {"id": "b", "text": "x"}, {"id": "a", "text": long}],
                 [{"id": "a", "text": long}, {"id": "b", "text": "x"}, {"id": "a", "text": long}]):
        corpus = write_jsonl(tmp_path / "c.jsonl", rows)
        with pytest.raises(RaditError, match=r"c.jsonl:3: duplicate id 'a' \(first at line 1\)"):
            check_corpus(corpus, 10)
        store = tmp_path / "store"
        store.mkdir(exist_ok=True)
        with pytest.raises(RaditError, match=r"c.jsonl:3: duplicate id 'a' \(first at line 1\)"):
            write_store(corpus, store, 10)
        line = one_line(capsys, "index", "build", "--corpus", corpus, "--out", tmp_path / "idx", "--chunk-words", 10)
        assert "c.jsonl:3: duplicate id 'a' (first at line 1)" in line and not (tmp_path / "idx").exists()
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"id": "a", "text": long}, {"id": "a#x", "text": "y"}])
    assert check_corpus(ok, 10) == 2


# --------------------------------------------------------------------- class 6: crafted checkpoints
@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    from radit_fast.training import train_lm
    from radit_fast.training.checkpoint import latest_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "run"
    train_lm(lm_config(tiny, out, max_steps=1, save_every=1))
    return latest_checkpoint(out / "checkpoints")


def _crafted(checkpoint: Path, tmp_path: Path, edit) -> Path:
    import shutil

    c = tmp_path / "run" / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint.parent.parent, tmp_path / "run")
    manifest = json.loads((c / "MANIFEST.json").read_text())
    edit(manifest, c)
    (c / "MANIFEST.json").write_text(json.dumps(manifest))
    return c


@pytest.mark.parametrize("edit, message", [
    (lambda m, c: m.update(files=[]), "field files must be an object"),
    (lambda m, c: m.update(files={}), "field files lacks params.safetensors, trainer_state.json"),
    (lambda m, c: m["files"]["params.safetensors"].pop("bytes"),
     "field files['params.safetensors'].bytes must be a non-negative integer, got nothing"),
    (lambda m, c: m["files"].update({"../../secret.bin": {"bytes": 1, "sha256": "0" * 64}}),
     "field files['../../secret.bin'] must be a file of the folder (a plain name)"),
    (lambda m, c: m["files"]["trainer_state.json"].update(sha256="xyz"), "sha256 must be 64 lowercase hex digits"),
    (lambda m, c: m.update(step="7"), "field step must be a non-negative integer"),
    (lambda m, c: m.pop("files"), "has no files entry"),
])
def test_crafted_checkpoint_manifests(checkpoint, tmp_path, edit, message):
    from radit_fast.training.checkpoint import CheckpointError, load_checkpoint

    (tmp_path / "secret.bin").write_bytes(b"s" * 12345)  # what a ../ name would reach
    c = _crafted(checkpoint, tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(c)
    assert message in str(info.value) and "\n" not in str(info.value) and "12345" not in str(info.value)


def test_crafted_checkpoint_through_resume_is_one_line(tiny, checkpoint, tmp_path, capsys):
    c = _crafted(checkpoint, tmp_path, lambda m, c: m.update(files=[]))
    (c.parent.parent / "train_state.json").unlink()  # as if killed after its checkpoint
    line = one_line(capsys, *_train_argv(tiny, c.parent.parent, "--resume", "--save-every", 1, "--threads", 1))
    assert "corrupt manifest (field files must be an object" in line


def test_pickled_weights_are_one_line_and_never_unpickled(checkpoint, tmp_path):
    import hashlib

    from radit_fast.training.checkpoint import CheckpointError, load_checkpoint

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    def swap(m, c):
        import pickle

        data = pickle.dumps(Boom())
        (c / "params.safetensors").write_bytes(data)
        m["files"]["params.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    c = _crafted(checkpoint, tmp_path, swap)
    with pytest.raises(CheckpointError, match=r"params.safetensors: not a safetensors file .*never loads pickled"):
        load_checkpoint(c)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------- class 7: nothing before inputs
def test_training_input_errors_leave_no_out_folder(tiny, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "q", "input": "x"}])  # no output
    for cmd, extra in (("train-lm", []), ("train-retriever", ["--cache-dir", tmp_path / "c"])):
        argv = _train_argv(tiny, tmp_path / cmd, *extra, cmd=cmd)
        argv[argv.index("--train") + 1] = bad
        one_line(capsys, *argv)
        assert not (tmp_path / cmd).exists()


def test_run_checks_the_corpus_before_writing(tiny, tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"id": "d", "input": "x?", "output": [{"answer": "y"}]}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"id": "t", "input": "x?", "output": [{"answer": "y"}]}])
    line = one_line(capsys, "run", "--corpus", corpus, "--train", tiny["train"], "--dev", dev, "--test", test,
                    "--out", tmp_path / "run", "--lm", tiny["lm"], "--encoder", tiny["encoder"])
    assert "c.jsonl:2: duplicate id 'a' (first at line 1)" in line and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ class 10: optional dependencies
HIDE = r"""
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("accelerate", "gguf"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, Hide())
import importlib.util
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in ("accelerate", "gguf") else real(name, *a)
from radit_fast.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_missing_extras_name_the_extra(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RADIT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    train = write_jsonl(tmp_path / "t.jsonl", [{"id": "q", "input": "x?", "output": [{"answer": "y"}]}])
    proc = subprocess.run([sys.executable, "-c", HIDE, "eval", "--test", str(train), "--k", "0", "--out",
                           str(tmp_path / "ev"), "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("radit: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "accelerate" in lines[0] and "pip install 'radit-fast[models]'" in lines[0]
    assert not (tmp_path / "ev").exists()


def test_eval_never_mixes_its_results_with_another_runs(tiny, tmp_path, capsys, monkeypatch):
    import radit_fast.evaluation.evaluate as ev

    real = ev.evaluate_examples
    out = tmp_path / "ev"

    def meanwhile(*a, **kw):  # another `radit eval --out ev` finished while this one computed
        out.mkdir()
        (out / "metrics.json").write_text('{"theirs": 1}')
        return real(*a, **kw)

    monkeypatch.setattr(ev, "evaluate_examples", meanwhile)
    argv = ["eval", "--test", tiny["train"], "--lm", tiny["lm"], "--k", 0, "--out", out, "--no-progress",
            "--max-new-tokens", 2, "--limit", 2]
    assert "appeared while this run was writing it" in one_line(capsys, *argv)
    assert json.loads((out / "metrics.json").read_text()) == {"theirs": 1} and sorted(os.listdir(out)) == ["metrics.json"]
    monkeypatch.setattr(ev, "evaluate_examples", real)
    assert main([str(a) for a in argv + ["--overwrite"]]) == 0
    assert "metrics" in json.loads((out / "metrics.json").read_text())
