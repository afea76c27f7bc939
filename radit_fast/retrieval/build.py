"""Building an index folder from a corpus: chunk -> passage store -> encode -> FAISS -> manifest.

The build runs inside :func:`radit_fast.io.atomic_dir`: the folder appears only when everything succeeded;
an interrupted or failed build leaves nothing behind. Under ``torchrun --nproc_per_node N`` every rank
encodes a slice of the rows into a float16 shard; rank 0 writes the store first and assembles the index
from the shards (see :mod:`radit_fast.distributed`).

>>> build_index("corpus.jsonl", "runs/idx", IndexBuildConfig(index_factory="IVF256,Flat"))  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from array import array
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radit_fast.distributed import INDEX_BUILD_TIMEOUT_S, DistEnv, init_distributed, run_step, shard_range
from radit_fast.io import RaditError, atomic_dir, open_npy, write_errno, write_failure
from radit_fast.records import iter_records, record_source
from radit_fast.retrieval.corpus import DEFAULT_CHUNK_WORDS, Passage, doc_id, iter_corpus, passage_text
from radit_fast.retrieval.encoder import TextEncoder, check_device
from radit_fast.retrieval.index import (
    EMBEDDINGS_FILE, FAISS_FILE, build_on_device, make_faiss_index, set_search_params,
)
from radit_fast.retrieval.manifest import MANIFEST_FILE, estimate_index_bytes, write_manifest
from radit_fast.retrieval.store import (
    STORE_FILES, PassageStore, PassageStoreWriter, first_duplicate, id_hash, store_ram_bytes,
)

logger = logging.getLogger(__name__)

_IDENTITY_KEYS = ("name", "fingerprint", "base_fingerprint", "pooling", "normalize", "dim")


@dataclass
class IndexBuildConfig:
    """Options of ``radit index build`` (None = the encoder's own default)."""

    encoder: str | None = None          # both encoders (default: embedded all-MiniLM-L6-v2)
    doc_encoder: str | None = None      # overrides ``encoder`` for documents (e.g. DRAGON+ context encoder)
    query_encoder: str | None = None    # recorded as the index's query encoder (e.g. DRAGON+ query encoder)
    pooling: str | None = None
    normalize: bool | None = None
    max_length: int | None = None
    chunk_words: int = DEFAULT_CHUNK_WORDS
    index_factory: str = "Flat"
    search_params: str = ""             # default FAISS run-time parameters, e.g. "nprobe=32"
    train_size: int | None = None       # IVF/PQ training sample (default max(65536, 100 nlist))
    batch_size: int = 64
    device: str = "cpu"
    precision: str = "auto"
    trust_remote_code: bool = False
    dist_timeout_s: float = INDEX_BUILD_TIMEOUT_S  # gloo timeout under torchrun (rank 0 works alone for hours)

    def check(self) -> None:
        if self.chunk_words < 1:
            raise RaditError(f"--chunk-words must be >= 1, got {self.chunk_words}")
        if self.batch_size < 1:
            raise RaditError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.device not in ("cpu", "cuda"):
            raise RaditError(f"--device must be cpu or cuda, got {self.device!r}")
        check_device(self.device)
        if not self.dist_timeout_s > 0:
            raise RaditError(f"--dist-timeout must be positive, got {self.dist_timeout_s} s")


def check_corpus(corpus: str | os.PathLike, chunk_words: int = DEFAULT_CHUNK_WORDS) -> int:
    """Read a corpus once without writing anything: every line's fields (:func:`iter_corpus`) and no document id
    twice (whatever the chunking); returns the number of documents. ``radit run`` calls it in its input phase,
    before any output exists; ``index build`` checks the same while it writes the store."""
    record_source(corpus, "--corpus")  # RaditError when missing or unreadable (JSON lines, Parquet, datasets folder)
    hashes, lines, last = array("Q"), array("q"), None
    for lineno, passage in iter_corpus(corpus, chunk_words):
        if lineno != last:
            hashes.append(id_hash(passage.doc_id))
            lines.append(lineno)
            last = lineno
    if not lines:
        raise RaditError(f"{corpus}: no documents")

    def doc_at(i: int) -> str:  # only for the rows whose hashes are equal (a duplicate, or a rare collision)
        want = lines[i]
        return next(doc_id(str(obj.get("id"))) for n, obj in iter_records(corpus) if n == want)

    dup = first_duplicate(np.frombuffer(hashes, dtype=np.uint64), lambda a, b: doc_at(a) == doc_at(b))
    if dup is not None:
        raise RaditError(f"{corpus}:{lines[dup[1]]}: duplicate id {doc_at(dup[0])!r} (first at line {lines[dup[0]]})")
    return len(lines)


def write_store(corpus: Path, folder: Path, chunk_words: int) -> int:
    """Chunk the corpus into the passage store files in ``folder``; returns the passage count."""
    from tqdm import tqdm

    writer = PassageStoreWriter(folder, source=str(corpus), documents=True)
    try:
        for lineno, passage in tqdm(iter_corpus(corpus, chunk_words), desc="reading corpus", unit=" passages",
                                    disable=None):
            writer.add(passage, lineno)
    except BaseException:
        writer.abort()
        raise
    n = writer.close()
    if n == 0:
        raise RaditError(f"{corpus}: no documents")
    return n


def encode_rows(store: PassageStore, encoder: TextEncoder, lo: int, hi: int, path: Path, *,
                batch_size: int = 64, precision: str = "auto", progress: bool = False) -> None:
    """Encode store rows [lo, hi) with the document encoder into a float16 ``.npy`` at ``path``."""
    from tqdm import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    out = open_npy(path, np.float16, (hi - lo, encoder.dim))  # disk reserved first: no SIGBUS when full
    block = max(32 * batch_size, 4096)
    with tqdm(total=hi - lo, desc="encoding passages", unit=" passages", disable=None if progress else True) as bar:
        for s in range(lo, hi, block):
            e = min(hi, s + block)
            texts = [passage_text(p.title, p.text) for p in store.get(range(s, e))]
            emb = encoder.encode(texts, batch_size=batch_size, precision=precision, progress=bar)
            emb16 = emb.cpu().numpy().astype(np.float16)
            if not np.isfinite(emb16).all():
                raise RaditError(f"encoder produced non-finite float16 embeddings in rows {s}..{e - 1}")
            out[s - lo : e - lo] = emb16
    out.flush()
    del out


def _finish(folder: Path, *, doc_identity: dict, query_identity: dict, index_factory: str, search_params: str,
            train_size: int | None, device: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Build the FAISS index from ``folder/embeddings.f16.npy`` and write the manifest."""
    import faiss

    emb = np.load(folder / EMBEDDINGS_FILE, mmap_mode="r")
    n, dim = emb.shape
    index = make_faiss_index(index_factory, dim)
    t0 = time.perf_counter()
    index, used = build_on_device(index, emb, device=device, train_size=train_size, progress=True)
    set_search_params(index, search_params)  # validate now, not at the first retrieve
    try:
        faiss.write_index(index, str(folder / FAISS_FILE))
    except RuntimeError as e:  # faiss reports a failed fwrite with the system's message
        if write_errno(e) is None:
            raise
        raise write_failure(e, folder / FAISS_FILE, needed=estimate_index_bytes(index_factory, n, dim)) from None
    logger.info("built %s over %d vectors in %.1f s", index_factory, n, time.perf_counter() - t0)
    index_bytes = (folder / FAISS_FILE).stat().st_size
    memory = {
        "index_bytes": index_bytes,                 # read fully into RAM by Index.load
        "index_estimate_bytes": estimate_index_bytes(index_factory, n, dim),
        "store_ram_bytes": store_ram_bytes(n),      # offsets + id map (memory-mapped, paged on use)
        "embeddings_mmap_bytes": 2 * n * dim,       # float16, memory-mapped, paged on use
        "passages_disk_bytes": (folder / "passages.jsonl").stat().st_size,
    }
    memory["predicted_ram_bytes"] = index_bytes + memory["store_ram_bytes"]
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)  # mkdtemp makes it private; an index is meant to be shared
    manifest = write_manifest(folder, {
        "count": int(n),
        "dim": int(dim),
        "doc_encoder": doc_identity,
        "query_encoder": query_identity,
        "index": {"factory": index_factory, "metric": "inner_product", "search_params": search_params,
                  "train_size": used, "file": FAISS_FILE},
        "embeddings": {"file": EMBEDDINGS_FILE, "dtype": "float16"},
        "memory": memory,
        **extra,
    }, files=[FAISS_FILE, EMBEDDINGS_FILE, *STORE_FILES])
    os.chmod(folder / MANIFEST_FILE, 0o666 & ~umask)
    return manifest


def build_index(corpus: str | os.PathLike, out: str | os.PathLike, config: IndexBuildConfig | None = None, *,
                overwrite: bool = False) -> Path:
    """Build an index folder at ``out`` from a corpus file (single process, or every rank under torchrun)."""
    cfg = config or IndexBuildConfig()
    cfg.check()
    corpus, out = Path(corpus), Path(out)
    if out.exists() and not overwrite:
        raise RaditError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise RaditError(f"{out}: exists and is not a folder")
    record_source(corpus, "--corpus")  # RaditError when missing or unreadable (JSON lines, Parquet, datasets folder)
    with init_distributed("cpu", timeout_s=cfg.dist_timeout_s) as env:  # gloo: rank 0 works alone for hours
        if env.is_main:
            with atomic_dir(out, overwrite=overwrite) as tmp:
                _build_steps(env, corpus, tmp, cfg)
        else:
            _build_steps(env, corpus, None, cfg)
    return out


def _build_steps(env: DistEnv, corpus: Path, tmp: Path | None, cfg: IndexBuildConfig) -> None:
    device = f"cuda:{env.local_rank}" if cfg.device == "cuda" else "cpu"
    enc_kw = dict(pooling=cfg.pooling, normalize=cfg.normalize, max_length=cfg.max_length,
                  trust_remote_code=cfg.trust_remote_code)
    local: dict[str, Any] = {}

    def load_and_store() -> dict[str, Any] | None:
        check_device(device)  # cuda:LOCAL_RANK exists on this node
        local["enc"] = TextEncoder.from_pretrained(cfg.doc_encoder or cfg.encoder, device=device, **enc_kw)
        if not env.is_main:
            return None
        doc_id = local["enc"].identity()
        local["q_id"] = doc_id
        if cfg.query_encoder and cfg.query_encoder != (cfg.doc_encoder or cfg.encoder):
            local["q_id"] = TextEncoder.from_pretrained(cfg.query_encoder, **enc_kw).identity()
            if local["q_id"]["dim"] != doc_id["dim"]:
                raise RaditError(f"query encoder {cfg.query_encoder} has dim {local['q_id']['dim']} but the document "
                                 f"encoder {doc_id['name']} has dim {doc_id['dim']}")
        n = write_store(corpus, tmp, cfg.chunk_words)
        logger.info("%s: %d passages (chunks of at most %d words)", corpus, n, cfg.chunk_words)
        make_faiss_index(cfg.index_factory, local["enc"].dim)  # a bad factory string fails before encoding
        return {"folder": str(tmp), "n": n}

    info = run_step(env, "loading the encoder and writing the passage store", load_and_store)[0]
    folder, n = Path(info["folder"]), info["n"]
    enc: TextEncoder = local["enc"]

    def encode_shard() -> None:
        lo, hi = shard_range(n, env.rank, env.world_size)
        path = folder / (EMBEDDINGS_FILE if env.world_size == 1 else f"shards/emb-{env.rank:05d}.npy")
        logger.info("rank %d encodes rows %d..%d", env.rank, lo, hi - 1)
        encode_rows(PassageStore(folder), enc, lo, hi, path, batch_size=cfg.batch_size,
                    precision=cfg.precision, progress=env.is_main)

    run_step(env, "encoding", encode_shard)

    def assemble() -> None:
        if not env.is_main:
            return
        if env.world_size > 1:
            out = open_npy(folder / EMBEDDINGS_FILE, np.float16, (n, enc.dim))
            for r in range(env.world_size):
                lo, hi = shard_range(n, r, env.world_size)
                out[lo:hi] = np.load(folder / f"shards/emb-{r:05d}.npy", mmap_mode="r")
            out.flush()
            del out
            shutil.rmtree(folder / "shards")
        _finish(folder, doc_identity=enc.identity(), query_identity=local["q_id"], index_factory=cfg.index_factory,
                search_params=cfg.search_params, train_size=cfg.train_size, device=cfg.device,
                extra={"chunk_words": cfg.chunk_words, "corpus": str(corpus.resolve()),
                       "precision": enc.resolve_precision(cfg.precision), "world_size": env.world_size, "build_config": asdict(cfg)})

    run_step(env, "assembling the index", assemble)


def precomputed_identity(name: str, dim: int, *, pooling: str = "mean", normalize: bool = True,
                         fingerprint: str | None = None) -> dict[str, Any]:
    """Encoder identity for embeddings computed elsewhere (synthetic vectors, an external encoder)."""
    fp = fingerprint or f"external:{name}"
    return {"name": name, "path": None, "fingerprint": fp, "base_fingerprint": fp, "pooling": pooling,
            "normalize": normalize, "max_length": None, "dim": int(dim)}


def build_index_from_embeddings(
    out: str | os.PathLike,
    passages: Iterable[Passage],
    embeddings: np.ndarray,
    *,
    doc_encoder: dict[str, Any],
    query_encoder: dict[str, Any] | None = None,
    index_factory: str = "Flat",
    search_params: str = "",
    train_size: int | None = None,
    chunk_words: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Build an index folder from precomputed embeddings [n, d] (benchmarks, tests, external encoders).

    ``doc_encoder``/``query_encoder`` are identity dicts as :meth:`TextEncoder.identity` returns
    (keys name, fingerprint, base_fingerprint, pooling, normalize, dim).
    """
    for ident in (doc_encoder, query_encoder or doc_encoder):
        missing = [k for k in _IDENTITY_KEYS if k not in ident]
        if missing:
            raise RaditError(f"encoder identity lacks {missing}")
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[1] != int(doc_encoder["dim"]):
        raise RaditError(f"embeddings must be [n, {doc_encoder['dim']}], got {list(emb.shape)}")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = PassageStoreWriter(tmp, source="passages")
        try:
            for i, p in enumerate(passages):
                writer.add(p, i + 1)
        except BaseException:
            writer.abort()
            raise
        n = writer.close()
        if n != len(emb):
            raise RaditError(f"{n} passages but {len(emb)} embeddings")
        out16 = open_npy(tmp / EMBEDDINGS_FILE, np.float16, emb.shape)
        for s in range(0, n, 1 << 18):
            out16[s : s + (1 << 18)] = emb[s : s + (1 << 18)]
        out16.flush()
        del out16
        _finish(tmp, doc_identity=doc_encoder, query_identity=query_encoder or doc_encoder,
                index_factory=index_factory, search_params=search_params, train_size=train_size, device="cpu",
                extra={"chunk_words": chunk_words, "corpus": None, "precision": None, "world_size": 1})
    return Path(out)
