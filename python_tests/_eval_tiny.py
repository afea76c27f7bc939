"""Tiny offline models for the evaluation and pipeline tests: a byte-level BPE tokenizer trained on a few
sentences and a random 2-layer Llama saved with ``save_pretrained`` (a second or two to build)."""
from __future__ import annotations

from pathlib import Path

import torch

TEXTS = [
    "Background: Paris is the capital of France.\n\nQ: capital of France\nA: Paris",
    "Berlin is the capital of Germany. Rome is the capital of Italy. Madrid is in Spain.",
    "The Eiffel Tower is a tower in Paris. Mount Everest is a mountain in Asia.",
    "Question: which topic?\nAnswer: History Science Arts Geography People Everyday life",
    "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z",
]


def tiny_tokenizer(folder: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 4, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return tok


def tiny_lm(folder: Path, *, seed: int = 0, tie: bool = True) -> Path:
    """A random LlamaForCausalLM (2 layers, d=32) plus tokenizer saved in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return save_tiny_llama(folder, tiny_tokenizer(folder), seed=seed, tie=tie)


def save_tiny_llama(folder: Path, tok, *, seed: int = 0, tie: bool = True) -> Path:
    """A random LlamaForCausalLM (2 layers, d=32) for the tokenizer ``tok``, saved in ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=tie, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the default init so that answers differ in likelihood
        model.get_input_embeddings().weight.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder
