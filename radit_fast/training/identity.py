"""Identities of the models and data a run depends on: for ``--resume`` checks and the LSR cache keys.

* A model folder is identified by the sha256 of the contents of its weight files, its ``config.json`` and
  its tokenizer files; a single file (``.gguf``) by the sha256 of its contents. Hashing a large file once
  costs about 1 s per GB here, so the digest of every file of at least :data:`MEMO_MIN_BYTES` is memoised
  in ``$RADIT_CACHE/file_sha256/`` under its resolved path, keyed by its size, inode, ``mtime_ns`` and
  ``ctime_ns``: a file rewritten in place (even with other weights of the same shapes) is hashed again.
* The embedded default LM is identified by its GGUF file (the conversion's source), so the identity is
  the same before and after its one-time conversion to safetensors.
* A model given in memory is identified by :func:`radit_fast.retrieval.encoder.model_fingerprint` (every
  tensor), its config and its dtype.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from radit_fast._util import cache_root, sha256_file
from radit_fast.default_lm import default_gguf_path, default_lm_dir, is_default
from radit_fast.io import RaditError, write_json
from radit_fast.records import records_sha256
from radit_fast.retrieval.encoder import model_fingerprint

log = logging.getLogger(__name__)

MEMO_MIN_BYTES = 1 << 24      # smaller files are hashed on every call (well under 20 ms each)
MEMO_DIR = "file_sha256"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model")


def _stamp(p: Path) -> dict[str, Any]:
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "inode": st.st_ino, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's contents, memoised for large files (see the module docstring)."""
    p = Path(path).resolve()
    stamp = _stamp(p)
    if stamp["size"] < MEMO_MIN_BYTES:
        return sha256_file(p)
    memo = cache_root() / MEMO_DIR / (hashlib.sha256(str(p).encode()).hexdigest()[:32] + ".json")
    try:
        got = json.loads(memo.read_text(encoding="utf-8"))
        if {k: got.get(k) for k in stamp} == stamp and isinstance(got.get("sha256"), str):
            return got["sha256"]
    except (OSError, ValueError):
        pass
    log.info("hashing %s (%.0f MB, once)", p, stamp["size"] / 1e6)
    digest = sha256_file(p)
    if _stamp(p) == stamp:  # not rewritten while it was read
        try:
            write_json(memo, {**stamp, "sha256": digest})
        except OSError as e:  # a read-only cache only costs the hashing next time
            log.debug("cannot memoise the sha256 of %s (%s)", p, e)
    return digest


def _is_model_file(name: str) -> bool:
    return name in MODEL_FILES or name.endswith(WEIGHT_SUFFIXES)


def model_identity(name_or_path: str | None) -> dict[str, Any]:
    """Content identity of a model folder or file (the default LM: its GGUF file); a name that is neither
    (a model in the Hugging Face cache) is identified by the name alone."""
    if is_default(name_or_path):
        try:
            p = default_gguf_path()
        except RaditError:  # package missing: the converted folder, when there is one
            p = default_lm_dir()
        ident: dict[str, Any] = {"name": "default"}
    else:
        p = Path(str(name_or_path))
        ident = {}
    if p.is_dir():
        ident["files"] = {f.name: file_sha256(f) for f in sorted(p.iterdir())
                          if f.is_file() and _is_model_file(f.name)}
    elif p.is_file():
        ident["file_sha256"] = file_sha256(p)
    else:
        ident["name"] = str(name_or_path)
    return ident


def module_identity(lm: nn.Module) -> dict[str, Any]:
    """Identity of a model given in memory: a hash of every tensor, its config and its dtype."""
    config = getattr(lm, "config", None)
    return {"module": model_fingerprint(lm),
            "config": config.to_json_string(use_diff=True) if config is not None else None,
            "dtype": str(next(lm.parameters()).dtype)}


def fingerprint(cfg: Any, *, lm: nn.Module | None = None, lm_ident: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Identity of the data and models of a run: a resumed run must see the same. ``lm_ident``: the LM's
    identity when the caller has computed it already (stage 2's LSR cache key); else ``lm``, the model given
    in memory, or ``cfg.lm``'s files."""
    idx = Path(cfg.index) / "manifest.json"
    if lm_ident is None:
        lm_ident = model_identity(cfg.lm) if lm is None else module_identity(lm)
    fp = {"train_sha256": records_sha256(cfg.train),
          "index_manifest_sha256": sha256_file(idx) if idx.is_file() else None,
          "lm": lm_ident}
    if getattr(cfg, "corpus", None):
        fp["corpus_sha256"] = records_sha256(cfg.corpus)
    return {**fp, **(extra or {})}


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
