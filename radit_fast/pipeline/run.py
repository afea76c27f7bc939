"""``radit run``: the RA-DIT ablation on any corpus and task, step by step, each step cached in OUT.

Steps (folder names in OUT)::

    inputs            validate every split (answers, fields, non-empty, disjoint), the LM and encoder
                      references (configs, weights present, tokenizers) and that every prompt fits its
                      max_length (RA-IT, R-IT, evaluation) before any compute or output folder
    index             radit index build (corpus chunked, encoded with the base encoder, FAISS)
    retrieve_base     top passages of dev and test with the base query encoder
    eval_lm_only      base LM, no retrieval                      (test)
    eval_replug       base LM + base retriever, REPLUG ensemble  (test)
    train_lm          stage 1, RA-IT; a candidate every run.select_every steps scored on dev, best kept
    train_retriever   stage 2, R-IT (LSR) with the base LM; candidates scored on dev, best kept
    retrieve_tuned    top passages of dev and test with the tuned query encoder
    eval_ra_it        tuned LM + base retriever                  (test)
    eval_r_it         base LM + tuned retriever                  (test)
    eval_ra_dit       tuned LM + tuned retriever                 (test)
    report.json, report.md, report.png

Steps are selected on the dev split only; the test split is never seen by training or selection. A step
whose settings and inputs did not change is skipped on a rerun (an interrupted run resumes where it
stopped; the training stages resume from their last checkpoint).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from radit_fast.config.run import RunConfig
from radit_fast.evaluation.report import task_average, write_report
from radit_fast.io import RaditError, claimed_dir, write_json, write_jsonl
from radit_fast.pipeline.steps import StepRunner, file_fingerprint
from radit_fast.records import read_jsonl
from radit_fast.retrieval.build import check_corpus
from radit_fast.retrieval.index import check_k

log = logging.getLogger(__name__)

ROWS = {  # row -> (LM, retriever)
    "lm_only": ("base", None),
    "replug": ("base", "base"),
    "ra_it": ("tuned", "base"),
    "r_it": ("base", "tuned"),
    "ra_dit": ("tuned", "tuned"),
}


# ------------------------------------------------------------------------------------------- inputs
def load_splits(cfg: RunConfig) -> tuple[dict[str, list], int]:
    """Read and check the corpus (returns its document count) and train/dev/test: answers, known fields,
    non-empty, pairwise disjoint ids."""
    from radit_fast.data.tasks import check_disjoint, load_tasks

    documents = check_corpus(cfg.corpus, cfg.run.chunk_words)  # lines and ids, before run_config.json or output
    splits = {name: load_tasks(getattr(cfg, name), require_answers=True) for name in ("train", "dev", "test")}
    for a, b in (("train", "test"), ("dev", "test"), ("train", "dev")):
        check_disjoint(splits[a], splits[b], names=(a, b))
    check_models_and_lengths(cfg, splits)
    return splits, documents


def check_models_and_lengths(cfg: RunConfig, splits: dict[str, list]) -> None:
    """The LM is a loadable causal LM and the encoders loadable encoders (configs and tokenizers only) and,
    with the LM's tokenizer, every prompt fits: RA-IT instances (question + answer, EOS included) within
    ``train_lm.max_length``, R-IT's LSR scoring instances within ``train_retriever.max_length``, evaluation
    prompts (question, demonstrations and room for the answer) within ``eval.max_length`` - before any
    index is built or model loaded."""
    from radit_fast.evaluation.scoring import check_prompts_fit
    from radit_fast.pipeline.checks import check_encoder, check_lm_reference
    from radit_fast.training.sources import check_fit

    tok = check_lm_reference(cfg.lm, "--lm")
    check_encoder(cfg.encoder, "--encoder")
    r_cfg = cfg.retriever_config(Path(cfg.out) / "train_retriever")
    if r_cfg.query_encoder is not None:
        check_encoder(r_cfg.query_encoder, "train_retriever.query_encoder")
    lm_cfg = cfg.lm_config(Path(cfg.out) / "train_lm")
    # the examples each stage reads: its train file (R-IT: maybe a subset), the first max_examples of it
    r_train = retriever_train_subset(cfg, splits["train"])
    for stage, stage_cfg, exs, eos in (
            ("train_lm", lm_cfg, splits["train"], lm_cfg.append_eos),
            ("train_retriever", r_cfg, splits["train"] if r_train is None else r_train, False)):
        try:
            check_fit(tok, exs[: stage_cfg.max_examples], stage_cfg.max_length, append_eos=eos)
        except RaditError as e:
            raise RaditError(f"{stage}.max_length {stage_cfg.max_length}: {e}") from None
    for name in ("dev", "test"):
        check_prompts_fit(tok, splits[name], cfg.eval, splits["train"])


def retriever_train_subset(cfg: RunConfig, train: list) -> list | None:
    """Stage 2's examples when not the whole train split (None): one kind of task (``run.retriever_train_kind``)
    and/or a seeded subset of ``run.retriever_train_examples``."""
    import random

    train = list(train)
    kind = cfg.run.retriever_train_kind
    n = cfg.run.retriever_train_examples
    if kind == "all" and (not n or n >= len(train)):
        return None
    if kind != "all":
        train = [ex for ex in train if (ex.choices is not None) == (kind == "multiple_choice")]
        if not train:
            raise RaditError(f"run.retriever_train_kind {kind}: the train split has no such example")
    random.Random(f"retriever-subset-{cfg.seed}").shuffle(train)
    return train[:n] if n else train


def _select_metric(metrics: dict[str, float], name: str) -> float | None:
    return task_average(metrics) if name == "avg" else metrics.get(name)


class Pipeline:
    """One ``radit run``; :meth:`run` executes (or reuses) every step and writes the report."""

    def __init__(self, cfg: RunConfig, *, force: bool = False) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.splits, documents = load_splits(cfg)  # every input error before any compute
        if cfg.run.dev_examples:
            self.splits["dev"] = self.splits["dev"][: cfg.run.dev_examples]
        dev_name = cfg.run.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev_name)
        r_train = retriever_train_subset(cfg, self.splits["train"])
        lines, heavy = cfg.plan(documents=documents, n_train=len(self.splits["train"]), n_dev=len(self.splits["dev"]),
                                n_test=len(self.splits["test"]), device=self.device.type,
                                n_retriever_train=len(self.splits["train"] if r_train is None else r_train))
        log.info("\n".join(lines))
        if heavy:
            log.warning("these are the paper's GPU-sized settings: on a CPU the run takes many hours; "
                        "`radit run --preset cpu` uses radit demo's sizing (about 15 minutes on 2 cores)")
        self.steps = StepRunner(self.out, force=force)  # the first output, after the checks and the plan
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self._base_lm: tuple[Any, Any] | None = None
        self.inputs_key = {name: file_fingerprint(getattr(cfg, name)) for name in ("corpus", "train", "dev", "test")}
        self.inputs_key["dev_examples"] = cfg.run.dev_examples

    # -------------------------------------------------------------------------------- models
    def _eval_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.run.eval_dtype == "bf16" else torch.float32

    def base_lm(self) -> tuple[Any, Any]:
        """The base LM (fp32, kept for the whole run) and its tokenizer."""
        if self._base_lm is None:
            from radit_fast.models import load_lm

            self._base_lm = load_lm(self.cfg.lm, device=self.device)
        return self._base_lm

    def eval_copy(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """A frozen plain copy of ``model`` (LoRA adapters merged) in the evaluation dtype; the original
        keeps training unchanged."""
        return plain_copy(model).to(dtype or self._eval_dtype()).eval().requires_grad_(False)

    def lm_for(self, which: str) -> tuple[Any, Any]:
        if which == "base":
            model, tok = self.base_lm()
            return (model if self._eval_dtype() == torch.float32 else self.eval_copy(model)), tok
        from radit_fast.models import load_lm

        path = self.steps.require("train_lm").dir / "selected"
        return load_lm(str(path), dtype=self._eval_dtype(), device=self.device)

    def retriever_for(self, which: str):
        from radit_fast.retrieval.retriever import Retriever

        index = self.steps.require("index").dir / "index"
        enc = None if which == "base" else str(self.steps.require("train_retriever").dir / "selected")
        return Retriever.load(index, enc, device=str(self.device))

    # ------------------------------------------------------------------------------ retrieval
    def _retrieve_step(self, which: str, key: dict[str, Any]) -> None:
        from radit_fast.evaluation.evaluate import retrieve

        def work(d: Path) -> dict[str, Any]:
            retriever = self.retriever_for(which)
            out = {}
            for split in ("dev", "test"):
                exs = self.splits[split]
                res = retrieve(retriever, exs, self.cfg.eval.k, progress=self.cfg.progress,
                               desc=f"retrieving {split} ({which} retriever)")
                write_jsonl(d / f"{split}.jsonl", ({"id": ex.id, "passages": r} for ex, r in zip(exs, res)))
                out[split] = len(res)
            return out

        self.steps.run(f"retrieve_{which}", key, work)

    def retrieved(self, which: str, split: str) -> list[list[tuple[str, str, float]]]:
        rows = read_jsonl(self.steps.require(f"retrieve_{which}").dir / f"{split}.jsonl")
        ids = [ex.id for ex in self.splits[split]]
        if [r["id"] for r in rows] != ids:
            raise RaditError(f"retrieve_{which}/{split}.jsonl does not match the {split} split; rerun with --force")
        return [[tuple(p) for p in r["passages"]] for r in rows]

    # ------------------------------------------------------------------------------------- eval
    def _evaluate(self, model, tok, split: str, retriever: str | None, *, desc: str,
                  examples: list | None = None) -> tuple[list[dict], dict[str, float]]:
        from radit_fast.evaluation.evaluate import evaluate_examples

        settings = copy.copy(self.cfg.eval)
        if retriever is None:
            settings.k = 0
        ret = self.retrieved(retriever, split) if retriever is not None else None
        exs = examples if examples is not None else self.splits[split]
        if examples is not None and ret is not None:
            ret = ret[: len(examples)]
        return evaluate_examples(model, tok, exs, ret, settings, train=self.splits["train"],
                                 progress=self.cfg.progress, desc=desc)

    def _eval_row(self, row: str, key: dict[str, Any]) -> None:
        lm_which, ret_which = ROWS[row]

        def work(d: Path) -> dict[str, Any]:
            model, tok = self.lm_for(lm_which)
            preds, metrics = self._evaluate(model, tok, "test", ret_which, desc=row)
            write_jsonl(d / "predictions.jsonl", preds)
            write_json(d / "metrics.json", metrics)
            return metrics

        res = self.steps.run(f"eval_{row}", key, work)
        log.info("%s: %s", row, {k: round(v, 4) for k, v in res.result.items() if isinstance(v, float)})

    # --------------------------------------------------------------------------------- stages
    def _train_lm(self, key: dict[str, Any]) -> None:
        from radit_fast.training import train_lm

        cfg = self.cfg

        def work(d: Path) -> dict[str, Any]:
            stage_cfg = cfg.lm_config(d / "model")
            stage_cfg.index = str(self.steps.require("index").dir / "index")
            stage_cfg.resume = True
            every = cfg.run.select_every
            stage_cfg.save_every = every if every else stage_cfg.save_every
            base, tok = self.base_lm()
            if cfg.run.train_dtype == "bf16":  # frozen bf16 base weights, fp32 LoRA adapters (validated)
                lm = copy.deepcopy(base).to(torch.bfloat16)
            else:
                lm = copy.deepcopy(base)
            selector = _Selector(d, "lm", cfg.run.select_metric_lm)
            dev = self.splits["dev"]

            def score(step: int) -> None:
                model = self.eval_copy(lm)
                _, m = self._evaluate(model, tok, "dev", "base", desc=f"dev @ step {step}")
                del model
                # the live weights (not the evaluation copy) become the candidate, adapters merged
                selector.offer(step, m, lambda folder: (plain_copy(lm).save_pretrained(folder),
                                                        tok.save_pretrained(folder)))

            def callback(event: str, step: int, row: dict[str, Any]) -> None:
                if event == "step_end" and ((every and step % every == 0) or step == stage_cfg.max_steps):
                    if not selector.has(step):
                        score(step)

            t0 = time.perf_counter()
            train_lm(stage_cfg, callbacks=[callback], lm=lm, tokenizer=tok)
            if selector.best() is None:  # training had completed before its selection was recorded
                from radit_fast.models import load_lm

                final, _ = load_lm(stage_cfg.out, device=self.device)
                model = self.eval_copy(final)
                _, m = self._evaluate(model, tok, "dev", "base", desc="dev (final)")
                selector.offer(stage_cfg.max_steps, m, lambda folder: (final.save_pretrained(folder),
                                                                       tok.save_pretrained(folder)))
            del lm
            result = selector.finish(d, {"train_seconds": time.perf_counter() - t0, "dev_examples": len(dev)})
            shutil.rmtree(Path(stage_cfg.out) / "checkpoints", ignore_errors=True)  # only needed to resume
            return result

        res = self.steps.run("train_lm", key, work, atomic=False)
        log.info("RA-IT: selected step %s on dev (%s)", res.result.get("step"), res.result.get("metrics"))

    def _train_retriever(self, key: dict[str, Any]) -> None:
        from radit_fast.retrieval.encoder import TextEncoder
        from radit_fast.training import train_retriever
        from radit_fast.training import checkpoint as ckpt

        cfg = self.cfg

        def work(d: Path) -> dict[str, Any]:
            from radit_fast.evaluation.evaluate import retrieve
            from radit_fast.retrieval.retriever import Retriever

            stage_cfg = cfg.retriever_config(d / "model")
            stage_cfg.index = str(self.steps.require("index").dir / "index")
            stage_cfg.resume = True
            every = cfg.run.select_every
            if every:
                stage_cfg.save_every = every
                stage_cfg.keep_checkpoints = stage_cfg.max_steps // every + 1
            subset = retriever_train_subset(cfg, self.splits["train"])
            if subset is not None:
                from radit_fast.data.tasks import write_tasks

                stage_cfg.train = str(d / "train_subset.jsonl")
                write_tasks(stage_cfg.train, subset)
            base, tok = self.base_lm()
            # the frozen LM only scores (LSR targets): it runs in the evaluation dtype
            scorer = base if self._eval_dtype() == torch.float32 else self.eval_copy(base)
            t0 = time.perf_counter()
            train_retriever(stage_cfg, lm=scorer, tokenizer=tok)
            del scorer
            train_seconds = time.perf_counter() - t0
            # Candidates: the kept checkpoints and the final encoder, scored on dev.
            selector = _Selector(d, "retriever", cfg.run.select_metric_retriever)
            final = Path(stage_cfg.out)
            index_dir = self.steps.require("index").dir / "index"
            dev = self.splits["dev"]
            has_prov = any(ex.provenance for ex in dev)
            metric = cfg.run.select_metric_retriever if has_prov else "avg"
            selector.metric = metric
            cands = [(s, p) for s, p in ckpt.list_checkpoints(final / "checkpoints") if s < stage_cfg.max_steps]
            cands.append((stage_cfg.max_steps, None))
            for step, path in cands:
                enc = TextEncoder.from_pretrained(str(final), device=str(self.device))
                if path is not None:
                    params = ckpt.load_checkpoint(path).params
                    res = enc.load_state_dict({k.removeprefix("query_encoder."): v for k, v in params.items()},
                                              strict=False)
                    # a checkpoint holds the trained parameters; the others (e.g. an unused pooler) keep the
                    # values of the final folder, which are their untouched initial values
                    if res.unexpected_keys or len(res.missing_keys) == len(enc.state_dict()):
                        raise RaditError(f"{path}: checkpoint does not match the query encoder "
                                         f"(unexpected {res.unexpected_keys[:3]})")
                retriever = Retriever.load(index_dir, enc, device=str(self.device))
                ret = retrieve(retriever, dev, cfg.eval.k, progress=False)
                if metric == "avg":
                    from radit_fast.evaluation.evaluate import evaluate_examples

                    _, m = evaluate_examples(self.eval_copy(base), tok, dev, ret, cfg.eval,
                                             train=self.splits["train"], progress=cfg.progress,
                                             desc=f"dev @ step {step}")
                else:
                    from radit_fast.evaluation.evaluate import example_metrics
                    from radit_fast.evaluation.metrics import aggregate

                    m = aggregate([{k: v for k, v in example_metrics(ex, "", [p for p, _, _ in r], cfg.eval.k).items()
                                    if k.startswith("recall")} for ex, r in zip(dev, ret)])
                selector.offer(step, m, enc.save_pretrained)
            result = selector.finish(d, {"train_seconds": train_seconds, "dev_examples": len(dev)})
            shutil.rmtree(final / "checkpoints", ignore_errors=True)  # scored; only needed to resume
            return result

        res = self.steps.run("train_retriever", key, work, atomic=False)
        log.info("R-IT: selected step %s on dev (%s)", res.result.get("step"), res.result.get("metrics"))

    # ------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Every step (reused when cached), then the report; OUT is held against a second ``radit run`` on it
        (:func:`radit_fast.io.claimed_dir`), which would otherwise interleave its steps with this one's."""
        with claimed_dir(self.out, fresh=False):
            return self._run_steps()

    def _run_steps(self) -> dict[str, Any]:
        from radit_fast.retrieval.build import IndexBuildConfig, build_index

        cfg = self.cfg
        t_start = time.perf_counter()
        write_json(self.out / "run_config.json", cfg.to_dict())
        inputs = self.inputs_key
        base_key = {"inputs": inputs, "lm": cfg.lm, "encoder": cfg.encoder}
        idx_key = {"corpus": inputs["corpus"], "encoder": cfg.encoder, "chunk_words": cfg.run.chunk_words,
                   "factory": cfg.run.index_factory}

        def build(d: Path) -> dict[str, Any]:
            build_index(cfg.corpus, d / "index", IndexBuildConfig(
                encoder=cfg.encoder, chunk_words=cfg.run.chunk_words, index_factory=cfg.run.index_factory,
                batch_size=cfg.run.encoder_batch_size, device=self.device.type))
            return json.loads((d / "index" / "manifest.json").read_text())["count"]

        idx = self.steps.run("index", idx_key, build)
        log.info("index: %s passages", idx.result)
        for option, k in (("eval.k", cfg.eval.k), ("train_lm.k", cfg.lm_config(self.out / "train_lm").k),
                          ("train_retriever.k", cfg.retriever_config(self.out / "train_retriever").k)):
            if k:  # refused, never clamped, before any retrieval or training (eval.k 0: no retrieval)
                check_k(k, int(idx.result), option)
        ev = {k: v for k, v in vars(cfg.eval).items()}
        ret_key = {"index": idx.fingerprint, "inputs": inputs, "k": cfg.eval.k}
        self._retrieve_step("base", ret_key)
        eval_key = {**base_key, "eval": ev, "eval_dtype": cfg.run.eval_dtype, "index": idx.fingerprint}
        self._eval_row("lm_only", {**eval_key, "index": None})
        self._eval_row("replug", eval_key)
        lm_key = {**base_key, "index": idx.fingerprint, "train_lm": stage_key(cfg.lm_config(self.out / "train_lm")),
                  "eval": ev,
                  "eval_dtype": cfg.run.eval_dtype, "train_dtype": cfg.run.train_dtype,
                  "select": [cfg.run.select_every, cfg.run.select_metric_lm, cfg.run.dev_examples]}
        self._train_lm(lm_key)
        r_key = {**base_key, "index": idx.fingerprint,
                 "train_retriever": stage_key(cfg.retriever_config(self.out / "train_retriever")), "eval": ev,
                 "select": [cfg.run.select_every, cfg.run.select_metric_retriever, cfg.run.dev_examples],
                 "subset": [cfg.run.retriever_train_examples, cfg.run.retriever_train_kind],
                 "lsr_dtype": cfg.run.eval_dtype}
        self._train_retriever(r_key)
        self._retrieve_step("tuned", {**ret_key, "retriever": self.steps.require("train_retriever").fingerprint})
        tuned_lm = self.steps.require("train_lm").fingerprint
        tuned_r = self.steps.require("train_retriever").fingerprint
        self._eval_row("ra_it", {**eval_key, "tuned_lm": tuned_lm})
        self._eval_row("r_it", {**eval_key, "tuned_retriever": tuned_r})
        self._eval_row("ra_dit", {**eval_key, "tuned_lm": tuned_lm, "tuned_retriever": tuned_r})

        rows = {row: {k: v for k, v in self.steps.require(f"eval_{row}").result.items()
                      if not k.startswith("n_")} for row in ROWS}
        timings = self.steps.timings()
        timings["total (this invocation)"] = round(time.perf_counter() - t_start, 2)
        timings["total (all steps)"] = round(sum(r.seconds for r in self.steps.results.values()), 2)
        test_m = self.steps.require("eval_lm_only").result
        config = {"corpus": cfg.corpus, "train": cfg.train, "dev": cfg.dev, "test": cfg.test,
                  "lm": cfg.lm or "SmolLM2-135M-Instruct (embedded)",
                  "encoder": cfg.encoder or "all-MiniLM-L6-v2 (embedded)", "passages": idx.result,
                  "eval_split": "test", "n_eval_examples": test_m.get("n_examples"),
                  "n_train": len(self.splits["train"]), "n_dev_for_selection": len(self.splits["dev"]),
                  "k": cfg.eval.k, "shots": cfg.eval.shots, "decode": cfg.eval.decode,
                  "retriever_temperature": cfg.eval.retriever_temperature, "eval_dtype": cfg.run.eval_dtype,
                  "chunk_words": cfg.run.chunk_words, "train_lm": cfg.train_lm,
                  "train_retriever": cfg.train_retriever,
                  "selected_lm_step": self.steps.require("train_lm").result.get("step"),
                  "selected_retriever_step": self.steps.require("train_retriever").result.get("step"),
                  "torch_threads": torch.get_num_threads(), "device": str(self.device)}
        selection = {"train_lm": self.steps.require("train_lm").result,
                     "train_retriever": self.steps.require("train_retriever").result}
        return write_report(self.out, rows, config=config, timings=timings, extra={"selection": selection})


