"""Fused LM-head loss for Hugging Face causal LMs: ``patch(model)``, ``apply_radit_kernels(cls)``, ``unpatch``.

A Hugging Face ``*ForCausalLM`` forward is ``body -> last_hidden_state -> lm_head -> logits -> loss``; with
``labels`` the loss is the mean (or, with ``num_items_in_batch``, the sum divided by it) of the token
cross-entropies ``-log softmax(h_t W^T + b)[y_{t+1}]`` over the positions whose shifted label is not
``ignore_index``. The patched forward runs the same body, gathers only those hidden rows and scores them with
:func:`radit_fast.ops.answer_logprobs` (vocabulary-blocked, online logsumexp, no ``[N, V]`` logits):

    loss = - sum_{t : y_{t+1} != -100} log p(y_{t+1} | h_t)  /  (num_items_in_batch or #answer tokens)

HF's conventions are kept: labels are shifted inside the model (``labels[..., 1:]`` with the last position
ignored) unless ``shift_labels`` is passed (then used as is, as transformers' ``ForCausalLMLoss`` does);
``logits_to_keep`` slices the hidden states as in transformers (the labels must then match the kept length);
the loss is float32 (float64 for float64 models; transformers computes it in float32 for every dtype). With
labels, ``use_cache`` defaults to False, so packed rows (``position_ids`` restarting at 0, no attention mask, as
``DataCollatorWithFlattening`` makes them) keep attention inside each sequence: transformers' own forward builds a
cache by default and then skips its packed-sequence detection. Logits are not computed (``logits=None``) unless
the model was patched with ``return_logits=True``; without ``labels`` the original forward runs unchanged
(generation, evaluation of logits). Cohere's ``logit_scale`` and Granite's ``logits_scaling`` multiply the logits by a
constant, which is applied exactly to the hidden rows (and bias) before the head. Heads that cannot be fused
raise ValueError naming the reason: soft-capped logits (Gemma-2/3 ``final_logit_softcapping``), other logit
modifiers, MoE models that add a router loss (``output_router_logits=True``), heads that are not an
``nn.Linear`` (LoRA or ``modules_to_save`` on ``lm_head``), DTensor heads (tensor parallel, or an FSDP2 unit of
their own).

TRL's ``SFTTrainer`` (>= 1.16) installs its own chunked LM head in ``__init__`` (``add_fused_lm_head``, which
replaces ``model.forward``) and calls ``model(..., fused_lm_head=True)`` for per-token log-probs, entropy and
top-1 accuracy. A patched forward answers that call too (:class:`FusedLMHeadOutput`: log-probs through the fused
op, entropy and top-1 from a no-grad blocked pass over the answer rows), so patch the trainer's model *after*
building the trainer: ``trainer = SFTTrainer(model, ...); patch(trainer.model)``. Patching before lets TRL's head
replace radit's. The per-token log-probs there are the op's ``reduction="none"`` output (TRL reduces them itself).

Under autocast the head runs in the autocast dtype, as ``nn.Linear`` would. A batch without any answer token
gives loss 0 (transformers gives NaN for the mean of nothing).
"""
from __future__ import annotations

import functools
import inspect
import logging
import types
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import ModelOutput

from radit_fast.models import decoder_body, unwrap
from radit_fast.ops._dispatch import IMPLS
from radit_fast.ops.answer_logprobs import answer_logprobs, answer_logprobs_per_sequence

log = logging.getLogger(__name__)

