"""LSR targets: scoring every (example, retrieved chunk) with the frozen LM once, and caching the result.

Scoring runs the B*k augmented sequences ``Background: c_i\\n\\nQ: x\\nA: y`` (fixed ``Q:``/``A:``
markers) through the decoder body, sorted by length and batched under a token budget (little padding),
and sums the answer tokens' log-probabilities with the fused op
:func:`radit_fast.ops.answer_logprobs.answer_logprobs_per_sequence` — the ``N x V`` logits are never
formed. Under torchrun each process scores a slice of the examples.

The cache stores the raw per-chunk sums and answer lengths, so the score kind (mean/sum/prob) and the
temperatures can change without rescoring. Its key covers the LM identity (weights by content, see
:func:`lm_identity`), the examples (ids, inputs, answers), the retrieved rows, the index manifest,
``max_length`` and the template version. Answers are scored without EOS (``build_instance``'s default),
whatever stage 1's ``append_eos``. Entries are
folders ``lsr-<key>/`` written atomically with a sha256 of their tensor file; a corrupt entry is ignored
(and rescored) with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from radit_fast._util import cache_root, sha256_file
from radit_fast.data.prompts import build_instance, collate_packed, collate_padded
from radit_fast.distributed import DistEnv, shard_range
from radit_fast.io import atomic_dir, write_json
from radit_fast.models import lm_head_weight
from radit_fast.ops.scorer import chunk_logprobs
from radit_fast.packing import pack_forward
from radit_fast.training import identity

log = logging.getLogger(__name__)

TEMPLATE_VERSION = "background-qa/1"
TARGETS = "targets.safetensors"
META = "meta.json"


def default_dir(cfg: Any) -> Path:
    """``cfg.cache_dir`` or ``$RADIT_CACHE/lsr`` (shared by all runs of this user)."""
    if getattr(cfg, "cache_dir", None):
        return Path(cfg.cache_dir)
    return cache_root() / "lsr"


def lm_identity(cfg: Any, lm: nn.Module | None) -> dict[str, Any]:
    """What the targets depend on in the LM: the contents of its folder's weight, config and tokenizer
    files (digests memoised, see :mod:`radit_fast.training.identity`) or, for a model given in memory, a
    hash of every tensor, its config and its dtype."""
    if lm is None:
        return {**identity.model_identity(cfg.lm), "dtype": "float32"}
    return identity.module_identity(lm)


def key_for(cfg: Any, index: Any, items: list[Any], rows: np.ndarray, lm_ident: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.id, it.input, it.answers[0]]).encode())
    h.update(np.ascontiguousarray(rows).tobytes())
    parts = {"lm": lm_ident, "items": h.hexdigest(), "max_length": cfg.max_length,
             "index": sha256_file(Path(cfg.index) / "manifest.json"), "template": TEMPLATE_VERSION}
    return identity.cache_key(parts)


def entry(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"lsr-{key}"


def load(cache_dir: Path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(lm_logprobs [n, k] float32, lengths [n, k] int64)`` of a cache entry, or None."""
    from safetensors.numpy import load_file

    folder = entry(cache_dir, key)
    if not (folder / META).is_file():
        return None
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        if sha256_file(folder / TARGETS) != meta["sha256"]:
            raise ValueError("sha256 mismatch")
        t = load_file(str(folder / TARGETS))
        return t["lm_logprobs"], t["lengths"]
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        log.warning("ignoring the corrupt LSR cache entry %s (%s); rescoring", folder, e)
        return None


def save(cache_dir: Path, key: str, *, rows: np.ndarray, lm_logprobs: np.ndarray, lengths: np.ndarray,
         meta: dict[str, Any]) -> Path:
    from safetensors.numpy import save_file

    folder = entry(cache_dir, key)
    with atomic_dir(folder, overwrite=True) as tmp:
        save_file({"rows": np.ascontiguousarray(rows), "lm_logprobs": np.ascontiguousarray(lm_logprobs),
                   "lengths": np.ascontiguousarray(lengths)}, str(tmp / TARGETS))
        write_json(tmp / META, {**meta, "key": key, "sha256": sha256_file(tmp / TARGETS)})
    log.info("LSR targets cached in %s", folder)
    return folder


# ---------------------------------------------------------------------------------------------- scoring
def build_scoring_instances(tokenizer: Any, items: list[Any], texts: list[list[str]], max_length: int):
    """Instances of every (item, chunk) in row-major order and their ``(item, chunk)`` coordinates.

    Raises RaditError (naming the example) when the question and answer alone exceed ``max_length``.
    """
    instances, where = [], []
    for i, (it, chunks) in enumerate(zip(items, texts)):
        for j, chunk in enumerate(chunks):
            instances.append(build_instance(tokenizer, chunk, it.input, it.answers[0], max_length=max_length,
                                            example_id=it.id))
            where.append((i, j))
    return instances, where


