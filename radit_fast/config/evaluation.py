"""Inference settings: :class:`EvalSettings` (``radit eval``, the ``eval:`` section of a run file, ``radit ask``)
and :class:`LMEvalSettings` (``radit eval --task lm``). The paper's inference settings are the defaults."""
from __future__ import annotations

from dataclasses import dataclass

from radit_fast.config.fields import check_fields, option
from radit_fast.data.prompts import resolve_template
from radit_fast.io import RaditError
from radit_fast.ops._dispatch import IMPLS

DECODES = ("mixture", "rescore")
#: tau_R, the one default for the retriever's softmax(score / tau_R) in training (stage 2) and at inference: cosine
#: scores of the default normalised encoders lie in [-1, 1], so 1.0 gives a nearly uniform p_R (stage 2 warns).
RETRIEVER_TEMPERATURE = 0.1
CHOICE_SCORES = ("sum", "mean")


@dataclass
class EvalSettings:
    """How examples are augmented, scored and decoded (the paper's inference settings are the defaults)."""

    k: int = option(10, "retrieved chunks per example, each prepended separately (0: no retrieval)", ge=0)
    shots: int = option(0, "demonstrations per task kind from the train file", ge=0)
    max_length: int = option(512, "tokens per augmented prompt including the answer; only the chunk is truncated",
                             ge=1)
    max_new_tokens: int = option(32, "generation budget", ge=1)
    retriever_temperature: float = option(RETRIEVER_TEMPERATURE, "tau_R of the ensemble weights softmax(score / tau_R)",
                                          gt=0)
    decode: str = option("mixture", "generation: token-level mixture of the k prompts, or decode each prompt and "
                                    "rescore the candidates with the ensemble", choices=DECODES)
    reweight: bool = option(False, "mixture decoding: re-weight chunks by their running likelihood of the answer "
                                   "so far", negatable=False)
    choice_score: str = option("sum", "multiple choice: sum or mean log-prob of an option's tokens",
                               choices=CHOICE_SCORES)
    show_choices: bool = option(False, "list the options under the question", negatable=False)
    batch_size: int = option(16, "augmented prompts per forward pass", ge=1, flag="--eval-batch-size")
    max_rows: int = option(64, "continuation rows per forward pass (multiple choice, rescoring)", ge=1)
    impl: str = option("auto", "backend of the fused ops", choices=IMPLS)
    seed: int = option(0, "choice of demonstrations")
    template: str = option("auto", "prompt template: auto (by each example's task), a name (qa, fact_checking, "
                                   "slot_filling, multiple_choice, long_form, dialogue, entity_linking), a task name "
                                   "(nq, fever, mmlu, ...) or a template string with {Q} {question} {A}")

    def validate(self) -> None:
        check_fields(self)
        resolve_template(self.template)


@dataclass
class LMEvalSettings:
    """Windows and retrieval of :func:`radit_fast.evaluation.perplexity.evaluate_lm`."""

    stride: int = option(128, "--task lm: tokens scored per window", ge=1)
    context: int = option(256, "--task lm: tokens of preceding text per window", ge=0)
    query_tokens: int = option(64, "last tokens of the context used as the retrieval query", ge=1)
    k: int = option(10, "passages per window (0: no retrieval)", ge=0)
    max_length: int = option(1024, "tokens per augmented sequence (the passage is cut to fit)", ge=1)
    retriever_temperature: float = option(RETRIEVER_TEMPERATURE, "tau_R of the ensemble weights softmax(score / tau_R)",
                                          gt=0)
    batch_size: int = option(16, "augmented sequences per forward pass", ge=1)
    impl: str = option("auto", "backend of the fused ops", choices=IMPLS)

    def validate(self) -> None:
        check_fields(self)
        if self.stride + self.context + 1 > self.max_length:
            raise RaditError(f"--stride {self.stride} + --context {self.context} do not fit --max-length "
                             f"{self.max_length}")
