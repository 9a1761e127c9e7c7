"""``medclf pretrain`` under torchrun: 2 processes on CPU (gloo) on the small simulated dataset.

As in tests/test_distributed.py, ``MEDCLF_DEBUG_SHARDS`` makes every rank write the rows of each batch it
trained on. One further torchrun script checks, in the same two processes, that the gathered loss with
DDP's gradient average gives one process's gradient of the global batch, and runs pretraining on a fake
clock that the machine "slows down" on, so that the ranks must agree on the step at which to stop.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medclf.bundle import load_bundle
from tests.test_distributed import _torchrun

COMMON = [
    "--epochs", "3", "--size", "24", "--arch", "compact-s", "--batch-size", "12", "--seed", "0",
    "--no-progress",
]  # fmt: skip
BATCH = 12

# Kills every rank (as kill -9 would: no handler, no flush) as its third epoch starts, through the CLI.
_CRASHING_ENTRY = """
import os
import signal
import sys
from medclf.pretrain import loop
from medclf.cli import main

calls = {"n": 0}
original = loop.PretrainLoop._train_epoch

def crash_in_third_epoch(self, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)

loop.PretrainLoop._train_epoch = crash_in_third_epoch
sys.argv = ["medclf", *sys.argv[1:]]
main()
"""

# 1. The gradient: every rank embeds its shard of a global batch of 8 fixed view pairs through DDP; the
#    gathered loss's gradient must be that of one process on the whole batch (a network without batch norm,
#    whose statistics would differ per shard by design).
# 2. The clock: pretraining on a fake clock on which a timing-probe step takes 1 s and a training step 8 s,
#    so the run must stop inside its first epoch; rank 0 decides, and every rank reports where it stopped.
_SCRIPT = """
import copy
import json
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

import medclf.pretrain.run as run_mod
from medclf.budget import Budget
from medclf.distributed import from_env
from medclf.pretrain import pretrain
from medclf.pretrain.simclr import SimclrStep, contrastive_loss, global_contrastive_loss

out, data = sys.argv[1], sys.argv[2]
ctx, _ = from_env("cpu")
torch.manual_seed(0)
net = torch.nn.Sequential(
    torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 6)
)
v1, v2 = torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4)
loss_fn = contrastive_loss(0.5)
reference = copy.deepcopy(net)
z = reference(torch.cat([v1, v2]))
ref_loss = loss_fn(z[:8], z[8:])
ref_loss.backward()
ddp = DistributedDataParallel(net)
mine = slice(ctx.rank, None, ctx.world_size)
loss = global_contrastive_loss(ddp(torch.cat([v1[mine], v2[mine]])), loss_fn, ctx.world_size)
loss.backward()
grad_diff = max(
    float((p.grad - q.grad).abs().max()) for p, q in zip(net.parameters(), reference.parameters())
)

class FakeClock:
    now = 0.0
    def __call__(self):
        return self.now

clock = FakeClock()
step, prepare = SimclrStep.run, run_mod.prepare_sources

def timed_step(self, *args, gather, **kwargs):
    result = step(self, *args, gather=gather, **kwargs)
    clock.now += 8.0 if gather else 1.0
    return result

def timed_prepare(*args, **kwargs):
    result = prepare(*args, **kwargs)
    clock.now += 10.0
    return result

SimclrStep.run, run_mod.prepare_sources = timed_step, timed_prepare
budget = Budget(200, clock=clock, start=0.0)
res = pretrain(data, out + "/bb", budget=budget, size=24, arch="compact-s", batch_size=2, progress=False)
report = {
    "grad_diff": grad_diff,
    "loss_diff": abs(float(loss) - float(ref_loss)),
    "stop_reason": res.stop_reason,
    "history": res.history,
    "now": clock.now,
    "work_deadline": budget.work_deadline(),
}
with open(f"{out}/rank{ctx.rank}.json", "w") as fh:
    json.dump(report, fh)
