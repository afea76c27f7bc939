"""Compile the Triton answer_logprobs kernels ahead of time for a GPU target, without a GPU (Triton's own
front end, MLIR passes and bundled ptxas), and print one JSON line per kernel: the config the launcher
would pick for that device, the shared memory the compiler allocated and the MMA instructions in the PTX.

    .venv/bin/python python_tests/triton_aot.py 90:232448 89:101376 --dtypes bfloat16 --kernels fwd_tile

Each target is ``<sm>:<opt-in shared memory per block in bytes>``. Must run without TRITON_INTERPRET=1
(test_answer_logprobs_gpu_backends.py runs it in a subprocess). Arguments are specialised as a real launch
specialises them: 16-byte aligned pointers, sizes divisible by 16, unit strides as the constant 1.
"""
from __future__ import annotations

import argparse
import json

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from radit_fast.triton import answer_logprobs as tri

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
ALIGNED = "aligned"  # marks an argument specialised as divisible by 16


def _kernels(dtype: torch.dtype, cfg: tri.Config):
    """(name, kernel, argument types, constexprs) as triton_fwd / triton_bwd launch them."""
    ty = _PTR[dtype]
    a = (lambda t: (ALIGNED, t))
    tile = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP=cfg.group,
                CAST_F32=cfg.cast_f32, PRECISION="tf32")
    strides = dict(stride_hn=a("i32"), stride_hd=1, stride_wv=a("i32"), stride_wd=1)
    sizes = dict(N=a("i32"), V=a("i32"), D=a("i32"))
    yield "fwd_tile", tri._fwd_tile_kernel, dict(
        h_ptr=a(ty), w_ptr=a(ty), b_ptr=a("*fp32"), t_ptr=a("*i64"), part_m_ptr=a("*fp32"),
        part_s_ptr=a("*fp32"), tgt_ptr=a("*fp32"), **sizes, **strides), dict(HAS_BIAS=True, **tile)
    yield "fwd_merge", tri._fwd_merge_kernel, dict(
        part_m_ptr=a("*fp32"), part_s_ptr=a("*fp32"), tgt_ptr=a("*fp32"), t_ptr=a("*i64"), tok_ptr=a("*fp32"),
        lse_ptr=a("*fp32"), flag_ptr=a("*i32"), N=a("i32"), V=a("i32"), num_vblocks="i32", ignore_index="i32"),\
        dict(BLOCK=128, FLAG_BIT=tri.FLAG_TARGET_OUT_OF_RANGE)
    yield "dlogits", tri._dlogits_kernel, dict(
        h_ptr=a(ty), w_ptr=a(ty), b_ptr=a("*fp32"), t_ptr=a("*i64"), lse_ptr=a("*fp32"), g_ptr=a("*fp32"),
        dz_ptr=a(ty), gb_part_ptr=a("*fp32"), **sizes, v_start=a("i32"), chunk_width=a("i32"), **strides,
        stride_dz=a("i32")), dict(HAS_BIAS=True, NEED_BIAS_GRAD=True, **tile)
    mm = dict(BLOCK_M=cfg.block_n, BLOCK_NC=cfg.block_v, BLOCK_K=cfg.block_d, GROUP=cfg.group,
              CAST_F32=cfg.cast_f32, PRECISION="tf32")
    dims = dict(M=a("i32"), NC=a("i32"), K=a("i32"))
    yield "matmul_grad_hidden", tri._matmul_kernel, dict(  # dz_c [N, C] @ W_c [C, d] += into fp32
        a_ptr=a(ty), b_ptr=a(ty), c_ptr=a("*fp32"), **dims, stride_am=a("i32"), stride_ak=1,
        stride_bk=a("i32"), stride_bn=1, stride_cm=a("i32"), stride_cn=1), dict(ACCUMULATE=True, **mm)
    yield "matmul_grad_weight", tri._matmul_kernel, dict(  # dz_c^T (strides 1, C) @ H into the weight dtype
        a_ptr=a(ty), b_ptr=a(ty), c_ptr=a(ty), **dims, stride_am=1, stride_ak=a("i32"), stride_bk=a("i32"),
        stride_bn=1, stride_cm=a("i32"), stride_cn=1), dict(ACCUMULATE=False, **mm)


def compile_kernel(fn, args: dict, constexprs: dict, cfg: tri.Config, sm: int):
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif args[name] == 1:
            signature[name], consts[name] = "constexpr", 1
        else:
            kind = args[name]
            if isinstance(kind, tuple):
                attrs[(i,)] = [["tt.divisibility", 16]]
                kind = kind[1]
            signature[name] = kind
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", sm, 64),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="+", help="<sm>:<shared memory per block, bytes>, e.g. 90:232448")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--kernels", nargs="+", help="default: all")
    args = p.parse_args()
    for target in args.targets:
        sm, smem = (int(x) for x in target.split(":"))
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            cfg = tri.config_for(dtype, (sm // 10, sm % 10), smem)
            for name, fn, kinds, consts in _kernels(dtype, cfg):
                if args.kernels and name not in args.kernels:
                    continue
                k = compile_kernel(fn, kinds, consts, cfg, sm)
                ptx = k.asm["ptx"]
                print(json.dumps({
                    "sm": sm, "smem_limit": smem, "dtype": dtype_name, "kernel": name,
                    "config": [cfg.block_n, cfg.block_v, cfg.block_d, cfg.num_warps, cfg.num_stages],
                    "pipeline_estimate": cfg.pipeline_smem(dtype.itemsize), "shared": k.metadata.shared,
                    "wgmma": "wgmma.mma_async" in ptx, "mma_sync": "mma.sync" in ptx,
                    "cp_async": "cp.async" in ptx}), flush=True)


if __name__ == "__main__":
    main()
