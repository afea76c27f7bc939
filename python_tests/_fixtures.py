"""Shared test helpers for the model and data tests: the SmolLM2 tokenizer (read once per session) and
tiny random causal LMs (Llama and GPT-2 style) that load in milliseconds.

Imported by the test modules (plain functions cached per process; pytest fixtures wrap them there).
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@functools.lru_cache(maxsize=None)
def smollm2_tokenizer():
    """The default LM's tokenizer: from the converted cache if present, else from the GGUF (a few s)."""
    from radit_fast.models import load_tokenizer

    return load_tokenizer()


@functools.lru_cache(maxsize=None)
def _tmp_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="radit-tiny-models-"))


@functools.lru_cache(maxsize=None)
def tiny_model_dir(kind: str = "llama", vocab_size: int = 49152) -> Path:
    """A saved tiny random causal LM (hidden 32, 2 layers) with the SmolLM2 tokenizer, in a temp folder."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        model = LlamaForCausalLM(config)
    elif kind == "llama-untied":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        model = LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=1024,
                            bos_token_id=1, eos_token_id=2, pad_token_id=2)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # random init of the norms too, so the final norm matters in the checks
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.uniform_(0.5, 1.5)
    path = _tmp_root() / kind
    model.save_pretrained(path)
    smollm2_tokenizer().save_pretrained(path)
    return path
