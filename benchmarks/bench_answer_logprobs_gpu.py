"""GPU benchmark of answer_logprobs at an LLM-scale LM head (a script, not a test).

    .venv/bin/python benchmarks/bench_answer_logprobs_gpu.py             # N=8192, d=4096, V=128256, bf16
    .venv/bin/python benchmarks/bench_answer_logprobs_gpu.py --shape 2048 1024 32000 --repeat 3

Runs each case in a fresh process through benchmarks/harness.py with the case definitions of
benchmarks/bench_answer_logprobs.py (``setup``): radit's ``cuda`` and ``triton`` backends, the ``naive``
torch expression (N x V logits), ``torch.mm`` (the same products as bare bf16 matmuls: the floor) and,
when importable, cut-cross-entropy (``cce``) and Liger-Kernel (``liger``). Reports TFLOP/s of useful work
(2 N d V forward, 6 N d V forward + backward) and its fraction of torch.mm's rate. CSV:
benchmarks/results/answer_logprobs_gpu.csv. Without a GPU it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_answer_logprobs as base  # noqa: E402
import harness  # noqa: E402

SHAPE = (8192, 4096, 128256)  # Llama-3-8B head: d 4096, vocabulary 128256
OUT = base.RESULTS / "answer_logprobs_gpu.csv"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, metavar=("N", "d", "V"), default=SHAPE)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--passes", nargs="+", default=["fwd", "fwdbwd"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_answer_logprobs_gpu: no CUDA GPU visible; nothing measured (run it on a GPU machine).")
        return 0
    n, d, v = args.shape
    impls = ["torch.mm", "naive", "cuda", "triton"] + base._available_gpu_impls()
    print(f"answer_logprobs on {torch.cuda.get_device_name()}: N={n} d={d} V={v} {args.dtype}; writing {args.out}",
          flush=True)
    rows = []
    for pass_ in args.passes:
        for impl in impls:
            case = harness.Case(base.OP, impl, "cuda", args.dtype, n, d, v, pass_,
                                flops=(2 if pass_ == "fwd" else 6) * n * d * v, repeat=args.repeat)
            try:
                row = harness.run_case("bench_answer_logprobs", case)
            except RuntimeError as exc:  # e.g. out of memory for naive, or a backend not built
                print(f"  {impl:>8} {pass_:>6}: FAILED {str(exc).splitlines()[-1]}", flush=True)
                continue
            rows.append(row)
            harness.write_csv(args.out, rows)
            floor = [float(r["gflops"]) for r in rows if r["impl"] == "torch.mm" and r["pass"] == pass_]
            frac = f"{float(row['gflops']) / floor[0]:6.0%} of torch.mm" if floor else ""
            print(f"  {impl:>8} {pass_:>6}: {float(row['median_s']) * 1e3:9.2f} ms  spread {row['spread']}  "
                  f"peak +{float(row['peak_extra_MB']):8.0f} MB  {float(row['gflops']) / 1e3:7.1f} TFLOP/s  {frac}",
                  flush=True)
    if rows:
        harness.plot(args.out, args.out.with_suffix(".png"), "answer_logprobs on GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
