"""Configuration of the two tuning stages (``radit train-lm``, ``radit train-retriever``).

Precedence: dataclass defaults < config file (``--config run.yaml`` or ``.toml``) < command-line flags.
Keys are the field names (``max_steps``; ``max-steps`` is accepted too). Unknown keys, wrong types and
inconsistent values raise :class:`~radit_fast.io.RaditError` before any model is loaded. Each option is
declared once below (:func:`~radit_fast.config.fields.option`): its flag, run-file key and checks derive from it.

Batch semantics (the same whatever the number of processes): ``batch_size`` is the *global* number of
training instances per optimizer step; each of the ``world_size`` processes runs ``grad_accum``
micro-batches of ``batch_size / (world_size * grad_accum)`` instances. The loss is normalised by the
global batch (answer tokens for stage 1, examples for stage 2), so 1 process and N processes compute the
same update on the same global batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import typing
from dataclasses import dataclass, fields
from typing import Any

from radit_fast import __version__
from radit_fast.config.evaluation import RETRIEVER_TEMPERATURE
from radit_fast.config.fields import add_arguments, check_fields, check_value, from_dict, load_config_file, option
from radit_fast.io import RaditError, atomic_file
from radit_fast.ops._dispatch import IMPLS
from radit_fast.ops.lsr import DIRECTIONS, SCORE_KINDS

REPORT_TO = ("none", "tensorboard")
DEVICES = ("cpu", "cuda")
#: Fields the ``radit train-*`` commands declare as paths of their own (not from a stage's run-file section).
STAGE_PATHS = ("train", "index", "out", "lm")


def check_report_to(value: str) -> None:
    """RaditError for an unknown ``--report-to`` or a missing tensorboard package (before any model loads)."""
    check_value({"choices": REPORT_TO}, "--report-to", value)
    if value == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise RaditError("--report-to tensorboard needs the package tensorboard "
                         "(pip install radit-fast[tensorboard])")


@dataclass
class TrainConfig:
    """Knobs shared by both stages."""

    train: str = option("", "training examples, KILT-style records {id, input, output, [context]}: JSON lines, "
                            "Parquet, or a datasets folder[:split]")
    index: str = option("", "index folder built by `radit index build`")
    out: str = option("", "output folder (save_pretrained model, checkpoints, metrics.jsonl, config)")
    lm: str | None = option(None, "causal LM name or folder (default: the embedded SmolLM2-135M-Instruct)")
    seed: int = option(0, "seed for data order, template randomisation, sampling and initialisation")
    max_examples: int | None = option(None, "use only the first N training examples (default: all)", ge=1)
    max_steps: int = option(100, "optimizer steps", gt=0)
    batch_size: int = option(8, "global training instances per optimizer step (all processes together)", gt=0)
    grad_accum: int = option(1, "micro-batches per optimizer step on each process", gt=0)
    lr: float = option(1e-5, "peak learning rate", gt=0)
    min_lr_ratio: float = option(0.01, "final learning rate of the cosine schedule, as a fraction of --lr",
                                 ge=0, le=1)
    warmup_steps: int = option(10, "linear warm-up steps", ge=0)
    weight_decay: float = option(0.0, "AdamW weight decay", ge=0)
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.95, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 disables)", ge=0)
    bf16: bool = option(False, "bfloat16 autocast for the forward and backward passes (weights stay fp32)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    eval_file: str | None = option(None, "held-out examples for the periodic evaluation loss")
    eval_every: int = option(0, "evaluate every N steps (0: never; needs --eval-file)", ge=0)
    eval_examples: int = option(64, "at most this many held-out examples per evaluation")
    save_every: int = option(50, "write a checkpoint every N steps (0: only at the end)", ge=0)
    keep_checkpoints: int = option(2, "checkpoints kept on disk (oldest are deleted)", gt=0)
    log_every: int = option(1, "write a metrics line every N steps", gt=0)
    report_to: str = option("none", "also write the training curves for TensorBoard (event files in "
                                    "OUT/tensorboard, beside metrics.jsonl; no network)", choices=REPORT_TO)
    resume: bool = option(False, "continue from the last checkpoint in --out")
    overwrite: bool = option(False, "allow --out to exist (without --resume its checkpoints are discarded)")
    progress: bool = option(True, "show a progress bar")
    threads: int | None = option(None, "torch CPU threads per process (default: torch's choice)")
    fsdp: bool = option(False, "shard parameters with FSDP (under torchrun) instead of DDP")
    impl: str = option("auto", "backend of the fused ops", choices=IMPLS)
    device: str | None = option(None, "device (default: cuda when available)", choices=DEVICES)

    def validate(self) -> None:
        for name in ("train", "index", "out"):
            if not getattr(self, name):
                raise RaditError(f"--{name.replace('_', '-')} is required")
        check_fields(self)
        check_report_to(self.report_to)
        if self.batch_size % self.grad_accum:
            raise RaditError(f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum} "
                             "(each process runs grad_accum micro-batches of the global batch)")
        if self.eval_every and not self.eval_file:
            raise RaditError("--eval-every needs --eval-file")

    def micro_batch_size(self, world_size: int) -> int:
        """Instances per micro-batch on one process; RaditError when the global batch does not divide."""
        parts = world_size * self.grad_accum
        if self.batch_size % parts:
            raise RaditError(f"--batch-size {self.batch_size} must be a multiple of processes x --grad-accum "
                             f"= {world_size} x {self.grad_accum} = {parts}")
        return self.batch_size // parts


@dataclass
class RaItConfig(TrainConfig):
    """Stage 1, retrieval-augmented instruction tuning of the LM (``radit train-lm``)."""

    k: int = option(3, "retrieved chunks per example; one training instance per (example, chunk)", gt=0)
    max_length: int = option(256, "tokens per instance; only the chunk is truncated to fit", gt=0)
    lr: float = option(1e-5, "peak learning rate (paper: 1e-5)", gt=0)
    randomize_markers: bool = option(True, "randomise Q:/Question: and A:/Answer: per instance (paper)")
    append_eos: bool = option(True, "end each task answer with the tokenizer's EOS token, so the tuned LM learns "
                                    "to stop after the answer (self-supervised corpus continuations never get one)")
    corpus_fraction: float = option(0.0, "fraction of self-supervised corpus instances "
                                         "(chunk beginning -> continuation; paper: about 0.1)", ge=0, lt=1)
    corpus: str | None = option(None, "corpus JSON lines for self-supervised instances (default: the index's "
                                      "passage store)")
    packing: bool = option(True, "pack instances into one row per micro-batch, attention kept inside each "
                                 "instance (off: length-bucketed padded batches)")
    bucket_window: int = option(64, "global batches sorted together by length when bucketing", gt=0)
    lora: bool = option(False, "train LoRA adapters (peft) instead of all weights; OUT holds the merged model")
    lora_r: int = option(16, "LoRA rank", gt=0)
    lora_alpha: int = option(32, "LoRA alpha", gt=0)
    lora_dropout: float = option(0.0, "LoRA dropout")
    lora_target_modules: str = option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                      "comma-separated module names that get LoRA adapters")

    def validate(self) -> None:
        super().validate()
        if self.lora and self.fsdp:
            raise RaditError("--lora with --fsdp is not supported (LoRA models fit one device: use DDP)")


@dataclass
class RetrieverConfig(TrainConfig):
    """Stage 2, LM-supervised retrieval fine-tuning of the query encoder (``radit train-retriever``)."""

    k: int = option(10, "retrieved chunks per example scored by the frozen LM (>= 2: a distribution over chunks)",
                    ge=2)
    lr: float = option(1e-5, "peak learning rate", gt=0)
    batch_size: int = option(16, "global examples per optimizer step (each with k chunks)", gt=0)
    query_encoder: str | None = option(None, "initial query encoder (default: the index's encoder)")
    max_length: int = option(256, "tokens per augmented sequence when scoring with the LM", gt=0)
    query_max_length: int = option(128, "tokens per query for the query encoder", gt=0)
    retriever_temperature: float = option(RETRIEVER_TEMPERATURE, "tau_R: p_R(c|x) = softmax(E_q(x).E_d(c) / tau_R); 0.05-0.1 "
                                               "suits cosine scores (normalised encoders such as the default)",
                                          gt=0)
    lm_temperature: float = option(0.01, "tau_LSR: p_LSR(c|x,y) = softmax(score_LM / tau_LSR) (paper: 0.01)", gt=0)
    score_kind: str = option("mean", "LM score of a chunk: mean or sum answer-token log-prob, or prob",
                             choices=SCORE_KINDS)
    direction: str = option("lsr_to_retriever", "KL direction: lsr_to_retriever = KL(p_LSR||p_R) (Atlas, REPLUG "
                                                "code) | retriever_to_lsr = KL(p_R||p_LSR) (paper)",
                            choices=DIRECTIONS)
    corpus_fraction: float = option(0.0, "fraction of self-supervised corpus examples (paper: 0.95)", ge=0, lt=1)
    corpus: str | None = option(None, "corpus JSON lines for self-supervised examples (default: the index's "
                                      "passage store)")
    e2e_weight: float = option(0.0, "weight of the end-to-end objective -log p(y|x) of the REPLUG ensemble", ge=0)
    cache_dir: str | None = option(None, "LSR target cache (default: $RADIT_CACHE/lsr, RADIT_CACHE defaulting "
                                         "to ~/.cache/radit_fast)")
    score_batch_size: int = option(8, "examples (x k chunks) per forward pass when scoring with the frozen LM", gt=0)


# ---------------------------------------------------------------------------------------------- loading
C = typing.TypeVar("C", bound=TrainConfig)

#: Sections of a config file that hold one stage's keys (other stages' sections are ignored).
_SECTIONS = {"RaItConfig": ("train_lm", "train-lm", "ra_it"),
             "RetrieverConfig": ("train_retriever", "train-retriever", "r_it")}


def config_from_dict(cls: type[C], data: dict[str, Any], *, source: str = "config",
                     base: C | None = None) -> C:
    """Build ``cls`` from ``data`` on top of ``base`` (or the defaults), with type checks.

    A file may nest the keys under a section named after the stage (``[train_lm]`` / ``train_retriever:``);
    top-level scalar keys apply to both stages, and sections named after other stages are ignored, so one
    file can configure both stages.
    """
    own = _SECTIONS.get(cls.__name__, ())
    others = {s for k, v in _SECTIONS.items() if k != cls.__name__ for s in v}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key in own:
                flat.update(value)
            elif key not in others:
                raise RaditError(f"{source}: unknown section {key!r} (expected one of {', '.join(own)})")
        else:
            flat[key] = value
    return from_dict(cls, flat, source=source, base=base)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[TrainConfig]) -> None:
    """One ``--flag`` per option of ``cls`` but :data:`STAGE_PATHS` (default None, so that unset flags do not
    override a config file)."""
    add_arguments(parser, cls, skip=STAGE_PATHS)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """Defaults < ``args.config`` file < explicitly given flags; then :meth:`validate`."""
    cfg = cls()
    if getattr(args, "config", None):
        cfg = config_from_dict(cls, load_config_file(args.config), source=str(args.config))
    given = {f.name: getattr(args, f.name) for f in fields(cls)
             if getattr(args, f.name, None) is not None}
    cfg = config_from_dict(cls, given, source="command line", base=cfg)
    cfg.validate()
    return cfg


def resolved_config(cfg: TrainConfig, **extra: Any) -> dict[str, Any]:
    """The full configuration as written next to the outputs (plus run facts such as the world size)."""
    return {"stage": type(cfg).__name__, **dataclasses.asdict(cfg),
            "_run": {"radit_fast": __version__, "python": sys.version.split()[0], **extra}}


def write_resolved_config(cfg: TrainConfig, path: str | os.PathLike, **extra: Any) -> None:
    """Write :func:`resolved_config` as YAML, atomically."""
    import yaml

    with atomic_file(path) as f:
        yaml.safe_dump(resolved_config(cfg, **extra), f, sort_keys=False)


def read_resolved_config(cls: type[C], path: str | os.PathLike) -> C:
    """Reload a configuration written by :func:`write_resolved_config`."""
    data = load_config_file(path)
    data.pop("stage", None)
    data.pop("_run", None)
    return config_from_dict(cls, data, source=str(path))
