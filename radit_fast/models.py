"""Causal LM loading and checking, and the split "decoder body | LM head" that the fused scoring op stands on.

* :func:`load_lm` loads any Hugging Face causal LM (a local folder, a ``.gguf`` file or a name already in
  the Hugging Face cache; never the network) or the embedded default, SmolLM2-135M-Instruct
  (:mod:`radit_fast.default_lm`, converted once from its GGUF file and cached).
* :func:`answer_hidden_states` runs the decoder body *without* the LM head and returns the final-norm
  hidden states at selected positions; with :func:`lm_head_weight` the training and evaluation layers
  hand these to the fused op, so the ``N x V`` logits are never materialised. Works for every model
  whose ``get_output_embeddings()`` is an ``nn.Linear`` applied directly to the output of the base model
  ``getattr(model, model.base_model_prefix)`` (Llama/Mistral/Qwen/Gemma-1/Phi/OPT style ``model.model``,
  GPT-2/GPT-J/Falcon style ``model.transformer``, GPT-NeoX ``model.gpt_neox``). Models that rescale or
  soft-cap their logits (Gemma-2 ``final_logit_softcapping``, Cohere ``logit_scale``, Granite
  ``logits_scaling``) are refused with a RaditError rather than silently scored wrong.
* Packed sequences (several instances in one row) are :mod:`radit_fast.packing`.
* :func:`plain_copy`: the one way to copy an LM for saving or evaluation (out of its peft wrapper, LoRA
  merged, dtype-cast; also the rebuild of an FSDP-sharded LM from its gathered weights).
"""
from __future__ import annotations

import copy
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from radit_fast._util import hub_offline
from radit_fast.default_lm import default_gguf_path, default_lm_dir, is_default, load_gguf, resolve_lm_path
from radit_fast.io import RaditError, require_extra, require_file

log = logging.getLogger(__name__)

# Config attributes of models whose logits are not ``hidden @ W.T + b``.
_LOGIT_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


# --------------------------------------------------------------------------------------------- loading


def load_tokenizer(name_or_path: str | os.PathLike | None = None, *, trust_remote_code: bool = False):
    """The tokenizer of :func:`load_lm`'s model, with ``pad_token`` set (to EOS when the model has none).

    For the default LM this reads the cached conversion when present, else only the tokenizer of the GGUF
    file (a few seconds; nothing is written).
    """
    from transformers import AutoTokenizer

    if is_default(name_or_path) and not (default_lm_dir() / "config.json").is_file():
        gguf = default_gguf_path()
        require_extra(f"reading the tokenizer of {gguf.name}", "gguf")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    elif str(name_or_path).endswith(".gguf"):
        gguf = require_file(name_or_path)
        require_extra(f"reading the tokenizer of {gguf.name}", "gguf")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    else:
        path = resolve_lm_path(name_or_path)
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=hub_offline(),
                                                trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise RaditError(not_found_message(path, e)) from None
    _ensure_pad_token(tok)
    return tok


