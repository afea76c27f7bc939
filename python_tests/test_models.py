"""Model loading, the body | head split and packed rows (radit_fast.models, radit_fast.packing), on tiny
random causal LMs (plus one slow test on the default LM, radit_fast.default_lm).

The reference is the model's own ``model(input_ids).logits`` run per instance, unpadded, in float64
log-softmax; the split path (hidden states of the body at answer positions, ``h @ W.T + b``) must match
it for padded batches and for packed rows, with both ways of keeping attention inside an instance.
"""
from __future__ import annotations

import random
import time

import pytest
import torch
from _fixtures import smollm2_tokenizer, tiny_model_dir

from radit_fast import _util, default_lm, models, packing
from radit_fast.data.prompts import build_instance, collate_packed, collate_padded
from radit_fast.io import RaditError

CHUNK = "Paris is the capital and most populous city of France, on the Seine. " * 4


def _instances(tok, n=6, seed=0, max_length=80):
    rng = random.Random(seed)
    return [build_instance(tok, CHUNK[:rng.randint(0, len(CHUNK))], f"Which city is number {i}?",
                           " ".join(["Paris"] * rng.randint(1, 4)), max_length=max_length, rng=rng)
            for i in range(n)]


def _reference(model, insts):
    """float64 log-probs of every answer token, one unpadded forward per instance through the full model."""
    out = []
    with torch.no_grad():
        for inst in insts:
            ids = torch.tensor([inst.input_ids])
            logp = model(ids).logits.double().log_softmax(-1)[0]
            t = torch.arange(inst.answer_start, inst.length)
            out.append(logp[t - 1, ids[0, t]])
    return torch.cat(out)


def _split_logprobs(model, batch, **kw):
    with torch.no_grad():
        hidden = packing.pack_forward(model, batch, **kw)
        weight, bias = models.lm_head_weight(model)
        logits = torch.nn.functional.linear(hidden.double(), weight.double(),
                                            None if bias is None else bias.double())
        return logits.log_softmax(-1).gather(1, batch["answer_targets"][:, None]).squeeze(1)


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.mark.parametrize("kind, attn", [("llama", "eager"), ("llama", "sdpa"), ("llama-untied", "sdpa"),
                                        ("gpt2", "eager"), ("gpt2", "sdpa")])
def test_split_matches_full_model(tok, kind, attn):
    model, mtok = models.load_lm(str(tiny_model_dir(kind)), attn_implementation=attn)
    assert mtok.pad_token_id is not None
    insts = _instances(tok)
    ref = _reference(model, insts)
    batches = {"padded": (collate_padded(insts, tok.pad_token_id), {}),
               "packed-1-row/mask": (collate_packed(insts, tok.pad_token_id), {"packing": "mask"}),
               "packed-1-row/position_ids": (collate_packed(insts, tok.pad_token_id), {"packing": "position_ids"}),
               "packed-80/mask": (collate_packed(insts, tok.pad_token_id, max_tokens=80), {"packing": "mask"}),
               "packed-80/auto": (collate_packed(insts, tok.pad_token_id, max_tokens=80), {})}
    for name, (batch, kw) in batches.items():
        got = _split_logprobs(model, batch, **kw)
        err = (got - ref).abs().max().item()
        assert err < 1e-5, f"{kind}/{attn}/{name}: max |diff| {err:.2e}"
    assert packing.answer_logprobs_reference(model, batches["padded"][0]).allclose(ref.float(), atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_split_bf16_within_the_models_own_error(tok, attn):
    """In bf16, the split path (padded and packed) errs no more than the model's own bf16 forward does."""
    ref = _reference(models.load_lm(str(tiny_model_dir("llama")))[0], _instances(tok))
    model, _ = models.load_lm(str(tiny_model_dir("llama")), dtype=torch.bfloat16, attn_implementation=attn)
    insts = _instances(tok)
    own = (_reference(model, insts) - ref).abs().max().item()
    for batch in (collate_padded(insts, tok.pad_token_id), collate_packed(insts, tok.pad_token_id, max_tokens=80)):
        err = (_split_logprobs(model, batch) - ref).abs().max().item()
        assert err <= 2 * own + 1e-3, f"split error {err:.3e} vs the model's own bf16 error {own:.3e}"


def test_hidden_states_shapes_and_gradients(tok):
    model, _ = models.load_lm(str(tiny_model_dir("llama")))
    insts = _instances(tok, n=3)
    batch = collate_padded(insts, tok.pad_token_id)
    full = models.answer_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    assert full.shape == (*batch["input_ids"].shape, model.config.hidden_size)
    sel = models.answer_hidden_states(model, batch["input_ids"], batch["attention_mask"], batch["answer_positions"])
    assert torch.equal(sel, full.reshape(-1, full.shape[-1])[batch["answer_positions"]])
    # gradients reach the body and the (tied) embedding through the split path
    weight, bias = models.lm_head_weight(model)
    assert bias is None and weight is model.get_input_embeddings().weight
    loss = -torch.nn.functional.linear(sel, weight).log_softmax(-1).gather(1, batch["answer_targets"][:, None]).sum()
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert weight.grad.abs().sum() > 0


def test_body_and_head_accessors():
    llama, _ = models.load_lm(str(tiny_model_dir("llama")))
    gpt2, _ = models.load_lm(str(tiny_model_dir("gpt2")))
    assert models.decoder_body(llama) is llama.model
    assert models.decoder_body(gpt2) is gpt2.transformer
    assert models.lm_head_weight(gpt2)[0] is gpt2.lm_head.weight
    assert models.attention_implementation(llama) in {"sdpa", "eager"}


def test_peft_wrapped_model(tok):
    peft = pytest.importorskip("peft")
    model, _ = models.load_lm(str(tiny_model_dir("llama")))
    insts = _instances(tok, n=3)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, cfg)
    ref = _reference(wrapped, insts)  # LoRA (non-zero init) changes the outputs; the split must follow
    got = _split_logprobs(wrapped, collate_packed(insts, tok.pad_token_id))
    assert (got - ref).abs().max() < 1e-5