__all__ = ["FusedLMHeadOutput", "answer_logprobs_from_model", "apply_radit_kernels", "is_patched", "patch", "unpatch"]

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum")
PER = ("token", "sequence")
# model_type -> (config attribute, "mul" | "div"): logits = (h W^T + b) * s or / s, fused exactly.
_LOGIT_SCALES = {
    "cohere": ("logit_scale", "mul"), "cohere2": ("logit_scale", "mul"),
    "granite": ("logits_scaling", "div"), "granitemoe": ("logits_scaling", "div"),
    "granitemoeshared": ("logits_scaling", "div"), "granitemoehybrid": ("logits_scaling", "div"),
}
# Config attributes that change the logits of other model types (refused unless neutral).
_LOGIT_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                    "logit_softcapping", "output_logits_scaling")
# Vocabulary entries per block of the no-grad entropy / top-1 pass of the TRL protocol.
METRIC_BLOCK_COLS = 4096


@dataclass(frozen=True)
class FusedOptions:
    """How a patched model computes its loss (see :func:`patch`)."""
    impl: str = "auto"
    reduction: str = "mean"
    return_logits: bool = False


def _sum_answer_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None, impl: str) -> torch.Tensor:
    """Scalar sum over the rows of log p(targets[n] | hidden[n]): the one fused call behind every patched loss.

    ``hidden [N, d]``, ``weight [V, d]`` and ``bias [V]`` share a dtype; no row is ignored (rows were gathered).
    reduction="sum" forms the gradients in the forward pass (3 GEMMs in all, no logits kept).
    """
    return answer_logprobs(hidden, weight, targets, bias=bias, reduction="sum", impl=impl)


# ------------------------------------------------------------------------------------------- checks


def _configs(config) -> list:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def _logit_scale(config) -> float:
    """The constant the model multiplies its logits by (1.0 for most); ValueError for unfusable modifiers."""
    scale = 1.0
    for cfg in _configs(config):
        name = f"{type(cfg).__name__}"
        model_type = getattr(cfg, "model_type", "")
        if getattr(cfg, "output_router_logits", False):
            raise ValueError(f"cannot fuse the LM head of {name}: output_router_logits=True adds the MoE "
                             "router loss to the LM loss (set config.output_router_logits=False to patch)")
        known = _LOGIT_SCALES.get(model_type)
        for attr in _LOGIT_MODIFIERS:
            value = getattr(cfg, attr, None)
            if known is not None and attr == known[0]:
                if not isinstance(value, (int, float)) or value == 0:
                    raise ValueError(f"cannot fuse the LM head of {name}: config.{attr}={value!r} "
                                     "is not a non-zero number")
                scale = float(value) if known[1] == "mul" else 1.0 / float(value)
            elif value not in (None, 1, 1.0, False):
                raise ValueError(f"cannot fuse the LM head of {name}: its logits are modified by "
                                 f"config.{attr}={value!r} (soft-capping/scaling not supported by the fused op)")
    return scale


def _head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``(weight [V, d], bias [V] or None, scale)`` with ``logits = scale * (h W^T + b)``; ValueError if unfusable."""
    name = type(model).__name__
    scale = _logit_scale(model.config)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not (isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward):
        kind = "no output embedding" if head is None else f"a {type(head).__name__}"
        raise ValueError(f"cannot fuse the LM head of {name}: it is {kind}, not a plain nn.Linear "
                         "(a LoRA adapter or modules_to_save on lm_head, a quantised or custom head)")
    weight = head.weight
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    if dtensor is not None and isinstance(weight, dtensor):
        raise ValueError(f"cannot fuse the LM head of {name}: its weight is a DTensor (tensor-parallel, "
                         "or lm_head sharded as an FSDP2 unit of its own; shard it with its parent instead)")
    return weight, head.bias, scale


def _check_fusable(model: nn.Module) -> None:
    _head(model)
    decoder_body(model)  # RaditError (a ValueError) when there is no base model to run


def _check_options(impl: str, reduction: str, return_logits: bool) -> FusedOptions:
    if impl not in IMPLS:
        raise ValueError(f"patch: impl must be one of {IMPLS}, got {impl!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"patch: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return FusedOptions(impl=impl, reduction=reduction, return_logits=bool(return_logits))


# ---------------------------------------------------------------------------------------- the loss


def _head_inputs(hidden, weight, bias, scale):
    """Apply the logit scale to the rows (and bias) and the dtype rules of nn.Linear under autocast."""
    if scale != 1.0:
        hidden = hidden * scale
        bias = bias * scale if bias is not None else None
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = weight.dtype
    cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias)


def _answer_rows(hidden: torch.Tensor, labels, shift_labels, ignore_index: int):
    """Flat row indices of the answer positions and their targets. ``hidden [B, T, d]``."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("pass labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if tuple(shift_labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels give targets of shape {tuple(shift_labels.shape)} but the model kept "
                         f"hidden states of shape {tuple(hidden.shape[:-1])} (with logits_to_keep, pass "
                         "shift_labels for the kept positions)")
    targets = shift_labels.reshape(-1).to(hidden.device)
    rows = (targets != ignore_index).nonzero().squeeze(1)
    return rows, targets.index_select(0, rows), shift_labels


