"""Settings of ``radit run``: inputs, index, inference, the two tuning stages and step selection.

A run file (YAML/TOML, ``radit run --config FILE``) holds up to four sections::

    run:              # RunOptions fields (index, selection, precision)
      chunk_words: 64
    eval:             # EvalSettings fields (k, shots, decode, max_new_tokens, ...)
      k: 4
    train_lm:         # RaItConfig fields (radit train-lm)
      max_steps: 60
    train_retriever:  # RetrieverConfig fields (radit train-retriever)
      max_steps: 40

Precedence: built-in defaults (the paper's settings, see ``PAPER_LM`` and ``PAPER_RETRIEVER``) < the file
< command-line flags. Unknown keys are errors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radit_fast.evaluation.scoring import EvalSettings
from radit_fast.io import RaditError

# Paper settings for stage 1 (RA-DIT section 4: lr 1e-5 cosine to 1e-7, 200 warm-up steps, 500 steps,
# k' = 3 chunks per example) and stage 2 (k = 10 chunks, tau_LSR = 0.01).
PAPER_LM: dict[str, Any] = {"max_steps": 500, "batch_size": 64, "lr": 1e-5, "min_lr_ratio": 0.01,
                            "warmup_steps": 200, "k": 3, "max_length": 512}
PAPER_RETRIEVER: dict[str, Any] = {"max_steps": 500, "batch_size": 32, "lr": 1e-5, "warmup_steps": 50,
                                   "k": 10, "lm_temperature": 0.01}

#: ``radit run --preset NAME``: ``paper`` = the built-in defaults above (hours on a CPU, sized for GPUs);
#: ``cpu`` = the sections of demo.yaml (``radit demo``'s sizing: about 15 minutes on 2 CPU cores).
DEMO_FILE = Path(__file__).resolve().with_name("demo.yaml")
PRESETS = ("paper", "cpu")


@dataclass
class RunOptions:
    """Pipeline options that belong to no single stage."""

    chunk_words: int = 200               # words per passage when the corpus is chunked (paper: 200)
    index_factory: str = "Flat"          # FAISS index_factory string
    encoder_batch_size: int = 64         # texts per encoder batch when indexing
    eval_dtype: str = "fp32"             # fp32 | bf16 weights of the evaluated LMs (and of LSR scoring)
    train_dtype: str = "fp32"            # fp32 | bf16 base weights in stage 1 (bf16 needs train_lm.lora)
    dev_examples: int | None = None      # dev examples used for step selection (None: all)
    select_every: int = 0                # evaluate a candidate every N training steps on dev (0: last only)
    select_metric_lm: str = "avg"        # dev metric for the LM steps (avg = mean of em and accuracy)
    select_metric_retriever: str = "recall@1"  # dev metric for the retriever steps (falls back to avg)
    retriever_train_examples: int | None = None  # stage 2 on a seeded subset of train (None: all of it)
    retriever_train_kind: str = "all"    # stage 2 examples: all | generation | multiple_choice
    device: str | None = None            # cpu | cuda (default: cuda when available)
    threads: int | None = None           # torch CPU threads

    def validate(self) -> None:
        if self.chunk_words < 1:
            raise RaditError(f"run.chunk_words must be >= 1, got {self.chunk_words}")
        for name in ("eval_dtype", "train_dtype"):
            if getattr(self, name) not in ("fp32", "bf16"):
                raise RaditError(f"run.{name} must be fp32 or bf16, got {getattr(self, name)!r}")
        if self.dev_examples is not None and self.dev_examples < 1:
            raise RaditError(f"run.dev_examples must be >= 1, got {self.dev_examples}")
        if self.retriever_train_examples is not None and self.retriever_train_examples < 1:
            raise RaditError(f"run.retriever_train_examples must be >= 1, got {self.retriever_train_examples}")
        if self.retriever_train_kind not in ("all", "generation", "multiple_choice"):
            raise RaditError("run.retriever_train_kind must be all, generation or multiple_choice, "
                             f"got {self.retriever_train_kind!r}")
        if self.select_every < 0:
            raise RaditError(f"run.select_every must be >= 0, got {self.select_every}")
        if self.select_metric_retriever not in ("recall@1", "recall@10", "avg"):
            raise RaditError("run.select_metric_retriever must be recall@1, recall@10 or avg")
        if self.select_metric_lm not in ("avg", "em", "f1", "accuracy"):
            raise RaditError("run.select_metric_lm must be avg, em, f1 or accuracy")
        if self.device not in (None, "cpu", "cuda"):
            raise RaditError(f"run.device must be cpu or cuda, got {self.device!r}")


@dataclass
class RunConfig:
    corpus: str
    train: str
    dev: str
    test: str
    out: str
    lm: str | None = None
    encoder: str | None = None
    seed: int = 0
    progress: bool = True
    run: RunOptions = field(default_factory=RunOptions)
    eval: EvalSettings = field(default_factory=EvalSettings)
    train_lm: dict[str, Any] = field(default_factory=lambda: dict(PAPER_LM))
    train_retriever: dict[str, Any] = field(default_factory=lambda: dict(PAPER_RETRIEVER))

    def validate(self) -> None:
        for name in ("corpus", "train", "dev", "test", "out"):
            if not getattr(self, name):
                raise RaditError(f"--{name} is required")
        self.run.validate()
        self.eval.validate()
        lm_cfg = self.lm_config(Path(self.out) / "x")
        lm_cfg.validate()
        if self.run.train_dtype == "bf16" and not lm_cfg.lora:
            raise RaditError("run.train_dtype bf16 trains LoRA adapters over frozen bf16 weights: set train_lm.lora "
                             "(full fine-tuning in bf16 would lose the small updates)")
        self.retriever_config(Path(self.out) / "x").validate()

    # The stage configurations, pointing at this run's files.
    def _stage(self, cls: type, section: dict[str, Any], out: Path, **extra: Any):
        from radit_fast.training.config import config_from_dict

        base = {"train": self.train, "index": str(Path(self.out) / "index" / "index"), "out": str(out),
                "lm": self.lm, "seed": self.seed, "progress": self.progress, "impl": self.eval.impl,
                "device": self.run.device, "threads": self.run.threads, **extra}
        return config_from_dict(cls, {**base, **section}, source=f"run config ({cls.__name__})")

    def lm_config(self, out: Path):
        from radit_fast.training.config import RaItConfig

        return self._stage(RaItConfig, self.train_lm, out)

    def retriever_config(self, out: Path):
        from radit_fast.training.config import RetrieverConfig

        extra = {"retriever_temperature": self.eval.retriever_temperature,
                 "cache_dir": str(Path(self.out) / "lsr_cache" / self.run.eval_dtype)}
        return self._stage(RetrieverConfig, self.train_retriever, out, **extra)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def plan(self, *, documents: int, n_train: int, n_dev: int, n_test: int, n_retriever_train: int,
             device: str) -> tuple[list[str], bool]:
        """What the run will compute, stage by stage (sequences through the LM, tokens per step), and whether
        it is sized beyond a CPU (the paper's settings): printed before any work, so that a run of hours
        is a choice. Counts are upper bounds where prompts are shorter than ``max_length``."""
        lm, r, ev = self.lm_config(Path(self.out) / "x"), self.retriever_config(Path(self.out) / "x"), self.eval
        n_r = min(n_retriever_train, r.max_examples or n_retriever_train)
        n_lm = min(n_train, lm.max_examples or n_train)
        lm_seqs = lm.max_steps * lm.batch_size
        candidates = max(1, lm.max_steps // self.run.select_every) if self.run.select_every else 1
        lines = [
            f"plan ({device}): index of {documents} documents in passages of at most {self.run.chunk_words} words",
            f"  train_lm: {n_lm} examples x k={lm.k} = {n_lm * lm.k} instances; {lm.max_steps} steps x "
            f"{lm.batch_size} sequences of <= {lm.max_length} tokens (<= {lm.batch_size * lm.max_length:,} tokens "
            f"per step, {lm_seqs:,} forward+backward passes in all)",
            f"  train_retriever: LSR scoring of {n_r} examples x k={r.k} = {n_r * r.k:,} LM sequences of <= "
            f"{r.max_length} tokens (once, cached), then {r.max_steps} steps x {r.batch_size} queries",
            f"  evaluation: 5 rows x {n_test} test examples x k={ev.k} passages (~{5 * n_test * max(ev.k, 1):,} "
            f"prompts of <= {ev.max_length} tokens), plus {candidates} candidate(s) per stage x {n_dev} dev examples",
        ]
        heavy = device == "cpu" and lm_seqs * lm.max_length > 2_000_000
        return lines, heavy


def _typed(cls: type, data: dict[str, Any], source: str, base: Any = None) -> Any:
    """A dataclass instance from ``data`` over ``base`` with light type checks (unknown keys are errors)."""
    import typing

    hints = typing.get_type_hints(cls)
    values = dataclasses.asdict(base) if base is not None else {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in hints:
            raise RaditError(f"{source}: unknown option {key!r}")
        tp = hints[name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        want = args[0] if args else tp
        if value is None and type(None) in typing.get_args(tp):
            values[name] = None
            continue
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want in (int, float, str, bool) and not (isinstance(value, want) and
                                                    not (want is int and isinstance(value, bool))):
            raise RaditError(f"{source}: {key} must be {want.__name__}, got {value!r}")
        values[name] = value
    return cls(**values)


def load_run_file(path: str | Path, *, extra_sections: tuple[str, ...] = ()) -> dict[str, Any]:
    """The sections of a run file (RaditError for unknown sections or a non-mapping section)."""
    from radit_fast.training.config import load_config_file

    data = load_config_file(path)
    known = ("run", "eval", "train_lm", "train_retriever", *extra_sections)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RaditError(f"{path}: unknown section(s) {unknown} (expected {', '.join(known)})")
    for key, value in data.items():
        if not isinstance(value, dict):
            raise RaditError(f"{path}: section {key!r} must be a mapping")
    return data


def preset_sections(name: str) -> dict[str, Any]:
    """The run-file sections of a preset (see :data:`PRESETS`); a run file and flags override them."""
    if name not in PRESETS:
        raise RaditError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    if name == "paper":
        return {}
    data = load_run_file(DEMO_FILE, extra_sections=("data",))
    data.pop("data", None)
    return data


def merge_sections(*files: dict[str, Any]) -> dict[str, Any]:
    """Run-file sections merged key by key, later files winning (a preset, then --config)."""
    out: dict[str, dict[str, Any]] = {}
    for f in files:
        for section, values in f.items():
            out.setdefault(section, {}).update(values)
    return out


def make_config(*, corpus: str, train: str, dev: str, test: str, out: str, file: dict[str, Any] | None = None,
                overrides: dict[str, dict[str, Any]] | None = None, **top: Any) -> RunConfig:
    """RunConfig from paper defaults < ``file`` sections < ``overrides`` sections (same layout)."""
    file = file or {}
    overrides = overrides or {}
    sec = lambda name: {**file.get(name, {}), **overrides.get(name, {})}  # noqa: E731
    for stage in ("train_lm", "train_retriever"):
        owned = sorted({k.replace("-", "_") for k in sec(stage)} & {"train", "index", "out", "lm"})
        if owned:
            raise RaditError(f"{stage}: {owned} are set by radit run itself (use --train, --lm, --out)")
    run = _typed(RunOptions, sec("run"), "run options")
    ev = _typed(EvalSettings, sec("eval"), "eval options")
    cfg = RunConfig(corpus=corpus, train=train, dev=dev, test=test, out=out, run=run, eval=ev,
                    train_lm={**PAPER_LM, **sec("train_lm")},
                    train_retriever={**PAPER_RETRIEVER, **sec("train_retriever")}, **top)
    cfg.validate()
    return cfg
