"""Both stages under ``torchrun --nproc_per_node 2`` (gloo, CPU) reach the weights of single-process
training on the same global batches.

Run as a script (by torchrun), this file trains: ``test_training_distributed.py SETUP OUT_LM OUT_R [fsdp]``.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_training_fixtures import cached_setup  # noqa: E402

pytestmark = pytest.mark.distributed


def _cfgs(setup: Path, out_lm: Path, out_r: Path, fsdp: bool = False):
    from radit_fast.config.stages import RaItConfig, RetrieverConfig

    common = dict(train=str(setup / "train.jsonl"), index=str(setup / "index"), lm=str(setup / "lm"),
                  batch_size=4, warmup_steps=1, save_every=2, progress=False, max_length=64, threads=1)
    lm = RaItConfig(**common, out=str(out_lm), max_steps=3, lr=5e-3, fsdp=fsdp, eval_file=common["train"],
                    eval_every=3, eval_examples=5)
    r = RetrieverConfig(**common, out=str(out_r), max_steps=3, lr=1e-2, k=4, e2e_weight=0.3,
                        cache_dir=str(out_r) + ".lsr")
    return lm, r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, setup: Path, *extra: str) -> tuple[Path, Path]:
    out_lm, out_r = tmp_path / "ddp_lm", tmp_path / "ddp_r"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, str(setup), str(out_lm),
           str(out_r), *extra]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stderr[-4000:]
    return out_lm, out_r


def _close(a: Path, b: Path, base: Path) -> None:
    """Every tensor of ``a`` equals ``b`` within 1% of how far training moved it from ``base`` (Adam turns
    float-rounding differences of near-zero gradients into lr-sized steps, so a fixed atol is brittle)."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    w0 = load_file(str(base / "model.safetensors"))
    assert wa.keys() == wb.keys()
    moved = max(float((wb[k] - w0[k]).abs().max()) for k in wb if k in w0)
    assert moved > 1e-4, "training did not move the weights"
    for k in wa:
        diff = float((wa[k] - wb[k]).abs().max())
        assert diff <= 0.01 * moved + 1e-6, f"{k}: max |ddp - single| = {diff:.3g}, movement {moved:.3g}"


def test_ddp_two_processes_match_single_process(tmp_path):
    from radit_fast.training import train_lm, train_retriever

    setup = tmp_path / "tiny"
    cached_setup(setup)
    ddp_lm, ddp_r = _torchrun(tmp_path, setup)
    lm_cfg, r_cfg = _cfgs(setup, tmp_path / "one_lm", tmp_path / "one_r")
    train_lm(lm_cfg)
    train_retriever(r_cfg)
    _close(ddp_lm, tmp_path / "one_lm", setup / "lm")
    _close(ddp_r, tmp_path / "one_r", setup / "encoder")


def test_fsdp_two_processes_stage1_matches_single_process(tmp_path):
    from radit_fast.training import train_lm

    setup = tmp_path / "tiny"
    cached_setup(setup)
    fsdp_lm, _ = _torchrun(tmp_path, setup, "fsdp")
    lm_cfg, _ = _cfgs(setup, tmp_path / "one_lm", tmp_path / "one_r")
    train_lm(lm_cfg)
    _close(fsdp_lm, tmp_path / "one_lm", setup / "lm")


if __name__ == "__main__":  # one torchrun worker
    from radit_fast.training import train_lm, train_retriever

    setup, out_lm, out_r = (Path(a) for a in sys.argv[1:4])
    fsdp = "fsdp" in sys.argv[4:]
    lm_cfg, r_cfg = _cfgs(setup, out_lm, out_r, fsdp=fsdp)
    lm_cfg.resume = "resume" in sys.argv[4:]
    train_lm(lm_cfg)
    if not fsdp:
        train_retriever(r_cfg)
