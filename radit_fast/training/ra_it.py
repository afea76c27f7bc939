"""Stage 1, RA-IT: retrieval-augmented instruction tuning of the LM.

For each training example (x, y) and each of its top-k' retrieved chunks c_j (or its gold ``context``),
one instance ``Background: c_j\\n\\nQ: x\\nA:`` + `` y`` (markers randomised per instance, seeded); the loss
is the negative log-likelihood of the answer tokens only, averaged over the answer tokens of the global
batch::

    L = - (1 / #answer tokens) * sum_{(x, y)} sum_j log p_LM(y | c_j o x)

The decoder body runs on packed rows (attention kept inside each instance) or on length-bucketed padded
batches; only the hidden states at answer positions go through the fused op
:func:`radit_fast.ops.answer_logprobs.answer_logprobs` with the LM-head weight, so the ``N x V`` logits
are never formed. Chunks are truncated to fit ``max_length``, never the question or the answer (an
answer that cannot fit is an error before any compute). With ``append_eos`` (default) each task answer
ends with the tokenizer's EOS token, one more scored answer token, so the tuned LM learns to stop.

Optional self-supervised corpus instances (``corpus_fraction``): a passage's beginning as x, its
continuation as y (never followed by EOS: the text goes on), with the top retrieved chunk for x as
background — never a passage of x's own document, which holds y itself.
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from radit_fast import models
from radit_fast.config.stages import RaItConfig
from radit_fast.data.prompts import build_instance, collate_packed, collate_padded
from radit_fast.distributed import DistEnv, main_then_broadcast
from radit_fast.io import RaditError, require_extra
from radit_fast.ops.answer_logprobs import answer_logprobs
from radit_fast.packing import pack_forward
from radit_fast.training import identity, sources
from radit_fast.training.loop import Callback, Trainer, stage_run
from radit_fast.training.plan import DataPlan, check_items

log = logging.getLogger(__name__)


class AnswerNLL(nn.Module):
    """``forward(micro_batch)``: decoder body on the batch, fused LM head at the answer positions only.

    Returns ``loss = -sum(answer log-probs) * world / norm`` (``norm``: answer tokens of the global batch)
    and float counters for the metrics.
    """

    def __init__(self, lm: nn.Module, impl: str = "auto") -> None:
        super().__init__()
        self.lm = lm
        self.impl = impl

    def answer_logprob_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(sum of the answer tokens' log-probs of a collated batch, their count). The fused op forms the
        gradients in its forward pass (reduction="sum": 3 GEMMs, no recomputation in the backward pass)."""
        hidden = pack_forward(self.lm, batch)
        weight, bias = models.lm_head_weight(self.lm)
        if weight.dtype != hidden.dtype:  # bf16 autocast: the body's output is bf16, the master weight fp32
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        targets = batch["answer_targets"].to(hidden.device)
        total = answer_logprobs(hidden, weight, targets, bias=bias, reduction="sum", impl=self.impl)
        return total, targets.numel()

    def forward(self, mb: dict[str, Any]) -> dict[str, Any]:
        total, count = self.answer_logprob_sum(mb["batch"])
        loss_sum = -total.float()
        n = float(count)
        return {"loss": loss_sum * (mb["world"] / mb["norm"]), "loss_sum": loss_sum.detach(), "loss_norm": n,
                "answer_tokens": n, "tokens": float(mb["tokens"]), "instances": float(mb["instances"]),
                "examples": float(mb.get("examples", 0.0))}


@dataclass
class RaItData:
    """Tokenised instances (built on rank 0, shared with the other processes)."""

    instances: list[Any]           # radit_fast.data.prompts.Instance
    example_index: list[int]       # training example (or -1 - corpus item) of each instance
    n_examples: int
    n_corpus: int
    truncated: int                 # instances whose chunk was cut to fit max_length
    eval_instances: list[Any]


