"""``--report-to tensorboard``: the training curves as TensorBoard event files beside metrics.jsonl, read back
with TensorBoard's own reader and compared with metrics.jsonl (also across an interrupted, resumed run)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from radit_fast.cli.main import main
from radit_fast.io import RaditError
from radit_fast.config.stages import TrainConfig
from radit_fast.distributed import DistEnv
from radit_fast.training.loop import Trainer, prepare_out
from radit_fast.training.metrics import MetricsWriter, read_metrics, scalar_rows
from radit_fast.training.plan import DataPlan

from test_training_fixtures import Crash, cached_setup, crash_at, retriever_config

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_from_jsonl(path: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard must hold: every plotted field of metrics.jsonl, by tag, in step order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics(path):
        for tag, value in scalar_rows(row):
            out.setdefault(tag, []).append((int(row["step"]), value))
    return out


def assert_same_curves(events, expected) -> None:
    assert set(events) == set(expected) and expected
    for tag, want in expected.items():
        got = events[tag]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        for (_, g), (_, w) in zip(got, want):
            assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, rel=1e-6, abs=1e-12), (tag, g, w)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, mb):
        x, y, norm = mb
        loss_sum = ((self.net(x).squeeze(-1) - y) ** 2).sum()
        return {"loss": loss_sum / norm, "loss_sum": loss_sum.detach(), "loss_norm": torch.tensor(float(len(y))),
                "examples": torch.tensor(float(len(y)))}


class _ToyStage:
    shard_modules = ()

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(32, 4, generator=g)
        self.y = torch.sin(self.x.sum(-1))
        self.module = _Toy()
        self.plan = DataPlan(32, cfg.batch_size, seed=cfg.seed)

    def trainable_names(self):
        return [n for n, _ in self.module.named_parameters()]

    def micro_batches(self, step):
        return [(self.x[i], self.y[i], self.cfg.batch_size) for i in self.plan.micro_batches(step, rank=0, world_size=1,
                                                                                              grad_accum=1)]

    def fingerprint(self):
        return {"toy": 1}

    def evaluate(self, module):
        return {"eval_loss": float(((self.module.net(self.x).squeeze(-1) - self.y) ** 2).mean())}

    def save_final(self, out, gathered):
        (out / "done.txt").write_text("ok")


def _toy(out: Path, callbacks=None, **kw) -> None:
    cfg = TrainConfig(**{**dict(train="t", index="i", out=str(out), max_steps=6, batch_size=8, lr=0.05,
                                warmup_steps=1, save_every=2, progress=False, eval_every=3, eval_file="e",
                                report_to="tensorboard"), **kw})
    prepare_out(cfg, DistEnv())
    Trainer(cfg, _ToyStage(cfg), DistEnv(), callbacks=callbacks).fit()


def test_event_scalars_equal_metrics_jsonl(tmp_path):
    _toy(tmp_path / "run")
    events = read_events(tmp_path / "run" / "tensorboard")
    expected = expected_from_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/eval_loss"} <= set(expected)
    assert [s for s, _ in expected["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert_same_curves(events, expected)


def test_resumed_run_keeps_one_curve(tmp_path):
    with pytest.raises(Crash):
        _toy(tmp_path / "run", [crash_at("step_end", 5)])
    _toy(tmp_path / "run", resume=True)  # from the step-4 checkpoint: step 5 is run again
    events = read_events(tmp_path / "run" / "tensorboard")
    expected = expected_from_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [s for s, _ in events["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert_same_curves(events, expected)


def test_off_by_default_and_checked(tmp_path, monkeypatch):
    _toy(tmp_path / "plain", report_to="none")
    assert (tmp_path / "plain" / "metrics.jsonl").is_file()
    assert not (tmp_path / "plain" / "tensorboard").exists()
    assert TrainConfig().report_to == "none"
    with pytest.raises(RaditError, match="--report-to must be one of none|tensorboard"):
        TrainConfig(train="t", index="i", out="o", report_to="wandb").validate()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(RaditError, match=r"needs the package tensorboard \(pip install radit-fast\[tensorboard\]\)"):
        TrainConfig(train="t", index="i", out="o", report_to="tensorboard").validate()


def test_metrics_writer_plots_numbers_only(tmp_path):
    w = MetricsWriter(tmp_path / "metrics.jsonl", report_to="tensorboard")
    w.log({"step": 1, "loss": 2.5, "lr": 1e-3, "note": "text", "flag": True})
    w.log({"step": 1, "event": "checkpoint", "path": "x"})
    w.log({"step": 2, "event": "eval", "eval_hit@4": 0.5})
    w.close()
    events = read_events(tmp_path / "tensorboard")
    assert events == {"train/loss": [(1, 2.5)], "train/lr": [(1, pytest.approx(1e-3))],
                      "eval/eval_hit@4": [(2, 0.5)]}


@pytest.mark.slow
def test_train_retriever_cli_writes_tensorboard(tmp_path):
    p = cached_setup(tmp_path / "setup")
    cfg = retriever_config(p, tmp_path / "r")
    code = main(["train-retriever", "--train", cfg.train, "--index", cfg.index, "--lm", cfg.lm, "--out", cfg.out,
                 "--max-steps", "2", "--batch-size", "4", "--k", "4", "--max-length", "64", "--threads", "1",
                 "--cache-dir", cfg.cache_dir, "--save-every", "0", "--no-progress", "--report-to", "tensorboard"])
    assert code == 0
    events = read_events(Path(cfg.out) / "tensorboard")
    expected = expected_from_jsonl(Path(cfg.out) / "metrics.jsonl")
    assert [s for s, _ in expected["train/loss"]] == [1, 2]
    assert_same_curves(events, expected)


def test_radit_run_passes_report_to_both_stages(tmp_path):
    from radit_fast.cli.main import build_parser
    from radit_fast.cli.run import _overrides
    from radit_fast.config.run import make_config

    args = build_parser().parse_args(["run", "--corpus", "c", "--train", "t", "--dev", "d", "--test", "e",
                                      "--out", str(tmp_path / "run"), "--report-to", "tensorboard"])
    cfg = make_config(corpus="c", train="t", dev="d", test="e", out=str(tmp_path / "run"), overrides=_overrides(args))
    assert cfg.lm_config(tmp_path / "lm").report_to == "tensorboard"
    assert cfg.retriever_config(tmp_path / "r").report_to == "tensorboard"
    plain = build_parser().parse_args(["run", "--corpus", "c", "--train", "t", "--dev", "d", "--test", "e",
                                       "--out", str(tmp_path / "run")])
    cfg = make_config(corpus="c", train="t", dev="d", test="e", out=str(tmp_path / "run"), overrides=_overrides(plain))
    assert cfg.lm_config(tmp_path / "lm").report_to == "none"
