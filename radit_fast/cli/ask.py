"""``radit ask``: answer questions with a tuned RA-DIT system and cite the passages used.

    radit ask --run runs/exp "Which element has the symbol W?"
    radit ask --lm PATH --index runs/idx [--query-encoder PATH] "question" ...
    cat questions.txt | radit ask --run runs/demo --json

With no question on the command line, questions are read from stdin, one per line (blank lines skipped).
Each answer is printed with its ensemble log-probability and the passages it was conditioned on, with
their retriever weights; ``--json`` prints one JSON object per question instead (JSON lines). The answers
come from :class:`radit_fast.inference.RaditSystem`, i.e. from the same code as ``radit eval``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from radit_fast.config.evaluation import EvalSettings
from radit_fast.config.fields import add_arguments
from radit_fast.config.run import RunOptions
from radit_fast.io import RaditError

_RUN_DEFAULT = ("k", "decode", "max_new_tokens", "retriever_temperature")  # the run's settings, else EvalSettings'


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ask", help="answer questions with a (tuned) retrieval-augmented LM",
                              description="Answer questions with the LM, retriever and index of a `radit run` "
                                          "folder (or given one by one) and print the cited passages.")
    p.add_argument("questions", nargs="*", metavar="QUESTION",
                   help="questions (default: read from stdin, one per line)")
    p.add_argument("--run", type=Path, help="a radit run / radit demo output folder (tuned LM and query encoder)")
    p.add_argument("--base-lm", action="store_true", help="with --run: the run's base LM instead of the tuned one")
    p.add_argument("--base-retriever", action="store_true",
                   help="with --run: the index's own query encoder instead of the tuned one")
    p.add_argument("--lm", help="causal LM name or folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--index", type=Path, help="index folder from `radit index build` (none: the LM alone)")
    p.add_argument("--query-encoder", help="query encoder folder (default: the index's)")
    p.add_argument("--choices", help="multiple choice: the options, separated by '|' (same for every question)")
    p.add_argument("--json", action="store_true", help="one JSON object per question (JSON lines)")
    shown = {name: f"the run's, else {getattr(EvalSettings, name)}" for name in _RUN_DEFAULT}
    shown["k"] += "; 0 without --index"
    add_arguments(p, EvalSettings, only=_RUN_DEFAULT, shown=shown)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="LM weights (default auto: bf16 where the device computes it natively)")
    add_arguments(p, RunOptions, only=("device",))
    p.set_defaults(func=cmd_ask)


def read_questions(args: argparse.Namespace, stdin=None) -> list[str]:
    if args.questions:
        qs = [q.strip() for q in args.questions]
        if not all(qs):
            raise RaditError("an empty question was given")
        return qs
    stream = stdin if stdin is not None else sys.stdin
    if stream.isatty():
        raise RaditError("no question: give one as an argument or pipe them in, one per line")
    qs = [line.strip() for line in stream if line.strip()]
    if not qs:
        raise RaditError("no question on stdin")
    return qs


def load_system(args: argparse.Namespace):
    from radit_fast.inference import RaditSystem

    if args.run is not None:
        if args.lm or args.index or args.query_encoder:
            raise RaditError("--run takes the LM, index and query encoder from the run: drop --lm/--index/"
                             "--query-encoder (or drop --run)")
        return RaditSystem.from_run(args.run, lm="base" if args.base_lm else "tuned",
                                    retriever="base" if args.base_retriever else "tuned", device=args.device,
                                    dtype=args.dtype)
    if args.base_lm or args.base_retriever:
        raise RaditError("--base-lm and --base-retriever need --run")
    if args.query_encoder and args.index is None:
        raise RaditError("--query-encoder needs --index")
    if args.index is None and args.k:
        raise RaditError("--k > 0 needs --index")
    if args.index is not None and not (Path(args.index) / "manifest.json").is_file():
        raise RaditError(f"{args.index}: not an index folder (no manifest.json; build one with `radit index build`)")
    from radit_fast.pipeline.checks import check_encoder, check_lm_reference

    check_lm_reference(args.lm, "--lm")
    if args.query_encoder is not None:
        check_encoder(args.query_encoder, "--query-encoder")
    return RaditSystem.from_parts(args.lm, args.index, args.query_encoder, device=args.device, dtype=args.dtype,
                                  settings=EvalSettings(k=10 if args.index is not None else 0))


def _show(answer, out) -> None:
    lp = f"   (log p = {answer.logprob:.3f})" if answer.logprob is not None else ""
    out.write(f"Q: {answer.question}\nA: {answer.text or '(no answer)'}{lp}\n")
    for i, p in enumerate(answer.passages, 1):
        text = " ".join(p.text.split())
        text = text if len(text) <= 100 else text[:97] + "..."
        out.write(f"   [{i}] {p.weight:.3f}  {p.id}  {text}\n")
    out.write("\n")


def cmd_ask(args: argparse.Namespace) -> int:
    questions = read_questions(args)
    choices = None
    if args.choices is not None:
        choices = [c.strip() for c in args.choices.split("|")]
        if len(choices) < 2 or not all(choices) or len(set(choices)) != len(choices):
            raise RaditError("--choices must list at least 2 distinct non-empty options separated by '|'")
    system = load_system(args)
    opts = {"k": args.k, "retriever_temperature": args.retriever_temperature}
    if choices is not None:
        answers = system.choose(questions, [choices] * len(questions), **opts)
    else:
        answers = system.generate(questions, decode=args.decode, max_new_tokens=args.max_new_tokens, **opts)
    for a in answers:
        if args.json:
            sys.stdout.write(json.dumps(a.to_json(), ensure_ascii=False) + "\n")
        else:
            _show(a, sys.stdout)
    return 0
