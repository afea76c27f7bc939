"""A built index folder: FAISS index (inner product), float16 document embeddings, passage store, manifest.

Folder layout (written by :mod:`radit_fast.retrieval.build`)::

    manifest.json        see radit_fast.retrieval.manifest
    index.faiss          faiss.write_index of index_factory(dim, factory, METRIC_INNER_PRODUCT)
    embeddings.f16.npy   float16 [count, dim] document embeddings, memory-mapped on load
    passages.jsonl, offsets.npy, id_hash.npy, id_rows.npy     the passage store

The FAISS index holds the float16-rounded embeddings (as float32), so an exact (Flat) search scores
q . d with exactly the vectors :meth:`Index.doc_embeddings` returns: retrieval scores and the
differentiable training scores E_q(x) . E_d(c) agree without re-encoding documents.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radit_fast.io import RaditError
from radit_fast.retrieval.manifest import read_manifest
from radit_fast.retrieval.store import PassageStore

logger = logging.getLogger(__name__)

FAISS_FILE = "index.faiss"
EMBEDDINGS_FILE = "embeddings.f16.npy"
ADD_BLOCK = 65536


def exact_topk(queries: torch.Tensor, docs: torch.Tensor, k: int, block: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference exact inner-product top-k in PyTorch: (scores [B, k] descending, rows int64 [B, k]).

    Scans ``docs`` [n, d] in blocks of ``block`` rows (memory O(B * (block + k))), merging running top-k.
    Used by tests and benchmarks as the ground truth for FAISS searches.
    """
    best_s = torch.full((queries.shape[0], 0), float("-inf"), dtype=torch.float32)
    best_i = torch.zeros((queries.shape[0], 0), dtype=torch.long)
    q = queries.float()
    for s in range(0, docs.shape[0], block):
        sc = q @ docs[s : s + block].float().T
        top_s, top_i = sc.topk(min(k, sc.shape[1]), dim=1)
        best_s, pick = torch.cat([best_s, top_s], 1).topk(min(k, best_s.shape[1] + top_s.shape[1]), dim=1)
        best_i = torch.cat([best_i, top_i + s], 1).gather(1, pick)
    return best_s, best_i


def check_k(k: int, count: int, option: str = "--k") -> None:
    """The one check of a retrieval depth against an index: RaditError unless ``1 <= k <= count``.

    Every command that retrieves (retrieve, train-lm, train-retriever, eval, run) calls it before any work,
    instead of clamping k to the index size (which silently changes the method: with a tiny index every
    example gets every passage).
    """
    sep = " " if option.startswith("--") else "="
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise RaditError(f"{option} must be >= 1, got {k!r}")
    if k > count:
        raise RaditError(f"{option}{sep}{k} is larger than the index ({count} passages): use {option}{sep}{count} "
                         "or less, or build the index from a bigger corpus")


def make_faiss_index(factory: str, dim: int) -> Any:
    """``faiss.index_factory(dim, factory, METRIC_INNER_PRODUCT)`` with a one-line error for bad strings."""
    import faiss

    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "invalid"
        raise RaditError(f"invalid --index-factory {factory!r} for dim {dim}: {reason}") from None


def default_train_size(index: Any, n: int) -> int:
    """Training sample for an index that needs training: max(65536, 100 * nlist), at most n."""
    import faiss

    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        nlist = 0
    return min(n, max(65536, 100 * nlist))


def train_index(index: Any, emb: np.ndarray, *, train_size: int | None = None, seed: int = 0) -> int:
    """Train ``index`` (if it needs it) on a random sample of the rows of ``emb``; returns the sample size."""
    n = len(emb)
    if index.is_trained:
        return 0
    used = min(n, train_size or default_train_size(index, n))
    rows = np.sort(np.random.default_rng(seed).choice(n, size=used, replace=False))
    logger.info("training the index on %d of %d vectors", used, n)
    try:
        index.train(np.ascontiguousarray(emb[rows], dtype=np.float32))
    except RuntimeError as e:
        raise RaditError(f"cannot train the index on {used} vectors: {str(e).strip().splitlines()[-1]}") from None
    return used