def build_data(cfg: RaItConfig, tokenizer: Any) -> RaItData:
    """Read the examples, retrieve chunks, tokenise every instance; all input errors surface here."""
    eos = cfg.append_eos
    examples = sources.load_examples(cfg.train, cfg.max_examples)
    sources.check_fit(tokenizer, examples, cfg.max_length, append_eos=eos)
    ev = sources.load_examples(cfg.eval_file)[: cfg.eval_examples] if cfg.eval_file else []
    sources.check_fit(tokenizer, ev, cfg.max_length, append_eos=eos)
    index = sources.open_index(cfg.index, k=cfg.k)
    need = [i for i, ex in enumerate(examples) if not ex.context]
    retrieved = index.retrieve_texts([examples[i].input for i in need], cfg.k) if need else []
    chunks_of: dict[int, list[str]] = {i: r for i, r in zip(need, retrieved)}
    instances, owner = [], []
    for i, ex in enumerate(examples):
        chunks = [ex.context] if ex.context else chunks_of[i]
        if not chunks:
            chunks = [None]  # empty index result: the instance runs without background
        for j, chunk in enumerate(chunks):
            rng = random.Random(f"{cfg.seed}/{ex.id}/{j}") if cfg.randomize_markers else None
            instances.append(build_instance(tokenizer, chunk, ex.input, ex.answer, max_length=cfg.max_length,
                                            rng=rng, example_id=ex.id, append_eos=eos))
            owner.append(i)
    n_corpus = 0
    if cfg.corpus_fraction > 0:
        want = round(len(instances) * cfg.corpus_fraction / (1.0 - cfg.corpus_fraction))
        items = [f for f in (sources.fit_corpus_item(it, tokenizer, cfg.max_length // 2)
                             for it in sources.corpus_items(index, want, seed=cfg.seed, corpus=cfg.corpus))
                 if f is not None]
        backgrounds = index.retrieve_texts([it.input for it in items], 1, exclude=[it.exclude_rows for it in items])
        for c, (it, bg) in enumerate(zip(items, backgrounds)):
            rng = random.Random(f"{cfg.seed}/corpus/{c}") if cfg.randomize_markers else None
            try:
                inst = build_instance(tokenizer, bg[0] if bg else None, it.input, it.answer,
                                      max_length=cfg.max_length, rng=rng, example_id=it.id)
            except RaditError:
                continue  # a corpus passage whose beginning alone is too long: skip it, it is not user data
            instances.append(inst)
            owner.append(-1 - c)
            n_corpus += 1
    eval_instances = []
    if ev:
        need = [e for e in ev if not e.context]
        got = iter(index.retrieve_texts([e.input for e in need], cfg.k) if need else [])
        for e in ev:
            for chunk in ([e.context] if e.context else next(got)) or [None]:
                eval_instances.append(build_instance(tokenizer, chunk, e.input, e.answer,
                                                     max_length=cfg.max_length, example_id=e.id, append_eos=eos))
    truncated = sum(1 for inst in instances if inst.chunk_truncated)
    log.info("RA-IT data: %d examples -> %d instances (+%d corpus), %d chunks truncated to %d tokens",
             len(examples), len(instances) - n_corpus, n_corpus, truncated, cfg.max_length)
    return RaItData(instances, owner, len(examples), n_corpus, truncated, eval_instances)


class RaItStage:
    """The :class:`~radit_fast.training.loop.Stage` of RA-IT."""

    def __init__(self, cfg: RaItConfig, env: DistEnv, lm: nn.Module, tokenizer: Any, data: RaItData,
                 fingerprint: dict[str, Any]) -> None:
        self.cfg, self.env, self.tokenizer, self.data = cfg, env, tokenizer, data
        self.lm = lm
        self.module = AnswerNLL(lm, cfg.impl)
        self.shard_modules = sources.decoder_layer_types(lm)
        self._fingerprint = fingerprint
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        lengths = [inst.length for inst in data.instances]
        self.plan = DataPlan(len(lengths), cfg.batch_size, seed=cfg.seed, lengths=lengths,
                             bucket_window=cfg.bucket_window)
        cfg.micro_batch_size(env.world_size)
        # examples/s: each instance counts 1 / (instances of its training example or corpus item)
        counts = Counter(data.example_index)
        self._example_share = [1.0 / counts[o] for o in data.example_index]

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.module.named_parameters() if p.requires_grad]

    def fingerprint(self) -> dict[str, Any]:
        return self._fingerprint

    def _collate(self, instances: list[Any]) -> dict[str, torch.Tensor]:
        if self.cfg.packing:
            return collate_packed(instances, self.pad_id, max_tokens=max(self.cfg.max_length,
                                                                         max(i.length for i in instances)))
        return collate_padded(instances, self.pad_id)

    def micro_batches(self, step: int) -> list[dict[str, Any]]:
        inst = self.data.instances
        norm = float(sum(inst[i].answer_len for i in self.plan.global_batch(step)))
        out = []
        for idx in self.plan.micro_batches(step, rank=self.env.rank, world_size=self.env.world_size,
                                           grad_accum=self.cfg.grad_accum):
            group = [inst[i] for i in idx]
            out.append({"batch": self._collate(group), "norm": norm, "world": self.env.world_size,
                        "tokens": sum(i.length for i in group), "instances": len(group),
                        "examples": sum(self._example_share[i] for i in idx)})
        return out

    def evaluate(self, module: nn.Module) -> dict[str, float] | None:
        ev = self.data.eval_instances
        if not ev:
            return None
        mine = ev[self.env.rank::self.env.world_size]
        bs = max(1, self.cfg.micro_batch_size(self.env.world_size))
        total, count = 0.0, 0.0
        for s in range(0, len(mine), bs):  # through the wrapped module: FSDP gathers its shards in forward
            group = mine[s:s + bs]
            out = module({"batch": self._collate(group), "norm": 1.0, "world": 1, "tokens": 0,
                          "instances": len(group)})
            total += float(out["loss_sum"])
            count += float(out["loss_norm"])
        total, count = self.env.all_reduce_sum([total, count])
        return {"eval_loss": total / max(count, 1.0), "eval_answer_tokens": count}

    def save_final(self, out: Path, gathered: dict[str, torch.Tensor] | None) -> None:
        lm = self.lm
        if gathered is not None:  # FSDP: rebuild full weights on rank 0 (no LoRA: validated)
            lm = models.plain_copy(self.lm, state={k.removeprefix("lm."): v for k, v in gathered.items()})
        if self.cfg.lora:
            lm.save_pretrained(out / "adapter", safe_serialization=True)
            lm = models.plain_copy(lm, in_place=True)  # training is over: merged without a second copy
        lm.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)


