"""The training loop shared by both stages: optimizer, schedule, accumulation, clipping, autocast, DDP/FSDP,
atomic checkpoints, resume, metrics, progress. It holds no model math: a :class:`Stage` supplies the
module whose ``forward(micro_batch)`` returns the (already normalised) loss, and the data plan.

Loss normalisation contract: for optimizer step ``s`` every process knows the whole global batch, so a
stage returns ``loss = loss_sum_local / global_normaliser * world_size``; DDP averages gradients over
processes, which makes the update independent of the number of processes and of ``grad_accum``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from radit_fast import models
from radit_fast.config.stages import TrainConfig, resolved_config, write_resolved_config
from radit_fast.distributed import DistEnv, init_distributed
from radit_fast.io import RaditError, claimed_dir, write_json
from radit_fast.training import checkpoint as ckpt
from radit_fast.training.parallel import full_state_dict, load_params, no_sync, wrap_model
from radit_fast.training.metrics import MetricsWriter
from radit_fast.training.schedule import lr_at, set_lr, step_seed

log = logging.getLogger(__name__)

RESOLVED_CONFIG = "radit_config.yaml"
METRICS = "metrics.jsonl"
TRAIN_STATE = "train_state.json"
CHECKPOINTS = "checkpoints"

# Options that may differ between a run and its --resume (they change neither data nor math).
_MUTABLE = {"resume", "overwrite", "progress", "threads", "log_every", "save_every", "keep_checkpoints",
            "eval_every", "eval_file", "eval_examples", "out", "impl", "device", "cache_dir",
            "score_batch_size", "grad_accum", "fsdp", "report_to"}

#: ``callback(event, step, info)``: "step_end" (info: the step's metrics row), "eval" (the dev metrics), "checkpoint"
#: (its path) after each, and "resumed" (the checkpoint's path) once when a resumed run has loaded the weights
#: of ``step``, which a kill may have left between its checkpoint and its "step_end" callbacks.
Callback = Callable[[str, int, dict[str, Any]], None]


class Stage(Protocol):
    """What a tuning stage gives the loop (see ``ra_it.RaItStage`` and ``retriever.RetrieverStage``)."""

    module: nn.Module                   # forward(micro_batch) -> dict with "loss" and float counters
    shard_modules: tuple[type, ...]     # FSDP units (decoder layers)

    def trainable_names(self) -> list[str]: ...
    def micro_batches(self, step: int) -> list[Any]: ...     # this process's grad_accum micro-batches
    def fingerprint(self) -> dict[str, Any]: ...             # identity of data/model for --resume checks
    def evaluate(self, module: nn.Module) -> dict[str, float] | None: ...
    def save_final(self, out: Path, gathered: dict[str, torch.Tensor] | None) -> None: ...


@dataclasses.dataclass
class TrainResult:
    out: Path
    steps: int
    final_loss: float | None
    resumed_from: int | None


def set_threads(threads: int | None) -> None:
    """``threads`` torch threads; by default under torchrun on CPU, the cores divided among the local
    processes (torch's default gives every process all cores, which oversubscribes them)."""
    if not threads:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local <= 1 or torch.cuda.is_available():
            return
        threads = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)


@contextlib.contextmanager
def stage_run(cfg: TrainConfig, tokenizer: Any = None) -> Iterator[tuple[DistEnv, Any]]:
    """The opening of every stage, before any data is read: validate ``cfg``, join the process group,
    check that the batch divides over the processes, set the torch threads, check ``cfg.out``
    (:func:`prepare_out`), load the LM's tokenizer unless given. Yields ``(env, tokenizer)``; the
    processes meet at a barrier when the stage ends (the process group lives until the process exits)."""
    cfg.validate()
    env = init_distributed(cfg.device)
    try:
        cfg.micro_batch_size(env.world_size)  # the batch divides over the processes: checked first
        set_threads(cfg.threads)
        prepare_out(cfg, env)
        yield env, tokenizer if tokenizer is not None else models.load_tokenizer(cfg.lm)
    finally:
        env.barrier()


def prepare_out(cfg: TrainConfig, env: DistEnv) -> Path:
    """Check ``cfg.out`` before any compute: exists -> needs --resume or --overwrite. Nothing is created
    here (a run refused for its inputs leaves no folder behind): :meth:`Trainer.fit` creates it."""
    out = Path(cfg.out)
    if env.is_main:
        if out.exists() and not out.is_dir():
            raise RaditError(f"{out}: exists and is not a folder")
        if out.exists() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
            raise RaditError(f"{out}: already exists (use --resume to continue it or --overwrite to replace it)")
        if out.exists() and cfg.overwrite and not cfg.resume:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
            for name in (METRICS, TRAIN_STATE):
                (out / name).unlink(missing_ok=True)
        for partial in [*out.glob(".final.*.partial"), *(out / CHECKPOINTS).glob(".*.partial")]:
            log.info("removing %s, left by an interrupted run", partial)
            shutil.rmtree(partial, ignore_errors=True)
    env.barrier()
    return out