@torch.inference_mode()
def score_grid(lm: nn.Module, instances: list[Any], slots: list[int], grid: tuple[int, int], pad_id: int, *,
               batch_tokens: int = 4096, packing: bool = False, impl: str = "auto",
               progress: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Answer log-likelihoods of the augmented sequences laid out on a ``grid = (B, k)``.

    ``slots[m] = b * k + i``: instance m is query b's sequence with chunk i. Returns ``(logprobs [B, k]
    float32, lengths [B, k] int64)``; slots without an instance get 0 and length 0. Instances are sorted by
    length and grouped so that ``rows x longest`` (padded) or the packed rows stay within ``batch_tokens``;
    the decoder body runs once per group and only the answer positions reach the fused scorer
    (:func:`radit_fast.ops.scorer.chunk_logprobs`, no logits).
    """
    B, k = grid
    total = torch.zeros(B, k, dtype=torch.float32)
    lengths = torch.zeros(B, k, dtype=torch.int64)
    order = sorted(range(len(instances)), key=lambda i: -instances[i].length)
    slot_t = torch.as_tensor(slots, dtype=torch.long)
    weight, bias = lm_head_weight(lm)
    s = 0
    while s < len(order):
        longest = instances[order[s]].length
        n = max(1, batch_tokens // longest)
        if packing:
            n, used = 0, 0
            while s + n < len(order) and used + instances[order[s + n]].length <= batch_tokens:
                used += instances[order[s + n]].length
                n += 1
            n = max(n, 1)
        group = order[s:s + n]
        insts = [instances[i] for i in group]
        batch = (collate_packed(insts, pad_id, max_tokens=max(longest, 512)) if packing
                 else collate_padded(insts, pad_id))
        hidden = pack_forward(lm, batch)
        w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        seg = slot_t[torch.as_tensor(group)][batch["segment_ids"]]  # batch-local instance -> grid slot
        lp, ln = chunk_logprobs(hidden, w, batch["answer_targets"].to(hidden.device), seg.to(hidden.device),
                                B, k, bias=b, impl=impl)
        total += lp.float().cpu()
        lengths += ln.cpu()
        s += len(group)
        if progress is not None:
            progress.update(len(group))
    return total.numpy(), lengths.numpy()


def score_instances(lm: nn.Module, instances: list[Any], pad_id: int, **kwargs: Any) -> np.ndarray:
    """``[m]`` float32: sum of the answer tokens' log-probabilities of each instance (see :func:`score_grid`)."""
    lp, _ = score_grid(lm, instances, list(range(len(instances))), (len(instances), 1), pad_id, **kwargs)
    return lp[:, 0]


def score_items(lm_loader: Any, tokenizer: Any, items: list[Any], texts: list[list[str]], cfg: Any,
                env: DistEnv) -> tuple[np.ndarray, np.ndarray]:
    """``(lm_logprobs [n, k] float32, lengths [n, k] int64)`` for every item and retrieved chunk.

    Each process scores a contiguous slice of the items; the slices are gathered on every process.
    ``lm_loader()`` is called only after every instance was built (input errors come first).
    """
    n, k = len(items), max((len(t) for t in texts), default=0)
    k = max(k, cfg.k if len(items) else 0)
    lo, hi = shard_range(n, env.rank, env.world_size)
    instances, where = build_scoring_instances(tokenizer, items[lo:hi], texts[lo:hi], cfg.max_length)
    lm = lm_loader()
    lm.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    budget = max(cfg.max_length, cfg.score_batch_size * cfg.k * cfg.max_length // 2)
    bar = None
    if getattr(cfg, "progress", False) and env.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(instances), desc="LSR scoring", unit="seq", dynamic_ncols=True)
    try:
        lp, ln = score_grid(lm, instances, [i * k + j for i, j in where], (hi - lo, k), pad, batch_tokens=budget,
                            impl=cfg.impl, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    lp = np.where(ln > 0, lp, -np.inf).astype(np.float32)
    if env.distributed:
        parts = env.all_gather((lp, ln))
        lp = np.concatenate([p[0] for p in parts])
        ln = np.concatenate([p[1] for p in parts])
    log.info("scored %d augmented sequences with the frozen LM", int((ln > 0).sum()))
    return lp, ln
