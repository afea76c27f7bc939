"""One optimizer step of a Hugging Face ``Trainer``-style loop on SmolLM2-135M, unpatched and patched.

    .venv/bin/python benchmarks/bench_hf_step.py             # SmolLM2-135M, 4 x 256 tokens, fp32 and bf16
    .venv/bin/python benchmarks/bench_hf_step.py --quick     # a tiny random Llama, 2 x 32 tokens, 1 repeat
    make bench-peers; flock /tmp/radit-bench.lock .venv/bin/python benchmarks/bench_hf_step.py

The step is what ``transformers.Trainer`` does per batch: ``model(input_ids, attention_mask, labels=labels)``
(the model shifts the labels), ``loss.backward()``, ``AdamW.step()`` (``fused=True``: Trainer's default optim
``adamw_torch_fused``), ``zero_grad(set_to_none=True)``. The model is trained in the row's dtype (bf16 =
weights loaded in bfloat16, as with ``from_pretrained(dtype=torch.bfloat16)``). Batches are real text (the
embedded Wikipedia summaries, tokenized and cut into windows); ``pass`` says where the labels are:
``labels_all`` (every token) or ``labels_answer`` (the second half of each row; the first half -100, like a
completion-only SFT loss).

Implementations (``impl`` column):
  hf          the unpatched model: full N x V logits, HF's ForCausalLMLoss (logits upcast to float32)
  radit       ``radit_fast.integrations.transformers.patch(model)`` (skipped with a logged line when absent)
  torch.lce   the model's forward replaced (here, ``head_patch``) by decoder -> rows whose shifted label is not
              -100 -> PyTorch's chunked ``F.linear_cross_entropy(..., reduction="sum",
              options=torch.nn.LinearCrossEntropyOptions())`` / number of label tokens
  cce         cut-cross-entropy's ``cce_patch(model, impl="torch_compile")`` (needs ``cut_cross_entropy.transformers``;
              the PyPI wheels up to 25.1.1 do not ship it: then skipped with a logged line)
  cce-head    the same ``head_patch`` as torch.lce with cut-cross-entropy's
              ``linear_cross_entropy(..., impl="torch_compile", reduction="sum")`` (the op cce_patch calls)

Columns (besides harness.FIELDS): ``batch`` (rows x tokens), ``threads``, ``vs_hf`` (median step time of the
unpatched model / this row's: > 1 = faster than unpatched), ``peak_rss_MB`` (the process's resident-set
high-water mark during one steady-state step: model, optimizer state and the step; ``peak_extra_MB`` is what the
step adds above the resident set before it), ``loss`` (the first step's loss of this row), ``loss_abs_diff``
(|loss - unpatched float32 loss on the same weights|; bf16 rows: weights rounded to bfloat16, then the float32
reference runs on them), ``grad_rel_err`` (max over parameters of ||grad - grad_ref|| / ||grad_ref||, same
reference). ``gflops``: 6 x parameters x tokens per step (the usual estimate of model FLOPs).
Each row's memory and accuracy are measured in a fresh child process; the times of one (dtype, labels) group run
round-robin in one process (benchmarks/harness.py).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

log = logging.getLogger("bench_hf_step")

OP = "hf_step"
harness.DIRTY_PATHS = ["benchmarks/harness.py", "benchmarks/bench_hf_step.py", "radit_fast/ops/answer_logprobs.py",
                       "radit_fast/integrations", "csrc/answer_logprobs", "csrc/common", "csrc/bindings.cpp"]
RESULTS = Path(__file__).resolve().parent / "results"
FULL_BATCH = (4, 256)
QUICK_BATCH = (2, 32)
QUICK_MODEL = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   tie_word_embeddings=True)
FIELDS = harness.FIELDS[:-1] + ["batch", "threads", "vs_hf", "peak_rss_MB", "loss", "loss_abs_diff", "grad_rel_err",
                                "commit"]
IMPLS = ["hf", "radit", "torch.lce", "cce", "cce-head"]
LABELS = ("labels_all", "labels_answer")


def _quick(case: harness.Case) -> bool:
    return case.d == QUICK_MODEL["hidden_size"] and case.V == QUICK_MODEL["vocab_size"]


def load_model(case: harness.Case, dtype: torch.dtype):
    """The model of ``case`` in ``dtype``: SmolLM2-135M (radit_fast.models.load_lm) or, --quick, a tiny Llama."""
    if _quick(case):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**QUICK_MODEL)).to(dtype)
    from radit_fast.models import load_lm

    return load_lm(dtype=dtype)[0]


def make_batch(case: harness.Case, rows: int, length: int) -> dict[str, torch.Tensor]:
    """``rows`` x ``length`` tokens of real text (--quick: random ids), labels per ``case.pass_``."""
    if _quick(case):
        ids = torch.randint(0, case.V, (rows, length), generator=torch.Generator().manual_seed(0))
    else:
        from radit_fast.data.wiki_demo import load_articles
        from radit_fast.models import load_tokenizer

        tok = load_tokenizer()
        stream: list[int] = []
        for art in load_articles():
            stream += tok(f"{art['title']}. {art['text']}\n\n", add_special_tokens=False)["input_ids"]
            if len(stream) >= rows * length:
                break
        ids = torch.tensor(stream[:rows * length]).view(rows, length)
    labels = ids.clone()
    if case.pass_ == "labels_answer":
        labels[:, :length // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def head_patch(model, summed_nll):
    """Replaces ``model.forward`` (this instance only) by decoder -> label rows -> ``summed_nll(h, W, y)``.

    ``summed_nll(h [M, d], W [V, d], y [M]) -> sum of -log p(y | h)``. The loss follows HF's convention: labels
    shifted left by one inside the model, -100 ignored, sum / ``num_items_in_batch`` when given, else mean over
    the label tokens. Only the rows with a label go through the head; no logits are returned."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if head.bias is not None or getattr(model.config, "final_logit_softcapping", None):
        raise ValueError("head_patch: the benchmark's head patch supports plain Linear heads only")

    def forward(input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if labels is None:
            raise ValueError("head_patch: the benchmark only calls the patched model with labels")
        shifted = labels[:, 1:]
        keep = shifted != -100
        total = summed_nll(out.last_hidden_state[:, :-1][keep], head.weight, shifted[keep])
        count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
        return CausalLMOutputWithPast(loss=total / count)

    model.forward = forward
    return model


def patch(model, impl: str):
    """The model of row ``impl`` (patched in place, or as returned by the peer's patch function)."""
    if impl == "hf":
        return model
    if impl == "radit":
        return importlib.import_module("radit_fast.integrations.transformers").patch(model)
    if impl == "torch.lce":
        options = torch.nn.LinearCrossEntropyOptions()
        return head_patch(model, lambda h, w, y: torch.nn.functional.linear_cross_entropy(
            h, w, y, reduction="sum", options=options))
    if impl == "cce":
        return importlib.import_module("cut_cross_entropy.transformers").cce_patch(model, impl="torch_compile")
    if impl == "cce-head":
        from cut_cross_entropy import linear_cross_entropy

        return head_patch(model, lambda h, w, y: linear_cross_entropy(h, w, y, reduction="sum",
                                                                      impl="torch_compile"))
    raise ValueError(f"unknown impl {impl!r}")


def _batch_shape(case: harness.Case) -> tuple[int, int]:
    return QUICK_BATCH if _quick(case) else (FULL_BATCH[0], case.N // FULL_BATCH[0])


def setup(case: harness.Case):
    """One optimizer step of ``case`` (in the harness's child process); returns the loss."""
    model = patch(load_model(case, getattr(torch, case.dtype)), case.impl)
    model.train()
    batch = make_batch(case, *_batch_shape(case))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def _loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}  # float: 135M params
    return float(loss.detach()), grads


def extra_columns(case: harness.Case) -> dict:
    """Peak RSS of the step just measured, then loss and gradient agreement with the unpatched float32 model."""
    peak_rss = harness._rss_kb("VmHWM") / 1024  # the memory run's measured step was the last thing it did
    dtype = getattr(torch, case.dtype)
    batch = make_batch(case, *_batch_shape(case))
    ref_model = load_model(case, dtype).float()  # same weights (rounded to dtype), computed in float32
    ref_loss, ref_grads = _loss_and_grads(ref_model, batch)
    del ref_model
    loss, grads = _loss_and_grads(patch(load_model(case, dtype), case.impl), batch)
    if set(grads) != set(ref_grads):
        raise RuntimeError(f"{case.impl}: gradients of {sorted(set(ref_grads) ^ set(grads))} missing or extra")
    rel = max(float((grads[n].double() - g.double()).norm() / g.double().norm().clamp_min(1e-30))
              for n, g in ref_grads.items())
    return {"batch": "x".join(map(str, _batch_shape(case))), "peak_rss_MB": f"{peak_rss:.0f}",
            "loss": f"{loss:.6f}", "loss_abs_diff": f"{abs(loss - ref_loss):.3g}", "grad_rel_err": f"{rel:.3g}"}


def available(impls: list[str]) -> list[str]:
    """``impls`` without those whose package or patch is missing (each skipped with a logged line)."""
    needs = {"radit": "radit_fast.integrations.transformers", "cce": "cut_cross_entropy.transformers",
             "cce-head": "cut_cross_entropy"}
    out = []
    for impl in impls:
        if impl in needs:
            try:
                importlib.import_module(needs[impl])
            except ImportError as exc:
                log.warning("skipping %s: %s is not importable (%s)", impl, needs[impl], exc)
                continue
        if impl == "torch.lce" and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            log.warning("skipping torch.lce: torch %s has no F.linear_cross_entropy options", torch.__version__)
            continue
        out.append(impl)
    return out


def _model_facts(quick: bool) -> tuple[int, int, int]:
    """(parameters, hidden size, vocabulary) of the benchmarked model."""
    if quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        m = LlamaForCausalLM(LlamaConfig(**QUICK_MODEL))
    else:
        from radit_fast.models import load_lm

        m = load_lm()[0]
    return sum(p.numel() for p in m.parameters()), m.config.hidden_size, m.config.vocab_size


def plot(csv_path: Path, png_path: Path) -> None:
    """Step time and peak RSS per implementation, one group of bars per (dtype, labels), from the CSV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = harness.read_csv(csv_path)
    groups = list(dict.fromkeys((r["dtype"], r["pass"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.8 / max(1, len(impls))
    for ax, key, label in ((axes[0], "median_s", "median step time (s)"), (axes[1], "peak_rss_MB", "peak RSS (MB)")):
        for i, impl in enumerate(impls):
            xs, vals = [], []
            for j, g in enumerate(groups):
                m = [r for r in rows if (r["dtype"], r["pass"]) == g and r["impl"] == impl]
                if m:
                    xs.append(j + (i - (len(impls) - 1) / 2) * width)
                    vals.append(float(m[0][key]))
            bars = ax.bar(xs, vals, width, label=impl)
            if key == "median_s":
                ax.bar_label(bars, labels=[f"{float(r['vs_hf']):.2f}x" for g in groups for r in rows
                                           if (r["dtype"], r["pass"]) == g and r["impl"] == impl], fontsize=7)
        ax.set_xticks(range(len(groups)), [f"{dt}\n{p}" for dt, p in groups], fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"HF Trainer-style step (fwd + bwd + AdamW), batch {r0['batch']}, d={r0['d']} V={r0['V']}, "
                 f"{r0['threads']} threads; commit {r0['commit']}")
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"tiny random Llama, batch {QUICK_BATCH}, 1 repeat")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--labels", nargs="+", default=list(LABELS), choices=LABELS)
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--threads", type=int, help="intra-op threads (default 2; --quick 1)")
    p.add_argument("--repeat", type=int, help="timed steps (default 5; --quick 1)")
    p.add_argument("--out", type=Path, help="CSV path (default benchmarks/results/hf_step_cpu.csv; --quick: a "
                                            "temporary folder)")
    args = p.parse_args(argv)
    threads = args.threads or (1 if args.quick else 2)
    repeat = args.repeat or (1 if args.quick else 5)
    rows_, length = QUICK_BATCH if args.quick else FULL_BATCH
    impls = available(args.impls)
    params, d, v = _model_facts(args.quick)
    out = args.out or (Path(tempfile.mkdtemp()) / f"{OP}_cpu.csv" if args.quick else RESULTS / f"{OP}_cpu.csv")
    log.info("%s: %s parameters, batch %dx%d, threads %d, torch %s; writing %s", OP, params, rows_, length, threads,
             torch.__version__, out)
    rows: list[dict] = []
    for dtype in args.dtypes:
        for labels in args.labels:
            cases = [harness.Case(OP, impl, "cpu", dtype, rows_ * length, d, v, labels,
                                  flops=6.0 * params * rows_ * length, repeat=repeat, threads=threads)
                     for impl in impls]
            group = harness.run_group("bench_hf_step", cases)
            base = [r for r in group if r["impl"] == "hf"]
            for r in group:
                r["vs_hf"] = f"{float(base[0]['median_s']) / float(r['median_s']):.3f}" if base else ""
                log.info("  %9s %8s %13s: %9s s  spread %s  peak RSS %6s MB (+%s)  x%s vs hf  loss %s (diff %s)  "
                         "grad rel err %s", r["impl"], dtype, labels, r["median_s"], r["spread"], r["peak_rss_MB"],
                         r["peak_extra_MB"], r["vs_hf"], r["loss"], r["loss_abs_diff"], r["grad_rel_err"])
            rows += group
            harness.write_csv(out, rows, FIELDS)
    if rows:
        plot(out, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