def test_modified_logits_are_refused():
    model, _ = models.load_lm(str(tiny_model_dir("llama")))
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(RaditError, match="final_logit_softcapping"):
        models.lm_head_weight(model)


def test_packed_attention_mask():
    seq = torch.tensor([[0, 0, 1, 1, 1, -1]])
    allowed = packing.packed_attention_mask(seq, torch.float32)[0, 0] == 0
    expect = torch.tensor([[1, 0, 0, 0, 0, 0],
                           [1, 1, 0, 0, 0, 0],
                           [0, 0, 1, 0, 0, 0],
                           [0, 0, 1, 1, 0, 0],
                           [0, 0, 1, 1, 1, 0],
                           [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expect)
    assert torch.equal(packing.packed_attention_mask(seq, torch.bool)[0, 0], expect)
    assert packing.packed_attention_mask(seq, torch.bfloat16).dtype == torch.bfloat16


def test_load_errors(tmp_path):
    with pytest.raises(RaditError, match="not a local folder and not in the local Hugging Face cache"):
        models.load_lm("no-such-org/no-such-model-radit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RaditError, match="cannot load a model or tokenizer from this folder"):
        models.load_lm(str(tmp_path / "empty"))
    with pytest.raises(RaditError, match="no such file"):
        models.load_lm(str(tmp_path / "x.gguf"))


def test_damaged_default_cache(monkeypatch, tmp_path):
    broken = tmp_path / "smollm2-135m-instruct"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    monkeypatch.setenv("RADIT_CACHE", str(tmp_path))
    with pytest.raises(RaditError, match="remove .*smollm2-135m-instruct to convert again"):
        models.load_lm("default")


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("RADIT_CACHE", str(tmp_path))
    assert default_lm.default_lm_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("RADIT_CACHE")
    assert _util.cache_root().name == "radit_fast"
    assert default_lm.default_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_default_lm_convert_and_reload(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("RADIT_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    model, mtok = models.load_lm()  # converts the GGUF into tmp_path
    convert_s = time.perf_counter() - t0
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert not hasattr(model.config, "quantization_config")
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 134.5e6) < 0.1e6, n_params
    assert model.config.vocab_size == 49152 and len(mtok) == 49152
    assert models.lm_head_weight(model)[0] is model.get_input_embeddings().weight  # tied head
    t0 = time.perf_counter()
    again, tok2 = models.load_lm()
    reload_s = time.perf_counter() - t0
    assert reload_s < convert_s
    text = "Background: Paris is the capital of France.\n\nQ: What is the capital of France?\nA: Paris"
    assert tok2(text)["input_ids"] == mtok(text)["input_ids"] == tok(text)["input_ids"]
    ids = torch.tensor([mtok(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    # the instruct model answers this one: " Paris" is its most likely next token
    inst = build_instance(mtok, "Paris is the capital of France.", "What is the capital of France?", "Paris",
                          max_length=64)
    batch = collate_padded([inst], mtok.pad_token_id)
    with torch.no_grad():
        hidden = packing.pack_forward(again, batch)
        logits = hidden @ models.lm_head_weight(again)[0].T
    assert logits[0].argmax().item() == batch["answer_targets"][0].item()