def add_vectors(index: Any, emb: np.ndarray, *, progress: bool = False) -> None:
    """Add every row of ``emb`` (any float dtype, e.g. the float16 memmap) in blocks of ``ADD_BLOCK`` rows."""
    from tqdm import tqdm

    with tqdm(total=len(emb), desc="indexing", unit=" vectors", disable=None if progress else True) as bar:
        for s in range(0, len(emb), ADD_BLOCK):
            block = np.ascontiguousarray(emb[s : s + ADD_BLOCK], dtype=np.float32)
            index.add(block)
            bar.update(len(block))


def train_and_add(index: Any, emb: np.ndarray, *, train_size: int | None = None, seed: int = 0,
                  progress: bool = False) -> int:
    """Train ``index`` (if it needs it) on a random sample of rows, then add every row in blocks.

    ``emb`` is [n, d] of any float dtype (e.g. the float16 memmap); returns the training sample size.
    """
    used = train_index(index, emb, train_size=train_size, seed=seed)
    add_vectors(index, emb, progress=progress)
    return used


def build_on_device(index: Any, emb: np.ndarray, *, device: str = "cpu", train_size: int | None = None,
                    seed: int = 0, progress: bool = False) -> tuple[Any, int]:
    """Train and fill a CPU ``index``, on the GPUs when ``device`` is cuda; returns (CPU index, sample size).

    On the CPU (or without a faiss GPU build) this is :func:`train_and_add`. With GPUs, an index that needs
    training is trained on one GPU (an index sharded over several would train every shard separately, each
    with its own k-means), then copied to all GPUs (sharded, one common coarse quantizer) to add the
    vectors, then copied back to the CPU. An index that needs no training (Flat) is filled on the CPU,
    where adding is a copy.
    """
    n_gpu = 0
    if device.startswith("cuda"):
        if faiss_gpu_available():
            import faiss

            n_gpu = faiss.get_num_gpus()
        else:
            logger.warning("faiss has no GPU support here (install faiss-gpu); the index is built on the CPU")
    if n_gpu == 0 or index.is_trained:
        return index, train_and_add(index, emb, train_size=train_size, seed=seed, progress=progress)
    size = train_size or default_train_size(index, len(emb))  # from the CPU index: faiss can read its nlist
    one = index_to_gpu(index, gpus=1)
    used = train_index(one, emb, train_size=size, seed=seed)
    index = index_to_gpu(index_to_cpu(one))
    add_vectors(index, emb, progress=progress)
    return index_to_cpu(index), used


def faiss_gpu_available() -> bool:
    """True when faiss was built with GPU support and sees at least one GPU."""
    import faiss

    return hasattr(faiss, "index_gpu_to_cpu") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _sub_indexes(index: Any) -> list[Any]:
    """The indexes ``index`` wraps: shards / replicas, and the inner index of IndexPreTransform, IDMap, Refine."""
    import faiss

    subs = [index.at(i) for i in range(index.count())] if hasattr(index, "at") and hasattr(index, "count") else []
    subs += [sub for attr in ("index", "base_index") if (sub := getattr(index, attr, None)) is not None]
    return [faiss.downcast_index(sub) for sub in subs]


def is_gpu_index(index: Any) -> bool:
    """True when ``index`` is or contains a faiss GPU index: ``index_cpu_to_all_gpus`` over several GPUs gives
    IndexShards / IndexReplicas / IndexShardsIVF of GpuIndex*, and OPQ or PCA keep an IndexPreTransform
    around one."""
    return "Gpu" in type(index).__name__ or any(is_gpu_index(sub) for sub in _sub_indexes(index))