def _scored_rows(model, hidden, labels, shift_labels, ignore_index):
    """``(h [N, d], weight, bias, targets [N], rows [N], shift_labels)`` ready for the fused op."""
    weight, bias, scale = _head(model)
    rows, targets, shift_labels = _answer_rows(hidden, labels, shift_labels, ignore_index)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    if h.device != weight.device:  # a model split over devices (device_map): the head's device scores
        h, targets = h.to(weight.device), targets.to(weight.device)
    h, weight, bias = _head_inputs(h, weight, bias, scale)
    return h, weight, bias, targets, rows, shift_labels


def _no_autocast(device_type: str):
    return torch.autocast(device_type, enabled=False)


def fused_causal_lm_loss(model: nn.Module, hidden: torch.Tensor, labels=None, *, shift_labels=None,
                         num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                         options: FusedOptions = FusedOptions()) -> torch.Tensor:
    """HF's causal-LM loss from the final hidden states ``[B, T, d]`` through the fused head (no logits)."""
    h, weight, bias, targets, rows, _ = _scored_rows(model, hidden, labels, shift_labels, ignore_index)
    with _no_autocast(h.device.type):
        total = _sum_answer_logprobs(h, weight, targets, bias, options.impl)
    if options.reduction == "sum":
        return -total
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return -total / num_items_in_batch
    return -total / max(rows.shape[0], 1)


# ------------------------------------------------------------------------ TRL's fused_lm_head protocol


@dataclass
class FusedLMHeadOutput(ModelOutput):
    """What ``model(..., labels=..., fused_lm_head=True)`` returns: the fields TRL's ``SFTTrainer`` (>= 1.16) reads
    from its own fused head (``trl.trainer.utils.add_fused_lm_head``), computed through radit's op instead.

    Per-token fields are ``[B, T-1]`` (``[B, T]`` with ``shift_labels``), zero where the label is ignored:
    ``log_probs`` (differentiable, float32), ``entropy`` and ``is_top1`` (no gradient, for TRL's metrics),
    ``label_mask`` (bool). ``loss`` = -sum(log_probs) / (num_items_in_batch or #answer tokens).
    """
    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@torch.no_grad()
def _entropy_and_top1(hidden, weight, bias, targets, block_cols: int = METRIC_BLOCK_COLS):
    """Entropy of softmax(hidden @ weight.T + bias) per row and whether the target is its argmax, walking the
    vocabulary in blocks (online logsumexp; H = lse - sum_v p_v z_v). ``[N]`` float32 and ``[N]`` bool."""
    n = hidden.shape[0]
    run_max = hidden.new_full((n,), float("-inf"), dtype=torch.float32)
    sum_exp = hidden.new_zeros(n, dtype=torch.float32)
    sum_exp_z = hidden.new_zeros(n, dtype=torch.float32)
    best = hidden.new_full((n,), float("-inf"), dtype=torch.float32)
    arg = torch.zeros(n, dtype=torch.long, device=hidden.device)
    for c0 in range(0, weight.shape[0], block_cols):
        z = (hidden @ weight[c0:c0 + block_cols].T).float()
        if bias is not None:
            z += bias[c0:c0 + block_cols].float()
        block_max, block_arg = z.max(1)
        better = block_max > best
        best, arg = torch.where(better, block_max, best), torch.where(better, block_arg + c0, arg)
        new_max = torch.maximum(run_max, block_max)
        alpha = torch.exp(run_max - new_max)
        e = torch.exp(z - new_max[:, None])
        sum_exp = sum_exp * alpha + e.sum(1)
        sum_exp_z = sum_exp_z * alpha + (e * z).sum(1)
        run_max = new_max
    entropy = run_max + torch.log(sum_exp) - sum_exp_z / sum_exp
    return entropy, arg == targets


