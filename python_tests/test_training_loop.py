"""Training infrastructure: configs, schedule, data plan, checkpoints, and the loop on a toy stage
(resume equals an uninterrupted run; accumulation and process count do not change the update)."""
from __future__ import annotations

import argparse
import dataclasses
import doctest
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from radit_fast.io import RaditError
from radit_fast.training import checkpoint as ckpt
from radit_fast.training import schedule
from radit_fast.config.fields import load_config_file
from radit_fast.config.stages import (RaItConfig, RetrieverConfig, TrainConfig, add_config_arguments, config_from_args,
                                      config_from_dict, read_resolved_config, write_resolved_config)
from radit_fast.distributed import DistEnv
from radit_fast.training.loop import Trainer
from radit_fast.training.plan import DataPlan

from test_training_fixtures import Crash, crash_at


# ------------------------------------------------------------------------------------------- config
def _parse(cls, argv):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    for name in ("train", "index", "out", "lm"):
        p.add_argument(f"--{name}")
    add_config_arguments(p, cls)
    return config_from_args(cls, p.parse_args(argv))


def test_config_precedence_yaml_toml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("max_steps: 7\nlr: 3.0e-4\ntrain_lm:\n  k: 5\n  lora: true\ntrain_retriever:\n  k: 12\n")
    cfg = _parse(RaItConfig, ["--config", str(y), "--train", "t", "--index", "i", "--out", "o", "--lr", "1e-3"])
    assert (cfg.max_steps, cfg.lr, cfg.k, cfg.lora) == (7, 1e-3, 5, True)
    rcfg = _parse(RetrieverConfig, ["--config", str(y), "--train", "t", "--index", "i", "--out", "o"])
    assert (rcfg.k, rcfg.max_steps) == (12, 7)
    t = tmp_path / "c.toml"
    t.write_text('batch-size = 4\nbf16 = true\n[train_lm]\nmax_length = 64\n')
    cfg = _parse(RaItConfig, ["--config", str(t), "--train", "t", "--index", "i", "--out", "o", "--no-bf16"])
    assert (cfg.batch_size, cfg.bf16, cfg.max_length) == (4, False, 64)


@pytest.mark.parametrize("text, msg", [("max_stepz: 3\n", "unknown option 'max_stepz'"),
                                       ("max_steps: many\n", "max_steps must be an integer"),
                                       ("bf16: maybe\n", "bf16 must be true or false"),
                                       ("[1, 2]\n", "expected a mapping"),
                                       ("a: [\n", "invalid YAML")])
def test_config_errors(tmp_path, text, msg):
    y = tmp_path / "bad.yaml"
    y.write_text(text)
    with pytest.raises(RaditError, match=msg):
        config_from_dict(RaItConfig, load_config_file(y), source=str(y))


def test_config_validation():
    with pytest.raises(RaditError, match="--train is required"):
        RaItConfig().validate()
    with pytest.raises(RaditError, match="--k must be >= 2"):
        RetrieverConfig(train="t", index="i", out="o", k=1).validate()
    with pytest.raises(RaditError, match="multiple of processes"):
        TrainConfig(batch_size=6, grad_accum=4).micro_batch_size(1)
    assert TrainConfig(batch_size=8, grad_accum=2).micro_batch_size(2) == 2


def test_resolved_config_roundtrip(tmp_path):
    cfg = RetrieverConfig(train="t", index="i", out="o", k=4, lm_temperature=0.1, cache_dir=None)
    write_resolved_config(cfg, tmp_path / "r.yaml", world_size=2)
    assert read_resolved_config(RetrieverConfig, tmp_path / "r.yaml") == cfg


# ----------------------------------------------------------------------------------- schedule, plan
def test_schedule():
    assert doctest.testmod(schedule).failed == 0
    lrs = [schedule.lr_at(s, peak=1e-3, warmup_steps=3, total_steps=20, min_lr_ratio=0.01) for s in range(20)]
    assert lrs[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] > 1e-5


def test_plan_partitions_and_buckets():
    lengths = np.random.default_rng(0).integers(5, 100, size=50)
    plan = DataPlan(50, 8, seed=3, lengths=lengths, bucket_window=3)
    seen = np.concatenate([plan.global_batch(s) for s in range(plan.batches_per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == 48
    for step in (0, 9):  # the same global batch, whatever the split
        whole = sorted(plan.global_batch(step).tolist())
        for world, accum in ((1, 1), (2, 2), (4, 1)):
            parts = [m for r in range(world) for m in plan.micro_batches(step, rank=r, world_size=world,
                                                                           grad_accum=accum)]
            assert sorted(np.concatenate(parts).tolist()) == whole
    # bucketing: a batch's length spread is smaller than a random batch's
    spread = np.mean([np.ptp(lengths[plan.global_batch(s)]) for s in range(6)])
    assert spread < np.ptp(lengths) * 0.8
    with pytest.raises(RaditError, match="larger than the 5 training instances"):
        DataPlan(5, 8, seed=0)


# --------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_roundtrip_and_corruption(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    root = tmp_path / "checkpoints"
    params = dict(model.named_parameters())
    for step in (1, 2, 3):
        ckpt.save_checkpoint(root, step, params=params, optimizer_state=opt.state_dict(),
                             trainer_state={"x": step}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 3]
    c = ckpt.load_checkpoint(ckpt.latest_checkpoint(root))
    assert c.step == 3 and c.trainer_state["x"] == 3
    torch.testing.assert_close(c.params["weight"], model.weight.detach())
    opt2 = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=0.5)
    opt2.load_state_dict(c.optimizer)
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert opt2.param_groups[0]["lr"] == 0.1
    # a partial (interrupted) folder is ignored; a flipped byte and a missing manifest are reported
    (root / ".step-00000004.x.partial").mkdir()
    assert ckpt.latest_checkpoint(root).name == "step-00000003"
    f = root / "step-00000003" / "params.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupt: params.safetensors sha256"):
        ckpt.load_checkpoint(root / "step-00000003")
    f.write_bytes(bytes(data[:-5]))
    with pytest.raises(ckpt.CheckpointError, match="has .* bytes"):
        ckpt.load_checkpoint(root / "step-00000003")
    (root / "step-00000002" / "MANIFEST.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete: MANIFEST.json is missing"):
        ckpt.load_checkpoint(root / "step-00000002")


# ------------------------------------------------------------------------------------ toy stage loop
class ToyModule(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))

    def forward(self, mb):
        x, y, norm, world = mb
        loss_sum = ((self.net(x).squeeze(-1) - y) ** 2).sum()
        return {"loss": loss_sum / norm * world, "loss_sum": loss_sum.detach(),
                "loss_norm": torch.tensor(float(len(y))), "examples": torch.tensor(float(len(y)))}


