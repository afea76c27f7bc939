"""Ask a tuned RA-DIT system questions: one object over an LM, a query encoder and an index.

:class:`RaditSystem` loads a system from a ``radit run`` folder (the tuned LM and query encoder, the run's
index and inference settings; ``radit demo``'s output is such a folder) or from its parts, and answers
through exactly the functions ``radit eval`` uses (:func:`radit_fast.evaluation.evaluate.retrieve` and
:func:`radit_fast.evaluation.evaluate.predict_examples`): parallel retrieval augmentation, the REPLUG
ensemble through the fused LM-head op, mixture or rescoring decoding. Nothing here re-implements them.

* :meth:`RaditSystem.generate`: one :class:`Answer` per question: the text, the passages used with their
  retriever weights ``softmax(s / tau_R)`` (summing to 1 over the chunks used) and the answer's ensemble
  log-probability ``log sum_i w_i p_LM(answer | c_i o x)``;
* :meth:`RaditSystem.choose`: multiple choice, the option of highest ensemble likelihood;
* :meth:`RaditSystem.score`: ``log p(answer | question)`` under the ensemble.

Batched (all questions of a call go through the engine together), on CPU or GPU; ``dtype="auto"`` runs the
LM in bfloat16 where the device computes it natively (CUDA with bf16, CPUs with AVX-512 BF16 or AMX).

>>> system = RaditSystem.from_run(run_folder, device="cpu")        # a `radit run` folder, e.g. runs/demo
>>> [answer] = system.generate(["What is the capital of France?"], k=2, max_new_tokens=4)
>>> len(answer.passages), round(sum(p.weight for p in answer.passages), 6)
(2, 1.0)
>>> answer.logprob is None or answer.logprob <= 0.0
True
>>> pick = system.choose("What is the capital of France?", ["Paris", "Rome"], k=2)
>>> pick.text in ("Paris", "Rome") and len(pick.choice_logprobs) == 2
True
>>> abs(system.score("What is the capital of France?", "Paris", k=2) - pick.choice_logprobs[0]) < 1e-4
True
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from radit_fast.config.evaluation import EvalSettings
from radit_fast.data.tasks import Example, load_tasks
from radit_fast.evaluation import evaluate as E
from radit_fast.evaluation.engine import LMEngine
from radit_fast.evaluation.scoring import augmentation_for, pick_demonstrations, score_candidates
from radit_fast.io import RaditError
from radit_fast.models import load_lm
from radit_fast.retrieval.retriever import Retriever

log = logging.getLogger(__name__)


@dataclass
class Passage:
    """A passage an answer was conditioned on: its id, the background text the LM saw, the retriever score
    ``s(x, c)`` and the ensemble weight ``softmax(s / tau_R)`` over the chunks used."""

    id: str
    text: str
    score: float
    weight: float


@dataclass
class Answer:
    """One answer: ``text``, ``logprob`` (ensemble log-likelihood of the answer; None for an empty one),
    the ``passages`` used (best first) and, for :meth:`RaditSystem.choose`, every option's log-likelihood."""

    question: str
    text: str
    logprob: float | None
    passages: list[Passage] = field(default_factory=list)
    choices: list[str] | None = None
    choice_logprobs: list[float] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively (CUDA with bf16; CPUs with AVX-512 BF16/AMX)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in ("fp32", "bf16"):
        raise RaditError(f"dtype must be auto, fp32 or bf16, got {dtype!r}")
    return torch.bfloat16 if dtype == "bf16" else torch.float32


def _weights(scores: Sequence[float], temperature: float) -> list[float]:
    if not scores:
        return []
    z = [s / temperature for s in scores]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    tot = sum(e)
    return [v / tot for v in e]


