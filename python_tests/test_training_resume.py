"""Faults: ``kill -9`` during stage-1 training, then ``resume``, reaches the weights of an uninterrupted run;
a corrupt checkpoint is refused with a clear error; stage 2 resumes after a crash as well.

Run as a script, this file is the training process that the test kills:
``python test_training_resume.py SETUP_DIR OUT_DIR`` (sleeps after each step so the kill lands mid-run).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_training_fixtures import Crash, cached_setup, crash_at  # noqa: E402

STEPS = 6


def _lm_cfg(p, out, **kw):
    from radit_fast.config.stages import RaItConfig

    base = dict(train=str(p["train"]), index=str(p["index"]), lm=str(p["lm"]), out=str(out), max_steps=STEPS,
                batch_size=4, lr=5e-3, warmup_steps=2, save_every=1, keep_checkpoints=2, progress=False,
                max_length=64, threads=1)
    return RaItConfig(**{**base, **kw})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_kill9_then_resume_matches_uninterrupted(tmp_path):
    from radit_fast.training import train_lm
    from radit_fast.training.checkpoint import CheckpointError

    p = cached_setup(tmp_path / "tiny")
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, __file__, str(tmp_path / "tiny"), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = out / "checkpoints" / "step-00000003"
    deadline = time.time() + 50
    while not target.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / "model.safetensors").exists(), "the killed run must not have finished"

    # a copy with a corrupted latest checkpoint is refused with a clear error
    import shutil

    bad = tmp_path / "corrupt"
    shutil.copytree(out, bad)
    from radit_fast.training.checkpoint import latest_checkpoint

    latest = latest_checkpoint(bad / "checkpoints")
    f = latest / "params.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x55
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: params.safetensors sha256"):
        train_lm(_lm_cfg(p, bad, resume=True))

    train_lm(_lm_cfg(p, out, resume=True))
    train_lm(_lm_cfg(p, tmp_path / "straight"))
    resumed, straight = _weights(out), _weights(tmp_path / "straight")
    assert resumed.keys() == straight.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6, msg=k)
    events = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"resume"' in line]
    assert len(events) == 1


def test_retriever_resume_after_crash(tmp_path):
    from radit_fast.config.stages import RetrieverConfig
    from radit_fast.training import train_retriever

    p = cached_setup(tmp_path / "tiny")

    def cfg(out, **kw):
        return RetrieverConfig(train=str(p["train"]), index=str(p["index"]), lm=str(p["lm"]), out=str(out),
                               max_steps=4, batch_size=4, k=4, lr=1e-2, warmup_steps=1, save_every=2,
                               progress=False, max_length=64, threads=1, cache_dir=str(tmp_path / "lsr"), **kw)

    with pytest.raises(Crash):
        train_retriever(cfg(tmp_path / "a"), callbacks=[crash_at("step_end", 3)])
    train_retriever(cfg(tmp_path / "a", resume=True))
    train_retriever(cfg(tmp_path / "b"))
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


if __name__ == "__main__":  # the process that test_kill9_then_resume_matches_uninterrupted kills
    from radit_fast.training import train_lm

    setup = Path(sys.argv[1])
    paths = {k: setup / v for k, v in {"lm": "lm", "train": "train.jsonl", "index": "index"}.items()}
    train_lm(_lm_cfg(paths, Path(sys.argv[2])), callbacks=[lambda event, step, info: time.sleep(0.4)])