def _trl_fused_output(model, body_kwargs, labels, shift_labels, num_items, options: FusedOptions):
    body_kwargs["use_cache"] = False
    hidden = decoder_body(model)(**body_kwargs)[0]
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    weight, bias, scale = _head(model)
    targets = targets.to(hidden.device)
    mask = targets != IGNORE_INDEX
    rows = mask.reshape(-1).nonzero().squeeze(1)
    t = targets.reshape(-1).index_select(0, rows)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    h, weight, bias = _head_inputs(h, weight, bias, scale)
    with _no_autocast(h.device.type):
        tok = answer_logprobs(h, weight, t, bias=bias, impl=options.impl)
        entropy, top1 = _entropy_and_top1(h, weight, bias, t)
    scatter = lambda x: x.new_zeros(mask.shape).masked_scatter(mask, x)  # noqa: E731  (stays connected when empty)
    log_probs = scatter(tok)
    denom = mask.sum().clamp(min=1) if num_items is None else num_items
    return FusedLMHeadOutput(loss=-log_probs.sum() / denom, log_probs=log_probs, entropy=scatter(entropy),
                             is_top1=scatter(top1), label_mask=mask)


# ------------------------------------------------------------------------------- patched forward


def _parameter_names(fn) -> list[str]:
    params = list(inspect.signature(fn).parameters.values())[1:]  # after self
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _make_forward(original):
    """The patched forward around ``original`` (an unbound forward). It keeps the original's signature
    (``functools.wraps``): Trainer drops dataset columns the forward does not name and checks it for ``**kwargs``
    (to pass ``num_items_in_batch``); ``generate`` validates its model kwargs against it."""
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        return _fused_forward(self, original, args, kwargs)

    forward._radit_fused = True
    return forward


def _fused_forward(self, original, args, kwargs):
    """Forward of a patched causal LM: the original one without labels, the fused loss with them."""
    if args:
        names = _parameter_names(original)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}.forward takes {len(names)} positional arguments, "
                            f"got {len(args)}")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}.forward got multiple values for argument {name!r}")
            kwargs[name] = value
    options = self.__dict__.get("_radit_options") or getattr(type(self), "_radit_options", None)
    fused_lm_head = kwargs.pop("fused_lm_head", False)
    if options is None or (kwargs.get("labels") is None and kwargs.get("shift_labels") is None):
        if fused_lm_head:
            raise ValueError("fused_lm_head=True needs labels or shift_labels")
        return original(self, **kwargs)
    labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    if fused_lm_head:  # TRL's SFTTrainer asks for per-token log-probs and metrics instead of a loss
        _check_fusable(self)
        kwargs.pop("return_dict", None)
        return _trl_fused_output(self, kwargs, labels, shift_labels, num_items, options)
    ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
    logits_to_keep = kwargs.pop("logits_to_keep", 0)
    return_dict = kwargs.pop("return_dict", None)
    _check_fusable(self)
    # A loss needs no cache; without one, transformers detects packed rows from position_ids (it skips that
    # detection whenever it builds a cache, which its own forward does by default).
    kwargs.setdefault("use_cache", False)
    outputs = decoder_body(self)(**kwargs)
    hidden = outputs[0]
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        hidden = slice_logits_to_keep(hidden, logits_to_keep)
        if hidden.dim() != 3:
            raise ValueError("a boolean logits_to_keep mask cannot be combined with labels")
    loss = fused_causal_lm_loss(self, hidden, labels, shift_labels=shift_labels, num_items_in_batch=num_items,
                                ignore_index=ignore_index, options=options)
    logits = None
    if options.return_logits:
        logits = self.get_output_embeddings()(hidden)
        scale = _head(self)[2]
        logits = logits * scale if scale != 1.0 else logits
    out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=getattr(outputs, "past_key_values", None),
                                 hidden_states=getattr(outputs, "hidden_states", None),
                                 attentions=getattr(outputs, "attentions", None))
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return out if return_dict else out.to_tuple()