# Stage settings that name this run's own files or only change how a run looks (progress bars, log lines,
# resuming), not what it computes. Checkpointing stays in: R-IT's kept checkpoints are its dev candidates.
_NOT_IN_STAGE_KEY = ("out", "index", "train", "cache_dir", "progress", "threads", "resume", "overwrite",
                     "log_every", "report_to")


def stage_key(stage_cfg: Any) -> dict[str, Any]:
    """The resolved settings of a tuning stage (``RaItConfig`` / ``RetrieverConfig``, defaults included) that
    decide its result: a changed default (e.g. ``append_eos``) invalidates a finished stage step, as a
    changed run-file value does. Paths inside the run folder and display settings are left out."""
    return {k: v for k, v in dataclasses.asdict(stage_cfg).items() if k not in _NOT_IN_STAGE_KEY}


def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of a causal LM with any LoRA adapters merged into its weights and the LoRA wrappers
    removed, so that ``save_pretrained`` writes an ordinary model (peft injects the adapters in place)."""
    m = copy.deepcopy(model)
    get_base = getattr(m, "get_base_model", None)
    if callable(get_base):
        m = get_base()
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: no adapters
        return m
    for name, mod in list(m.named_modules()):
        if isinstance(mod, LoraLayer):
            mod.merge()
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, child, mod.get_base_layer())
    return m


class _Selector:
    """Dev-split step selection: remembers each candidate's dev metrics, keeps the best one on disk.

    State lives in ``folder/selection.json`` and the best candidate in ``folder/selected/``, so an
    interrupted training stage resumes with what it had already scored.
    """

    def __init__(self, folder: Path, what: str, metric: str) -> None:
        self.folder, self.what, self.metric = folder, what, metric
        self.path = folder / "selection.json"
        self.scores: dict[int, dict[str, float]] = {}
        if self.path.is_file():
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("metric") == metric:
                self.scores = {int(k): v for k, v in data.get("candidates", {}).items()}

    def has(self, step: int) -> bool:
        return step in self.scores

    def value(self, step: int) -> float:
        v = _select_metric(self.scores[step], self.metric)
        return float("-inf") if v is None else v

    def best(self) -> int | None:
        if not self.scores or not (self.folder / "selected").is_dir():
            return None
        # ties go to the later step (more training)
        return max(self.scores, key=lambda s: (self.value(s), s))

    def offer(self, step: int, metrics: dict[str, float], save) -> None:
        prev = self.best()
        self.scores[step] = {k: v for k, v in metrics.items() if isinstance(v, float)}
        log.info("%s candidate at step %d: dev %s = %.4f", self.what, step, self.metric, self.value(step))
        if prev is None or (self.value(step), step) >= (self.value(prev), prev):
            tmp = self.folder / ".selected.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            save(tmp)
            shutil.rmtree(self.folder / "selected", ignore_errors=True)
            tmp.rename(self.folder / "selected")
            with contextlib.suppress(OSError):
                (self.folder / "selected" / "STEP").write_text(str(step))
        write_json(self.path, {"metric": self.metric, "candidates": {str(k): v for k, v in self.scores.items()}})

    def finish(self, folder: Path, extra: dict[str, Any]) -> dict[str, Any]:
        best = self.best()
        if best is None:
            raise RaditError(f"{self.what}: no candidate was scored on dev")
        return {"step": best, "metric": self.metric, "metrics": self.scores[best],
                "candidates": {str(k): _select_metric(v, self.metric) for k, v in sorted(self.scores.items())},
                **extra}


def run_pipeline(cfg: RunConfig, *, force: bool = False) -> dict[str, Any]:
    """Run (or resume) ``radit run``; returns the report dict (also written to OUT/report.json)."""
    return Pipeline(cfg, force=force).run()