def _apply_lora(lm: nn.Module, cfg: RaItConfig) -> nn.Module:
    require_extra("--lora", "peft")
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
    present = {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise RaditError(f"--lora-target-modules: {missing} are not modules of this LM")
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)  # the adapters' random initialisation (lora_A) follows --seed
    return get_peft_model(lm, lcfg)


def prepare_lm(cfg: RaItConfig, env: DistEnv, lm: nn.Module | None = None, tokenizer: Any = None):
    """Load the LM (or take the given one), make it trainable, apply LoRA and gradient checkpointing.

    Under FSDP (``fsdp`` with several processes) the LM is loaded and kept on the CPU: ``fully_shard``
    (:func:`radit_fast.training.parallel.wrap_model`) moves one decoder layer at a time to the device
    and keeps only this process's shard there, so an LM larger than one device's memory can be trained.
    """
    sharded = cfg.fsdp and env.distributed
    if lm is None:
        lm, tokenizer = models.load_lm(cfg.lm, device="cpu" if sharded else env.device)
    lm.config.use_cache = False
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        if cfg.gradient_checkpointing:
            lm.enable_input_require_grads()
        lm = _apply_lora(lm, cfg)
    else:
        lm.requires_grad_(True)
    return (lm if sharded else lm.to(env.device)), tokenizer


def train_lm(config: RaItConfig, *, callbacks: list[Callback] | None = None, lm: nn.Module | None = None,
             tokenizer: Any = None) -> Path:
    """Run stage 1 and return ``config.out``: a ``save_pretrained`` folder (safetensors, tokenizer; with
    ``lora`` the merged model plus ``adapter/``), ``radit_config.yaml``, ``metrics.jsonl`` and
    ``checkpoints/`` for ``resume``. Works alone or under ``torchrun`` (DDP, or FSDP with ``fsdp``).

    ``lm``/``tokenizer``: an already loaded model to train in place (else ``config.lm`` is loaded).
    """
    with stage_run(config, tokenizer) as (env, tokenizer):
        data = main_then_broadcast(env, lambda: build_data(config, tokenizer))
        check_items(len(data.instances), config.batch_size)  # before the LM is loaded
        given = lm
        fingerprint = main_then_broadcast(env, lambda: identity.fingerprint(config, lm=given, extra={
            "instances": len(data.instances)}))
        lm, tokenizer = prepare_lm(config, env, lm, tokenizer)
        stage = RaItStage(config, env, lm, tokenizer, data, fingerprint)
        Trainer(config, stage, env, callbacks=callbacks).fit()
    return Path(config.out)
