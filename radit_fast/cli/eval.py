"""``radit eval``: evaluate an LM, alone or with a retriever, on a task file or a text.

    radit eval --test test.jsonl --out runs/eval [--index runs/idx] [--query-encoder PATH] [--lm PATH]
               [--k 10] [--shots 5 --train train.jsonl] [--decode mixture|rescore] [--max-new-tokens 32]
    radit eval --test nq-dev-kilt.jsonl ...            # KILT as released (format detected, or --format kilt)
    radit eval --test mmlu/data --train mmlu/data --shots 5 ...   # MMLU CSVs: test split, dev as shots
    radit eval --task lm --test text.txt [--index runs/idx] --out runs/ppl   # perplexity, bits per byte

Writes ``OUT/predictions.jsonl`` (one line per example: prediction, gold answers, metrics, passages)
and ``OUT/metrics.json`` (the means, KILT's metrics included, and per task when the examples name one);
``--task lm`` writes ``OUT/metrics.json`` with and without retrieval. Every input is checked before any
model is loaded.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from radit_fast.config.evaluation import EvalSettings, LMEvalSettings
from radit_fast.config.fields import add_arguments, arg_type, from_dict
from radit_fast.config.run import RunOptions
from radit_fast.io import RaditError

logger = logging.getLogger("radit_fast.cli.eval")

_positive = arg_type(int, {"ge": 1})

#: ``EvalSettings`` fields that are inference flags of ``radit eval``, ``radit run`` and ``radit demo``.
EVAL_FLAGS = ("k", "shots", "decode", "reweight", "max_new_tokens", "max_length", "retriever_temperature",
              "choice_score", "show_choices", "batch_size", "impl", "seed")
_EVAL_DESTS = {"batch_size": "eval_batch_size"}


def add_eval_options(p: argparse.ArgumentParser, *, defaults: bool = True,
                     shown: Mapping[str, str] | None = None) -> None:
    """Inference options shared by ``radit eval``, ``radit run`` and ``radit demo``: the :data:`EVAL_FLAGS` of
    ``EvalSettings``, and ``--dtype``/``--device`` of ``RunOptions``.

    ``defaults=False``: unset flags are None (a run file decides). ``shown`` (by option dest) replaces the
    default a help text states, for commands whose defaults come from elsewhere (``radit demo``: demo.yaml)."""
    g = p.add_argument_group("inference")
    add_arguments(g, EvalSettings, only=EVAL_FLAGS, defaults=defaults, shown=shown, dests=_EVAL_DESTS)
    add_arguments(g, RunOptions, only=("eval_dtype", "device"), defaults=defaults, shown=shown,
                  dests={"eval_dtype": "dtype"})


def eval_values(args: argparse.Namespace) -> dict[str, Any]:
    """The :data:`EVAL_FLAGS` values of parsed arguments, by ``EvalSettings`` field (None: not given)."""
    return {name: getattr(args, _EVAL_DESTS.get(name, name)) for name in EVAL_FLAGS}


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    values = {**eval_values(args), "template": getattr(args, "template", "auto")}
    s = from_dict(EvalSettings, values, source="command line")
    s.validate()
    return s


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate an LM with parallel retrieval augmentation",
                              description="Evaluate an LM (alone, or with a retriever and the REPLUG ensemble) on "
                                          "a KILT task file: exact match / F1 for generation, accuracy for "
                                          "multiple choice, recall@k when the examples have provenance.")
    p.add_argument("--test", type=Path,
                   help="examples to evaluate (radit/KILT records: JSON lines, Parquet, a datasets folder[:split]; an MMLU "
                        "folder), or a text (--task lm)")
    p.add_argument("--task", choices=["tasks", "lm", "paper"], default="tasks",
                   help="tasks: answer the examples (default); lm: perplexity and bits per byte of a text file, "
                        "with and without the k retrieved passages (REPLUG ensemble); paper: the paper's Table 2 "
                        "(five rows x --tasks, 0- and 5-shot) from a finished --run")
    p.add_argument("--run", type=Path, help="--task paper: the radit run folder (tuned and base models, index)")
    p.add_argument("--tasks", nargs="+", metavar="NAME=PATH", default=[],
                   help="--task paper: task files, e.g. mmlu=data/mmlu nq=nq-dev-kilt.jsonl "
                        "triviaqa=triviaqa-dev-kilt.jsonl eli5=eli5-dev-kilt.jsonl")
    p.add_argument("--shot-pools", nargs="+", metavar="NAME=PATH", default=[],
                   help="--task paper: few-shot pools per task (KILT train files; MMLU uses its dev split)")
    p.add_argument("--paper-shots", default="0,5", help="--task paper: shot settings (default 0,5)")
    p.add_argument("--long-form-tokens", type=_positive, default=128,
                   help="--task paper: generation budget for ELI5 (default 128)")
    p.add_argument("--format", choices=["auto", "radit", "kilt", "mmlu"], default="auto",
                   help="task file format (default auto: MMLU for a folder or .csv, KILT for its released files)")
    add_arguments(p, EvalSettings, only=("template",), defaults=True)
    add_arguments(p, LMEvalSettings, only=("stride", "context"), defaults=True)
    p.add_argument("--out", required=True, type=Path, help="output folder (predictions.jsonl, metrics.json)")
    p.add_argument("--index", type=Path, help="index folder from `radit index build` (needed when --k > 0)")
    p.add_argument("--query-encoder", help="query encoder folder (default: the index's; e.g. a tuned one)")
    p.add_argument("--lm", help="causal LM name or folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--train", type=Path, help="train split: demonstrations for --shots, and checked disjoint from --test")
    p.add_argument("--limit", type=_positive, help="evaluate only the first N examples")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_eval_options(p)
    p.set_defaults(func=cmd_eval)


def load_split(path: Path, name: str, fmt: str = "auto") -> list:
    """A task split, validated (answers required, known fields only, no duplicates, not empty), in any
    format :func:`radit_fast.data.readers.load_examples` reads (MMLU: ``--train`` is its dev split)."""
    from radit_fast.data.readers import load_examples

    if path is None:
        raise RaditError(f"--{name} is required")
    return load_examples(path, format=fmt, split="dev" if name == "train" else "test", require_answers=True)


def check_inputs(args: argparse.Namespace) -> tuple[list, list | None]:
    """Everything ``radit eval`` can check before loading a model or retrieving: the files, the LM's and the
    query encoder's configs and tokenizers, and (with the LM's tokenizer) that every prompt fits
    ``--max-length``."""
    from radit_fast.data.tasks import check_disjoint

    test = load_split(args.test, "test", args.format)
    if args.limit:
        test = test[: args.limit]
    train = load_split(args.train, "train", args.format) if args.train else None
    if train is not None:
        check_disjoint(train, test, names=("train", "test"))
    if args.shots and train is None:
        raise RaditError("--shots needs --train (the demonstrations come from the train split)")
    needs_retrieval = args.k > 0 and any(not ex.context for ex in test)
    if needs_retrieval and args.index is None:
        raise RaditError("--k > 0 needs --index (or pass --k 0 to evaluate the LM alone)")
    if args.index is not None and not (Path(args.index) / "manifest.json").is_file():
        raise RaditError(f"{args.index}: not an index folder (no manifest.json; build one with `radit index build`)")
    from radit_fast.evaluation.scoring import check_prompts_fit
    from radit_fast.pipeline.checks import check_encoder, check_lm_reference

    tok = check_lm_reference(args.lm, "--lm")
    if args.query_encoder is not None:
        check_encoder(args.query_encoder, "--query-encoder")
    check_prompts_fit(tok, test, settings_from_args(args), train)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise RaditError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise RaditError(f"{out}: already exists (use --overwrite to replace its results)")
    return test, train


def load_eval_lm(name: str | None, dtype: str, device: str | None) -> tuple[Any, Any]:
    import torch

    from radit_fast.models import load_lm

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_lm(name, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, device=dev)


def cmd_eval(args: argparse.Namespace) -> int:
    from radit_fast.evaluation.evaluate import evaluate_examples, per_task_metrics, retrieve
    from radit_fast.io import claimed_dir, write_json, write_jsonl

    if args.task == "lm":
        return cmd_eval_lm(args)
    if args.task == "paper":
        return cmd_eval_paper(args)
    if args.test is None:
        raise RaditError("--test is required")
    settings = settings_from_args(args)
    test, train = check_inputs(args)
    t0 = time.perf_counter()
    retrieved = None
    if settings.k > 0 and args.index is not None:
        import torch

        from radit_fast.retrieval.retriever import Retriever

        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        retriever = Retriever.load(args.index, args.query_encoder, device=dev)
        retrieved = retrieve(retriever, test, settings.k, progress=args.progress)
    model, tok = load_eval_lm(args.lm, args.dtype, args.device)
    preds, metrics = evaluate_examples(model, tok, test, retrieved, settings, train=train, progress=args.progress)
    out = Path(args.out)
    with claimed_dir(out, fresh=not args.overwrite):  # never mixed with, or replacing, another run's results
        write_jsonl(out / "predictions.jsonl", preds)
        metrics["seconds"] = round(time.perf_counter() - t0, 2)
        write_json(out / "metrics.json", {"metrics": metrics, "by_task": per_task_metrics(test, preds),
                                          "settings": vars(settings),
                                          "test": str(args.test), "lm": args.lm or "default",
                                          "index": str(args.index) if args.index else None,
                                          "query_encoder": args.query_encoder})
    shown = "  ".join(f"{k} {100 * v:.1f}" for k, v in metrics.items()
                      if isinstance(v, float) and not k.startswith("n_") and k != "seconds")
    print(f"{shown}  ({metrics['n_examples']} examples, {metrics['seconds']:.0f} s) -> {out}")
    return 0


def cmd_eval_lm(args: argparse.Namespace) -> int:
    """``radit eval --task lm``: perplexity and bits per byte of ``--test`` (a UTF-8 text file)."""
    import torch

    from radit_fast.evaluation.perplexity import evaluate_lm
    from radit_fast.io import claimed_dir, write_json
    from radit_fast.pipeline.checks import check_encoder, check_lm_reference

    if args.test is None:
        raise RaditError("--test is required (a UTF-8 text file)")
    path = Path(args.test)
    if not path.is_file():
        raise RaditError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RaditError(f"{path}: not a UTF-8 text file") from None
    settings = LMEvalSettings(stride=args.stride, context=args.context, k=args.k if args.index else 0,
                              max_length=args.max_length, retriever_temperature=args.retriever_temperature,
                              batch_size=args.eval_batch_size, impl=args.impl)
    settings.validate()
    if args.index is not None and not (Path(args.index) / "manifest.json").is_file():
        raise RaditError(f"{args.index}: not an index folder (no manifest.json; build one with `radit index build`)")
    check_lm_reference(args.lm, "--lm")
    if args.query_encoder is not None:
        check_encoder(args.query_encoder, "--query-encoder")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise RaditError(f"{out}: already exists (use --overwrite to replace its results)")
    t0 = time.perf_counter()
    retriever = None
    if settings.k > 0:
        from radit_fast.retrieval.retriever import Retriever

        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        retriever = Retriever.load(args.index, args.query_encoder, device=dev)
    model, tok = load_eval_lm(args.lm, args.dtype, args.device)
    res = evaluate_lm(model, tok, text, settings, retriever=retriever)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    with claimed_dir(out, fresh=not args.overwrite):
        write_json(out / "metrics.json", {"metrics": res, "settings": vars(settings), "test": str(path),
                                          "lm": args.lm or "default",
                                          "index": str(args.index) if args.index else None,
                                          "query_encoder": args.query_encoder})
    rows = [("LM alone", res["lm_only"])] + ([(f"REPLUG k={settings.k}", res["retrieval"])] if res["retrieval"] else [])
    for name, r in rows:
        print(f"{name}: perplexity {r['perplexity']:.3f}  bits/byte {r['bits_per_byte']:.4f}")
    print(f"({res['tokens']} tokens, {res['windows']} windows, {res['seconds']:.0f} s) -> {out}")
    return 0


def _named_paths(items: list[str], option: str) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise RaditError(f"{option}: expected NAME=PATH, got {item!r}")
        if not Path(path).exists():
            raise RaditError(f"{option} {name}: {path}: no such file or folder")
        out[name] = Path(path)
    return out


def cmd_eval_paper(args: argparse.Namespace) -> int:
    """``radit eval --task paper``: the paper's Table 2 layout from a finished ``radit run``."""
    from radit_fast.pipeline.paper import paper_table, render_paper_table

    if args.run is None:
        raise RaditError("--task paper needs --run (a finished radit run folder)")
    tasks = _named_paths(args.tasks, "--tasks")
    if not tasks:
        raise RaditError("--task paper needs --tasks NAME=PATH ... (mmlu, nq, triviaqa, eli5)")
    try:
        shots = sorted({int(x) for x in args.paper_shots.split(",")})
    except ValueError:
        raise RaditError(f"--paper-shots: expected integers such as 0,5, got {args.paper_shots!r}") from None
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise RaditError(f"{out}: already exists (use --overwrite to replace its results)")
    table = paper_table(args.run, tasks, out, train=_named_paths(args.shot_pools, "--shot-pools"), shots=shots,
                        max_new_tokens={"eli5": args.long_form_tokens}, limit=args.limit, device=args.device,
                        progress=args.progress)
    print(render_paper_table(table))
    return 0
