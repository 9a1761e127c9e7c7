"""The time budget of ``medclf pretrain`` holds: decoding counts against it, the schedule is laid over the
steps that fit (one partial epoch when not one full pass fits), the run stops at the step the deadline
allows when the machine slows down, and a budget too small for decoding plus a minimal run is refused in
one line.

The clock is a fake one that moves only when the code under test does something that takes time here:
decoding (:data:`DECODE_S`) and each SimCLR step (``cost``). The tests check the logic; none asserts a
timing of the machine they run on.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import medclf.pretrain.run as run_mod
from medclf.budget import Budget, epoch_pace
from medclf.bundle import load_bundle
from medclf.errors import ConfigError
from medclf.pretrain import pretrain
from medclf.pretrain.loop import PretrainLoop
from medclf.pretrain.pace import MIN_STEPS
from medclf.pretrain.simclr import SimclrStep

DECODE_S = 10.0
N_IMAGES, BATCH = 120, 2
FULL_STEPS = N_IMAGES // BATCH  # 60 steps in a full pass over the images
SETTINGS = {"size": 24, "arch": "compact-s", "batch_size": BATCH, "progress": False}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Unlabelled noise images in one folder (no k-NN probe, so no probe time to price)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("unlabelled")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def clocked(monkeypatch):
    """A fake clock on which decoding takes DECODE_S and each SimCLR step ``cost["probe"]`` (the timing
    probe's) or ``cost["train"]`` seconds."""
    clock, cost = FakeClock(), {"probe": 1.0, "train": 1.0}
    step, prepare = SimclrStep.run, run_mod.prepare_sources

    def timed_step(self, *args, gather, **kwargs):
        out = step(self, *args, gather=gather, **kwargs)
        clock.now += cost["train" if gather else "probe"]
        return out

    def timed_prepare(*args, **kwargs):
        out = prepare(*args, **kwargs)
        clock.now += DECODE_S
        return out

    monkeypatch.setattr(SimclrStep, "run", timed_step)
    monkeypatch.setattr(run_mod, "prepare_sources", timed_prepare)
    return clock, cost


def _pretrain(images: Path, out: Path, seconds: float, clock: FakeClock, **kw):
    budget = Budget(seconds, clock=clock, start=clock())
    res = pretrain(images, out, budget=budget, cache_dir=str(out.parent / "cache"), **SETTINGS, **kw)
    return res, budget


def test_a_budget_short_of_one_pass_trains_a_partial_epoch_that_anneals(images, tmp_path, clocked):
    clock, _ = clocked
    res, budget = _pretrain(images, tmp_path / "bb", 60, clock)
    pre = load_bundle(res.bundle).manifest["pretraining"]
    assert MIN_STEPS <= pre["steps_per_epoch"] < FULL_STEPS and res.epochs_run == 1
    assert pre["schedule"]["completed"]  # the cosine was laid over the steps that fit: it ended at zero
    # Decoding, the timing probe and the steps all fit before the time set aside for the bundle.
    assert clock.now <= budget.work_deadline() and budget.elapsed() <= budget.total


def test_a_larger_budget_plans_whole_epochs_on_the_clock(images, tmp_path, clocked):
    clock, _ = clocked
    res, budget = _pretrain(images, tmp_path / "bb", 200, clock)
    pre = load_bundle(res.bundle).manifest["pretraining"]
    assert pre["steps_per_epoch"] == FULL_STEPS and res.epochs_run >= 2
    assert pre["schedule"]["completed"] and "steps" not in res.history[-1]
    assert clock.now <= budget.work_deadline()


def test_a_machine_slower_than_timed_stops_at_the_step_the_deadline_allows(images, tmp_path, clocked):
    """Steps take four times what the probe measured: the planned epochs no longer fit, and the run stops
    inside an epoch, at the last step that ends before the deadline, instead of overrunning the budget."""
    clock, cost = clocked
    cost["train"] = 4.0
    res, budget = _pretrain(images, tmp_path / "bb", 200, clock)
    assert res.stop_reason == "time_budget"
    assert 0 < res.history[-1]["steps"] < FULL_STEPS  # a partial epoch
    # One more step at the pace the run measured (with the budget's slack) would have overrun.
    assert clock.now <= budget.work_deadline() < clock.now + epoch_pace(cost["train"])
    pre = load_bundle(res.bundle).manifest["pretraining"]
    assert pre["stop_reason"] == "time_budget" and not pre["schedule"]["completed"]


def test_a_budget_too_small_to_train_after_decoding_is_refused_with_what_would_do(images, tmp_path, clocked):
    clock, _ = clocked
    with pytest.raises(ConfigError) as refused:
        _pretrain(images, tmp_path / "bb", 30, clock)
    message = str(refused.value)
    assert "\n" not in message and f"fewer than the {MIN_STEPS}" in message
    assert not (tmp_path / "bb").exists() and not (tmp_path / "bb.ckpt").exists()
    # The budget it names is enough (decoding costs the same again on the fake clock).
    suggested = float(re.search(r"--time-budget (\d+)s", message).group(1))
    res, _ = _pretrain(images, tmp_path / "bb", suggested, clock)
    assert load_bundle(res.bundle).manifest["pretraining"]["steps_per_epoch"] >= MIN_STEPS


def test_a_budget_spent_by_decoding_is_refused_before_decoding(images, tmp_path):
    """2 s cannot hold even the 7 s set aside for writing the backbone: exit 2, one line, nothing decoded."""
    cmd = [sys.executable, "-m", "medclf", "pretrain", str(images), "--out", str(tmp_path / "bb")]
    cmd += ["--time-budget", "2s", "--cache-dir", str(tmp_path / "cache"), "--size", "24"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "time budget" in proc.stderr
    assert "Decoding" not in proc.stderr and not (tmp_path / "cache").exists()


def test_a_clock_driven_run_resumes_exactly_after_a_crash(images, tmp_path, clocked, monkeypatch):
    """Killed (an exception) as its second epoch starts, a run on the clock resumes from its checkpoint and
    ends with the weights of the run that was not interrupted: the timing probe of the resumed run draws
    nothing from the run's random streams."""
    clock, _ = clocked
    full, _ = _pretrain(images, tmp_path / "full", 200, clock)
    assert full.epochs_run == 2
    original, calls = PretrainLoop._train_epoch, {"n": 0}

    def crash_in_second_epoch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PretrainLoop, "_train_epoch", crash_in_second_epoch)
    out = tmp_path / "again"
    with pytest.raises(KeyboardInterrupt):
        _pretrain(images, out, 200, clock)
    assert (tmp_path / "again.ckpt" / "state.json").exists() and not out.exists()
    monkeypatch.setattr(PretrainLoop, "_train_epoch", original)
    resumed, _ = _pretrain(images, out, 200, clock, resume=True)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    a, b = load_file(str(full.bundle / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
