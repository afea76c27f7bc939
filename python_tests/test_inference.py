"""The inference API and `radit ask` on a tiny `radit run` folder built here (real pipeline, tiny models):
same predictions as `radit eval` (one code path), ensemble scores against a float64 transformers
reference, the module's doctest, and the command line."""
from __future__ import annotations

import doctest
import io
import json
import math

import pytest
import torch
import yaml
from test_pipeline import TINY_FILE, _tasks
from test_training_fixtures import corpus_rows, tiny_encoder, tiny_lm, write_jsonl

import radit_fast.inference as inference
from radit_fast.evaluation import evaluate as E
from radit_fast.inference import RaditSystem
from radit_fast.io import RaditError

Q = "What is the capital of France?"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished `radit run` folder (about 40 s on 2 cores): tuned LM, tuned query encoder, index."""
    from radit_fast.cli.main import main

    root = tmp_path_factory.mktemp("ask_run")
    inp = {"lm": tiny_lm(root / "lm"), "encoder": tiny_encoder(root / "encoder"),
           "corpus": write_jsonl(root / "corpus.jsonl", corpus_rows()),
           "train": write_jsonl(root / "train.jsonl", _tasks(range(0, 6)) + _tasks(range(0, 4), mc=True)),
           "dev": write_jsonl(root / "dev.jsonl", _tasks(range(6, 8))),
           "test": write_jsonl(root / "test.jsonl", _tasks(range(9, 11)))}
    cfg = root / "run.yaml"
    cfg.write_text(yaml.safe_dump(TINY_FILE))
    out = root / "run"
    assert main(["run", "--corpus", str(inp["corpus"]), "--train", str(inp["train"]), "--dev", str(inp["dev"]),
                 "--test", str(inp["test"]), "--out", str(out), "--lm", str(inp["lm"]), "--encoder",
                 str(inp["encoder"]), "--config", str(cfg), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def system(run):
    return RaditSystem.from_run(run, device="cpu", dtype="fp32")


def test_doctest(run):
    res = doctest.testmod(inference, extraglobs={"run_folder": run}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 6 and res.failed == 0


def test_from_run_reads_the_run(run, system):
    assert system.settings.k == TINY_FILE["eval"]["k"] and system.settings.max_length == 96
    assert system.retriever.query_encoder is not None and system.model.dtype == torch.float32
    with pytest.raises(RaditError, match="not a radit run folder"):
        RaditSystem.from_run(run / "index")
    with pytest.raises(RaditError, match="tuned or base"):
        RaditSystem.from_run(run, lm="best")


def test_same_predictions_as_radit_eval(run, system, tmp_path, monkeypatch):
    """`radit eval` on the same questions, parts and settings gives the same answers, passages and scores,
    and both go through evaluate.predict_examples."""
    from radit_fast.cli.main import main

    calls = []
    real = E.predict_examples

    def spy(*a, **k):
        calls.append(k.get("score_answers", False))
        return real(*a, **k)

    monkeypatch.setattr(E, "predict_examples", spy)
    rows = _tasks(range(0, 3)) + _tasks(range(3, 5), mc=True)
    test = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "e"
    assert main(["eval", "--test", str(test), "--out", str(out), "--index", str(run / "index" / "index"),
                 "--query-encoder", str(run / "train_retriever" / "selected"),
                 "--lm", str(run / "train_lm" / "selected"), "--k", "2", "--max-new-tokens", "3",
                 "--max-length", "96", "--no-progress"]) == 0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    gen = system.generate([r["input"] for r in rows[:3]])
    mc = system.choose([r["input"] for r in rows[3:]], [r["choices"] for r in rows[3:]])
    assert calls == [False, True, True]
    for p, a in zip(preds, gen + mc):
        assert p["prediction"] == a.text
        assert p["passages"] == [x.id for x in a.passages]
        assert p["retriever_scores"] == pytest.approx([x.score for x in a.passages], abs=1e-6)
        if "choice_logprobs" in p:
            assert p["choice_logprobs"] == pytest.approx(a.choice_logprobs, abs=1e-4)
            assert a.logprob == a.choice_logprobs[a.choices.index(a.text)]


def _ref_logprob(model, ids, n_answer):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = logits.log_softmax(-1)
    start = len(ids) - n_answer
    return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))


def test_score_and_weights_match_float64_reference(system):
    """log p(a | q) = logsumexp_i(log softmax(s / tau)_i + log p_LM(a | c_i o q)) in float64 with plain
    transformers; the passages' weights are the softmax of the retriever's own scores."""
    from radit_fast.data.prompts import build_prompt
    from radit_fast.retrieval.corpus import passage_text
    from radit_fast.evaluation.scoring import answer_ids

    tau = 0.5
    got = system.score(Q, "Paris", k=2, retriever_temperature=tau)
    res = system.retriever.retrieve([Q], 2)
    scores = res.scores[0].double()
    ans = answer_ids(system.tokenizer, "Paris")
    ref_model = type(system.model)(system.model.config).double()
    ref_model.load_state_dict(system.model.state_dict())
    ref_model.eval()
    per_chunk = []
    for p in res.passages[0]:
        prompt = build_prompt(system.tokenizer, passage_text(p.title, p.text), Q, max_length=96,
                              reserve=len(ans)).input_ids
        per_chunk.append(_ref_logprob(ref_model, prompt + ans, len(ans)))
    want = float(torch.logsumexp((scores / tau).log_softmax(0) + torch.tensor(per_chunk, dtype=torch.float64), 0))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4)
    [a] = system.generate([Q], retriever_temperature=tau)
    w = (scores / tau).softmax(0).tolist()
    assert [p.weight for p in a.passages] == pytest.approx(w, abs=1e-6)
    assert [p.id for p in a.passages] == [p.id for p in res.passages[0]]
    if a.text:  # the answer's log-probability is the ensemble score of that text
        assert a.logprob == pytest.approx(system.score(Q, a.text, retriever_temperature=tau), abs=1e-4)


def test_batched_equals_one_by_one_and_lm_alone(system):
    qs = [Q, "What is the capital of Spain?", "What is the capital of Italy?"]
    batch = system.generate(qs, decode="rescore")
    for q, b in zip(qs, batch):
        [one] = system.generate([q], decode="rescore")
        assert one.text == b.text and [p.id for p in one.passages] == [p.id for p in b.passages]
    [alone] = system.generate([Q], k=0)
    assert alone.passages == []
    with pytest.raises(TypeError, match="unknown inference option"):
        system.generate([Q], temperature=2.0)
    with pytest.raises(TypeError, match="list of strings"):
        system.generate(Q)
    with pytest.raises(RaditError, match="choices"):
        system.choose(Q, ["Paris"])


def _ask(argv, capsys, monkeypatch, stdin=None):
    from radit_fast.cli.main import main

    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(["ask", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_radit_ask(run, capsys, monkeypatch):
    code, out, err = _ask(["--run", str(run), "--dtype", "fp32", Q], capsys, monkeypatch)
    assert code == 0, err
    assert out.startswith(f"Q: {Q}\nA: ") and "   [1] " in out and "   [2] " in out and "   [3] " not in out
    code, out, err = _ask(["--run", str(run), "--json", "--k", "3"], capsys, monkeypatch,
                          stdin=f"{Q}\n\n  What is the capital of Spain?  \n")
    assert code == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["question"] for x in lines] == [Q, "What is the capital of Spain?"]
    for x in lines:
        assert len(x["passages"]) == 3 and math.isclose(sum(p["weight"] for p in x["passages"]), 1.0, rel_tol=1e-6)
    code, out, _ = _ask(["--run", str(run), "--json", "--choices", "Paris|Rome", Q], capsys, monkeypatch)
    [x] = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and x["text"] in ("Paris", "Rome") and len(x["choice_logprobs"]) == 2
    # the parts one by one, and the base models of the run
    code, out, err = _ask(["--lm", str(run / "train_lm" / "selected"), "--index", str(run / "index" / "index"),
                           "--k", "1", Q], capsys, monkeypatch)
    assert code == 0 and "   [1] " in out and "   [2] " not in out, err
    code, out, err = _ask(["--run", str(run), "--base-lm", "--base-retriever", "--k", "0", Q], capsys, monkeypatch)
    assert code == 0 and "[1]" not in out, err


@pytest.mark.parametrize("argv, stdin, msg", [
    (["--run", "/no/such/run", "q?"], None, "not a radit run folder"),
    (["--run", "RUN", "--lm", "x", "q?"], None, "drop --lm"),
    (["--k", "2", "q?"], None, "--k > 0 needs --index"),
    (["--base-lm", "q?"], None, "need --run"),
    (["--run", "RUN", "--choices", "Paris", "q?"], None, "at least 2"),
    (["--run", "RUN"], "\n  \n", "no question on stdin"),
])
def test_radit_ask_errors(run, capsys, monkeypatch, argv, stdin, msg):
    argv = [str(run) if a == "RUN" else a for a in argv]
    code, _, err = _ask(argv, capsys, monkeypatch, stdin=stdin if stdin is not None else "")
    assert code == 2 and msg in err and err.count("\n") == 1, err



@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_gpu_bf16_agrees_with_cpu_fp32(run, system):
    """dtype="auto" on a GPU with bf16 runs the LM in bfloat16; scores agree with CPU float32 to bf16 accuracy."""
    gpu = RaditSystem.from_run(run, device="cuda", dtype="auto")
    assert gpu.model.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    want = system.score([Q, "What is the capital of Spain?"], ["Paris", "Madrid"])
    got = gpu.score([Q, "What is the capital of Spain?"], ["Paris", "Madrid"])
    assert got == pytest.approx(want, rel=0.05, abs=0.5)
    [a] = gpu.generate([Q])
    assert [p.id for p in a.passages] == [p.id for p in system.generate([Q])[0].passages]

# ------------------------------------------------------------------ the paper's table, in miniature
def test_paper_run_file_is_valid(tmp_path):
    from pathlib import Path

    from radit_fast.config.run import load_run_file, make_config

    path = Path(inference.__file__).parent / "pipeline" / "paper.yaml"
    cfg = make_config(corpus="c", train="t", dev="d", test="e", out=str(tmp_path / "o"), file=load_run_file(path))
    assert cfg.eval.k == 10 and cfg.eval.max_length == 2048 and cfg.run.chunk_words == 200
    assert cfg.lm_config(tmp_path / "x").k == 3 and cfg.retriever_config(tmp_path / "y").lm_temperature == 0.01


def test_paper_table_in_miniature(run, tmp_path, capsys):
    """`radit eval --task paper` on the tiny run: five rows x MMLU/NQ/TQA/ELI5 x 0/1-shot, each cell the
    paper's metric of that task's own evaluation, Avg their mean, the LM-alone row without passages."""
    from test_eval_native import _kilt_nq
    from test_kilt_readers import _mmlu, _prov, _write

    from radit_fast.cli.main import main
    from radit_fast.pipeline.paper import ROWS

    short = {"arithmetic": [[f"{a}+{a}?", str(a), str(2 * a), str(3 * a), str(4 * a), "B"] for a in (1, 2, 3)]}
    mmlu = _mmlu(tmp_path / "mmlu", "test", short)
    _mmlu(mmlu, "dev", {"arithmetic": [["5+5?", "10", "5", "0", "1", "A"]]})
    nq = _kilt_nq(4)
    files = {"mmlu": mmlu, "nq": _write(tmp_path / "nq-dev-kilt.jsonl", nq[2:]),
             "triviaqa": _write(tmp_path / "triviaqa-dev-kilt.jsonl", [{**r, "id": "t" + r["id"]} for r in nq[:2]]),
             "eli5": _write(tmp_path / "eli5-dev-kilt.jsonl", [
                 {"id": "e1", "input": "why is Paris the capital of France",
                  "output": [{"answer": "Paris has been the seat of the French kings for centuries."},
                             {"provenance": [_prov("cap0", "Paris")]}]}])}
    pool = _write(tmp_path / "nq-train-kilt.jsonl", [{**r, "id": "p" + r["id"]} for r in nq[:2]])
    eli5_pool = _write(tmp_path / "eli5-train-kilt.jsonl", [{"id": "e0", "input": "why rain", "output": [
        {"answer": "Clouds cool."}]}])
    out = tmp_path / "table"
    argv = ["eval", "--task", "paper", "--run", str(run), "--out", str(out), "--paper-shots", "0,1",
            "--tasks", *[f"{k}={v}" for k, v in files.items()],
            "--shot-pools", f"nq={pool}", f"triviaqa={pool}", f"eli5={eli5_pool}",
            "--long-form-tokens", "6", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "## 0-shot" in printed and "## 1-shot" in printed and "| row | MMLU | NQ | TQA | ELI5 | Avg |" in printed
    table = json.loads((out / "paper_table.json").read_text())
    assert table["metrics"] == {"mmlu": "accuracy", "nq": "em", "triviaqa": "em", "eli5": "rougel"}
    for shots in ("0", "1"):
        assert list(table["results"][shots]) == list(ROWS)
        for row, cells in table["results"][shots].items():
            for task, metric in table["metrics"].items():
                m = json.loads((out / "cells" / f"{row}-{task}-{shots}shot" / "metrics.json").read_text())
                assert cells["tasks"][task] == m[metric]
            assert cells["avg"] == pytest.approx(sum(cells["tasks"].values()) / 4)
    lm_only = (out / "cells" / "lm_only-nq-0shot" / "predictions.jsonl").read_text().splitlines()
    assert all(json.loads(x)["passages"] == [] for x in lm_only)
    replug = [json.loads(x) for x in (out / "cells" / "replug-nq-0shot" / "predictions.jsonl").read_text().splitlines()]
    assert all(len(x["passages"]) == TINY_FILE["eval"]["k"] for x in replug)
    code = main(["eval", "--task", "paper", "--run", str(run), "--out", str(tmp_path / "t2"),
                 "--tasks", f"nq={files['nq']}"])
    assert code == 2 and "5-shot needs a train file" in capsys.readouterr().err
    code = main(["eval", "--task", "paper", "--run", str(run), "--out", str(tmp_path / "t3"),
                 "--tasks", f"mmlu={_mmlu(tmp_path / 'long', 'test', {'x': [['why? ' * 60, '1', '2', '3', '4', 'A']]})}",
                 "--paper-shots", "0"])
    assert code == 2 and "task mmlu, 0-shot: example x-test-1: question and answer alone" in capsys.readouterr().err
    assert not (tmp_path / "t3").exists()
