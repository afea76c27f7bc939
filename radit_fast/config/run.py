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

Precedence: the dataclass defaults < ``run_defaults`` of presets.yaml (the paper's stage sizing) < a
``--preset`` < the file < command-line flags. Unknown keys are errors; every section is read by the one
loader of :mod:`radit_fast.config.fields`.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radit_fast.config.evaluation import EvalSettings
from radit_fast.config.fields import check_fields, from_dict, load_config_file, option
from radit_fast.config.stages import DEVICES, STAGE_PATHS, RaItConfig, RetrieverConfig, config_from_dict
from radit_fast.io import RaditError

PRESETS_FILE = Path(__file__).resolve().with_name("presets.yaml")
#: ``radit demo``'s run file (its sections are also the ``cpu`` preset, with a ``data`` section of its own).
DEMO_FILE = PRESETS_FILE.parent.parent / "pipeline" / "demo.yaml"
DTYPES = ("fp32", "bf16")
SECTIONS = ("run", "eval", "train_lm", "train_retriever")


@dataclass
class RunOptions:
    """Pipeline options that belong to no single stage."""

    chunk_words: int = option(200, "max words per passage when the corpus is chunked (paper: 200)", ge=1)
    index_factory: str = option("Flat", "FAISS index_factory string")
    encoder_batch_size: int = option(64, "texts per encoder batch when indexing")
    eval_dtype: str = option("fp32", "LM weights for evaluation and LSR scoring (bf16 is about 3x faster on CPUs "
                                     "with AVX-512 BF16)", choices=DTYPES, flag="--dtype")
    train_dtype: str = option("fp32", "base weights in stage 1 (bf16 needs train_lm.lora)", choices=DTYPES)
    dev_examples: int | None = option(None, "dev examples used for step selection (None: all)", ge=1)
    select_every: int = option(0, "score a candidate on dev every N training steps (0: the last step only)", ge=0)
    select_metric_lm: str = option("avg", "dev metric for the LM steps (avg = mean of em and accuracy)",
                                   choices=("avg", "em", "f1", "accuracy"))
    select_metric_retriever: str = option("recall@1", "dev metric for the retriever steps (falls back to avg)",
                                          choices=("recall@1", "recall@10", "avg"))
    retriever_train_examples: int | None = option(None, "stage 2 on a seeded subset of train (None: all of it)",
                                                  ge=1)
    retriever_train_kind: str = option("all", "stage 2 examples", choices=("all", "generation", "multiple_choice"))
    device: str | None = option(None, "device (default cuda when available)", choices=DEVICES)
    threads: int | None = option(None, "torch CPU threads")

    def validate(self) -> None:
        check_fields(self, lambda f: f"run.{f.name}")


@functools.cache
def _presets_data() -> dict[str, Any]:
    return load_config_file(PRESETS_FILE)


def run_defaults() -> dict[str, dict[str, Any]]:
    """The stage sections every ``radit run`` starts from (presets.yaml ``run_defaults``: the paper's sizing)."""
    return {name: dict(values) for name, values in _presets_data()["run_defaults"].items()}


def preset_names() -> tuple[str, ...]:
    return tuple(_presets_data()["presets"])


def preset_sections(name: str) -> dict[str, Any]:
    """The run-file sections of a ``--preset`` (presets.yaml); a run file and flags override them."""
    presets = _presets_data()["presets"]
    if name not in presets:
        raise RaditError(f"--preset must be one of {', '.join(presets)}, got {name!r}")
    preset = presets[name]
    if isinstance(preset, str):
        preset = load_run_file(PRESETS_FILE.parent.parent / preset, extra_sections=("data",))
        preset.pop("data", None)
    return {section: dict(values) for section, values in preset.items()}


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
    train_lm: dict[str, Any] = field(default_factory=lambda: run_defaults()["train_lm"])
    train_retriever: dict[str, Any] = field(default_factory=lambda: run_defaults()["train_retriever"])

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
        base = {"train": self.train, "index": str(Path(self.out) / "index" / "index"), "out": str(out),
                "lm": self.lm, "seed": self.seed, "progress": self.progress, "impl": self.eval.impl,
                "device": self.run.device, "threads": self.run.threads, **extra}
        return config_from_dict(cls, {**base, **section}, source=f"run config ({cls.__name__})")

    def lm_config(self, out: Path) -> RaItConfig:
        return self._stage(RaItConfig, self.train_lm, out)

    def retriever_config(self, out: Path) -> RetrieverConfig:
        # stage 2 trains the tau_R that evaluation uses (a train_retriever section may still set its own)
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


def load_run_file(path: str | Path, *, extra_sections: tuple[str, ...] = ()) -> dict[str, Any]:
    """The sections of a run file (RaditError for unknown sections or a non-mapping section)."""
    data = load_config_file(path)
    known = (*SECTIONS, *extra_sections)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RaditError(f"{path}: unknown section(s) {unknown} (expected {', '.join(known)})")
    for key, value in data.items():
        if not isinstance(value, dict):
            raise RaditError(f"{path}: section {key!r} must be a mapping")
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
    """RunConfig from :func:`run_defaults` < ``file`` sections < ``overrides`` sections (same layout)."""
    sec = merge_sections(run_defaults(), file or {}, overrides or {})
    for stage in ("train_lm", "train_retriever"):
        owned = sorted({k.replace("-", "_") for given in (file or {}, overrides or {})
                        for k in given.get(stage, {})} & set(STAGE_PATHS))
        if owned:
            raise RaditError(f"{stage}: {owned} are set by radit run itself (use --train, --lm, --out)")
    cfg = RunConfig(corpus=corpus, train=train, dev=dev, test=test, out=out,
                    run=from_dict(RunOptions, sec.get("run", {}), source="run options"),
                    eval=from_dict(EvalSettings, sec.get("eval", {}), source="eval options"),
                    train_lm=sec["train_lm"], train_retriever=sec["train_retriever"], **top)
    cfg.validate()
    return cfg
