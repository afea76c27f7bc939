"""Configuration of the two tuning stages: dataclasses, YAML/TOML loading, CLI flags, resolved-config dump.

Precedence: dataclass defaults < config file (``--config run.yaml`` or ``.toml``) < command-line flags.
Keys are the field names (``max_steps``; ``max-steps`` is accepted too). Unknown keys, wrong types and
inconsistent values raise :class:`~radit_fast.io.RaditError` before any model is loaded.

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
from dataclasses import dataclass, field, fields
from typing import Any

from radit_fast.io import RaditError, atomic_file, require_file

_CLI_SKIP = {"train", "index", "out", "lm"}  # declared by the CLI itself (required/positional semantics)


REPORT_TO = ("none", "tensorboard")


def check_report_to(value: str) -> None:
    """RaditError for an unknown ``--report-to`` or a missing tensorboard package (before any model loads)."""
    if value not in REPORT_TO:
        raise RaditError(f"--report-to must be one of {'|'.join(REPORT_TO)}, got {value!r}")
    if value == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise RaditError("--report-to tensorboard needs the package tensorboard "
                         "(pip install radit-fast[tensorboard])")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Knobs shared by both stages."""

    train: str = _f("", "training examples (KILT-style JSON lines, Parquet, or a datasets folder[:split])")
    index: str = _f("", "index folder built by `radit index build`")
    out: str = _f("", "output folder (save_pretrained model, checkpoints, metrics.jsonl, config)")
    lm: str | None = _f(None, "causal LM name or path (default: the embedded SmolLM2-135M-Instruct)")
    seed: int = _f(0, "seed for data order, template randomisation, sampling and initialisation")
    max_examples: int | None = _f(None, "use only the first N training examples (default: all)")
    max_steps: int = _f(100, "optimizer steps")
    batch_size: int = _f(8, "global training instances per optimizer step (all processes together)")
    grad_accum: int = _f(1, "micro-batches per optimizer step on each process")
    lr: float = _f(1e-5, "peak learning rate")
    min_lr_ratio: float = _f(0.01, "final learning rate of the cosine schedule, as a fraction of --lr")
    warmup_steps: int = _f(10, "linear warm-up steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.95, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    bf16: bool = _f(False, "bfloat16 autocast for the forward and backward passes (weights stay fp32)")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    eval_file: str | None = _f(None, "held-out examples for the periodic evaluation loss")
    eval_every: int = _f(0, "evaluate every N steps (0: never; needs --eval-file)")
    eval_examples: int = _f(64, "at most this many held-out examples per evaluation")
    save_every: int = _f(50, "write a checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _f(2, "checkpoints kept on disk (oldest are deleted)")
    log_every: int = _f(1, "write a metrics line every N steps")
    report_to: str = _f("none", "also write the training curves for: none | tensorboard (event files in "
                                "OUT/tensorboard, beside metrics.jsonl; no network)")
    resume: bool = _f(False, "continue from the last checkpoint in --out")
    overwrite: bool = _f(False, "allow --out to exist (without --resume its checkpoints are discarded)")
    progress: bool = _f(True, "show a progress bar")
    threads: int | None = _f(None, "torch CPU threads per process (default: torch's choice)")
    fsdp: bool = _f(False, "shard parameters with FSDP (under torchrun) instead of DDP")
    impl: str = _f("auto", "backend of the fused ops: auto|cpu|cuda|triton|torch")
    device: str | None = _f(None, "cpu | cuda (default: cuda when available)")

    def validate(self) -> None:
        for name in ("train", "index", "out"):
            if not getattr(self, name):
                raise RaditError(f"--{name.replace('_', '-')} is required")
        _positive(self, "max_steps", "batch_size", "grad_accum", "keep_checkpoints", "log_every")
        check_report_to(self.report_to)
        if self.max_examples is not None and self.max_examples < 1:
            raise RaditError(f"--max-examples must be > 0, got {self.max_examples}")
        _non_negative(self, "warmup_steps", "eval_every", "save_every", "weight_decay", "max_grad_norm")
        if not self.lr > 0:
            raise RaditError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise RaditError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.batch_size % self.grad_accum:
            raise RaditError(f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum} "
                             "(each process runs grad_accum micro-batches of the global batch)")
        if self.eval_every and not self.eval_file:
            raise RaditError("--eval-every needs --eval-file")
        if self.impl not in ("auto", "cpu", "cuda", "triton", "torch"):
            raise RaditError(f"--impl must be auto|cpu|cuda|triton|torch, got {self.impl!r}")
        if self.device not in (None, "cpu", "cuda"):
            raise RaditError(f"--device must be cpu or cuda, got {self.device!r}")

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

    k: int = _f(3, "retrieved chunks per example; one training instance per (example, chunk)")
    max_length: int = _f(256, "tokens per instance; only the chunk is truncated to fit")
    lr: float = _f(1e-5, "peak learning rate (paper: 1e-5)")
    randomize_markers: bool = _f(True, "randomise Q:/Question: and A:/Answer: per instance (paper)")
    append_eos: bool = _f(True, "end each task answer with the tokenizer's EOS token, so the tuned LM learns to "
                                "stop after the answer (self-supervised corpus continuations never get one)")
    corpus_fraction: float = _f(0.0, "fraction of self-supervised corpus instances "
                                     "(chunk beginning -> continuation; paper: about 0.1)")
    corpus: str | None = _f(None, "corpus JSON lines for self-supervised instances (default: the index's "
                                  "passage store)")
    packing: bool = _f(True, "pack instances into one row per micro-batch, attention kept inside each "
                             "instance (off: length-bucketed padded batches)")
    bucket_window: int = _f(64, "global batches sorted together by length when bucketing")
    lora: bool = _f(False, "train LoRA adapters (peft) instead of all weights; OUT holds the merged model")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lora_target_modules: str = _f("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                  "comma-separated module names that get LoRA adapters")

    def validate(self) -> None:
        super().validate()
        _positive(self, "k", "max_length", "bucket_window", "lora_r", "lora_alpha")
        if not 0.0 <= self.corpus_fraction < 1.0:
            raise RaditError(f"--corpus-fraction must be in [0, 1), got {self.corpus_fraction}")
        if self.lora and self.fsdp:
            raise RaditError("--lora with --fsdp is not supported (LoRA models fit one device: use DDP)")


@dataclass
class RetrieverConfig(TrainConfig):
    """Stage 2, LM-supervised retrieval fine-tuning of the query encoder (``radit train-retriever``)."""

    k: int = _f(10, "retrieved chunks per example scored by the frozen LM")
    lr: float = _f(1e-5, "peak learning rate")
    batch_size: int = _f(16, "global examples per optimizer step (each with k chunks)")
    query_encoder: str | None = _f(None, "initial query encoder (default: the index's encoder)")
    max_length: int = _f(256, "tokens per augmented sequence when scoring with the LM")
    query_max_length: int = _f(128, "tokens per query for the query encoder")
    retriever_temperature: float = _f(1.0, "tau_R: p_R(c|x) = softmax(E_q(x).E_d(c) / tau_R)")
    lm_temperature: float = _f(0.01, "tau_LSR: p_LSR(c|x,y) = softmax(score_LM / tau_LSR) (paper: 0.01)")
    score_kind: str = _f("mean", "LM score of a chunk: mean | sum answer-token log-prob, or prob")
    direction: str = _f("lsr_to_retriever", "KL direction: lsr_to_retriever = KL(p_LSR||p_R) (Atlas, "
                                            "REPLUG code) | retriever_to_lsr = KL(p_R||p_LSR) (paper)")
    corpus_fraction: float = _f(0.0, "fraction of self-supervised corpus examples (paper: 0.95)")
    corpus: str | None = _f(None, "corpus JSON lines for self-supervised examples (default: the index's "
                                  "passage store)")
    e2e_weight: float = _f(0.0, "weight of the end-to-end objective -log p(y|x) of the REPLUG ensemble")
    cache_dir: str | None = _f(None, "LSR target cache (default: $RADIT_CACHE/lsr, RADIT_CACHE defaulting "
                                     "to ~/.cache/radit_fast)")
    score_batch_size: int = _f(8, "examples (x k chunks) per forward pass when scoring with the frozen LM")

    def validate(self) -> None:
        super().validate()
        _positive(self, "k", "max_length", "query_max_length", "score_batch_size")
        if self.k < 2:
            raise RaditError(f"--k must be >= 2 for a distribution over chunks, got {self.k}")
        if not (self.retriever_temperature > 0 and self.lm_temperature > 0):
            raise RaditError("--retriever-temperature and --lm-temperature must be > 0")
        if self.score_kind not in ("mean", "sum", "prob"):
            raise RaditError(f"--score-kind must be mean|sum|prob, got {self.score_kind!r}")
        if self.direction not in ("lsr_to_retriever", "retriever_to_lsr"):
            raise RaditError(f"--direction must be lsr_to_retriever|retriever_to_lsr, got {self.direction!r}")
        if not 0.0 <= self.corpus_fraction < 1.0:
            raise RaditError(f"--corpus-fraction must be in [0, 1), got {self.corpus_fraction}")
        if self.e2e_weight < 0:
            raise RaditError(f"--e2e-weight must be >= 0, got {self.e2e_weight}")


def _positive(cfg: Any, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) <= 0:
            raise RaditError(f"--{n.replace('_', '-')} must be > 0, got {getattr(cfg, n)}")


def _non_negative(cfg: Any, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) < 0:
            raise RaditError(f"--{n.replace('_', '-')} must be >= 0, got {getattr(cfg, n)}")


# ---------------------------------------------------------------------------------------------- loading
C = typing.TypeVar("C", bound=TrainConfig)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional) of an annotation such as ``int | None``."""
    args = typing.get_args(tp)
    if args:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) < len(args)
    return tp, False


def _coerce(name: str, value: Any, tp: Any, source: str) -> Any:
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise RaditError(f"{source}: {name} cannot be null")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise RaditError(f"{source}: {name} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise RaditError(f"{source}: {name} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise RaditError(f"{source}: {name} must be an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise RaditError(f"{source}: {name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RaditError(f"{source}: {name} must be a number, got {value!r}") from None
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RaditError(f"{source}: {name} must be a string, got {value!r}")
    return value


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file; RaditError when unreadable.

    A file may nest the keys under a section named after the stage (``[train_lm]`` / ``train_retriever:``)
    or under ``train:``; top-level scalar keys apply to both stages.
    """
    p = require_file(path, "config file")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RaditError(f"{p}: invalid TOML ({e})") from None
    elif p.suffix.lower() in (".yaml", ".yml", ".json"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RaditError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        data = {} if data is None else data
    else:
        raise RaditError(f"{p}: config files must end in .yaml, .yml, .toml or .json")
    if not isinstance(data, dict):
        raise RaditError(f"{p}: expected a mapping of option names to values")
    return data


_SECTIONS = {"RaItConfig": ("train_lm", "train-lm", "ra_it"),
             "RetrieverConfig": ("train_retriever", "train-retriever", "r_it")}


def config_from_dict(cls: type[C], data: dict[str, Any], *, source: str = "config",
                     base: C | None = None) -> C:
    """Build ``cls`` from ``data`` on top of ``base`` (or the defaults), with type checks.

    Sections named after other stages are ignored, so one file can configure both stages.
    """
    types = _field_types(cls)
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
    values = dataclasses.asdict(base) if base is not None else {}
    for key, value in flat.items():
        name = key.replace("-", "_")
        if name not in types:
            raise RaditError(f"{source}: unknown option {key!r}")
        values[name] = _coerce(name, value, types[name], source)
    return cls(**values)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[TrainConfig]) -> None:
    """One ``--flag`` per field of ``cls`` (default None, so unset flags do not override a config file)."""
    types = _field_types(cls)
    for f in fields(cls):
        if f.name in _CLI_SKIP:
            continue
        base, _ = _base_type(types[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{f.metadata.get('help', '')} (default: {f.default})"
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_)
        else:
            parser.add_argument(flag, dest=f.name, type=base, default=None, help=help_,
                                metavar=f.name.upper())


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
    from radit_fast import __version__

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
