"""Both tuning stages on a tiny random Llama, a tiny BERT encoder and a 24-passage index (seconds)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from radit_fast.io import RaditError
from radit_fast.config.stages import RaItConfig
from radit_fast.training import train_lm, train_retriever
from test_training_fixtures import cached_setup, lm_config, retriever_config, task_rows, tiny_encoder, write_jsonl

torch.set_num_threads(1)


@pytest.fixture
def tiny(tmp_path):
    return cached_setup(tmp_path / "tiny")


_lm_cfg = lm_config
_r_cfg = retriever_config


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


# ------------------------------------------------------------------------------------------- stage 1
def test_answer_loss_matches_full_logits_cross_entropy(tiny):
    """The fused loss equals HF's CrossEntropyLoss over answer-only labels, packed or padded, with grads."""
    from radit_fast.data.prompts import build_instance, collate_packed, collate_padded
    from radit_fast.models import load_lm
    from radit_fast.training.ra_it import AnswerNLL

    lm, tok = load_lm(tiny["lm"])
    insts = [build_instance(tok, "Paris is the capital of France." * (i + 1), f"What is the capital {i}?",
                            ["Paris", "Rome is big", "Oslo"][i % 3], max_length=64) for i in range(5)]
    pad = tok.pad_token_id
    padded = collate_padded(insts, pad)
    labels = torch.full_like(padded["input_ids"], -100)
    for b, inst in enumerate(insts):
        labels[b, inst.answer_start:inst.length] = torch.tensor(inst.answer_ids)
    ref = lm(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=labels).loss
    ref_grad = torch.autograd.grad(ref, lm.model.layers[0].mlp.up_proj.weight)[0]
    n = sum(i.answer_len for i in insts)
    module = AnswerNLL(lm)
    for batch in (padded, collate_packed(insts, pad, max_tokens=64), collate_packed(insts, pad)):
        out = module({"batch": batch, "norm": float(n), "world": 1, "tokens": 0, "instances": 5})
        torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-5)
        grad = torch.autograd.grad(out["loss"], lm.model.layers[0].mlp.up_proj.weight)[0]
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_train_lm_outputs_loadable_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = train_lm(_lm_cfg(tiny, tmp_path / "out", eval_file=str(tiny["train"]), eval_every=3))
    before = AutoModelForCausalLM.from_pretrained(tiny["lm"])
    after = AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(before.model.layers[0].mlp.up_proj.weight, after.model.layers[0].mlp.up_proj.weight)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["tokens_per_s"] > 0 and r["instances_per_s"] > 0 and r["lr"] > 0 for r in steps)
    # 12 examples x k = 3 chunks: an example counts 1/3 per instance
    assert all(r["examples_per_s"] == pytest.approx(r["instances_per_s"] / 3, rel=0.01) for r in steps)
    assert any(r.get("event") == "eval" and r["eval_loss"] > 0 for r in rows)
    assert "max_length: 64" in (out / "radit_config.yaml").read_text()


