"""Cheap checks of model references for the input phase of ``radit run`` and ``radit eval``.

They read configs and tokenizers only (milliseconds), so a misspelt ``--encoder`` or ``--query-encoder`` is a
one-line error before any index is built, any passage retrieved or any output folder created.
:func:`check_lm_reference` adds a weights check and the tokenizer to :func:`radit_fast.models.check_lm`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from radit_fast._util import hub_offline
from radit_fast.io import RaditError
from radit_fast.models import check_lm, check_model_kind, load_tokenizer, not_found_message
from radit_fast.retrieval.encoder import resolve_encoder


def check_weights(name_or_path: str | os.PathLike | None, option: str) -> None:
    """RaditError naming ``option`` when ``name_or_path`` is a local folder without Hugging Face weights
    (``model.safetensors``, ``pytorch_model.bin`` or their sharded indexes); names, files and the embedded
    defaults are left to their loaders."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    if name_or_path is None or not os.path.isdir(name_or_path):
        return
    names = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    if not any((Path(name_or_path) / n).is_file() for n in names):
        raise RaditError(f"{option} {name_or_path}: no model weights in this folder (expected {SAFE_WEIGHTS_NAME} "
                         f"or {WEIGHTS_NAME}, as save_pretrained writes them)")


def check_encoder(name_or_path: str | os.PathLike | None, option: str = "--encoder", *,
                  trust_remote_code: bool = False) -> Any:
    """RaditError naming ``option`` unless ``name_or_path`` resolves (as
    :meth:`radit_fast.retrieval.encoder.TextEncoder.from_pretrained` resolves it) to an encoder whose config
    has an ``AutoModel`` class and whose tokenizer loads; returns the tokenizer. Loads no weights."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    try:
        _, location = resolve_encoder(name_or_path)
    except RaditError as e:
        raise RaditError(f"{option}: {e}") from None

    def load(cls: Any) -> Any:
        try:
            return cls.from_pretrained(location, local_files_only=hub_offline(), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as e:  # transformers reports unusable folders as ValueError
            raise RaditError(f"{option} {not_found_message(location, e)}") from None

    config = load(AutoConfig)
    if config.model_type not in MODEL_MAPPING_NAMES and not getattr(config, "auto_map", None):
        raise RaditError(f"{option} {location}: not an encoder (model type {config.model_type!r} has no "
                         "AutoModel class)")
    check_model_kind(config, "encoder", f"{option} {location}")
    check_weights(location, option)
    return load(AutoTokenizer)


def check_lm_reference(name_or_path: str | os.PathLike | None, option: str = "--lm", *,
                       trust_remote_code: bool = False) -> Any:
    """:func:`radit_fast.models.check_lm` (a causal-LM config), weights present in a local folder, and the
    LM's tokenizer (:func:`radit_fast.models.load_tokenizer`), which is returned for the length checks."""
    try:
        check_lm(name_or_path, trust_remote_code=trust_remote_code)
    except RaditError as e:
        raise RaditError(f"{option} {e}") from None
    check_weights(name_or_path, option)
    return load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