class ToyStage:
    shard_modules = ()

    def __init__(self, cfg: TrainConfig, env: DistEnv, dropout: float = 0.1) -> None:
        self.cfg, self.env = cfg, env
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(40, 4, generator=g)
        self.y = torch.sin(self.x.sum(-1))
        self.module = ToyModule(dropout)
        self.plan = DataPlan(40, cfg.batch_size, seed=cfg.seed)

    def trainable_names(self):
        return [n for n, p in self.module.named_parameters()]

    def micro_batches(self, step):
        return [(self.x[i], self.y[i], self.cfg.batch_size, self.env.world_size)
                for i in self.plan.micro_batches(step, rank=self.env.rank, world_size=self.env.world_size,
                                                 grad_accum=self.cfg.grad_accum)]

    def fingerprint(self):
        return {"toy": 1}

    def evaluate(self, module):
        return {"eval_loss": float(((self.module.net(self.x).squeeze(-1) - self.y) ** 2).mean())}

    def save_final(self, out, gathered):
        save_file({k: v.contiguous() for k, v in self.module.state_dict().items()}, str(out / "model.safetensors"))


def _toy_cfg(out, **kw):
    base = dict(train="t", index="i", out=str(out), max_steps=6, batch_size=8, lr=0.05, warmup_steps=2,
                save_every=2, progress=False, eval_every=3, eval_file="e")
    return TrainConfig(**{**base, **kw})


def _run_toy(cfg, callbacks=None, dropout=0.1):
    stage = ToyStage(cfg, DistEnv(), dropout)
    from radit_fast.training.loop import prepare_out

    prepare_out(cfg, DistEnv())
    res = Trainer(cfg, stage, DistEnv(), callbacks=callbacks).fit()
    return res, {k: v.clone() for k, v in stage.module.state_dict().items()}


def test_toy_resume_matches_uninterrupted(tmp_path):
    _, full = _run_toy(_toy_cfg(tmp_path / "a"))

    with pytest.raises(Crash):
        _run_toy(_toy_cfg(tmp_path / "b"), [crash_at("step_end", 5)])
    with pytest.raises(RaditError, match="already exists"):
        _run_toy(_toy_cfg(tmp_path / "b"))
    res, resumed = _run_toy(_toy_cfg(tmp_path / "b", resume=True))
    assert res.resumed_from == 4
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0)
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r and "event" not in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert any(r.get("event") == "eval" for r in rows)
    assert (tmp_path / "b" / "radit_config.yaml").is_file()
    # resuming with other math settings is refused
    with pytest.raises(ckpt.CheckpointError, match="other settings .*lr"):
        _run_toy(_toy_cfg(tmp_path / "b", resume=True, lr=0.1, max_steps=8))


def test_resume_announces_the_loaded_step_to_callbacks(tmp_path):
    """A kill after step 4's checkpoint but before its step_end callbacks: the resumed run tells the callbacks
    that the weights of step 4 are loaded (the pipeline scores that step's dev candidate then), once."""
    with pytest.raises(Crash):
        _run_toy(_toy_cfg(tmp_path / "b"), [crash_at("checkpoint", 4)])
    events = []
    _run_toy(_toy_cfg(tmp_path / "b", resume=True), [lambda event, step, info: events.append((event, step))])
    assert [e for e in events if e[0] == "resumed"] == [("resumed", 4)]
    assert events[0] == ("resumed", 4) and ("step_end", 4) not in events and ("step_end", 5) in events
    events.clear()
    _run_toy(_toy_cfg(tmp_path / "c"), [lambda event, step, info: events.append((event, step))])
    assert not any(e[0] == "resumed" for e in events)


def test_toy_grad_accum_equivalent(tmp_path):
    _, a = _run_toy(_toy_cfg(tmp_path / "a", save_every=0), dropout=0.0)
    _, b = _run_toy(_toy_cfg(tmp_path / "b", save_every=0, grad_accum=4), dropout=0.0)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_dataclass_fields_have_help():
    for cls in (RaItConfig, RetrieverConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f.name


def test_out_path_written(tmp_path):
    res, _ = _run_toy(_toy_cfg(tmp_path / "c", save_every=0))
    assert Path(res.out, "model.safetensors").is_file() and Path(res.out, "train_state.json").is_file()
