"""The planner's timing probe: bounded by its allowance, skipping sizes that cannot fit, robust warm-up."""

from __future__ import annotations

from medclf import planner
from medclf.planner import Fingerprint, choose_size_and_epochs, initial_plan, measure_throughput

FP = Fingerprint(
    n_samples=600,
    class_counts={"train": {"a": 300, "b": 300}},
    spatial_dims=2,
    median_shape=[256, 256],
    min_side=256,
    max_side=256,
    channels=1,
    colour_fraction=0.0,
    formats={"png": 600},
    modalities={"unknown": 600},
    n_probed=10,
    n_unreadable_probed=0,
)


def _fake_machine(monkeypatch, pixel_rate: float) -> list[tuple[str, int]]:
    """Images/s inversely proportional to the pixels after the stem; records what was timed."""
    timed: list[tuple[str, int]] = []

    def measured(plan, size, arch_kwargs, **kw):
        timed.append((plan.arch, size))
        stride = arch_kwargs.get("stem_stride", 1)
        width = 2.0 if plan.arch == "compact-s" else 1.0
        return width * pixel_rate / (size / stride) ** 2

    monkeypatch.setattr(planner, "measure_throughput", measured)
    return timed


def test_sizes_that_cannot_fit_are_skipped_without_timing(monkeypatch):
    timed = _fake_machine(monkeypatch, pixel_rate=5e5)
    plan = choose_size_and_epochs(initial_plan(FP, 600, {}), n_train=600, budget_s=600, fp=FP, overrides={})
    # 256 px was timed; its pixel-scaled rate rules out the sizes down to the one that fits, timed next.
    assert len(timed) == 2 and timed[0] == ("compact", 256)
    assert plan.spec.size[0] == timed[1][1] == 160  # 224 and 192 were never timed
    assert any("timing probe" in r and "2 network/size pair(s) timed" in r for r in plan.reasons)


def test_past_its_allowance_the_probe_estimates_but_still_times_the_choice(monkeypatch):
    timed = _fake_machine(monkeypatch, pixel_rate=2e4)  # so slow that compact-s is the fallback
    plan = choose_size_and_epochs(
        initial_plan(FP, 600, {}), n_train=600, budget_s=600, fp=FP, overrides={}, planning_s=0.0
    )
    assert plan.arch == "compact-s"
    # One timing per network to start with, then only the size finally chosen.
    assert [a for a, _ in timed].count("compact") <= 2 and len(timed) <= 4
    assert timed[-1] == ("compact-s", plan.spec.size[0])


def test_measure_throughput_warms_up_and_respects_its_time_cap():
    plan = initial_plan(FP, 600, {"arch": "compact-s"})
    ips = measure_throughput(plan, 16, {"stem_stride": 1}, batch_size=4, max_seconds=0.0)
    assert ips > 0


def test_the_narrower_fallback_times_small_sizes_not_the_expensive_largest(monkeypatch):
    timed = _fake_machine(monkeypatch, pixel_rate=4e4)  # compact fits nowhere, compact-s at 32 px
    plan = choose_size_and_epochs(initial_plan(FP, 600, {}), n_train=600, budget_s=600, fp=FP, overrides={})
    assert plan.arch == "compact-s" and plan.spec.size[0] == 32
    assert [t for t in timed if t[0] == "compact-s"] == [("compact-s", 28), ("compact-s", 32)]