def _config_diff(cfg: TrainConfig, stored: dict[str, Any]) -> list[str]:
    now = dataclasses.asdict(cfg)
    return [k for k in now if k not in _MUTABLE and k in stored and stored[k] != now[k]]


class Trainer:
    """Runs ``cfg.max_steps`` optimizer steps of ``stage`` (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, stage: Stage, env: DistEnv, *,
                 callbacks: list[Callback] | None = None) -> None:
        self.cfg, self.stage, self.env = cfg, stage, env
        self.callbacks = list(callbacks or [])
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / CHECKPOINTS
        self.metrics = MetricsWriter(self.out / METRICS, enabled=env.is_main, report_to=cfg.report_to)

    # --------------------------------------------------------------------------------------- set-up
    def _optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        cfg = self.cfg
        params = dict(module.named_parameters())
        decay, no_decay = [], []
        for name in self.stage.trainable_names():
            p = params[name]
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # The fused AdamW kernel (CPU and CUDA) is ~5x faster than the foreach one on CPU for a 135M model;
        # FSDP's sharded (DTensor) parameters keep the default implementation.
        kind = {} if (cfg.fsdp and self.env.distributed) else {"fused": True}
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.adam_eps, **kind)

    def _resume_point(self) -> ckpt.Checkpoint | None:
        if not self.cfg.resume:
            return None
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        if latest is None:
            log.warning("--resume: no checkpoint in %s, starting from step 0", self.ckpt_root)
            return None
        c = ckpt.load_checkpoint(latest)
        stored_cfg = c.trainer_state.get("config", {})
        diff = _config_diff(self.cfg, stored_cfg)
        if diff:
            details = ", ".join(f"{k}: {stored_cfg[k]!r} -> {getattr(self.cfg, k)!r}" for k in diff)
            raise ckpt.CheckpointError(f"checkpoint {latest} was written with other settings ({details}); "
                                       "resume with the same settings or start a new --out")
        if c.trainer_state.get("fingerprint") != _jsonable(self.stage.fingerprint()):
            raise ckpt.CheckpointError(f"checkpoint {latest} was written for other data or models "
                                       f"(fingerprint differs); resume with the same --train/--index/--lm")
        return c

    # ------------------------------------------------------------------------------------------ run
    def fit(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        done = self.out / TRAIN_STATE
        if cfg.resume and done.is_file():
            import json

            state = json.loads(done.read_text(encoding="utf-8"))
            if state.get("completed") and state.get("steps") == cfg.max_steps:
                log.info("%s: the run is already complete (%d steps)", self.out, cfg.max_steps)
                return TrainResult(self.out, cfg.max_steps, state.get("final_loss"), cfg.max_steps)

        # the inputs passed: the first output, held against a second run writing the same --out
        with claimed_dir(self.out, fresh=not (cfg.resume or cfg.overwrite), enabled=env.is_main):
            return self._fit(done)

    def _fit(self, done: Path) -> TrainResult:
        cfg, env, stage = self.cfg, self.env, self.stage
        module = stage.module
        resume = self._resume_point()
        start = 0
        if resume is not None:
            load_params(module, resume.params)
            start = resume.step
        wrapped = wrap_model(module, env, fsdp=cfg.fsdp, shard_modules=stage.shard_modules,
                             find_unused_parameters=getattr(stage, "find_unused_parameters", False))
        optimizer = self._optimizer(module)
        if resume is not None and resume.optimizer is not None:
            if cfg.fsdp and env.distributed:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(module, optimizer, resume.optimizer,
                                         options=StateDictOptions(full_state_dict=True))
            else:
                optimizer.load_state_dict(resume.optimizer)
            log.info("resumed from %s (step %d)", resume.path, start)
        if resume is not None:  # the weights of step `start` again: a kill may have come before its step_end ran
            for cb in self.callbacks:
                cb("resumed", start, {"path": str(resume.path)})
        if env.is_main:
            write_resolved_config(cfg, self.out / RESOLVED_CONFIG, world_size=env.world_size,
                                  device=str(env.device), torch=str(torch.__version__),
                                  resumed_from=start if resume is not None else None)
            self.metrics.truncate_after(start)
            if resume is not None:
                self.metrics.log({"event": "resume", "step": start})
        env.barrier()

        try:
            final_loss = self._loop(wrapped, module, optimizer, start)
        finally:
            self.metrics.close()

        gathered = full_state_dict(module, None, env, True) if (cfg.fsdp and env.distributed) else None
        if env.is_main:
            with _staging(self.out) as tmp:
                stage.save_final(tmp, gathered)
            write_json(done, {"completed": True, "steps": cfg.max_steps, "final_loss": final_loss,
                              "config": resolved_config(cfg)})
        env.barrier()
        self.metrics.close()
        return TrainResult(self.out, cfg.max_steps, final_loss, start if resume is not None else None)

    def _loop(self, wrapped: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer,
              start: int) -> float | None:
        cfg, env, stage = self.cfg, self.env, self.stage
        params = [p for n, p in module.named_parameters() if p.requires_grad]
        autocast = torch.autocast(env.device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
        bar = _progress(cfg, env, start)
        try:
            return self._steps(wrapped, module, optimizer, start, params, autocast, bar)
        finally:
            if bar is not None:
                bar.close()

    def _steps(self, wrapped: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer, start: int,
               params: list[torch.Tensor], autocast: Any, bar: Any) -> float | None:
        cfg, env, stage = self.cfg, self.env, self.stage
        final_loss = None
        window = _Window()
        for step in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            torch.manual_seed(step_seed(cfg.seed, step, env.rank))
            lr = lr_at(step, peak=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps,
                       min_lr_ratio=cfg.min_lr_ratio)
            set_lr(optimizer, lr)
            module.train()
            micro = stage.micro_batches(step)
            counters: dict[str, float] = {}
            failed = False
            for i, mb in enumerate(micro):
                with no_sync(wrapped, i == len(micro) - 1), autocast:
                    out = wrapped(mb)
                loss = out["loss"]
                if not torch.isfinite(loss.detach()):
                    failed = True
                loss.backward()
                for k, v in out.items():
                    if k != "loss":
                        counters[k] = counters.get(k, 0.0) + float(v)
            if env.any(failed):
                raise RaditError(f"step {step}: the loss is not finite (lower --lr, or check the data)")
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0
                                                else float("inf"))
            grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            keys = sorted(counters)
            totals = dict(zip(keys, env.all_reduce_sum([counters[k] for k in keys])))
            dt = time.perf_counter() - t0
            if step == start and env.is_main and cfg.max_steps - start > 1:  # the plan's estimate, timed
                left = dt * (cfg.max_steps - start - 1)
                log.info("the first step took %.2f s: about %s for the other %d steps (evaluation and "
                         "checkpoints not included)", dt, _human_seconds(left), cfg.max_steps - start - 1)
            final_loss = totals["loss_sum"] / max(totals.get("loss_norm", 1.0), 1e-12)
            window.add(dt, totals)
            parts = {k[:-4]: v / max(totals.get("loss_norm", 1.0), 1e-12) for k, v in totals.items()
                     if k.endswith("_sum") and k != "loss_sum"}
            row = {"step": step + 1, "loss": final_loss, **parts, "lr": lr, "grad_norm": grad_norm,
                   "step_time_s": round(dt, 4), **window.rates()}
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{final_loss:.4f}", lr=f"{lr:.2e}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
                self.metrics.log(row)
                window.reset()
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                self._evaluate(wrapped, module, step + 1)
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                self._save(module, optimizer, step + 1)
            for cb in self.callbacks:
                cb("step_end", step + 1, row)
        return final_loss

    def _evaluate(self, wrapped: nn.Module, module: nn.Module, step: int) -> None:
        module.eval()
        autocast = torch.autocast(self.env.device.type, dtype=torch.bfloat16) if self.cfg.bf16 \
            else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            res = self.stage.evaluate(wrapped)
        module.train()
        if res:
            self.metrics.log({"step": step, "event": "eval", **res})
            for cb in self.callbacks:
                cb("eval", step, res)

    def _save(self, module: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        cfg, env = self.cfg, self.env
        names = self.stage.trainable_names()
        params = full_state_dict(module, names, env, cfg.fsdp)
        if cfg.fsdp and env.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opt_state = get_optimizer_state_dict(module, optimizer,
                                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            opt_state = optimizer.state_dict()
        if env.is_main:
            state = {"config": dataclasses.asdict(cfg), "fingerprint": _jsonable(self.stage.fingerprint()),
                     "world_size": env.world_size}
            path = ckpt.save_checkpoint(self.ckpt_root, step, params=params, optimizer_state=opt_state,
                                        trainer_state=state, keep=cfg.keep_checkpoints)
            self.metrics.log({"step": step, "event": "checkpoint", "path": str(path)})
            for cb in self.callbacks:
                cb("checkpoint", step, {"path": str(path)})
        env.barrier()


class _Window:
    """Throughput over the steps since the last metrics line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.time = 0.0
        self.totals: dict[str, float] = {}

    def add(self, dt: float, totals: dict[str, float]) -> None:
        self.time += dt
        for k, v in totals.items():
            self.totals[k] = self.totals.get(k, 0.0) + v

    def rates(self) -> dict[str, float]:
        t = max(self.time, 1e-9)
        names = {"tokens": "tokens_per_s", "answer_tokens": "answer_tokens_per_s",
                 "instances": "instances_per_s", "examples": "examples_per_s"}
        return {out: round(self.totals[k] / t, 3) for k, out in names.items() if k in self.totals}


def _progress(cfg: TrainConfig, env: DistEnv, start: int) -> Any:
    if not (cfg.progress and env.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=start, desc=f"{type(cfg).__name__}", unit="step",
                dynamic_ncols=True)


def _human_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden folder inside ``out`` whose files are moved into ``out`` (one rename each) on success."""
    import os
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".final.", suffix=".partial", dir=out))
    try:
        yield tmp
        for p in sorted(tmp.iterdir()):
            target = out / p.name
            if target.is_dir() and p.is_dir():
                shutil.rmtree(target)
            os.replace(p, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=str))