def index_to_gpu(index: Any, *, gpus: int | None = None) -> Any:
    """Copy a CPU index to the first ``gpus`` GPUs (default all), sharded when several; unchanged (with a
    warning) without faiss-gpu or for index types faiss cannot put on a GPU (HNSW, PQ without IVF).

    Shards hold 1/G of the inverted lists each and share one coarse quantizer (``common_ivf_quantizer``,
    where this faiss has it); queries go to every shard and the top-k are merged.
    """
    import faiss

    if not faiss_gpu_available():
        logger.warning("faiss has no GPU support here (install faiss-gpu); the index stays on the CPU")
        return index
    n = faiss.get_num_gpus() if gpus is None else max(1, min(gpus, faiss.get_num_gpus()))
    co = faiss.GpuMultipleClonerOptions()
    co.shard = n > 1
    if co.shard and hasattr(co, "common_ivf_quantizer"):
        co.common_ivf_quantizer = True
    co.useFloat16 = True  # halves GPU memory for Flat/IVF-Flat storage; scores are rescored exactly
    try:
        return faiss.index_cpu_to_gpus_list(index, co=co, gpus=list(range(n)))
    except RuntimeError as e:
        logger.warning("faiss cannot put %s on a GPU (%s); it stays on the CPU", type(index).__name__,
                       str(e).strip().splitlines()[-1] if str(e).strip() else "unsupported")
        return index


def index_to_cpu(index: Any) -> Any:
    """A CPU copy of a GPU index (shards merged into one index); a CPU index is returned as is."""
    import faiss

    return faiss.index_gpu_to_cpu(index) if faiss_gpu_available() and is_gpu_index(index) else index


def set_search_params(index: Any, params: str) -> None:
    """Apply FAISS run-time parameters, e.g. ``"nprobe=32"`` or ``"efSearch=128"`` (empty = none).

    GPU indexes (also sharded ones) need ``GpuParameterSpace``: the CPU ``ParameterSpace`` cannot set nprobe
    on a GpuIndexIVF.
    """
    if not params:
        return
    import faiss

    gpu = faiss_gpu_available() and is_gpu_index(index)
    space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
    try:
        space.set_index_parameters(index, params)
    except RuntimeError as e:
        raise RaditError(f"invalid search parameters {params!r}: {str(e).strip().splitlines()[-1]}") from None


def same_lineage(identity: dict[str, Any], expected: dict[str, Any]) -> bool:
    """Whether an encoder (its :meth:`TextEncoder.identity`) is, or was fine-tuned from, the encoder ``expected``
    records: equal fingerprints, a shared base fingerprint, or equal names."""
    fps = {expected.get("fingerprint"), expected.get("base_fingerprint")} - {None}
    same = identity.get("fingerprint") in fps or identity.get("base_fingerprint") in fps
    return same or identity.get("name") == expected.get("name")