# Leave the group before the interpreter tears down DDP's gloo threads (an abort at exit otherwise, rarely).
del ddp
ctx.close()
"""


@pytest.fixture(scope="module")
def ddp_run(sim_data, tmp_path_factory):
    """An uninterrupted 2-process pretraining run, with its shard logs."""
    root = tmp_path_factory.mktemp("ddp-pretrain")
    shards = root / "shards"
    proc = _torchrun(
        ["-m", "medclf", "pretrain", str(sim_data), "--out", str(root / "run" / "bb"), *COMMON],
        {"MEDCLF_DEBUG_SHARDS": str(shards)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"root": root, "bundle": root / "run" / "bb", "shards": shards, "log": proc.stderr}


def test_each_rank_trains_on_its_shard_of_every_global_batch(ddp_run):
    logs = {}
    for rank in (0, 1):
        path = ddp_run["shards"] / f"shards-rank{rank}.jsonl"
        logs[rank] = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["epoch"] for e in logs[0]] == [e["epoch"] for e in logs[1]] == [0, 1, 2]
    for e0, e1 in zip(logs[0], logs[1], strict=True):
        assert len(e0["batches"]) == len(e1["batches"]) > 1
        for b0, b1 in zip(e0["batches"], e1["batches"], strict=True):
            assert len(b0) == len(b1) == BATCH // 2  # the global batch, split in two
        seen0 = [i for b in e0["batches"] for i in b]
        seen1 = [i for b in e1["batches"] for i in b]
        assert not set(seen0) & set(seen1), "the ranks' shards overlap"
        assert len(set(seen0)) == len(seen0) and len(set(seen1)) == len(seen1)
    assert logs[0][0]["batches"] != logs[0][1]["batches"]  # each epoch reshuffles


def test_only_rank_0_writes_one_verified_backbone(ddp_run):
    b = load_bundle(ddp_run["bundle"])  # every hash verified
    pre = b.manifest["pretraining"]
    assert b.manifest["kind"] == "backbone" and pre["world_size"] == 2 and pre["batch_size"] == BATCH
    assert pre["epochs"] == 3 and len(pre["knn_probe"]["accuracy_curve"]) == 3  # the probe ran on rank 0
    assert ddp_run["log"].count("Backbone bundle written") == 1, "only rank 0 prints and writes"
    # Nothing beside it: no second bundle, no temporary folder, no checkpoint left behind.
    assert sorted(p.name for p in ddp_run["bundle"].parent.iterdir()) == ["bb"]


def test_distributed_pretraining_resumes_exactly_after_a_kill(ddp_run, sim_data):
    root, out = ddp_run["root"], ddp_run["root"] / "resume" / "bb"
    entry = root / "crash_entry.py"
    entry.write_text(_CRASHING_ENTRY)
    crashed = _torchrun([str(entry), "pretrain", str(sim_data), "--out", str(out), *COMMON])
    assert crashed.returncode != 0 and (out.parent / "bb.ckpt" / "last.safetensors").exists()
    assert not out.exists()
    resumed = _torchrun(["-m", "medclf", "pretrain", str(sim_data), "--out", str(out), *COMMON, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resuming" in resumed.stderr
    full = load_bundle(ddp_run["bundle"]).manifest["pretraining"]["history"]
    again = load_bundle(out).manifest["pretraining"]["history"]
    assert [h["epoch"] for h in again] == [1, 2, 3]
    assert np.allclose([h["loss"] for h in again], [h["loss"] for h in full], rtol=1e-5)
    wf, wr = (
        load_file(str(ddp_run["bundle"] / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    assert wf.keys() == wr.keys()
    assert all(torch.allclose(wf[k].float(), wr[k].float(), atol=1e-6) for k in wf)


def test_gathered_loss_gradient_and_a_clock_stop_all_ranks_agree_on(sim_data, tmp_path):
    script = tmp_path / "check.py"
    script.write_text(_SCRIPT)
    proc = _torchrun([str(script), str(tmp_path), str(sim_data)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in ranks:
        assert report["grad_diff"] < 1e-6 and report["loss_diff"] < 1e-6, report
    # The fake machine ran 8x slower than timed: the run stopped inside its first epoch, on every rank at
    # the same step, before the time set aside for the bundle.
    steps = [r["history"][-1].get("steps") for r in ranks]
    assert steps[0] is not None and steps[0] == steps[1] and len(ranks[0]["history"]) == 1
    assert ranks[0]["stop_reason"] == ranks[1]["stop_reason"] == "time_budget"
    assert ranks[0]["now"] <= ranks[0]["work_deadline"]
    assert load_bundle(tmp_path / "bb").manifest["pretraining"]["world_size"] == 2