# ------------------------------------------------------------------------------------ public API


def patch(model: nn.Module, *, impl: str = "auto", reduction: str = "mean", return_logits: bool = False) -> nn.Module:
    """Make ``model`` (a transformers causal LM, or a peft model around one) compute its ``labels`` loss through
    the fused LM-head op, in place; returns ``model``.

    Args:
        model: any ``AutoModelForCausalLM`` model whose head is an ``nn.Linear`` over the final hidden state
            (Llama, Mistral, Qwen2, Gemma-1, GPT-2, Phi, Cohere, Granite, ...), or a ``peft`` model wrapping one.
        impl: backend of the fused op: ``"auto" | "cpu" | "cuda" | "triton" | "torch"``.
        reduction: ``"mean"`` (transformers' loss: mean over answer tokens, or sum / ``num_items_in_batch`` when
            the Trainer passes it) or ``"sum"`` (negative sum of the answer log-probs).
        return_logits: also compute and return the ``[B, T, V]`` logits (off: ``outputs.logits`` is None).

    With TRL's ``SFTTrainer``, call it on ``trainer.model`` after building the trainer (see the module doc).

    Raises:
        ValueError: one line naming why the head cannot be fused (soft-capping, router loss, non-Linear head...).
    """
    options = _check_options(impl, reduction, return_logits)
    inner = unwrap(model)
    _check_fusable(inner)
    current = getattr(inner.__dict__.get("forward"), "__func__", None)
    if "/trl/" in getattr(getattr(current, "__code__", None), "co_filename", "").replace("\\", "/"):
        log.info("replacing the fused LM head TRL added to %s with radit's", type(inner).__name__)
    inner._radit_options = options
    inner.forward = types.MethodType(_make_forward(type(inner).forward), inner)
    log.info("patched %s: labels loss through the fused LM head (impl=%s, reduction=%s)",
             type(inner).__name__, impl, reduction)
    return model


def apply_radit_kernels(model_type_or_class: str | type, *, impl: str = "auto", reduction: str = "mean",
                        return_logits: bool = False) -> type:
    """Patch a causal-LM class (or a ``model_type`` such as ``"llama"``) so that every instance, including
    those created later by ``from_pretrained``, uses the fused loss; returns the class. Undo with :func:`unpatch`.

    The class's default config is checked here (e.g. Gemma-2's soft-capping is refused at once); each
    instance's own config is checked again when it computes a loss.
    """
    cls = _resolve_class(model_type_or_class)
    options = _check_options(impl, reduction, return_logits)
    config_class = getattr(cls, "config_class", None)
    if config_class is not None:
        _logit_scale(config_class())
    if "_radit_original_forward" not in cls.__dict__:
        cls._radit_original_forward = cls.forward
        cls._radit_forward_was_own = "forward" in cls.__dict__
    cls._radit_options = options
    cls.forward = _make_forward(cls._radit_original_forward)
    log.info("patched class %s: labels loss through the fused LM head (impl=%s)", cls.__name__, impl)
    return cls


