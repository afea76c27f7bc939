"""radit run's step cache: skip done steps, rerun changed ones, leave nothing half-written."""
from __future__ import annotations

import pytest

from radit_fast.pipeline.steps import StepRunner, fingerprint


def test_fingerprint_stable():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_step_cached_and_rerun_on_change(tmp_path):
    calls = []

    def work(d):
        calls.append(d)
        (d / "out.txt").write_text("x")
        return {"value": len(calls)}

    r = StepRunner(tmp_path)
    first = r.run("s", {"k": 1}, work)
    assert not first.cached and first.result == {"value": 1} and (tmp_path / "s" / "out.txt").exists()
    again = StepRunner(tmp_path).run("s", {"k": 1}, work)
    assert again.cached and again.result == {"value": 1} and len(calls) == 1
    assert again.seconds == pytest.approx(first.seconds)
    changed = StepRunner(tmp_path).run("s", {"k": 2}, work)
    assert not changed.cached and changed.result == {"value": 2}
    forced = StepRunner(tmp_path, force=True).run("s", {"k": 2}, work)
    assert not forced.cached and len(calls) == 3


def test_interrupted_atomic_step_leaves_nothing(tmp_path):
    def boom(d):
        (d / "half.txt").write_text("x")
        raise KeyboardInterrupt

    r = StepRunner(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        r.run("s", {}, boom)
    assert not (tmp_path / "s").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_in_place_step_keeps_partial_work_until_done(tmp_path):
    def interrupted(d):
        (d / "ckpt").write_text("step 5")
        raise KeyboardInterrupt

    r = StepRunner(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        r.run("train", {"lr": 1}, interrupted, atomic=False)
    assert (tmp_path / "train" / "ckpt").read_text() == "step 5"     # resumable
    res = r.run("train", {"lr": 1}, lambda d: (d / "ckpt").read_text(), atomic=False)
    assert res.result == "step 5" and not res.cached
    assert StepRunner(tmp_path).run("train", {"lr": 1}, lambda d: 1 / 0, atomic=False).cached
