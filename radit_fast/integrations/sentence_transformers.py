"""Stage 2 (R-IT) as a sentence-transformers loss: :class:`LSRLoss` for ``SentenceTransformerTrainer``.

The objective is the one of ``radit train-retriever`` (:class:`radit_fast.training.retriever.LsrObjective`)
through the same fused op::

    s_i   = E_q(x) . E_d(c_i)                                 (inner product, as the radit index)
    p_R   = softmax(s / tau_R)            over the present chunks (trained: gradient reaches E_q only)
    p_LSR = softmax(score_LM(y | c_i o x) / tau_LSR)          (constants: the frozen LM's answer log-probs)
    loss  = mean_b KL(p_LSR || p_R)  (default; ``direction="retriever_to_lsr"`` = KL(p_R || p_LSR))
            [+ e2e_weight * mean_b -log sum_i p_R,i p_LM(y | c_i o x)]

with the same defaults as ``radit train-retriever`` (read from :class:`~radit_fast.config.stages.RetrieverConfig`:
tau_R = 1, tau_LSR = 0.01, score kind "mean", KL(p_LSR || p_R)). As in RA-DIT only the query encoder is
trained: the document side is a frozen copy of the initial model (or the ``document_model`` given), run
without gradient, or precomputed document embeddings (e.g. the radit index's) looked up by row.

Dataset columns (sentence-transformers passes every column but the label to the model, in order):

* text mode: ``query, passage_1, ..., passage_k, label``;
* embedding mode (``passage_embeddings=`` a [N, d] tensor): ``query, label``, the rows in the label.

The label of one example is a [k] list (channel 0 only) or a [2, k] / [3, k] nested list:

* channel 0: the LM's answer log-probability ``sum_t log p_LM(y_t | c_i o x)`` of each chunk; -inf or NaN
  for a missing chunk;
* channel 1: the number of answer tokens (0 = missing chunk). Without it every chunk counts one token, so
  the "mean" score is channel 0 itself (give per-token means there, or use ``score_kind="sum"``);
* channel 2 (embedding mode): the row of each chunk in ``passage_embeddings`` (-1 = none). The collator
  makes float32 labels, exact for rows below 2**24; larger tables are refused.

:func:`lsr_label` builds such a label. Example (the test and ``examples/st_lsr.py`` run it)::

    model = SentenceTransformer(str(default_encoder_path()))
    loss = LSRLoss(model, retriever_temperature=0.1)
    ds = Dataset.from_dict({"query": [...], "passage_1": [...], "passage_2": [...],
                            "label": [lsr_label(logprobs, lengths) for ...]})
    SentenceTransformerTrainer(model=model, train_dataset=ds, loss=loss, args=...).train()

``sentence-transformers`` is an optional dependency (``pip install radit-fast[st]``); this module imports
only torch and radit itself, so it loads without it.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn

from radit_fast.config.stages import RetrieverConfig
from radit_fast.ops.lsr import lsr_loss, lsr_scores
from radit_fast.ops.replug import replug_logprob

logger = logging.getLogger(__name__)

_DEFAULTS = {f.name: f.default for f in fields(RetrieverConfig)}
MAX_FLOAT_ROW = 2 ** 24  # float32 represents every integer below this exactly


def lsr_label(logprobs: Sequence[float], lengths: Sequence[int] | None = None,
              rows: Sequence[int] | None = None) -> list[Any]:
    """One example's label for :class:`LSRLoss`: ``logprobs`` alone, or ``[logprobs, lengths(, rows)]``.

    >>> lsr_label([-1.5, float("-inf")], [3, 0])
    [[-1.5, -inf], [3.0, 0.0]]
    """
    lp = [float(v) for v in logprobs]
    if lengths is None and rows is None:
        return lp
    ln = [float(v) for v in lengths] if lengths is not None else [1.0 if math.isfinite(v) else 0.0 for v in lp]
    out = [lp, ln]
    if rows is not None:
        out.append([float(int(r)) for r in rows])
    if any(len(c) != len(lp) for c in out):
        raise ValueError(f"lsr_label: logprobs, lengths and rows must have the same length, got "
                         f"{[len(c) for c in out]}")
    return out


class LSRLoss(nn.Module):
    """LM-supervised retrieval loss for ``SentenceTransformerTrainer`` (see the module docstring).

    Args:
        model: the ``SentenceTransformer`` being trained (the query encoder).
        document_model: frozen document encoder for text mode (default: a frozen copy of ``model`` made
            here, i.e. the initial weights, as the fixed index of RA-DIT).
        passage_embeddings: float [N, d] precomputed document embeddings (embedding mode).
        retriever_temperature, lm_temperature, score_kind, direction, e2e_weight, impl: as the options of
            ``radit train-retriever`` (same defaults).
    """

    def __init__(self, model: nn.Module, *, document_model: nn.Module | None = None,
                 passage_embeddings: Tensor | None = None,
                 retriever_temperature: float = _DEFAULTS["retriever_temperature"],
                 lm_temperature: float = _DEFAULTS["lm_temperature"], score_kind: str = _DEFAULTS["score_kind"],
                 direction: str = _DEFAULTS["direction"], e2e_weight: float = _DEFAULTS["e2e_weight"],
                 impl: str = _DEFAULTS["impl"]) -> None:
        super().__init__()
        # the same checks as `radit train-retriever`, on a throwaway config
        probe = RetrieverConfig(train="-", index="-", out="-", retriever_temperature=retriever_temperature,
                                lm_temperature=lm_temperature, score_kind=score_kind, direction=direction,
                                e2e_weight=e2e_weight, impl=impl)
        try:
            probe.validate()
        except ValueError as e:
            raise ValueError(f"LSRLoss: {e}") from None
        self.model = model
        self.retriever_temperature = float(retriever_temperature)
        self.lm_temperature = float(lm_temperature)
        self.score_kind = score_kind
        self.direction = direction
        self.e2e_weight = float(e2e_weight)
        self.impl = impl
        if passage_embeddings is not None:
            if document_model is not None:
                raise ValueError("LSRLoss: give document_model (text mode) or passage_embeddings, not both")
            if passage_embeddings.dim() != 2 or not passage_embeddings.is_floating_point():
                raise ValueError(f"LSRLoss: passage_embeddings must be a float [N, d] tensor, got "
                                 f"{passage_embeddings.dtype} {list(passage_embeddings.shape)}")
            if passage_embeddings.shape[0] >= MAX_FLOAT_ROW:
                raise ValueError(f"LSRLoss: {passage_embeddings.shape[0]} passage rows: labels are float32, "
                                 f"exact only for rows below {MAX_FLOAT_ROW}; use text mode")
            self.register_buffer("passage_embeddings", passage_embeddings.detach().float(), persistent=False)
            self.document_model = None
        else:
            self.passage_embeddings = None
            doc = document_model if document_model is not None else copy.deepcopy(model)
            self.document_model = doc.eval().requires_grad_(False)

    @classmethod
    def from_config(cls, model: nn.Module, cfg: RetrieverConfig, **kwargs: Any) -> LSRLoss:
        """The loss with the objective options of a ``radit train-retriever`` configuration."""
        opts = {n: getattr(cfg, n) for n in ("retriever_temperature", "lm_temperature", "score_kind",
                                             "direction", "e2e_weight", "impl")}
        return cls(model, **{**opts, **kwargs})

    def get_config_dict(self) -> dict[str, Any]:
        """What sentence-transformers writes into the model card."""
        return {"retriever_temperature": self.retriever_temperature, "lm_temperature": self.lm_temperature,
                "score_kind": self.score_kind, "direction": self.direction, "e2e_weight": self.e2e_weight,
                "document_side": "embeddings" if self.passage_embeddings is not None else "frozen model"}

    # ---- inputs ----
    def _split_labels(self, labels: Tensor, k: int | None, b: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(log-prob sums [b, k] float, lengths [b, k] int64, rows [b, k] int64 | None)."""
        labels = torch.as_tensor(labels)
        want_rows = self.passage_embeddings is not None
        if labels.dim() == 2:
            labels = labels.unsqueeze(1)
        if labels.dim() != 3 or labels.shape[0] != b or labels.shape[1] not in (1, 2, 3) or (
                k is not None and labels.shape[2] != k):
            kk = "k" if k is None else str(k)
            raise ValueError(f"LSRLoss: labels must be [B={b}, {kk}] log-probs or [B, 2|3, {kk}] "
                             f"(log-probs, answer lengths, rows), got {list(labels.shape)}")
        if want_rows and labels.shape[1] != 3:
            raise ValueError("LSRLoss: with passage_embeddings the labels must be [B, 3, k] "
                             "(log-probs, answer lengths, passage rows); see lsr_label")
        if not want_rows and labels.shape[1] == 3:
            raise ValueError("LSRLoss: labels carry passage rows ([B, 3, k]) but no passage_embeddings were given")
        sums = labels[:, 0].float()
        present = ~torch.isnan(sums) & (sums != float("-inf"))
        if labels.shape[1] >= 2:
            lengths = labels[:, 1].round().long()
        else:
            lengths = torch.ones_like(sums, dtype=torch.long)
        rows = labels[:, 2].round().long() if want_rows else None
        if rows is not None:
            present &= rows >= 0
        lengths = torch.where(present, lengths.clamp(min=0), torch.zeros_like(lengths))
        sums = torch.where(lengths > 0, sums, torch.zeros_like(sums))
        return sums, lengths, rows

    def _doc_embeddings(self, features: Sequence[dict[str, Any]], rows: Tensor | None, device: torch.device) -> Tensor:
        """[b, k, d] document embeddings, constants."""
        if rows is not None:
            table = self.passage_embeddings
            if int(rows.max()) >= table.shape[0]:
                raise ValueError(f"LSRLoss: passage row {int(rows.max())} out of range (table of {table.shape[0]})")
            return table.to(device)[rows.clamp(min=0).to(device)]
        doc = self.document_model.to(device)
        with torch.no_grad():
            embs = [doc(dict(f))["sentence_embedding"].float() for f in features]
        return torch.stack(embs, dim=1)

    # ---- loss ----
    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        features = list(sentence_features)
        text_mode = self.passage_embeddings is None
        if text_mode and len(features) < 3:
            raise ValueError(f"LSRLoss: expected columns (query, passage_1, ..., passage_k) with k >= 2, "
                             f"got {len(features)} column(s)")
        if not text_mode and len(features) != 1:
            raise ValueError(f"LSRLoss: with passage_embeddings the dataset has one text column (query) and "
                             f"the label, got {len(features)} text columns")
        q = self.model(features[0])["sentence_embedding"].float()  # [b, d], differentiable
        k = len(features) - 1 if text_mode else None
        sums, lengths, rows = self._split_labels(labels, k, q.shape[0])
        sums, lengths = sums.to(q.device), lengths.to(q.device)
        d = self._doc_embeddings(features[1:], rows, q.device)
        s = torch.einsum("bd,bkd->bk", q, d)
        mask = lengths > 0
        s = s.masked_fill(~mask, float("-inf"))
        target = lsr_scores(sums, lengths, kind=self.score_kind)
        loss = lsr_loss(s, target, retriever_temperature=self.retriever_temperature,
                        lm_temperature=self.lm_temperature, mask=mask, direction=self.direction,
                        reduction="mean", impl=self.impl)
        if self.e2e_weight > 0:
            ll = replug_logprob(sums.masked_fill(~mask, float("-inf")), s, temperature=self.retriever_temperature,
                                mask=mask, impl=self.impl)
            loss = loss + self.e2e_weight * -ll.mean()
        return loss

    @property
    def citation(self) -> str:
        return ("@inproceedings{lin2024radit,\n  title={RA-DIT: Retrieval-Augmented Dual Instruction Tuning},\n"
                "  author={Lin, Xi Victoria and others},\n  booktitle={ICLR},\n  year={2024}\n}")