class RaditSystem:
    """A retrieval-augmented LM ready to answer (see the module docstring).

    Args:
        model, tokenizer: the causal LM (eval mode) and its tokenizer.
        retriever: a :class:`radit_fast.retrieval.retriever.Retriever`, or None (LM alone; ``k`` must be 0).
        settings: inference defaults (:class:`EvalSettings`; per-call keywords override them).
        train: examples for ``settings.shots`` demonstrations (as ``radit eval --train``).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, retriever: Any = None, *,
                 settings: EvalSettings | None = None, train: Sequence[Example] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.settings = settings if settings is not None else EvalSettings()
        if retriever is None:
            self.settings = dataclasses.replace(self.settings, k=0)
        self.settings.validate()
        self.train = list(train) if train else None
        if self.settings.shots and not self.train:
            log.warning("shots %d but no train examples: answering without demonstrations", self.settings.shots)
            self.settings = dataclasses.replace(self.settings, shots=0)

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_parts(cls, lm: str | os.PathLike | None = None, index: str | os.PathLike | None = None,
                   query_encoder: str | os.PathLike | None = None, *, device: str | None = None,
                   dtype: str | torch.dtype = "auto", settings: EvalSettings | None = None,
                   train: Sequence[Example] | None = None) -> RaditSystem:
        """Load the LM (default: the embedded SmolLM2), the index folder (None: no retrieval) and its query
        encoder (default: the index's own; e.g. a tuned one from ``radit train-retriever``)."""
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if query_encoder is not None and index is None:
            raise RaditError("a query encoder needs an index (--index)")
        retriever = None
        if index is not None:
            if not (Path(index) / "manifest.json").is_file():
                raise RaditError(f"{index}: not an index folder (no manifest.json; build one with `radit index build`)")
            retriever = Retriever.load(index, str(query_encoder) if query_encoder is not None else None,
                                       device=dev.type)
        model, tok = load_lm(str(lm) if lm is not None else None, dtype=_resolve_dtype(dtype, dev), device=dev)
        return cls(model, tok, retriever, settings=settings, train=train)

    @classmethod
    def from_run(cls, folder: str | os.PathLike, *, lm: str = "tuned", retriever: str = "tuned",
                 device: str | None = None, dtype: str | torch.dtype = "auto",
                 settings: EvalSettings | None = None) -> RaditSystem:
        """Load a ``radit run`` / ``radit demo`` folder: ``lm`` and ``retriever`` are ``"tuned"`` (the
        dev-selected stage outputs) or ``"base"`` (the run's inputs); the run's index; the run's inference
        settings (``eval`` section) unless ``settings`` is given; its train split for demonstrations."""
        paths = run_parts(folder, lm=lm, retriever=retriever)
        cfg = paths["config"]
        if settings is None:
            known = {f.name for f in dataclasses.fields(EvalSettings)}
            settings = EvalSettings(**{k: v for k, v in (cfg.get("eval") or {}).items() if k in known})
        train = None
        if settings.shots and cfg.get("train") and Path(cfg["train"]).is_file():
            train = load_tasks(cfg["train"])
        return cls.from_parts(paths["lm"], paths["index"], paths["query_encoder"], device=device, dtype=dtype,
                              settings=settings, train=train)

    # ------------------------------------------------------------------------------ answering
    def _settings(self, overrides: dict[str, Any]) -> EvalSettings:
        known = {f.name for f in dataclasses.fields(EvalSettings)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise TypeError(f"unknown inference option(s) {bad} (known: {', '.join(sorted(known))})")
        s = dataclasses.replace(self.settings, **{k: v for k, v in overrides.items() if v is not None})
        if s.k > 0 and self.retriever is None:
            raise RaditError("k > 0 needs a retriever (load the system with an index)")
        s.validate()
        return s

    def _retrieved(self, examples: Sequence[Example], s: EvalSettings):
        if s.k == 0 or self.retriever is None:
            return None
        return E.retrieve(self.retriever, examples, s.k, progress=False)

    def _answers(self, examples: Sequence[Example], s: EvalSettings) -> list[Answer]:
        retrieved = self._retrieved(examples, s)
        results, augs = E.predict_examples(self.model, self.tokenizer, examples, retrieved, s, train=self.train,
                                         progress=False, score_answers=True)
        out = []
        for ex, r, aug in zip(examples, results, augs):
            ws = _weights(aug.scores, s.retriever_temperature) if aug.passage_ids else []
            passages = [Passage(pid, text or "", sc, w)
                        for pid, text, sc, w in zip(aug.passage_ids, aug.chunks, aug.scores, ws)]
            out.append(Answer(ex.input, r["prediction"], r.get("answer_logprob"), passages,
                              list(ex.choices) if ex.choices is not None else None, r.get("choice_logprobs")))
        return out

    @staticmethod
    def _examples(questions: Sequence[str], choices: Sequence[Sequence[str]] | None = None) -> list[Example]:
        if isinstance(questions, str):
            raise TypeError("questions must be a list of strings (use [question] for one)")
        out = []
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise RaditError(f"question {i + 1} is empty")
            ch = list(choices[i]) if choices is not None else None
            if ch is not None and (len(ch) < 2 or len(set(ch)) != len(ch) or not all(c.strip() for c in ch)):
                raise RaditError(f"question {i + 1}: choices must be at least 2 distinct non-empty strings")
            out.append(Example(id=f"q{i}", input=q.strip(), answers=[], choices=ch))  # no gold: predictions only
        return out

    def generate(self, questions: Sequence[str], *, k: int | None = None, decode: str | None = None,
                 max_new_tokens: int | None = None, **options: Any) -> list[Answer]:
        """Answer each question (see the module docstring); ``options`` override other
        :class:`EvalSettings` fields (``retriever_temperature``, ``reweight``, ``shots``, ``max_length`` ...)."""
        s = self._settings({"k": k, "decode": decode, "max_new_tokens": max_new_tokens, **options})
        return self._answers(self._examples(questions), s)

    def choose(self, question: str | Sequence[str], choices: Sequence[str] | Sequence[Sequence[str]], *,
               k: int | None = None, **options: Any) -> Answer | list[Answer]:
        """Multiple choice: one question and its options, or lists of both (then a list of answers)."""
        s = self._settings({"k": k, **options})
        if isinstance(question, str):
            return self._answers(self._examples([question], [choices]), s)[0]
        return self._answers(self._examples(question, choices), s)

    def score(self, question: str | Sequence[str], answer: str | Sequence[str], *, k: int | None = None,
              **options: Any) -> float | list[float]:
        """``log p(answer | question)`` under the REPLUG ensemble of the top-k augmented prompts (the
        ``choice_score`` setting applies: sum or mean over the answer's tokens)."""
        s = self._settings({"k": k, **options})
        single = isinstance(question, str)
        qs, ans = ([question], [answer]) if single else (list(question), list(answer))
        if len(qs) != len(ans):
            raise ValueError(f"{len(qs)} questions but {len(ans)} answers")
        examples = self._examples(qs)
        retrieved = self._retrieved(examples, s)
        augs = [augmentation_for(ex, retrieved[b] if retrieved is not None else None, s.k)
                for b, ex in enumerate(examples)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        engine = LMEngine(self.model, pad_id=int(pad), batch_size=s.batch_size, max_rows=s.max_rows, impl=s.impl)
        demos = pick_demonstrations(self.train, s.shots, seed=s.seed, show_choices=s.show_choices, template=s.template)
        res = score_candidates(engine, self.tokenizer, examples, augs, [[a] for a in ans], s, demos)
        vals = [r["logprobs"][0] for r in res]
        return vals[0] if single else vals


def run_parts(folder: str | os.PathLike, *, lm: str = "tuned", retriever: str = "tuned") -> dict[str, Any]:
    """The parts of a ``radit run`` folder: ``{"lm", "index", "query_encoder", "config"}`` (paths or None for
    the defaults), RaditError naming what is missing."""
    root = Path(folder)
    cfg_path = root / "run_config.json"
    if not cfg_path.is_file():
        raise RaditError(f"{root}: not a radit run folder (no run_config.json)")
    for name, value in (("lm", lm), ("retriever", retriever)):
        if value not in ("tuned", "base"):
            raise RaditError(f"{name} must be tuned or base, got {value!r}")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    index = root / "index" / "index"
    if not (index / "manifest.json").is_file():
        raise RaditError(f"{root}: the run has no index yet ({index}); finish it with `radit run`")
    out: dict[str, Any] = {"config": cfg, "index": str(index), "lm": cfg.get("lm"), "query_encoder": None}
    if lm == "tuned":
        sel = root / "train_lm" / "selected"
        if not (sel / "config.json").is_file():
            raise RaditError(f"{root}: no tuned LM ({sel}); finish the run, or use the base LM (lm='base')")
        out["lm"] = str(sel)
    if retriever == "tuned":
        sel = root / "train_retriever" / "selected"
        if not (sel / "config.json").is_file():
            raise RaditError(f"{root}: no tuned query encoder ({sel}); finish the run, or use the base one")
        out["query_encoder"] = str(sel)
    return out
