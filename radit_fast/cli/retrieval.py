"""``radit index build``, ``radit index info`` and ``radit retrieve``.

    radit index build --corpus corpus.jsonl --out runs/idx [--encoder NAME] [--chunk-words 200]
                      [--index-factory Flat] [--batch-size 64] [--device cpu|cuda] [--overwrite]
    radit retrieve --index runs/idx --queries tasks.jsonl --k 10 --out retrieved.jsonl [--query-encoder PATH]

``index build`` also runs under ``torchrun --nproc_per_node N $(which radit) index build ...`` (the encoding
is sharded over the ranks). ``retrieve`` is a single process: it does not split the queries over ranks
(with ``--device cuda`` the FAISS index is sharded over all the GPUs of the machine instead).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from radit_fast.config.fields import positive_int
from radit_fast.io import RaditError

logger = logging.getLogger("radit_fast.cli.retrieval")


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value: str) -> float:
    """Seconds from ``"3600"``, ``"90s"``, ``"45m"``, ``"24h"`` or ``"2d"``."""
    text = value.strip().lower()
    unit = _UNITS.get(text[-1:], None)
    try:
        seconds = float(text[:-1] if unit else text) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration such as 3600, 90m or 24h, got {value!r}") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive duration, got {value!r}")
    return seconds


def _encoder_options(p: argparse.ArgumentParser, default: str = "the encoder's") -> None:
    p.add_argument("--pooling", choices=["cls", "mean"], help=f"override the pooling (default: {default})")
    p.add_argument("--normalize", type=_bool, metavar="{true,false}",
                   help=f"override L2 normalisation (default: {default})")
    p.add_argument("--max-length", type=positive_int, help=f"max tokens per text (default: {default})")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="autocast for encoding (auto: bf16 on GPUs and on CPUs with native bf16, else fp32)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model folder")


def register(subparsers: argparse._SubParsersAction) -> None:
    index = subparsers.add_parser("index", help="build and inspect retrieval indexes")
    actions = index.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    b = actions.add_parser("build", help="encode a corpus and build a FAISS index folder",
                           description="Chunk a corpus {id, title, text}, encode it and build an index.")
    b.add_argument("--corpus", required=True, type=Path,
                   help="corpus records {id, title, text}: JSON lines, Parquet, or a datasets folder[:split]")
    b.add_argument("--out", required=True, type=Path, help="index folder to create")
    b.add_argument("--encoder", help="encoder for queries and documents, HF name or folder (default: all-MiniLM-L6-v2)")
    b.add_argument("--doc-encoder", help="document encoder when asymmetric (e.g. a DRAGON+ context encoder)")
    b.add_argument("--query-encoder", help="query encoder recorded in the manifest when asymmetric")
    b.add_argument("--chunk-words", type=positive_int, default=200, help="max words per passage (default 200)")
    b.add_argument("--index-factory", default="Flat",
                   help="FAISS index_factory string, inner product (default Flat; e.g. IVF4096,Flat, IVF65536,PQ64, HNSW32)")
    b.add_argument("--search-params", default="", help="default FAISS search parameters, e.g. nprobe=32")
    b.add_argument("--train-size", type=positive_int, help="vectors sampled to train IVF/PQ (default max(65536, 100 nlist))")
    b.add_argument("--batch-size", type=positive_int, default=64, help="texts per encoder batch (default 64)")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists (atomically, at the end)")
    b.add_argument("--dist-timeout", type=_duration, metavar="DURATION",
                   help="under torchrun: how long a rank may wait for the others, e.g. 3600, 90m, 24h (default 24h; "
                        "rank 0 alone writes the store and builds the index while the others wait)")
    _encoder_options(b)
    b.set_defaults(func=cmd_index_build)

    i = actions.add_parser("info", help="check an index folder and print its manifest summary")
    i.add_argument("--index", required=True, type=Path)
    i.add_argument("--verify", choices=["sha256", "size", "none"], default="sha256")
    i.set_defaults(func=cmd_index_info)

    r = subparsers.add_parser("retrieve", help="retrieve top-k passages for KILT queries",
                              description="Retrieve the top-k passages of each query ({id, input}) of a KILT file.")
    r.add_argument("--index", required=True, type=Path, help="index folder from `radit index build`")
    r.add_argument("--queries", required=True, type=Path,
                   help="KILT records with id and input (JSON lines, Parquet, or a datasets folder[:split])")
    r.add_argument("--k", type=positive_int, default=10, help="passages per query (default 10)")
    r.add_argument("--out", required=True, type=Path, help="output JSON lines {id, passages: [{id, score, title, text}]}")
    r.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    r.add_argument("--query-encoder", help="query encoder folder or name (default: the index's)")
    r.add_argument("--allow-encoder-mismatch", action="store_true",
                   help="use a query encoder of another lineage/pooling (dim must still match)")
    r.add_argument("--search-params", help="FAISS search parameters, e.g. nprobe=64 (default: the index's)")
    r.add_argument("--batch-size", type=positive_int, default=64, help="queries per batch (default 64)")
    r.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    r.add_argument("--verify", choices=["sha256", "size", "none"], default="sha256",
                   help="index file checks on load (default sha256; size is instant for huge indexes)")
    _encoder_options(r, default="the query encoder's radit_encoder.json, else the index's record")
    r.set_defaults(func=cmd_retrieve)


def cmd_index_build(args: argparse.Namespace) -> int:
    from radit_fast.pipeline.checks import check_encoder
    from radit_fast.retrieval.build import IndexBuildConfig, build_index

    cfg = IndexBuildConfig(
        encoder=args.encoder, doc_encoder=args.doc_encoder, query_encoder=args.query_encoder,
        pooling=args.pooling, normalize=args.normalize, max_length=args.max_length, chunk_words=args.chunk_words,
        index_factory=args.index_factory, search_params=args.search_params, train_size=args.train_size,
        batch_size=args.batch_size, device=args.device, precision=args.precision,
        trust_remote_code=args.trust_remote_code,
    )
    if args.dist_timeout is not None:
        cfg.dist_timeout_s = args.dist_timeout
    cfg.check()
    check_encoder(cfg.doc_encoder or cfg.encoder, "--doc-encoder" if cfg.doc_encoder else "--encoder",
                  trust_remote_code=cfg.trust_remote_code)
    if cfg.query_encoder:
        check_encoder(cfg.query_encoder, "--query-encoder", trust_remote_code=cfg.trust_remote_code)
    out = build_index(args.corpus, args.out, cfg, overwrite=args.overwrite)
    logger.info("index written to %s", out)
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    from radit_fast.retrieval.manifest import read_manifest

    m = read_manifest(args.index, verify=args.verify)
    mem = m.get("memory", {})
    print(json.dumps({
        "count": m["count"], "dim": m["dim"], "index": m["index"], "doc_encoder": m["doc_encoder"]["name"],
        "query_encoder": m["query_encoder"]["name"], "chunk_words": m.get("chunk_words"),
        "predicted_ram_bytes": mem.get("predicted_ram_bytes"), "versions": m.get("versions"),
    }, indent=2))
    return 0


def read_queries(path: Path) -> list[dict]:
    """KILT queries: each line needs a unique ``id`` (string or int) and a non-empty string ``input``.

    Ids are compared as the strings the output holds, so ``2`` and ``"2"`` are duplicates.
    """
    from radit_fast.records import iter_records

    out, first_line = [], {}
    for lineno, obj in iter_records(path):
        for key in ("id", "input"):
            if key not in obj:
                raise RaditError(f"{path}:{lineno}: missing field {key!r}")
        if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
            raise RaditError(f"{path}:{lineno}: field 'id' must be a string")
        if not isinstance(obj["input"], str) or not obj["input"].strip():
            raise RaditError(f"{path}:{lineno}: field 'input' must be a non-empty string")
        qid = str(obj["id"])
        if qid in first_line:
            raise RaditError(f"{path}:{lineno}: duplicate id {qid!r} (first at line {first_line[qid]})")
        first_line[qid] = lineno
        out.append(obj)
    if not out:
        raise RaditError(f"{path}: no queries")
    return out


def check_out_file(out: Path, overwrite: bool) -> None:
    """Refuse an output file that is a folder, or that exists without --overwrite (before any work)."""
    if out.is_dir():
        raise RaditError(f"{out}: is a folder; --out must name a file")
    if out.exists() and not overwrite:
        raise RaditError(f"{out}: already exists (choose another --out, or pass --overwrite to replace it)")


def cmd_retrieve(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from radit_fast.io import write_jsonl
    from radit_fast.retrieval.metrics import provenance_doc_ids, retrieval_metrics
    from radit_fast.retrieval.retriever import Retriever

    from radit_fast.retrieval.index import check_k

    if args.out.is_dir():
        raise RaditError(f"{args.out}: is a folder; --out must name a file")
    queries = read_queries(args.queries)
    if args.query_encoder is not None:
        from radit_fast.pipeline.checks import check_encoder

        check_encoder(args.query_encoder, "--query-encoder", trust_remote_code=args.trust_remote_code)
    retriever = Retriever.load(
        args.index, args.query_encoder, device=args.device, verify=args.verify, search_params=args.search_params,
        strict=not args.allow_encoder_mismatch, batch_size=args.batch_size, precision=args.precision,
        trust_remote_code=args.trust_remote_code, pooling=args.pooling, normalize=args.normalize,
        max_length=args.max_length,
    )
    check_k(args.k, len(retriever.index))
    check_out_file(args.out, args.overwrite)  # after the input checks, before any work (and again at the end)
    ranked: list[list[str | None]] = []

    def rows():
        with tqdm(total=len(queries), desc="retrieving", unit=" queries", disable=None) as bar:
            for s in range(0, len(queries), args.batch_size):
                batch = queries[s : s + args.batch_size]
                res = retriever.retrieve([q["input"] for q in batch], args.k)
                for q, scores, passages in zip(batch, res.scores.tolist(), res.passages):
                    hits = [{"id": p.id, "score": sc, "title": p.title, "text": p.text}
                            for sc, p in zip(scores, passages) if p is not None]
                    ranked.append([h["id"] for h in hits])
                    yield {"id": str(q["id"]), "passages": hits}
                bar.update(len(batch))

    n = write_jsonl(args.out, rows(), overwrite=args.overwrite)
    logger.info("wrote %d results to %s", n, args.out)
    gold = [provenance_doc_ids(q) for q in queries]
    if any(gold):
        ks = sorted({k for k in (1, 5, 10, 20, 100) if k <= args.k} | {args.k})
        m = retrieval_metrics(ranked, gold, ks=ks)
        line = "  ".join(f"{name} {m[name]:.4f}" for k in ks for name in (f"recall@{k}", f"hit@{k}"))
        print(f"{line}  (document level, {m['queries']} of {len(queries)} queries with provenance)")
    sys.stdout.flush()
    return 0
