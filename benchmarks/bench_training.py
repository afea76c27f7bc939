"""Training-layer benchmarks on SmolLM2-135M-Instruct (CPU), on the shared harness.

1. ``ra_it_step``: one RA-IT optimizer step per global batch (forward + backward + AdamW), ``N`` instances
   per batch, ``STEPS`` batches per timed call. Implementations:
   * ``radit_packed`` — the training layer's module (``radit_fast.training.ra_it.AnswerNLL``): decoder body
     on packed rows (attention inside each instance), fused LM head at the answer positions only;
   * ``radit_padded`` — the same module on padded batches;
   * ``hf_padded`` — a plain Hugging Face loop: padded batch, full logits, ``CrossEntropyLoss`` with the
     prompt and padding labels masked to -100.
   Batches (``pass`` column): ``bucketed`` (the training plan's length-bucketed global batches) or
   ``random`` (same plan without bucketing); every implementation gets the same batches.
   The loss of the first batch is computed by both the fused module and the HF loss on the same weights
   and written to the CSV (``loss``): the two must agree (<= 1e-4).
2. ``lsr_scoring``: frozen-LM scoring of ``B`` examples x ``k = 10`` augmented sequences (inference).
   ``radit`` = ``radit_fast.training.lsr_cache.score_instances`` (length-sorted batches, fused per-sequence
   answer log-probs, no logits); ``naive`` = padded batches of one example's k chunks, full logits,
   ``log_softmax``, ``gather``, sum. Max |score difference| goes to the CSV (``max_abs_diff``, <= 1e-4).

Instances come from the embedded wiki demo data (desc2title): question + answer with the gold passage and
passages drawn at random as chunks (the length distribution of retrieved chunks), ``max_length`` 256.

Usage: flock /tmp/radit-bench.lock .venv/bin/python benchmarks/bench_training.py [--quick] [--threads 2]
Writes benchmarks/results/training_cpu.csv and training_cpu.png.
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MAX_LENGTH = 256
K_TRAIN = 3
K_SCORE = 10
STEPS = 2
FIELDS = ["op", "impl", "pass", "device", "dtype", "N", "d", "V", "steps", "median_s", "spread", "peak_extra_MB",
          "items_per_s", "vs_baseline", "loss", "max_abs_diff", "threads", "commit"]


def _threads() -> None:
    torch.set_num_threads(int(os.environ.get("RADIT_BENCH_THREADS", "2")))


def _lm():
    from radit_fast.models import load_lm

    return load_lm()


def train_instances(tok, n_examples: int, seed: int = 0):
    """``n_examples * K_TRAIN`` RA-IT instances (gold passage + random passages as chunks)."""
    from radit_fast.data.prompts import build_instance
    from radit_fast.data.wiki_demo import desc2title_examples, load_articles

    arts = load_articles()
    byid = {a["id"]: a for a in arts}
    exs = desc2title_examples(arts)
    rng = random.Random(seed)
    exs = rng.sample(exs, n_examples)
    out = []
    for ex in exs:
        chunks = [byid[ex.provenance[0]]] + rng.sample(arts, K_TRAIN - 1)
        for j, a in enumerate(chunks):
            out.append(build_instance(tok, f"{a['title']} {a['text']}", ex.input, ex.answer, max_length=MAX_LENGTH,
                                      rng=random.Random(f"{seed}/{ex.id}/{j}")))
    return out


def train_batches(instances, batch: int, batching: str):
    from radit_fast.training.plan import DataPlan

    lengths = [i.length for i in instances]
    plan = DataPlan(len(instances), batch, seed=0, lengths=lengths,
                    bucket_window=8 if batching == "bucketed" else 0)
    return [[instances[i] for i in plan.micro_batches(s, rank=0, world_size=1, grad_accum=1)[0]]
            for s in range(STEPS)]


def hf_loss(lm, batch, insts):
    """Plain HF: full logits, CrossEntropyLoss over the answer tokens (other labels -100)."""
    labels = torch.full_like(batch["input_ids"], -100)
    for b, inst in enumerate(insts):
        labels[b, inst.answer_start:inst.length] = torch.tensor(inst.answer_ids)
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.CrossEntropyLoss()(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def radit_loss(module, batch, insts):
    norm = float(sum(i.answer_len for i in insts))
    return module({"batch": batch, "norm": norm, "world": 1, "tokens": 0, "instances": len(insts)})["loss"]


def setup(case: harness.Case):
    """The function the harness times (in the case's own subprocess)."""
    _threads()
    lm, tok = _lm()
    pad = tok.pad_token_id
    from radit_fast.data.prompts import collate_packed, collate_padded

    if case.op == "ra_it_step":
        from radit_fast.training.ra_it import AnswerNLL

        lm.train()
        module = AnswerNLL(lm)
        batches = train_batches(train_instances(tok, case.N), case.N, case.pass_)
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-5, fused=True)  # the same (fastest) optimizer for all
        if case.impl == "radit_packed":
            data = [(collate_packed(b, pad, max_tokens=MAX_LENGTH), b) for b in batches]
            loss_fn = lambda batch, insts: radit_loss(module, batch, insts)  # noqa: E731
        elif case.impl == "radit_padded":
            data = [(collate_padded(b, pad), b) for b in batches]
            loss_fn = lambda batch, insts: radit_loss(module, batch, insts)  # noqa: E731
        else:
            data = [(collate_padded(b, pad), b) for b in batches]
            loss_fn = lambda batch, insts: hf_loss(lm, batch, insts)  # noqa: E731

        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.dtype == "bf16")

        def run():
            for batch, insts in data:
                with autocast:
                    loss = loss_fn(batch, insts)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            return None
        return run

    seqs = score_instances_for(tok, case.N)
    if case.impl == "radit":
        from radit_fast.training.lsr_cache import score_instances

        return lambda: score_instances(lm, seqs, pad, batch_tokens=K_SCORE * MAX_LENGTH // 2)
    return lambda: naive_scores(lm, seqs, pad)


def score_instances_for(tok, n_examples: int, seed: int = 1):
    """``n_examples * K_SCORE`` scoring instances (fixed Q:/A: markers), example-major."""
    from radit_fast.data.prompts import build_instance
    from radit_fast.data.wiki_demo import desc2title_examples, load_articles

    arts = load_articles()
    byid = {a["id"]: a for a in arts}
    rng = random.Random(seed)
    exs = rng.sample(desc2title_examples(arts), n_examples)
    out = []
    for ex in exs:
        for a in [byid[ex.provenance[0]]] + rng.sample(arts, K_SCORE - 1):
            out.append(build_instance(tok, f"{a['title']} {a['text']}", ex.input, ex.answer, max_length=MAX_LENGTH))
    return out


@torch.inference_mode()
def naive_scores(lm, seqs, pad):
    """Padded batch per example (its k chunks), full logits, log_softmax, gather, sum over the answer."""
    from radit_fast.data.prompts import collate_padded

    out = []
    for s in range(0, len(seqs), K_SCORE):
        group = seqs[s:s + K_SCORE]
        batch = collate_padded(group, pad)
        logp = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
        flat = logp.reshape(-1, logp.shape[-1])[batch["answer_positions"]]
        tok = flat.gather(1, batch["answer_targets"][:, None]).squeeze(1)
        out.append(torch.zeros(len(group)).index_add_(0, batch["segment_ids"], tok))
    return torch.cat(out).numpy()


def correctness(n_train: int, n_score: int) -> dict[tuple[str, str], dict[str, str]]:
    """Loss of the first batch (fused vs HF) and score differences (radit vs naive), on fresh weights."""
    _threads()
    from radit_fast.data.prompts import collate_packed, collate_padded
    from radit_fast.training.lsr_cache import score_instances
    from radit_fast.training.ra_it import AnswerNLL

    lm, tok = _lm()
    pad = tok.pad_token_id
    module = AnswerNLL(lm)
    out: dict[tuple[str, str], dict[str, str]] = {}
    insts = train_instances(tok, n_train)
    with torch.no_grad():
        for batching in ("bucketed", "random"):
            first = train_batches(insts, n_train, batching)[0]
            ref = float(hf_loss(lm, collate_padded(first, pad), first))
            for impl, batch in (("radit_packed", collate_packed(first, pad, max_tokens=MAX_LENGTH)),
                                ("radit_padded", collate_padded(first, pad)), ("hf_padded", None)):
                loss = ref if batch is None else float(radit_loss(module, batch, first))
                out[(impl, batching)] = {"loss": f"{loss:.6f}", "max_abs_diff": f"{abs(loss - ref):.2e}"}
    seqs = score_instances_for(tok, n_score)
    naive = naive_scores(lm, seqs, pad)
    ours = score_instances(lm, seqs, pad, batch_tokens=K_SCORE * MAX_LENGTH // 2)
    diff = float(abs(torch.tensor(ours) - torch.tensor(naive)).max())
    out[("radit", "score")] = {"loss": "", "max_abs_diff": f"{diff:.2e}"}
    out[("naive", "score")] = {"loss": "", "max_abs_diff": "0"}
    return out


def plot(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = harness.read_csv(csv_path)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    groups = list(dict.fromkeys((r["op"], r["pass"], r["dtype"]) for r in rows))
    for ax, key, label in ((axes[0], "items_per_s", "instances (train) / sequences (scoring) per s"),
                           (axes[1], "peak_extra_MB", "peak extra memory (MB)")):
        x = 0
        ticks, names = [], []
        for g in groups:
            sub = [r for r in rows if (r["op"], r["pass"], r["dtype"]) == g]
            for r in sub:
                bar = ax.bar(x, float(r[key]), color="tab:blue" if r["impl"].startswith("radit") else "tab:gray")
                if key == "items_per_s" and r["vs_baseline"]:
                    ax.bar_label(bar, labels=[f"{float(r['vs_baseline']):.2f}x"], fontsize=8)
                ticks.append(x)
                names.append(f"{r['impl']}\n{g[0]}/{g[1]}/{g[2]}")
                x += 1
            x += 0.6
        ax.set_xticks(ticks, names, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    r0 = rows[0]
    fig.suptitle(f"SmolLM2-135M on CPU ({r0['threads']} threads): RA-IT training step and LSR "
                 f"scoring (k={K_SCORE}); commit {r0['commit']}")
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller batches, 2 repeats")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-batch", type=int, default=8, help="instances per RA-IT step")
    ap.add_argument("--score-examples", type=int, default=2, help="examples (x 10 chunks) per scoring call")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--groups", default="bucketed,random,bf16,score",
                    help="comparison groups to (re)measure; rows of the others are kept from the CSV")
    args = ap.parse_args()
    csv_path, png_path = RESULTS / "training_cpu.csv", RESULTS / "training_cpu.png"
    if args.plot_only:
        plot(csv_path, png_path)
        return
    os.environ["RADIT_BENCH_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    n_train = 4 if args.quick else args.train_batch
    n_score = 1 if args.quick else args.score_examples
    repeat = 2 if args.quick else 3
    checks = correctness(n_train, n_score) if args.groups != "bf16" else {}
    wanted = set(args.groups.split(","))
    groups = {}
    for batching in ("bucketed", "random"):
        groups[batching] = [harness.Case("ra_it_step", impl, "cpu", "fp32", n_train, 576, 49152, batching, 0.0,
                                         repeat) for impl in ("hf_padded", "radit_padded", "radit_packed")]
    groups["bf16"] = [harness.Case("ra_it_step", impl, "cpu", "bf16", n_train, 576, 49152, "bucketed", 0.0, repeat)
                      for impl in ("hf_padded", "radit_packed")]  # bf16 autocast (the --bf16 option)
    groups["score"] = [harness.Case("lsr_scoring", impl, "cpu", "fp32", n_score * K_SCORE, 576, 49152, "score",
                                    0.0, repeat) for impl in ("naive", "radit")]
    old = harness.read_csv(csv_path) if csv_path.is_file() else []
    rows = []
    for name, cases in groups.items():
        if name not in wanted:
            rows += [r for r in old if (r["op"], r["pass"], r["dtype"]) == (cases[0].op, cases[0].pass_,
                                                                            cases[0].dtype)]
            continue
        # Round-robin timing in one process (fair under a changing machine load), memory per case.
        results = (harness.run_group("bench_training", cases) if hasattr(harness, "run_group")
                   else [harness.run_case("bench_training", c) for c in cases])
        base = None
        for case, res in zip(cases, results):
            steps = STEPS if case.op == "ra_it_step" else 1
            row = {"op": case.op, "impl": case.impl, "pass": case.pass_, "device": "cpu", "dtype": case.dtype,
                   "N": case.N, "d": case.d, "V": case.V, "steps": steps, "median_s": res["median_s"],
                   "spread": res["spread"], "peak_extra_MB": res["peak_extra_MB"],
                   "items_per_s": f"{case.N * steps / float(res['median_s']):.3f}", "vs_baseline": "",
                   **(checks[(case.impl, case.pass_)] if case.dtype == "fp32" else {"loss": "", "max_abs_diff": ""}),
                   "threads": args.threads, "commit": res["commit"]}
            base = row if base is None else base
            row["vs_baseline"] = f"{float(row['items_per_s']) / float(base['items_per_s']):.3f}"
            rows.append(row)
            print(",".join(str(row[f]) for f in FIELDS), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    plot(csv_path, png_path)


if __name__ == "__main__":
    main()
