"""radit_fast.integrations.transformers: a patched Hugging Face causal LM against the unpatched one.

Tiny models built from configs with fixed seeds. References: the unpatched model's own loss and gradients
(transformers' ForCausalLMLoss over the full logits), in float64 where the comparison must be tight, and the
float64 model to bound the bfloat16 error of both paths.
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (GPT2Config, LlamaConfig, MistralConfig, PhiConfig, Qwen2Config,  # noqa: E402
                          AutoModelForCausalLM)

from radit_fast.integrations.transformers import (answer_logprobs_from_model, apply_radit_kernels,  # noqa: E402
                                                  is_patched, patch, unpatch)

V, D, L = 97, 32, 12


def _config(kind: str, **over):
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64)
    if kind == "llama":
        cfg = LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    elif kind == "qwen2":
        cfg = Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common)
    elif kind == "mistral":
        cfg = MistralConfig(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None, **common)
    elif kind == "phi":  # lm_head has a bias
        cfg = PhiConfig(partial_rotary_factor=0.5, **common)
    elif kind == "gpt2":  # tied head
        cfg = GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    elif kind == "cohere":
        cfg = transformers.CohereConfig(num_key_value_heads=2, logit_scale=0.25, **common)
    elif kind == "granite":
        cfg = transformers.GraniteConfig(num_key_value_heads=2, logits_scaling=4.0, **common)
    else:
        raise AssertionError(kind)
    for k, v in over.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "eager" if kind == "gpt2" else "sdpa"
    return cfg


def _pair(kind: str, dtype=torch.float64, **patch_kw):
    """(unpatched, patched) copies of one randomly initialised tiny model."""
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(_config(kind)).to(dtype)
    with torch.no_grad():  # some inits leave the bias at 0; make it matter
        head = ref.get_output_embeddings()
        if head.bias is not None:
            head.bias.normal_(0, 0.5)
    fused = patch(copy.deepcopy(ref), **patch_kw)
    return ref, fused


def _batch(b: int = 3, seed: int = 1, answer_from: int = 5):
    """input_ids, attention_mask (right padding in row 1) and labels (-100 on prompt and padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, L), generator=g)
    mask = torch.ones(b, L, dtype=torch.long)
    mask[1, L - 3:] = 0
    labels = ids.clone()
    labels[:, :answer_from] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def _loss_and_grads(model, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference(model, input_ids, attention_mask=None, labels=None, num_items_in_batch=None, **kw):
    """transformers' causal-LM loss written out over the unpatched model's full logits, in the logits' dtype
    (transformers itself upcasts to float32, which would cap a float64 comparison at float32 accuracy)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits
    target = labels[:, 1:]
    logp = logits[:, :-1].log_softmax(-1).gather(-1, target.clamp_min(0)[..., None]).squeeze(-1)
    total = -(logp * (target != -100)).sum()
    return total / (num_items_in_batch if num_items_in_batch is not None else (target != -100).sum())


def _reference_and_grads(model, **kw):
    model.zero_grad(set_to_none=True)
    loss = _reference(model, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got, want, **tol):
    assert got.keys() == want.keys() and got, "the same parameters must receive gradients"
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"grad of {n}: {m}", **tol)


# ------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "phi", "gpt2", "cohere", "granite"])
def test_loss_and_every_gradient_match_unpatched_float64(kind):
    ref, fused = _pair(kind)
    ids, mask, labels = _batch()
    want, g_r = _reference_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels)
    out_f, g_f = _loss_and_grads(fused, input_ids=ids, attention_mask=mask, labels=labels)
    assert out_f.logits is None and out_f.loss.dtype == torch.float64
    torch.testing.assert_close(out_f.loss, want, rtol=1e-12, atol=1e-12)
    hf = ref(input_ids=ids, attention_mask=mask, labels=labels).loss  # transformers' own (float32) loss
    torch.testing.assert_close(out_f.loss.float(), hf, rtol=1e-6, atol=1e-6)
    assert len(g_r) == len(list(ref.parameters()))  # every parameter, the head (tied or with bias) included
    _assert_grads_close(g_f, g_r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_float32_matches_unpatched(impl):
    if impl == "cpu" and not __import__("radit_fast._native", fromlist=["HAS_NATIVE"]).HAS_NATIVE:
        pytest.skip("native module not built")
    ref, fused = _pair("phi", torch.float32, impl=impl)
    ids, mask, labels = _batch()
    out_r, g_r = _loss_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels)
    out_f, g_f = _loss_and_grads(fused, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out_f.loss, out_r.loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close(g_f, g_r, rtol=1e-4, atol=1e-5)


def test_bfloat16_error_bounded_by_unpatched_error():
    ref64, _ = _pair("llama")
    ids, mask, labels = _batch(b=4)
    loss64, g64 = _reference_and_grads(ref64, input_ids=ids, attention_mask=mask, labels=labels)
    ref16 = copy.deepcopy(ref64).to(torch.bfloat16)
    fused16 = patch(copy.deepcopy(ref16))
    out_r, g_r = _loss_and_grads(ref16, input_ids=ids, attention_mask=mask, labels=labels)
    out_f, g_f = _loss_and_grads(fused16, input_ids=ids, attention_mask=mask, labels=labels)
    err_r = abs(out_r.loss.item() - loss64.item())
    err_f = abs(out_f.loss.item() - loss64.item())
    assert err_f <= 2 * err_r + 2e-3, (err_f, err_r)
    for name, g in g64.items():
        rel = lambda x: float((x.double() - g).norm() / g.norm().clamp_min(1e-30))  # noqa: E731
        assert rel(g_f[name]) <= 2 * rel(g_r[name]) + 2e-2, (name, rel(g_f[name]), rel(g_r[name]))


def test_num_items_in_batch_makes_accumulation_equal_one_big_batch():
    ref, fused = _pair("llama")
    ids, mask, labels = _batch(b=4)
    n_items = int((labels[:, 1:] != -100).sum())
    _, g_big = _loss_and_grads(fused, input_ids=ids, attention_mask=mask, labels=labels)
    fused.zero_grad(set_to_none=True)
    for part in (slice(0, 1), slice(1, 4)):  # unequal micro-batches: a mean per micro-batch would differ
        out = fused(input_ids=ids[part], attention_mask=mask[part], labels=labels[part],
                    num_items_in_batch=torch.tensor(n_items))
        out.loss.backward()
    _assert_grads_close({n: p.grad for n, p in fused.named_parameters()}, g_big, rtol=1e-9, atol=1e-12)
    want = _reference(ref, ids[:1], mask[:1], labels[:1], num_items_in_batch=n_items)
    out_f = fused(input_ids=ids[:1], attention_mask=mask[:1], labels=labels[:1], num_items_in_batch=n_items)
    torch.testing.assert_close(out_f.loss, want, rtol=1e-12, atol=1e-12)
    hf = ref(input_ids=ids[:1], attention_mask=mask[:1], labels=labels[:1], num_items_in_batch=n_items).loss
    torch.testing.assert_close(out_f.loss.float(), hf, rtol=1e-6, atol=1e-6)


def test_shift_labels_reduction_sum_return_logits_and_no_labels():
    ref, fused = _pair("qwen2", return_logits=True)
    ids, mask, labels = _batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].clone()
    shift[0, 2] = 7  # a target the unshifted labels do not have: shift_labels must be used as given
    out_r = ref(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift)
    out_f = fused(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift)
    torch.testing.assert_close(out_f.loss.float(), out_r.loss, rtol=1e-6, atol=1e-6)  # transformers: float32
    torch.testing.assert_close(out_f.logits, out_r.logits)
    no_labels = fused(input_ids=ids, attention_mask=mask)  # the original path: logits, no loss
    assert no_labels.loss is None
    torch.testing.assert_close(no_labels.logits, out_r.logits)
    summed = patch(fused, reduction="sum")(ids, mask, labels=labels)  # positional arguments too
    n = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(summed.loss, _reference(ref, ids, mask, labels) * n, rtol=1e-12, atol=1e-12)
    tup = fused(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], summed.loss)


def test_all_ignored_batch_gives_zero_loss_with_zero_gradients():
    _, fused = _pair("llama")
    ids, mask, _ = _batch()
    out, grads = _loss_and_grads(fused, input_ids=ids, attention_mask=mask, labels=torch.full_like(ids, -100))
    assert float(out.loss.detach()) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads.values())


# ------------------------------------------------------------------ per-token / per-sequence scores


def test_answer_logprobs_from_model_per_token_and_sequence():
    ref, _ = _pair("phi")
    ids, mask, labels = _batch()
    tok = answer_logprobs_from_model(ref, ids, mask, labels, per="token")
    seq = answer_logprobs_from_model(ref, ids, mask, labels, per="sequence")
    logp = ref(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)  # [B, T, V], position t predicts t+1
    want = torch.zeros(ids.shape, dtype=torch.float64)
    for b in range(ids.shape[0]):
        for t in range(1, L):
            if labels[b, t] != -100:
                want[b, t] = logp[b, t - 1, labels[b, t]]
    torch.testing.assert_close(tok, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seq, want.sum(1), rtol=1e-12, atol=1e-12)
    seq.sum().backward()
    assert ref.get_output_embeddings().weight.grad is not None
    with pytest.raises(ValueError, match="per must be one of"):
        answer_logprobs_from_model(ref, ids, mask, labels, per="row")


# ------------------------------------------------------------------------ packing, peft, compile


def test_packed_position_ids_match_separate_sequences():
    from transformers import DataCollatorWithFlattening

    ref, fused = _pair("llama")
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (7, 5, 9)]
    packed = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": s} for s in seqs])
    assert packed["input_ids"].shape[0] == 1 and "position_ids" in packed
    out_p = fused(**packed)  # with labels, use_cache defaults to False, so transformers sees the packing
    torch.testing.assert_close(out_p.loss.float(), ref(**packed, use_cache=False).loss, rtol=1e-6, atol=1e-6)
    nll, count = 0.0, 0
    for s in seqs:  # each sequence alone: the packed loss must not see across sequence boundaries
        t = torch.tensor([s])
        nll = nll + _reference(ref, t, labels=t) * (len(s) - 1)
        count += len(s) - 1
    torch.testing.assert_close(out_p.loss, nll / count, rtol=1e-10, atol=1e-10)


def test_peft_lora_loss_and_adapter_gradients():
    peft = pytest.importorskip("peft")
    ref, _ = _pair("llama")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(5)
    ref = peft.get_peft_model(ref, cfg)
    fused = patch(copy.deepcopy(ref))
    assert is_patched(fused) and not is_patched(ref)
    ids, mask, labels = _batch()
    want, g_r = _reference_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels)
    out_f, g_f = _loss_and_grads(fused, input_ids=ids, attention_mask=mask, labels=labels)
    assert out_f.logits is None and all("lora_" in n for n in g_f)
    torch.testing.assert_close(out_f.loss, want, rtol=1e-12, atol=1e-12)
    _assert_grads_close(g_f, g_r, rtol=1e-9, atol=1e-12)
    head_lora = peft.get_peft_model(_pair("llama")[0], peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        patch(head_lora)


def test_torch_compile_matches_eager():
    ref, fused = _pair("llama", torch.float32, impl="torch")
    ids, mask, labels = _batch()
    out_e, g_e = _loss_and_grads(fused, input_ids=ids, attention_mask=mask, labels=labels)
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager")
    out_c, g_c = _loss_and_grads(compiled, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out_c.loss, out_e.loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close({n.removeprefix("_orig_mod."): g for n, g in g_c.items()}, g_e, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ class level, refusals


def test_apply_radit_kernels_patches_the_class_and_unpatch_restores_it(tmp_path):
    cls = transformers.LlamaForCausalLM
    original = cls.forward
    ref, _ = _pair("llama")
    ref.save_pretrained(tmp_path)
    ids, mask, labels = _batch()
    want = _reference(ref, ids, mask, labels)
    try:
        assert apply_radit_kernels("llama") is cls and is_patched(cls)
        loaded = cls.from_pretrained(tmp_path, dtype=torch.float64)
        out = loaded(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits is None
        torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    finally:
        unpatch("llama")
    assert cls.forward is original and not is_patched(cls)
    assert ref(input_ids=ids, attention_mask=mask, labels=labels).logits is not None


def test_refusals_name_the_reason():
    gemma2 = transformers.Gemma2Config(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30\.0"):
        patch(transformers.Gemma2ForCausalLM(gemma2))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        apply_radit_kernels("gemma2")
    assert not is_patched(transformers.Gemma2ForCausalLM)
    moe = transformers.MixtralConfig(vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                     output_router_logits=True)
    with pytest.raises(ValueError, match="output_router_logits=True"):
        patch(transformers.MixtralForCausalLM(moe))
    _, fused = _pair("llama")
    with pytest.raises(ValueError, match="impl must be one of"):
        patch(fused, impl="fast")
    with pytest.raises(ValueError, match="reduction must be one of"):
        patch(fused, reduction="none")
    with pytest.raises(ValueError, match="not a causal-LM model_type"):
        apply_radit_kernels("no-such-model")
    ids, mask, labels = _batch()
    with pytest.raises(ValueError, match="logits_to_keep"):
        fused(input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=4)
    unpatch(fused)
    assert not is_patched(fused) and fused(input_ids=ids, labels=labels).logits is not None


# ------------------------------------------------------------------------------ Trainer and TRL


def _train_rows(n: int = 8):
    """Equal-length rows (the default collator stacks them) with padding and prompts of different lengths, so
    micro-batches hold different numbers of answer tokens (num_items_in_batch matters)."""
    g = torch.Generator().manual_seed(7)
    rows = []
    for i in range(n):
        ids = torch.randint(3, V, (L,), generator=g)
        mask = torch.ones(L, dtype=torch.long)
        mask[L - (i % 4):] = 0
        labels = torch.where(mask.bool(), ids, -100)
        labels[: 2 + (i % 5)] = -100
        rows.append({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})
    return rows


def _train(model, trainer_cls, args_cls, out_dir, **kw):
    args = args_cls(output_dir=str(out_dir), max_steps=3, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2, learning_rate=0.5, optim="sgd", logging_steps=1, report_to=[],
                    save_strategy="no", use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
                    disable_tqdm=True, **kw.pop("args", {}))
    trainer = trainer_cls(model=model, args=args, **kw)
    if kw.get("processing_class") is not None:  # SFTTrainer installs its own fused head: patch after it
        patch(trainer.model)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_steps_equal_unpatched(tmp_path):
    from transformers import Trainer, TrainingArguments

    ref, fused = _pair("llama", torch.float32)
    logs_r, params_r = _train(ref, Trainer, TrainingArguments, tmp_path / "r", train_dataset=_train_rows())
    logs_f, params_f = _train(fused, Trainer, TrainingArguments, tmp_path / "f", train_dataset=_train_rows())
    assert len(logs_f) == len(logs_r) == 3
    for a, b in zip(logs_f, logs_r):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-4)
    for name, p in params_r.items():
        torch.testing.assert_close(params_f[name], p, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "Q:", "A:"] + [f"w{i}" for i in range(60)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_sft_trainer_completion_only_through_the_fused_op(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from radit_fast.integrations import transformers as integ

    g = torch.Generator().manual_seed(11)
    pick = lambda k: " ".join(f"w{int(i)}" for i in torch.randint(0, 60, (k,), generator=g))  # noqa: E731
    data = [{"prompt": f"Q: {pick(2 + i % 3)} A:", "completion": f" {pick(1 + i % 2)}"} for i in range(8)]
    tok = _word_tokenizer()
    ref, fused = _pair("llama", torch.float32)
    for m in (ref, fused):
        m.config.pad_token_id, m.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    calls = []
    real = integ.answer_logprobs
    monkeypatch.setattr(integ, "answer_logprobs", lambda h, *a, **k: calls.append(h.shape[0]) or real(h, *a, **k))
    sft = dict(args_cls=trl.SFTConfig, trainer_cls=trl.SFTTrainer, processing_class=tok,
               args={"max_length": 16, "completion_only_loss": True, "bf16": False})
    logs_f, params_f = _train(fused, out_dir=tmp_path / "f", train_dataset=datasets.Dataset.from_list(data), **sft)
    # completion-only: a micro-batch of 2 examples scores their completion words and EOS, never their prompts
    per_example = [len(d["completion"].split()) + 1 for d in data]
    assert len(calls) == 3 * 2 and max(calls) <= 2 * max(per_example) and min(calls) >= 2 * min(per_example)
    monkeypatch.setattr(integ, "answer_logprobs", real)
    sft["processing_class"] = tok
    logs_r, params_r = _train_unpatched_sft(ref, tmp_path / "r", datasets.Dataset.from_list(data), sft)
    assert len(logs_f) == len(logs_r) == 3
    for a, b in zip(logs_f, logs_r):  # TRL's own chunked head is the reference (loss, entropy, accuracy)
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), key
    for name, p in params_r.items():
        torch.testing.assert_close(params_f[name], p, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def _train_unpatched_sft(model, out_dir, dataset, sft):
    args = sft["args_cls"](output_dir=str(out_dir), max_steps=3, per_device_train_batch_size=2,
                           gradient_accumulation_steps=2, learning_rate=0.5, optim="sgd", logging_steps=1,
                           report_to=[],
                           save_strategy="no", use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
                           disable_tqdm=True, **sft["args"])
    trainer = sft["trainer_cls"](model=model, args=args, train_dataset=dataset,
                                 processing_class=sft["processing_class"])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------ DDP


@pytest.mark.distributed
def test_ddp_two_processes_gloo_equal_one_big_batch(tmp_path):
    """2 ranks x half the batch under DistributedDataParallel (gloo, CPU), num_items_in_batch counting both
    halves and the loss scaled by the world size (what Trainer does), give the gradients of the whole batch."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, str(tmp_path / "grads.pt")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)  # ~15 s when idle
    assert res.returncode == 0, res.stderr[-4000:]
    got = torch.load(tmp_path / "grads.pt", weights_only=True)
    ref, _ = _pair("llama")
    ids, mask, labels = _batch(b=4)
    _, want = _reference_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels)
    _assert_grads_close({k.removeprefix("module."): v for k, v in got.items()}, want, rtol=1e-9, atol=1e-12)


def _ddp_worker(out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    _, fused = _pair("llama")
    ddp = DistributedDataParallel(fused)
    ids, mask, labels = _batch(b=4)
    n_items = torch.tensor(int((labels[:, 1:] != -100).sum()))  # Trainer gathers this count over the ranks
    part = slice(rank * 2, rank * 2 + 2)
    out_r = ddp(input_ids=ids[part], attention_mask=mask[part], labels=labels[part], num_items_in_batch=n_items)
    (out_r.loss * world).backward()  # DDP averages gradients over ranks; Trainer scales the loss back
    if rank == 0:
        torch.save({n: p.grad for n, p in ddp.named_parameters()}, out)
    dist.barrier()  # both ranks leave together (a rank tearing gloo down while the other still talks can hang)
    dist.destroy_process_group()


if __name__ == "__main__":  # one torchrun worker of the DDP test
    import sys

    _ddp_worker(sys.argv[1])