def test_train_lm_lora_bf16_checkpointing_corpus_context(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    write_jsonl(tiny["train"], task_rows(12, context_every=3))
    out = train_lm(_lm_cfg(tiny, tmp_path / "out", lora=True, lora_r=4, bf16=True, gradient_checkpointing=True,
                           corpus_fraction=0.3, packing=False, max_steps=2))
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_build_data_instances(tiny):
    """One instance per retrieved chunk (k), gold context used once, corpus items added, answers last;
    task answers end with EOS (default), corpus continuations never do."""
    from radit_fast.models import load_tokenizer
    from radit_fast.training.ra_it import build_data

    write_jsonl(tiny["train"], task_rows(12, context_every=4))
    tok = load_tokenizer(tiny["lm"])
    data = build_data(_lm_cfg(tiny, "unused", k=2, corpus_fraction=0.25, max_length=48), tok)
    n_ctx = 3
    assert len(data.instances) - data.n_corpus == n_ctx + (12 - n_ctx) * 2
    assert data.n_corpus == round((n_ctx + 18) * 0.25 / 0.75)
    assert all(i.length <= 48 for i in data.instances)
    first = data.instances[0]
    assert tok.decode(first.answer_ids, skip_special_tokens=True).strip() == "Paris"
    eos = tok.eos_token_id
    tasks = [inst for inst, o in zip(data.instances, data.example_index) if o >= 0]
    corpus = [inst for inst, o in zip(data.instances, data.example_index) if o < 0]
    assert all(inst.answer_ids[-1] == eos and eos not in inst.answer_ids[:-1] for inst in tasks)
    assert corpus and all(eos not in inst.answer_ids for inst in corpus)
    plain = build_data(_lm_cfg(tiny, "unused", k=2, max_length=48, append_eos=False), tok)
    assert [i.answer_len + 1 for i in plain.instances] == [i.answer_len for i in tasks]
    assert all(eos not in i.answer_ids for i in plain.instances)


def test_append_eos_teaches_the_lm_to_stop(tiny, tmp_path):
    """Tuned with EOS after each answer, the LM's greedy continuation ends with EOS; without, it runs on."""
    from radit_fast.data.prompts import build_prompt
    from radit_fast.models import load_lm

    def stops(append_eos: bool) -> int:
        out = train_lm(_lm_cfg(tiny, tmp_path / f"eos-{append_eos}", max_steps=60, batch_size=12, lr=1e-2,
                               warmup_steps=2, k=1, append_eos=append_eos, randomize_markers=False))
        lm, tok = load_lm(out)
        n = 0
        for country in ("France", "Germany", "Italy"):
            ids = build_prompt(tok, None, f"What is the capital of {country}?", max_length=64).input_ids
            new = lm.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
            n += tok.eos_token_id in new
        return n

    with_eos = stops(True)
    assert with_eos == 3
    assert stops(False) < with_eos


@pytest.mark.parametrize("rows, msg", [
    ([{"id": "a", "input": "q?", "output": []}], "no answer"),
    ([{"id": "a", "input": "q?", "output": [{"answer": "word " * 80}]}], "more than --max-length"),
])
def test_bad_input_fails_before_compute(tiny, tmp_path, monkeypatch, rows, msg):
    import radit_fast.models as models
    import radit_fast.training.sources as sources

    monkeypatch.setattr(models, "load_lm", lambda *a, **k: pytest.fail("LM loaded before the input check"))
    monkeypatch.setattr(sources, "open_index", lambda *a, **k: pytest.fail("index opened before the input check"))
    write_jsonl(tiny["train"], rows)
    with pytest.raises(RaditError, match=msg):
        train_lm(_lm_cfg(tiny, tmp_path / "out"))
    with pytest.raises(RaditError, match=msg):
        train_retriever(_r_cfg(tiny, tmp_path / "out_r"))


# ------------------------------------------------------------------------------------------- stage 2
def test_train_retriever_updates_query_encoder_only(tiny, tmp_path):
    from radit_fast.retrieval.encoder import TextEncoder
    from radit_fast.retrieval.retriever import Retriever

    index_before = _tree_digest(tiny["index"])
    out = train_retriever(_r_cfg(tiny, tmp_path / "out", max_steps=1, e2e_weight=0.5))
    assert _tree_digest(tiny["index"]) == index_before
    old = TextEncoder.from_pretrained(tiny["encoder"])
    new = TextEncoder.from_pretrained(out)
    changed = [n for (n, a), (_, b) in zip(old.named_parameters(), new.named_parameters()) if not torch.equal(a, b)]
    assert changed, "no query-encoder weight changed after one step"
    r = Retriever.load(tiny["index"], out)  # accepted by the index as its query encoder's descendant
    assert r.retrieve(["What is the capital of France?"], k=3).rows.shape == (1, 3)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] >= 0 and rows[0]["e2e_nll"] > 0 and rows[0]["examples_per_s"] > 0
    assert rows[0]["tokens_per_s"] > 0


def test_lsr_targets_cached_and_reused(tiny, tmp_path, monkeypatch):
    import radit_fast.models as models
    from radit_fast.training import lsr_cache

    cfg = _r_cfg(tiny, tmp_path / "a", corpus_fraction=0.5)
    train_retriever(cfg)
    entries = list(Path(cfg.cache_dir).glob("lsr-*"))
    assert len(entries) == 1
    monkeypatch.setattr(models, "load_lm", lambda *a, **k: pytest.fail("LM loaded although targets are cached"))
    train_retriever(_r_cfg(tiny, tmp_path / "b", corpus_fraction=0.5, cache_dir=cfg.cache_dir,
                           score_kind="sum", direction="retriever_to_lsr"))
    assert list(Path(cfg.cache_dir).glob("lsr-*")) == entries
    # a corrupt entry is ignored and rescored
    monkeypatch.undo()
    target = entries[0] / lsr_cache.TARGETS
    target.write_bytes(target.read_bytes()[:-3] + b"xyz")
    train_retriever(_r_cfg(tiny, tmp_path / "c", corpus_fraction=0.5, cache_dir=cfg.cache_dir))
    assert lsr_cache.load(Path(cfg.cache_dir), entries[0].name[4:]) is not None
    # an LM given in memory in another dtype gets its own entry
    lm16, tok = models.load_lm(tiny["lm"], dtype=torch.bfloat16)
    train_retriever(_r_cfg(tiny, tmp_path / "d", corpus_fraction=0.5, cache_dir=cfg.cache_dir), lm=lm16,
                    tokenizer=tok)
    assert len(list(Path(cfg.cache_dir).glob("lsr-*"))) == 2


