"""Packed sequences: several instances share one row, positions restart at 0 in each, and attention stays
inside each instance.

With eager/sdpa attention :func:`pack_forward` passes a 4D block-diagonal causal mask ``[R, 1, L, L]``
(:func:`packed_attention_mask`; transformers uses a 4D mask as is); with flash-attention (or flex) it passes
only the restarting ``position_ids``, from which transformers derives the blocks itself (varlen kernels for
flash-attention). Both give the per-instance results of unpacked runs (tested to 1e-5 in fp32). The mask
costs O(L^2) memory and sdpa/eager compute the full L x L scores, so pack into rows of about ``max_length``
tokens (:func:`radit_fast.data.prompts.collate_packed` with ``max_tokens``), not one long row.
"""
from __future__ import annotations

import torch
from torch import nn

from radit_fast.models import answer_hidden_states, attention_implementation, decoder_body, lm_head_weight

def packed_attention_mask(sequence_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """4D mask ``[R, 1, L, L]`` of where query ``i`` may see key ``j`` (same instance, ``j <= i``).

    ``dtype=torch.bool``: True where allowed (what transformers builds for sdpa); a float dtype: additive,
    0 where allowed and the dtype's lowest value elsewhere (what eager attention adds to its scores).

    ``sequence_ids [R, L]`` numbers the instance of each token; padding shares one id (e.g. -1) and so
    only sees padding, which keeps every row of the mask non-empty (no NaN from an all-masked softmax).
    """
    if sequence_ids.dim() != 2:
        raise ValueError(f"sequence_ids must be [R, L], got shape {tuple(sequence_ids.shape)}")
    length = sequence_ids.shape[1]
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=sequence_ids.device).tril_()
    allowed = same & causal
    if dtype == torch.bool:
        return allowed[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=sequence_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def packed_attention(model: nn.Module, sequence_ids: torch.Tensor, packing: str = "auto") -> torch.Tensor | None:
    """The attention mask for packed rows with instance numbers ``sequence_ids [R, L]`` (padding: -1).

    ``packing``: ``"mask"`` (a 4D block-diagonal causal mask: additive float in the model's dtype for eager,
    bool for the others), ``"position_ids"`` (None: only the restarting positions reach the attention;
    transformers derives the blocks itself, and flash-attention runs its varlen kernels) or ``"auto"`` (mask
    for eager and sdpa, position_ids for flash-attention, flex and the rest).
    """
    impl = attention_implementation(model)
    if packing == "auto":
        packing = "mask" if impl in ("eager", "sdpa") else "position_ids"
    if packing == "mask":
        dtype = next(decoder_body(model).parameters()).dtype if impl == "eager" else torch.bool
        return packed_attention_mask(sequence_ids, dtype)
    if packing == "position_ids":
        return None
    raise ValueError(f"packing must be 'auto', 'mask' or 'position_ids', got {packing!r}")


def pack_forward(model: nn.Module, batch: dict[str, torch.Tensor], *, packing: str = "auto") -> torch.Tensor:
    """``[N, d]`` hidden states at ``batch["answer_positions"]`` for a batch from
    :func:`radit_fast.data.prompts.collate_padded` or :func:`~radit_fast.data.prompts.collate_packed`.

    Row ``n`` predicts ``batch["answer_targets"][n]`` of instance ``batch["segment_ids"][n]``. Packed rows
    (``batch["sequence_ids"]``, with ``position_ids`` restarting in each instance) reach the attention as
    :func:`packed_attention` says; padded rows use ``attention_mask``.
    """
    device = next(decoder_body(model).parameters()).device
    get = lambda k: batch[k].to(device) if batch.get(k) is not None else None  # noqa: E731
    attention_mask, sequence_ids, position_ids = get("attention_mask"), get("sequence_ids"), get("position_ids")
    if sequence_ids is not None:
        if position_ids is None:
            raise ValueError("packed rows (sequence_ids) need position_ids that restart in each instance")
        attention_mask = packed_attention(model, sequence_ids, packing)
    return answer_hidden_states(model, get("input_ids"), attention_mask, get("answer_positions"),
                                position_ids=position_ids)


def answer_logprobs_reference(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token answer log-probs ``[N]`` through the full head (materialises ``[N, V]``; tests and
    small checks only — training and evaluation use the fused op)."""
    hidden = pack_forward(model, batch)
    weight, bias = lm_head_weight(model)
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    targets = batch["answer_targets"].to(logits.device)
    return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