def _causal_class_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def model_kind(config: Any) -> str:
    """``"causal-lm"``, ``"encoder"`` or ``"unknown"`` for a Hugging Face config, from what it declares.

    The saved ``architectures`` decide when present: a causal-LM head class (``*ForCausalLM``,
    ``GPT2LMHeadModel``, ... as transformers maps them) makes a causal LM, anything else (``BertModel``,
    ``BertForMaskedLM``, a sentence-transformers folder) an encoder. Without them: a model type that has no
    causal-LM class, or an encoder type (one with a masked-LM class, e.g. BERT) not configured as a
    decoder (``is_decoder``), is an encoder; a model type whose only head is causal is a causal LM.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    if archs:
        causal = _causal_class_names()
        if any(a in causal or a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
            return "causal-lm"
        return "encoder"
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "encoder" if model_type else "unknown"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "encoder"
    return "causal-lm"


def check_model_kind(config: Any, want: str, where: str) -> None:
    """RaditError unless ``config`` (see :func:`model_kind`) is of kind ``want`` ("causal-lm" | "encoder").

    The one model-kind check: every command runs it on its ``--lm`` and encoder references before any work
    (:func:`check_lm`, :func:`radit_fast.pipeline.checks.check_encoder`), so an encoder given as ``--lm``
    (its LM head would be newly initialised) or a causal LM given as ``--encoder`` is refused in one line.
    """
    kind = model_kind(config)
    if kind == want or kind == "unknown":
        return
    archs = ", ".join(getattr(config, "architectures", None) or []) or f"model type {config.model_type!r}"
    if want == "causal-lm":
        raise RaditError(f"{where}: not a causal LM ({archs} is an encoder: it has no trained LM head); "
                         "pass a *ForCausalLM model")
    raise RaditError(f"{where}: not an encoder ({archs} is a causal LM); pass an encoder such as a BERT or "
                     "sentence-transformers model")


def check_lm(name_or_path: str | os.PathLike | None, *, trust_remote_code: bool = False) -> None:
    """RaditError unless ``name_or_path`` names a loadable causal LM: the embedded default (its package
    present), a ``.gguf`` file, or a folder / cached name whose config is a causal-LM architecture
    (:func:`check_model_kind`). Reads only the config (milliseconds): for input checks before any compute."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if is_default(name_or_path):
        if not (default_lm_dir() / "config.json").is_file():
            # RaditError naming the package, or the extra, when one is missing
            require_extra(f"converting {default_gguf_path().name}", "gguf", "accelerate")
        return
    if str(name_or_path).endswith(".gguf"):
        require_extra(f"loading {require_file(name_or_path).name}", "gguf", "accelerate")
        return
    path = str(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=hub_offline(), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise RaditError(not_found_message(path, e)) from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "auto_map", None):
        raise RaditError(f"{path}: not a causal LM (model type {config.model_type!r} has no "
                         "AutoModelForCausalLM class)")
    check_model_kind(config, "causal-lm", path)


def check_loading_info(path: str, info: dict[str, Any]) -> None:
    """RaditError when ``from_pretrained`` had to initialise weights the checkpoint lacks (transformers'
    ``missing_keys``): the model would compute with random weights, e.g. an encoder's missing LM head."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise RaditError(f"{path}: the checkpoint lacks weights the model needs ({shown}); they would be randomly "
                         "initialised (is it the right kind of model?)")


def load_lm(name_or_path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
            device: str | torch.device = "cpu", trust_remote_code: bool = False,
            attn_implementation: str | None = None) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)`` with the model in eval mode.

    ``name_or_path``: None, ``"default"`` or ``"smollm2"`` for the embedded SmolLM2-135M-Instruct; a
    local Hugging Face folder; a ``.gguf`` file (dequantised on every load: convert it with
    ``save_pretrained`` for speed); or a model name already in the local Hugging Face cache (the hub is
    never contacted unless ``HF_HUB_OFFLINE=0``). ``attn_implementation`` is passed to transformers
    (None: its default, sdpa where available).
    """
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if str(name_or_path).endswith(".gguf") and not is_default(name_or_path):
        gguf = Path(name_or_path)
        if not gguf.is_file():
            raise RaditError(f"{gguf}: no such file")
        model, tok = load_gguf(gguf, dtype)
        _ensure_pad_token(tok)
    else:
        path = resolve_lm_path(name_or_path)
        if not is_default(name_or_path):
            check_lm(path, trust_remote_code=trust_remote_code)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=hub_offline(), trust_remote_code=trust_remote_code, output_loading_info=True,
                **kwargs)
        except (OSError, ValueError, pickle.UnpicklingError) as e:  # unusable checkpoints: ValueError
            hint = f" (a damaged cache: remove {path} to convert again)" if is_default(name_or_path) else ""
            raise RaditError(not_found_message(path, e) + hint) from None
        check_loading_info(path, info)
        tok = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    model.to(device)
    model.eval()
    log.info("loaded %s (%.1fM parameters, %s) in %.2f s", name_or_path or "the default LM",
             sum(p.numel() for p in model.parameters()) / 1e6, dtype, time.perf_counter() - t0)
    return model, tok


def _ensure_pad_token(tok: Any) -> None:
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token