def unpatch(model_or_class):
    """Undo :func:`patch` (on a model) or :func:`apply_radit_kernels` (on a class or model_type); returns it."""
    if isinstance(model_or_class, (str, type)):
        cls = _resolve_class(model_or_class)
        if "_radit_original_forward" in cls.__dict__:
            if cls._radit_forward_was_own:
                cls.forward = cls._radit_original_forward
            else:
                del cls.forward
            for attr in ("_radit_original_forward", "_radit_forward_was_own", "_radit_options"):
                delattr(cls, attr)
        return model_or_class
    inner = unwrap(model_or_class)
    for attr in ("forward", "_radit_options"):
        inner.__dict__.pop(attr, None)
    return model_or_class


def is_patched(model_or_class) -> bool:
    """Whether :func:`patch` or :func:`apply_radit_kernels` is in effect for this model or class."""
    if isinstance(model_or_class, type):
        return "_radit_options" in model_or_class.__dict__
    inner = unwrap(model_or_class)
    return "_radit_options" in inner.__dict__ or is_patched(type(inner))


def _resolve_class(model_type_or_class: str | type) -> type:
    if isinstance(model_type_or_class, type):
        if not issubclass(model_type_or_class, nn.Module):
            raise ValueError(f"apply_radit_kernels: {model_type_or_class.__name__} is not a torch module class")
        return model_type_or_class
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(model_type_or_class))
    if name is None:
        raise ValueError(f"apply_radit_kernels: {model_type_or_class!r} is not a causal-LM model_type known to "
                         "transformers")
    return getattr(transformers, name)


def answer_logprobs_from_model(model: nn.Module, input_ids: torch.Tensor | None = None,
                               attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                               per: str = "token", shift_labels: torch.Tensor | None = None,
                               ignore_index: int = IGNORE_INDEX, impl: str = "auto", **model_kwargs) -> torch.Tensor:
    """Answer log-probabilities of a causal LM through the fused head (no ``[B, T, V]`` logits).

    Args:
        model: a transformers causal LM (or peft model), patched or not.
        input_ids, attention_mask: ``[B, T]``; further forward arguments (``position_ids`` for packed rows,
            ``inputs_embeds``, ...) go in ``model_kwargs``.
        labels: ``[B, T]`` token ids with ``ignore_index`` on non-answer positions, shifted inside as in
            transformers (position t is predicted from the tokens before it). Or pass ``shift_labels``
            ``[B, T]`` (already aligned with the positions that predict them).
        per: ``"token"``: ``[B, T]`` float32, entry ``(b, t)`` = log p(labels[b, t] | tokens < t) (aligned with
            ``labels``; aligned with ``shift_labels`` when given), 0 where the label is ignored;
            ``"sequence"``: ``[B]`` float32, the sum of each row's answer log-probs (fused in the op).

    Differentiable w.r.t. the model's parameters (float64 for float64 models).
    """
    if per not in PER:
        raise ValueError(f"answer_logprobs_from_model: per must be one of {PER}, got {per!r}")
    if impl not in IMPLS:
        raise ValueError(f"answer_logprobs_from_model: impl must be one of {IMPLS}, got {impl!r}")
    inner = unwrap(model)
    outputs = decoder_body(inner)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                  **model_kwargs)
    hidden = outputs[0]
    h, weight, bias, targets, rows, aligned = _scored_rows(inner, hidden, labels, shift_labels, ignore_index)
    batch, length = aligned.shape
    with _no_autocast(h.device.type):
        if per == "sequence":
            return answer_logprobs_per_sequence(h, weight, targets, segment_ids=rows // length,
                                                num_segments=batch, bias=bias, impl=impl)
        tok = answer_logprobs(h, weight, targets, bias=bias, impl=impl)
    flat = tok.new_zeros(batch * length).index_put((rows,), tok).view(batch, length)
    return flat if shift_labels is not None else F.pad(flat[:, :-1], (1, 0))
