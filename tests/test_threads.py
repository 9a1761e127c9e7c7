"""Thread policy (medclf.threads): CPUs by affinity, cgroup quota and other processes' load; overrides."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from medclf import threads
from medclf.errors import ConfigError
from medclf.threads import CpuAvailability, LoadMonitor


def test_availability_counts_cores_other_processes_keep_busy():
    quiet = CpuAvailability(cores=8, allowed=2, quota=None, others_busy=0.1)
    assert quiet.limit == 2 and quiet.available == 2 and not quiet.busy
    # One competing CPU-bound process on a 2-core machine: one core is left.
    one_busy = CpuAvailability(cores=2, allowed=2, quota=None, others_busy=0.95)
    assert one_busy.available == 1 and one_busy.busy
    assert CpuAvailability(cores=2, allowed=2, quota=None, others_busy=0.4).available == 2
    # Never below one thread, however busy the machine.
    assert CpuAvailability(cores=2, allowed=2, quota=None, others_busy=5.0).available == 1
    # A cgroup quota of 1.5 CPUs allows one full CPU; affinity limits too.
    assert CpuAvailability(cores=16, allowed=4, quota=1.5, others_busy=0.0).available == 1
    assert CpuAvailability(cores=16, allowed=3, quota=None, others_busy=None).available == 3
    # A container with a 2-CPU quota on a busy 64-core host: other tenants do not take its quota.
    assert CpuAvailability(cores=64, allowed=64, quota=2.0, others_busy=30.0).available == 2
    assert CpuAvailability(cores=64, allowed=64, quota=2.0, others_busy=63.2).available == 1


def test_cgroup_quota_v2_and_v1(tmp_path):
    root = tmp_path / "cg"
    (root / "user.slice").mkdir(parents=True)
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice\n")
    assert threads.cgroup_quota(root, proc) is None
    (root / "user.slice" / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_quota(root, proc) == 1.5
    (root / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_quota(root, proc) == 1.5
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("4:cpu,cpuacct:/\n")
    assert threads.cgroup_quota(v1, proc) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_quota(v1, proc) is None


def test_load_monitor_subtracts_our_own_cpu_time(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal: cpu0 and cpu1 (cpu2 is not ours)
    stat.write_text(
        "cpu  0 0 0 0 0 0 0 0\ncpu0 100 0 0 900 0 0 0 0\ncpu1 100 0 0 900 0 0 0 0\ncpu2 0 0 0 0\n"
    )
    clock = iter([10.0, 11.0])
    own = iter([5.0, 5.5])
    monitor = LoadMonitor([0, 1], stat=stat, clock=lambda: next(clock), own_seconds=lambda: next(own))
    # Over one second: 150 of 200 jiffies busy on our two CPUs = 1.5 cores, of which 0.5 were ours.
    stat.write_text(
        "cpu  0 0 0 0 0 0 0 0\ncpu0 200 0 0 900 0 0 0 0\ncpu1 150 0 0 950 0 0 0 0\ncpu2 0 0 0 0\n"
    )
    assert monitor.sample() == pytest.approx(1.0)


def test_choice_follows_threads_option_then_omp_num_threads_then_measurement(monkeypatch):
    busy = CpuAvailability(cores=2, allowed=2, quota=None, others_busy=1.0)
    monkeypatch.setattr(threads, "_availability", busy)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    measured = threads.choose(None)
    assert (measured.torch_threads, measured.decode_workers, measured.source) == (1, 1, "measured")
    assert "busy with other processes" in measured.describe()
    assert threads.choose(3).torch_threads == 3 and threads.choose(3).source == "--threads"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets per process
    assert threads.choose(None).source == "OMP_NUM_THREADS" and threads.choose(None).torch_threads == 1
    with pytest.raises(ConfigError):
        threads.choose(0)


def test_apply_sets_torch_threads_and_decoding_workers(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_policy", None)
    try:
        policy = threads.apply(1)
        assert torch.get_num_threads() == 1 and threads.current() is policy
        assert threads.decode_workers() == 1 and threads.ort_threads() == 1
        from medclf.engines import ort_threads

        assert ort_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_openmp_waits_passively_only_when_other_processes_are_busy(monkeypatch):
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    busy = CpuAvailability(cores=2, allowed=2, quota=None, others_busy=1.0)
    quiet = CpuAvailability(cores=2, allowed=2, quota=None, others_busy=0.0)
    monkeypatch.setattr(threads, "cpu_availability", lambda **kw: quiet)
    threads.configure_openmp_env(["train", "data", "--out", "m"])
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setattr(threads, "cpu_availability", lambda **kw: busy)
    threads.configure_openmp_env(["info", "bundle"])  # commands that compute nothing are not measured
    assert "OMP_WAIT_POLICY" not in os.environ
    threads.configure_openmp_env(["train", "data", "--out", "m"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice stays
    threads.configure_openmp_env(["train", "data"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_command_line_sets_the_wait_policy_before_torch_is_imported():
    # GNU OpenMP reads OMP_WAIT_POLICY once, when torch loads it: the CLI module must not import torch.
    code = "import sys, medclf.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