def not_found_message(path: str, e: Exception) -> str:
    """One line for a model folder that cannot be loaded (missing, not a causal LM, unreadable)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "Unrecognized configuration class" in first:
        return f"{path}: not a causal LM (AutoModelForCausalLM does not support its model type)"
    if Path(path).exists():
        return f"{path}: cannot load a model or tokenizer from this folder ({first})"
    return (f"{path}: not a local folder and not in the local Hugging Face cache (radit-fast works "
            f"offline; download it elsewhere and pass its folder)")


# ------------------------------------------------------------------------------ body | head split


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers are injected in place, so they stay)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def plain_copy(model: nn.Module, *, dtype: torch.dtype | None = None, state: dict[str, torch.Tensor] | None = None,
               in_place: bool = False) -> nn.Module:
    """A plain causal LM for ``save_pretrained`` or evaluation: out of any peft wrapper, its LoRA adapters
    merged into their weights and the LoRA layers replaced by their base layers (peft injects them in place),
    cast to ``dtype`` when given. A deep copy: ``model`` is untouched.

    ``state``: the full weights of an FSDP-sharded ``model`` (gathered on rank 0): the copy is built from
    ``model.config`` on the CPU and holds them, instead of a deep copy of the shards.
    ``in_place``: merge into ``model`` itself, no second copy in memory (for a model done training; it is
    left merged).
    """
    if state is not None:
        m = _from_state(model, state)
    else:
        m = unwrap(model if in_place else copy.deepcopy(model))
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: no adapters
        LoraLayer = ()
    for name, mod in list(m.named_modules()):
        if isinstance(mod, LoraLayer):
            mod.merge()
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, child, mod.get_base_layer())
    return m if dtype is None else m.to(dtype)


def _from_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A CPU model of ``model``'s config holding ``state`` (the gathered weights of a sharded model)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_config(model.config)
    missing, unexpected = m.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if real_missing or unexpected:
        raise RaditError(f"cannot rebuild the FSDP model for saving: missing {real_missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    if getattr(m.config, "tie_word_embeddings", False):
        m.tie_weights()
    return m


def decoder_body(model: nn.Module) -> nn.Module:
    """The base model (embeddings, blocks, final norm) of a causal LM: ``getattr(model, base_model_prefix)``.

    Its output ``last_hidden_state`` is what the LM head multiplies (after the final norm).
    """
    model = unwrap(model)
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if not isinstance(body, nn.Module) or body is model:
        raise RaditError(f"{type(model).__name__}: cannot find the decoder body "
                         f"(base_model_prefix={prefix!r}); expected a Hugging Face *ForCausalLM model")
    return body


def lm_head_weight(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, d], bias [V] or None)`` of the output embedding, so that ``logits = h @ W.T + b``.

    For tied models (SmolLM2) the weight *is* the input embedding, so gradients reach both uses.
    Raises RaditError for heads that are not a plain Linear or for models that rescale their logits.
    """
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    for attr in _LOGIT_MODIFIERS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise RaditError(f"{type(inner).__name__}: logits are modified by config.{attr}={value}; "
                             "the fused answer scoring supports plain linear LM heads only")
    head = inner.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise RaditError(f"{type(inner).__name__}: the output embedding is {type(head).__name__}, "
                         "not an nn.Linear (a LoRA adapter on lm_head is not supported)")
    return head.weight, head.bias


def attention_implementation(model: nn.Module) -> str:
    """The attention backend the model runs with (``eager``, ``sdpa``, ``flash_attention_2``, ...)."""
    return str(getattr(unwrap(model).config, "_attn_implementation", None) or "eager")


def answer_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         positions: torch.Tensor | None = None, *,
                         position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final-norm hidden states of the decoder body, without the LM head.

    Args:
        input_ids: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` 1 for real tokens, 0 for (right) padding; or a 4D mask ``[B, 1, T, T]``
            passed to the attention as is (packed rows, :func:`radit_fast.packing.pack_forward`); None when
            all tokens are real.
        positions: ``[N]`` flat indices into ``B * T`` (``b * T + t``) of the positions to return;
            None returns all ``[B, T, d]``.
        position_ids: ``[B, T]`` positions; for packed rows they restart at 0 in each instance.

    Returns:
        ``[N, d]`` (or ``[B, T, d]``) in the model's dtype, differentiable w.r.t. the model's parameters.
        ``hidden @ W.T + b`` with ``(W, b) = lm_head_weight(model)`` equals the model's own logits.
    """
    out = decoder_body(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, return_dict=True)
    hidden = out.last_hidden_state
    if positions is None:
        return hidden
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions.to(hidden.device))
