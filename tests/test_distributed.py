"""Distributed training with torchrun: 2 processes on CPU (gloo) against 1 process on the same data.

Each torchrun run starts two Python processes that import PyTorch, so the runs share one module-scoped
dataset and one uninterrupted distributed run. ``MEDCLF_DEBUG_SHARDS`` makes every rank write the sample
indices of each batch it trained on, which is how the test sees the shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medclf.distributed import DistContext, epoch_seed, from_env, shard

COMMON = [
    "--epochs", "4", "--size", "32", "--batch-size", "16", "--arch", "compact-s", "--augment", "none",
    "--seed", "0", "--no-progress",
]  # fmt: skip

# Interrupts training at the start of the 3rd epoch in every rank (as a kill would), through the CLI.
_CRASHING_ENTRY = """
import os
import signal
import sys
from medclf import training
from medclf.cli import main

calls = {"n": 0}
original = training.Loop.train_epoch

def crash_in_third_epoch(self):
    calls["n"] += 1
    if calls["n"] == 3:  # a real kill -9 of every rank as the third epoch starts: no handler, no flush
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self)

training.Loop.train_epoch = crash_in_third_epoch
sys.argv = ["medclf", *sys.argv[1:]]
main()
"""


def _top_bottom_dataset(root: Path, n_train: int = 100, n_test: int = 25, side: int = 32) -> Path:
    """A bright blob in the top or the bottom half of a noisy image: learnt within a few epochs."""
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    for split, n in (("train", n_train), ("test", n_test)):
        for c, cls in enumerate(("top", "bottom")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                cy = rng.uniform(5, side / 2 - 4) + (side / 2 if c else 0)
                cx = rng.uniform(5, side - 5)
                img = 0.3 + 0.15 * rng.standard_normal((side, side))
                img += 0.5 * (np.hypot(yy - cy, xx - cx) < rng.uniform(3, 5))
                px = (np.clip(img, 0, 1) * 255).astype(np.uint8)
                PILImage.fromarray(px).save(root / split / cls / f"{i}.png")
    return root


def _torchrun(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """The dataset, a single-process bundle and a 2-process torchrun bundle with its shard logs."""
    from medclf.training import train

    root = tmp_path_factory.mktemp("ddp")
    data = _top_bottom_dataset(root / "data")
    single = train(
        data, root / "single", epochs=4, size=32, batch_size=16, arch="compact-s", augment="none",
        seed=0, progress=False,
    )  # fmt: skip
    shards = root / "shards"
    proc = _torchrun(
        ["-m", "medclf", "train", str(data), "--out", str(root / "ddp" / "model"), *COMMON],
        {"MEDCLF_DEBUG_SHARDS": str(shards)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"root": root, "data": data, "single": single, "ddp": root / "ddp" / "model", "shards": shards,
            "log": proc.stderr}  # fmt: skip


def test_ranks_train_on_disjoint_shards_of_every_global_batch(ddp_runs):
    logs = {}
    for rank in (0, 1):
        path = ddp_runs["shards"] / f"shards-rank{rank}.jsonl"
        logs[rank] = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["epoch"] for e in logs[0]] == [e["epoch"] for e in logs[1]] == [0, 1, 2, 3]
    for e0, e1 in zip(logs[0], logs[1], strict=True):
        assert len(e0["batches"]) == len(e1["batches"]) > 1
        seen0 = [i for b in e0["batches"] for i in b]
        seen1 = [i for b in e1["batches"] for i in b]
        assert not set(seen0) & set(seen1), "the ranks' shards overlap"
        assert len(set(seen0)) == len(seen0) and len(set(seen1)) == len(seen1)
        for b0, b1 in zip(e0["batches"], e1["batches"], strict=True):
            assert len(b0) == len(b1) == 8  # the global batch of 16, split in two
    # Each epoch reshuffles.
    assert logs[0][0]["batches"] != logs[0][1]["batches"]


def test_only_rank_0_writes_one_bundle(ddp_runs):
    from medclf.bundle import load_bundle

    b = load_bundle(ddp_runs["ddp"])  # every hash verified
    assert b.manifest["recipe"]["world_size"] == 2 and b.manifest["recipe"]["batch_size"] == 16
    assert ddp_runs["log"].count("Bundle written") == 1, "only rank 0 prints and writes"
    # Nothing else beside it: no second bundle, no temporary folder, no checkpoint left behind.
    assert sorted(p.name for p in ddp_runs["ddp"].parent.iterdir()) == ["model"]


def test_accuracy_matches_the_single_process_run(ddp_runs, tmp_path):
    from medclf.evaluation.runner import evaluate

    single = evaluate(ddp_runs["single"].bundle, ddp_runs["data"], tmp_path / "e1", progress=False)
    ddp = evaluate(ddp_runs["ddp"], ddp_runs["data"], tmp_path / "e2", progress=False)
    assert single["accuracy"] >= 0.8, single  # the task is learnt, so the comparison means something
    assert abs(ddp["accuracy"] - single["accuracy"]) <= 0.1, (ddp["accuracy"], single["accuracy"])


def test_distributed_resume_continues_exactly(ddp_runs):
    root, out = ddp_runs["root"], ddp_runs["root"] / "resume" / "model"
    entry = root / "crash_entry.py"
    entry.write_text(_CRASHING_ENTRY)
    crashed = _torchrun([str(entry), "train", str(ddp_runs["data"]), "--out", str(out), *COMMON])
    assert crashed.returncode != 0 and (out.parent / "model.ckpt" / "last.safetensors").exists()
    assert not out.exists()
    resumed = _torchrun(
        ["-m", "medclf", "train", str(ddp_runs["data"]), "--out", str(out), *COMMON, "--resume"]
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    full = json.loads((ddp_runs["ddp"] / "bundle.json").read_text())["history"]
    again = json.loads((out / "bundle.json").read_text())["history"]
    assert [h["epoch"] for h in again] == [1, 2, 3, 4]
    assert np.allclose([h["loss"] for h in again], [h["loss"] for h in full], rtol=1e-5)
    wf, wr = load_file(str(ddp_runs["ddp"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.allclose(wf[k].float(), wr[k].float(), atol=1e-6) for k in wf)


# --- the pieces, in one process ---


def test_single_process_context_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx, device = from_env("cpu")
    assert not ctx.enabled and ctx.is_main and device == "cpu"
    assert ctx.broadcast_json({"a": 1}) == {"a": 1} and ctx.agree(True) and ctx.sum([1.0, 2.0]) == [1.0, 2.0]
    local = np.arange(6.0).reshape(3, 2)
    assert np.array_equal(ctx.gather_strided(local, 3), local)
    ctx.barrier()
    ctx.close()


def test_missing_torchrun_variables_are_a_clear_error(monkeypatch):
    from medclf.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        from_env("cpu")


def test_shards_partition_a_batch_and_epoch_seeds_differ():
    batch = torch.arange(10)
    parts = [shard(batch, DistContext(rank=r, world_size=3)) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert shard(batch, DistContext()) is batch
    assert epoch_seed(0, 1) == epoch_seed(0, 1) != epoch_seed(0, 2)
    assert len({epoch_seed(0, 1, r) for r in range(4)} | {epoch_seed(0, 1)}) == 5


def test_planner_counts_the_world_size():
    from medclf.planner import Fingerprint, initial_plan

    fp = Fingerprint(
        n_samples=100, class_counts={}, spatial_dims=2, median_shape=[64, 64], min_side=64, max_side=64,
        channels=1, colour_fraction=0.0, formats={}, modalities={}, n_probed=10, n_unreadable_probed=0,
    )  # fmt: skip
    one = initial_plan(fp, 100, {})
    four = initial_plan(fp, 100, {}, world_size=4)
    assert four.batch_size == 4 * one.batch_size and four.lr == pytest.approx(2 * one.lr)
    fixed = initial_plan(fp, 100, {"batch_size": 30, "lr": 1e-3}, world_size=4)
    assert fixed.batch_size == 28 and fixed.lr == 1e-3  # a global batch, divisible by the world size
