"""The clock-driven schedule (medclf.schedule) and the time budget (medclf.budget), on fake clocks."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from medclf import planner, training
from medclf.budget import Budget
from medclf.schedule import Schedule


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _old_warmup_cosine(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + np.cos(np.pi * min(progress, 1.0)))

    return f


def test_budget_reserves_and_shares_on_an_injected_clock():
    clock = FakeClock()
    b = Budget("2m", clock=clock)
    clock.now += 30
    assert b.elapsed() == 30 and b.left() == 90
    b.reserve(10)
    assert b.available() == 80 and b.work_deadline() == b.deadline - 10
    assert b.share(4) == 20 and b.fraction(0.05, at_least=3) == 6 and b.fraction(0.01, at_least=3) == 3
    child = b.child(50)
    assert child.total == 50 and child.clock is clock


def test_the_epochs_get_what_the_budget_leaves_after_its_reservations_less_headroom():
    from medclf import budget as rules

    clock = FakeClock()
    b = Budget("10m", clock=clock)
    clock.now += 100
    assert 0 < b.plan_epoch_seconds(before=50) < b.left() - 50 < b.plan_epoch_seconds() + 50
    b.reserve_finishing(3000, throughput=None)  # no measured pace: the fallback rate
    assert b.reserved == rules.FINISH_FIXED_S + 3000 / (rules.INFERENCE_SPEEDUP * rules.FALLBACK_THROUGHPUT)
    assert 0 < b.epoch_seconds() < b.available() == b.left() - b.reserved
    b.reserve_bag_fusion()  # a reservation replaces the one before
    assert b.reserved == rules.BAG_FUSION_SHARE * 600 + rules.BAG_FUSION_MIN_S
    b.reserve_leftover_fusion()
    assert b.reserved == rules.LEFTOVER_FUSION_S
    assert rules.member_seconds(0.0) == rules.member_seconds(rules.MIN_RUN_S) > rules.MIN_RUN_S


def test_epoch_schedule_is_the_classic_warmup_cosine():
    for spe, epochs in ((17, 4), (1, 30), (5, 1)):
        s = Schedule(spe, epochs, patience_epochs=8)
        total = spe * epochs
        old = _old_warmup_cosine(min(max(1, spe), total // 5 + 1), total)
        assert all(s.lr_factor(k) == pytest.approx(old(k), abs=1e-12) for k in range(total + 2))
        assert s.ema_decay() == min(0.9995, 1.0 - 1.0 / max(10.0, total / 10))
        # Without the clock, re-planning changes nothing.
        assert s.replan(spe, 1, seconds_left=0.0, epoch_seconds=1.0) == epochs and s.patience() == 8


def test_a_slower_machine_compresses_the_cosine_to_end_with_the_epochs_that_fit():
    s = Schedule(steps_per_epoch=10, planned_epochs=20, patience_epochs=8, clock_driven=True)
    lrs = [s.lr_factor(k) for k in range(30)]
    # After 3 epochs, only 2 more fit before the deadline: the cosine now ends at step 50.
    assert s.replan(30, 3, seconds_left=25.0, epoch_seconds=10.0) == 5
    assert s.lr_factor(49) > 0 and s.lr_factor(50) == pytest.approx(0.0, abs=1e-12) and s.completed(50)
    lrs += [s.lr_factor(k) for k in range(30, 51)]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(lrs[10:])), "no re-warming"
    # The EMA averages over a tenth of the new horizon, and patience shrinks with it (at least 2).
    assert s.ema_decay() == 1.0 - 1.0 / 10.0 and s.patience() == 2
    # The machine got faster: the horizon grows back (at most to the plan) without raising the rate.
    before = s.lr_factor(40)
    assert s.replan(40, 4, seconds_left=1000.0, epoch_seconds=10.0) == 20
    assert s.lr_factor(40) == pytest.approx(before) and s.lr_factor(200) == pytest.approx(0.0, abs=1e-12)
    # Nothing fits any more: the horizon says stop at the epochs done.
    assert s.replan(50, 5, seconds_left=1.0, epoch_seconds=10.0) == 5


def test_schedule_state_round_trips():
    s = Schedule(10, 20, 8, clock_driven=True)
    s.replan(30, 3, 25.0, 10.0)
    t = Schedule(10, 20, 8, clock_driven=True)
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert [t.lr_factor(k) for k in range(60)] == [s.lr_factor(k) for k in range(60)]
    t.load_state_dict(None)  # a checkpoint from before the schedule was saved: unchanged
    assert t.horizon_epochs == 5


def test_training_anneals_when_epochs_run_slower_than_planned(sim_data, tmp_path, monkeypatch):
    """A competing process triples the epoch time after epoch 3 (a fake clock): the run must still end
    annealed, inside its budget, and the bundle must say so."""
    clock = FakeClock()
    monkeypatch.setattr(planner, "measure_throughput", lambda *a, **k: 1000.0)  # a plan of many fast epochs
    original = training.Loop.train_epoch
    seconds = []

    def slow_epoch(self):
        loss = original(self)
        seconds.append(2.0 if len(seconds) < 3 else 6.0)
        clock.now += seconds[-1]
        return loss

    monkeypatch.setattr(training.Loop, "train_epoch", slow_epoch)
    budget = Budget(60, clock=clock)
    result = training.train_one(
        sim_data,
        tmp_path / "m",
        budget=budget,
        size=24,
        arch="compact-s",
        batch_size=16,
        patience=1000,
        progress=False,
        time_budget=60,
    )
    sched = result.schedule
    assert sched["mode"] == "clock" and sched["completed"] and result.stop_reason == "time_budget"
    assert sched["epochs_run"] == len(seconds) < sched["planned_epochs"]
    assert clock.now <= budget.deadline, "the epochs ended inside the budget"
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)
    lrs = [h["lr"] for h in result.history]
    assert all(b <= a for a, b in itertools.pairwise(lrs[1:]))
    manifest = json.loads((result.bundle / "bundle.json").read_text())
    assert manifest["recipe"]["schedule"]["completed"] is True
    assert manifest["recipe"]["schedule"]["planned_epochs"] == sched["planned_epochs"]
    assert math.isclose(manifest["sanity"]["schedule"]["final_lr_factor"], 0.0, abs_tol=1e-9)


def test_explicit_epochs_keep_the_epoch_schedule(sim_data, tmp_path):
    result = training.train(
        sim_data, tmp_path / "e", epochs=2, size=24, arch="compact-s", batch_size=16, progress=False
    )
    assert result.schedule["mode"] == "epochs" and result.schedule["completed"]
    assert result.schedule["epochs_run"] == result.schedule["planned_epochs"] == 2


def test_a_clock_driven_run_resumes_with_its_schedule(sim_data, tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(planner, "measure_throughput", lambda *a, **k: 1000.0)
    original = training.Loop.train_epoch
    calls = {"n": 0}

    def epoch(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill")
        loss = original(self)
        clock.now += 5.0
        return loss

    monkeypatch.setattr(training.Loop, "train_epoch", epoch)
    kw = dict(size=24, arch="compact-s", batch_size=16, patience=1000, progress=False, time_budget=60)
    with pytest.raises(KeyboardInterrupt):
        training.train_one(sim_data, tmp_path / "m", budget=Budget(60, clock=clock), **kw)
    saved = json.loads((tmp_path / "m.ckpt" / "state.json").read_text())
    assert saved["schedule"]["clock_driven"] and saved["schedule"]["horizon_epochs"] < saved["plan"]["epochs"]
    # The resumed run has a budget of its own: the schedule continues from the saved horizon.
    result = training.train_one(sim_data, tmp_path / "m", resume=True, budget=Budget(30, clock=clock), **kw)
    assert [h["epoch"] for h in result.history][:3] == [1, 2, 3] and len(result.history) > 3
    assert result.schedule["mode"] == "clock" and result.schedule["completed"]