def test_lsr_scores_match_full_logits(tiny):
    """The cached LM scores equal log_softmax over full logits + gather (<= 1e-4)."""
    from radit_fast.data.prompts import build_instance, collate_padded
    from radit_fast.models import load_lm
    from radit_fast.training.lsr_cache import score_instances

    lm, tok = load_lm(tiny["lm"])
    insts = [build_instance(tok, "Rome is the capital of Italy. " * (i % 4), "Capital of Italy?", ans,
                            max_length=64) for i, ans in enumerate(["Rome", "Paris", "Rome is", "Oslo"] * 3)]
    got = score_instances(lm, insts, tok.pad_token_id, batch_tokens=200)
    got_packed = score_instances(lm, insts, tok.pad_token_id, batch_tokens=200, packing=True)
    batch = collate_padded(insts, tok.pad_token_id)
    with torch.no_grad():
        logp = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    ref = [sum(float(logp[b, t - 1, inst.input_ids[t]]) for t in range(inst.answer_start, inst.length))
           for b, inst in enumerate(insts)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(got_packed), torch.tensor(ref), rtol=0, atol=1e-4)


def test_train_retriever_rejects_other_encoder(tiny, tmp_path, monkeypatch):
    import radit_fast.models as models

    other = tiny_encoder(tmp_path / "other", seed=1)
    cfg_json = json.loads((other / "config.json").read_text())
    cfg_json["hidden_size"] = 48
    (other / "config.json").write_text(json.dumps(cfg_json))
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(**{k: v for k, v in cfg_json.items() if k in BertConfig().to_dict()})).save_pretrained(other)
    monkeypatch.setattr(models, "load_lm", lambda *a, **k: pytest.fail("LM loaded before the encoder check"))
    with pytest.raises(RaditError, match="dim"):
        train_retriever(_r_cfg(tiny, tmp_path / "out", query_encoder=str(other)))


def test_cli_train_commands(tiny, tmp_path, capsys):
    from radit_fast.cli.main import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"lm: {tiny['lm']}\nmax_steps: 1\nbatch_size: 4\nmax_length: 64\nprogress: false\n"
                   f"threads: 1\ntrain_retriever:\n  k: 3\n  cache_dir: {tmp_path / 'lsr'}\n")
    common = ["--train", str(tiny["train"]), "--index", str(tiny["index"]), "--config", str(cfg)]
    assert main(["train-lm", *common, "--out", str(tmp_path / "lm"), "--no-packing"]) == 0
    assert main(["train-retriever", *common, "--out", str(tmp_path / "r"), "--lm", str(tmp_path / "lm")]) == 0
    assert "k: 3" in (tmp_path / "r" / "radit_config.yaml").read_text()
    assert main(["train-lm", *common, "--out", str(tmp_path / "lm")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_fsdp_keeps_the_lm_on_the_cpu_until_it_is_sharded(tmp_path, monkeypatch):
    """Under FSDP the whole LM must never sit on one device: prepare_lm loads it on the CPU and leaves it
    there (fully_shard moves the shards); DDP and single-process runs move it to the device at once."""
    from transformers import AutoModelForCausalLM

    import radit_fast.models as models
    from radit_fast.distributed import DistEnv
    from radit_fast.training.ra_it import prepare_lm
    from test_training_fixtures import tiny_lm

    folder = tiny_lm(tmp_path / "lm")
    asked = []

    def fake_load_lm(name, *, device="cpu", **kw):
        asked.append(str(device))
        return AutoModelForCausalLM.from_pretrained(folder), None

    monkeypatch.setattr(models, "load_lm", fake_load_lm)
    cfg = RaItConfig(train="t", index="i", out=str(tmp_path / "o"), fsdp=True)
    meta = torch.device("meta")          # a device the LM must not be moved to before sharding
    lm, _ = prepare_lm(cfg, DistEnv(world_size=2, device=meta))
    assert asked == ["cpu"] and {p.device.type for p in lm.parameters()} == {"cpu"}
    lm, _ = prepare_lm(RaItConfig(train="t", index="i", out=str(tmp_path / "o")), DistEnv(world_size=2, device=meta))
    assert asked[-1] == "meta" and {p.device.type for p in lm.parameters()} == {"meta"}   # DDP: moved at once
