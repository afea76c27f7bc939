"""Stage 2 of RA-DIT with sentence-transformers: SentenceTransformerTrainer + radit's LSR loss.

The frozen LM (the embedded SmolLM2-135M-Instruct) scores each query's answer behind each of its candidate
chunks (``Background: chunk\\n\\nQ: query\\nA: answer``, fused LM head, no logits); those answer
log-probabilities are the labels of :class:`radit_fast.integrations.sentence_transformers.LSRLoss`, which
trains the query encoder (the embedded all-MiniLM-L6-v2) towards the chunks that help the LM, the document
side frozen. The trained model is saved with ``model.save`` and read back by sentence-transformers and radit.

    python examples/st_lsr.py --out runs/st-lsr

Measured on this project's shared 2-core machine (other jobs running): 2-3 minutes, of which about 25 s
for the two training steps; the first run also converts the embedded GGUF LM once (cached afterwards).

The last line printed is a JSON summary (the test suite runs this script and checks it).
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import torch

from radit_fast.data.tasks import Example
from radit_fast.integrations.sentence_transformers import LSRLoss, lsr_label
from radit_fast.models import load_lm
from radit_fast.retrieval.encoder import TextEncoder, default_encoder_path
from radit_fast.training.lsr_cache import build_scoring_instances, score_grid

EXAMPLES = [
    ("Which planet is the largest in the Solar System?", "Jupiter",
     ["Jupiter is the largest planet in the Solar System.", "Mars is known as the red planet.",
      "The Moon orbits the Earth."]),
    ("Who wrote the play Hamlet?", "William Shakespeare",
     ["Paris is the capital of France.", "Hamlet is a tragedy written by William Shakespeare.",
      "The piano has 88 keys."]),
    ("What is the capital of Japan?", "Tokyo",
     ["Mount Fuji is the highest mountain in Japan.", "Rice is a staple food in Asia.",
      "Tokyo is the capital city of Japan."]),
    ("Which element has the chemical symbol O?", "Oxygen",
     ["Oxygen is the chemical element with the symbol O.", "Gold is a precious metal.",
      "Water boils at 100 degrees Celsius."]),
]


def lm_labels() -> list[list[list[float]]]:
    """``[[logprobs], [lengths]]`` per example: log p_LM(answer | chunk o question) for each chunk."""
    lm, tok = load_lm(None)
    items = [Example(id=str(i), input=q, answers=[a]) for i, (q, a, _) in enumerate(EXAMPLES)]
    texts = [chunks for _, _, chunks in EXAMPLES]
    k = len(texts[0])
    instances, where = build_scoring_instances(tok, items, texts, max_length=128)
    lp, ln = score_grid(lm, instances, [i * k + j for i, j in where], (len(items), k),
                        tok.pad_token_id or 0)
    return [lsr_label(p.tolist(), n.tolist()) for p, n in zip(lp, ln)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (trainer files and the saved model)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(0)

    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)

    labels = lm_labels()
    k = len(EXAMPLES[0][2])
    columns = {"query": [q for q, _, _ in EXAMPLES]}
    for j in range(k):
        columns[f"passage_{j + 1}"] = [chunks[j] for _, _, chunks in EXAMPLES]
    dataset = Dataset.from_dict({**columns, "label": labels})

    model = SentenceTransformer(str(default_encoder_path()), device="cpu")
    loss = LSRLoss(model, retriever_temperature=0.1)  # tau_R for cosine scores, as `radit demo`
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def full_loss() -> float:
        with torch.no_grad():
            feats = [model.preprocess(columns[c]) for c in columns]
            return float(loss(feats, torch.tensor(labels)))

    loss_before = full_loss()
    train_args = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(args.out, "trainer"), max_steps=args.steps, per_device_train_batch_size=len(EXAMPLES),
        learning_rate=args.lr, warmup_steps=0, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="no", report_to="none", seed=0, use_cpu=True, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=train_args, train_dataset=dataset, loss=loss)
    result = trainer.train()
    model.eval()
    loss_after = full_loss()
    change = max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters())

    saved = os.path.join(args.out, "query_encoder")
    model.save(saved)
    probe = [q for q, _, _ in EXAMPLES]
    ref = model.encode(probe, convert_to_tensor=True)
    again = SentenceTransformer(saved, device="cpu").encode(probe, convert_to_tensor=True)
    by_radit = TextEncoder.from_pretrained(saved).encode(probe, precision="fp32")
    matches = bool(torch.allclose(ref, again, atol=1e-5) and torch.allclose(ref, by_radit, atol=1e-5))
    print(json.dumps({"steps": result.global_step, "loss_before": loss_before, "loss_after": loss_after,
                      "max_weight_change": change, "saved": saved, "saved_matches": matches}))


if __name__ == "__main__":
    main()