class Index:
    """A loaded index folder; search with query embeddings, read stored document embeddings and passages.

    >>> index = Index.load("runs/wiki-index")  # doctest: +SKIP
    >>> scores, rows = index.search(q.numpy(), k=10)  # doctest: +SKIP
    >>> d = index.doc_embeddings(rows)  # float32 [B, 10, dim], from the float16 matrix  # doctest: +SKIP
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], faiss_index: Any, embeddings: np.ndarray,
                 store: PassageStore):
        self.folder = folder
        self.manifest = manifest
        self.faiss_index = faiss_index
        self.embeddings = embeddings
        self.store = store

    @classmethod
    def load(cls, folder: str | os.PathLike, *, device: str = "cpu", verify: str = "sha256",
             search_params: str | None = None) -> Index:
        """Open an index folder; ``verify`` = sha256 | size | none (see manifest.read_manifest).

        ``device="cuda"`` moves the FAISS index to the GPUs when faiss has GPU support.
        ``search_params`` overrides the FAISS run-time parameters recorded at build time.
        """
        import faiss

        folder = Path(folder)
        manifest = read_manifest(folder, verify=verify)
        n, dim = int(manifest["count"]), int(manifest["dim"])
        try:
            index = faiss.read_index(str(folder / FAISS_FILE))
        except RuntimeError as e:
            raise RaditError(f"{folder / FAISS_FILE}: unreadable FAISS index ({str(e).strip().splitlines()[-1]})") from None
        try:
            emb = np.load(folder / EMBEDDINGS_FILE, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise RaditError(f"{folder / EMBEDDINGS_FILE}: unreadable embeddings ({e})") from None
        store = PassageStore(folder)
        if index.ntotal != n or index.d != dim or emb.shape != (n, dim) or emb.dtype != np.float16 or len(store) != n:
            raise RaditError(
                f"{folder}: files disagree with the manifest (count {n}, dim {dim}): index {index.ntotal}x{index.d}, "
                f"embeddings {emb.shape} {emb.dtype}, store {len(store)}"
            )
        if device.startswith("cuda"):
            index = index_to_gpu(index)
        params = manifest["index"].get("search_params", "") if search_params is None else search_params
        set_search_params(index, params)
        logger.info("loaded index %s: %d passages, dim %d, %s", folder, n, dim, manifest["index"]["factory"])
        return cls(folder, manifest, index, emb, store)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def _flat_matrix(self) -> torch.Tensor | None:
        """Zero-copy float32 [n, d] view of a CPU IndexFlatIP's vectors (None for other index types)."""
        import faiss

        idx = self.faiss_index
        if not (isinstance(idx, faiss.IndexFlat) and idx.metric_type == faiss.METRIC_INNER_PRODUCT):
            return None
        if getattr(self, "_flat", None) is None:
            xb = faiss.rev_swig_ptr(idx.get_xb(), idx.ntotal * idx.d)
            self._flat = torch.from_numpy(np.asarray(xb).reshape(idx.ntotal, idx.d))
        return self._flat

    def search(self, queries: np.ndarray | torch.Tensor, k: int, *, impl: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores float32 [B, k] descending, rows int64 [B, k], -1 = no result).

        ``impl="auto"`` searches a CPU Flat index with :func:`exact_topk` (torch matmul + top-k over the
        FAISS vectors, zero-copy: 2-9x faster than faiss-cpu 1.15's Flat search at batches of 1024-256 queries
        on this CPU, see benchmarks/results/retrieval_cpu.csv) and everything else with FAISS;
        ``"faiss"`` forces FAISS. Both are exact for Flat (ties may be ordered differently).
        """
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().float().cpu().numpy()
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise RaditError(f"queries must have shape [B, {self.dim}], got {list(q.shape)}")
        check_k(k, len(self), "k")
        if impl not in ("auto", "faiss"):
            raise RaditError(f"impl must be auto or faiss, got {impl!r}")
        flat = self._flat_matrix() if impl == "auto" else None
        if flat is not None:
            scores, rows = exact_topk(torch.from_numpy(q), flat, k)
            return scores.numpy(), rows.numpy()
        scores, rows = self.faiss_index.search(q, k)
        return scores, rows.astype(np.int64, copy=False)

    def doc_embeddings(self, rows: np.ndarray | torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
        """Stored document embeddings as float32 [*rows.shape, dim] (rows < 0 give zero vectors).

        These are constants (the document encoder is frozen); gradients flow through the query side of
        ``q @ d``. Reads only the requested rows of the memory-mapped float16 matrix.
        """
        r = torch.as_tensor(rows, dtype=torch.long).cpu()
        flat = r.reshape(-1).numpy()
        if flat.size and flat.max() >= len(self):
            raise IndexError(f"row {int(flat.max())} out of range (index has {len(self)} passages)")
        valid = flat >= 0
        vec = torch.from_numpy(np.asarray(self.embeddings[np.where(valid, flat, 0)], dtype=np.float32))
        vec[torch.from_numpy(~valid)] = 0.0
        out = vec.reshape(*r.shape, self.dim)
        return out if device is None else out.to(device)

    def check_query_encoder(self, identity: dict[str, Any], *, strict: bool = True) -> None:
        """Refuse a query encoder whose dim differs, or (``strict``) whose lineage, pooling or normalisation differ.

        Lineage matches when the fingerprints are equal, the encoder was fine-tuned from the index's query
        encoder (``base_fingerprint``), or the names are equal.
        """
        expected = self.manifest["query_encoder"]
        if int(identity["dim"]) != self.dim:
            raise RaditError(
                f"query encoder {identity['name']} has dim {identity['dim']} but index {self.folder} has dim {self.dim}"
            )
        problems = [] if same_lineage(identity, expected) else [
            f"it is {identity['name']!r}, the index expects {expected.get('name')!r}"]
        for key in ("pooling", "normalize"):
            if key in expected and identity.get(key) != expected[key]:
                problems.append(f"{key} {identity.get(key)!r} != {expected[key]!r}")
        if problems:
            msg = f"query encoder does not match index {self.folder}: " + "; ".join(problems)
            if strict:
                raise RaditError(msg + " (pass --allow-encoder-mismatch to use it anyway)")
            logger.warning(msg)
