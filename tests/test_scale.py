"""Data larger than memory (streaming from the disk cache) and volumes at scale (2.5D slices as channels).

The memory test trains on a generated dataset whose preprocessed cache is 3x the memory limit given to the
training process, and checks that peak memory stays under the limit.

How the limit is given and enforced, and why not ``ulimit -v`` or a cgroup:

- ``ulimit -v`` (RLIMIT_AS) caps *virtual* memory. PyTorch alone reserves about 1 GB of address space
  before doing anything, thread stacks and allocator arenas reserve more, so a cap that torch survives is
  far above the resident memory that matters, and a dataset 3x that cap would take minutes to make.
- A memory cgroup is the real tool (``systemd-run --scope -p MemoryMax=...`` or a container limit, which
  :func:`medclf.data.stream.available_memory` reads), but creating one needs privileges a test cannot
  assume.

So the test does what a cgroup does, from inside the process: a watchdog thread samples the resident set
size (RSS, ``/proc/self/statm``) every 10 ms and kills the process (exit code 3) the moment it grows more
than ``LIMIT`` above the peak of a small warm-up run of the same recipe. The warm-up peak is the fixed cost
of any run (Python, PyTorch, the model, one batch's activations); the limit is on what the data adds. The
same limit is handed to training as ``memory_limit``, so the automatic choice (stream or materialise) is
exercised, not forced. A control run with streaming switched off must be killed by the watchdog: the
limit is tight enough to catch a run that holds the data in memory.

Two settings keep the measurement about the data rather than about allocator noise: decoding runs in the
training process (``workers=1``; forked decoding workers cost a fixed amount each, whatever the data
size), and small inputs (32 x 32, batch 16) with ``MALLOC_ARENA_MAX=2`` keep the per-step swing of
activations and glibc's per-thread arenas to a few MiB (with 128-pixel RGB batches of 32 and default
arenas, RSS swings by ~70 MiB from step to step, whatever the data size).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from medclf.data.stream import StreamedRows, block_shuffled_order, parse_bytes, prefetched, should_stream
from medclf.errors import ConfigError, InputRejected
from medclf.preprocess import PreprocessSpec, preprocess

LIMIT = 48 << 20  # bytes of memory the data may add to a run
# 64 x 32 x 32 volumes trained as 2.5D (64 slabs as channels of a 32 x 32 image): 128 KiB per cached row
# (float16) for the compute of a 32-pixel 2D image, so a dataset several times the limit trains in seconds.
DEPTH, SIDE = 64, 32

_CHILD = textwrap.dedent(
    """
    import gc, json, os, sys, threading, time
    from pathlib import Path

    import medclf.training as training
    import sklearn.metrics  # noqa: F401 - imported lazily by training; load it before measuring

    small, big, out, limit = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * page

    state = {"peak": 0, "ceiling": None}

    def watchdog():
        while True:
            now = rss()
            state["peak"] = max(state["peak"], now)
            if state["ceiling"] is not None and now > state["ceiling"]:
                (out / "killed.json").write_text(json.dumps({"rss": now, "ceiling": state["ceiling"]}))
                os._exit(3)
            time.sleep(0.01)

    threading.Thread(target=watchdog, daemon=True).start()
    kw = dict(epochs=1, size=32, slices_as_channels=64, batch_size=16, arch="compact-s", augment="none",
              workers=1, progress=False, memory_limit=limit)
    training.train(small, out / "runs" / "small", stream="on", **kw)  # warm-up: the fixed cost of this recipe
    gc.collect()
    base = state["peak"]
    state["peak"], state["ceiling"] = 0, base + limit
    res = training.train(big, out / "runs" / "big", **kw)
    manifest = json.loads((Path(res.bundle) / "bundle.json").read_text())
    record = {"base": base, "peak": state["peak"], "streamed": manifest["recipe"]["streamed"]}
    (out / "result.json").write_text(json.dumps(record))
    # Control: the same data held in memory must be stopped by the same ceiling.
    training.train(big, out / "runs" / "control", stream="off", **kw)
    (out / "control-finished").write_text("the control run was not stopped")
    """
)


def _volume_dataset(root: Path, n_per_class: int, seed: int) -> Path:
    """NIfTI volumes (uint8, DEPTH x SIDE x SIDE) with a bright blob in the upper or the lower half, one
    folder per class."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    # NIfTI array axes are (x, y, z): z, inferior to superior, is the slab axis of 2.5D. Open grids: the
    # distances broadcast to the same values as full ones, without three volume-sized arrays per volume.
    xx, yy, zz = np.ogrid[:SIDE, :SIDE, :DEPTH]
    for c, cls in enumerate(("upper", "lower")):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            vol = 60 + 20 * rng.standard_normal((SIDE, SIDE, DEPTH))
            cz = rng.uniform(6, DEPTH / 2 - 6) + (DEPTH / 2 if c == 0 else 0)
            cy, cx = rng.uniform(8, SIDE - 8, 2)
            vol += 120 * (np.sqrt((zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2) < rng.uniform(3, 6))
            img = nib.Nifti1Image(np.clip(vol, 0, 255).astype(np.uint8), np.eye(4))
            img.to_filename(root / cls / f"{i:04d}.nii")
    return root


def test_training_on_data_three_times_the_memory_limit_streams_with_bounded_memory(tmp_path):
    row_bytes = DEPTH * SIDE * SIDE * 2
    n_per_class = -(-3 * LIMIT // row_bytes // 2) + 8  # cached rows > 3 x LIMIT
    small = _volume_dataset(tmp_path / "small", 96, seed=1)
    big = _volume_dataset(tmp_path / "big", n_per_class, seed=2)
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(small), str(big), str(tmp_path), str(LIMIT)],
        capture_output=True,
        text=True,
        timeout=900,  # a safety net for a loaded machine, not a timing assertion
        env={**_env(), "MEDCLF_CACHE_DIR": str(cache), "MALLOC_ARENA_MAX": "2"},
    )
    result = tmp_path / "result.json"
    assert result.exists(), (
        f"the streamed run did not finish (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    )
    record = json.loads(result.read_text())
    cached = [p.stat().st_size for p in cache.glob("*/tensors.npy")]
    assert max(cached) >= 3 * LIMIT, "the dataset must be at least 3x the memory limit"
    assert record["streamed"], "the automatic choice should have been to stream"
    grown = record["peak"] - record["base"]
    assert grown <= LIMIT, f"peak memory grew by {grown / 2**20:.0f} MiB over a limit of {LIMIT / 2**20:.0f}"
    # The limit bites: holding the same data in memory is stopped by the watchdog.
    assert proc.returncode == 3 and (tmp_path / "killed.json").exists(), proc.stderr[-3000:]
    assert not (tmp_path / "control-finished").exists()


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}


# --- streaming pieces ---


def test_cache_rows_go_to_disk_as_decoded_and_match_the_in_memory_path(sim_data, tmp_path):
    import os
    import time

    from medclf.data.cache import _remove_stale, prepare
    from medclf.data.sources import load_source

    samples = load_source(sim_data)
    spec = PreprocessSpec(size=(32, 32))
    on_disk = prepare(samples, spec, cache_dir=tmp_path / "c", workers=2, progress=False)
    in_memory = prepare(samples, spec, use_cache=False, workers=1, progress=False)
    assert on_disk.path is not None and getattr(on_disk.tensors, "filename", None) is not None
    assert np.array_equal(np.asarray(on_disk.tensors), in_memory.tensors)
    assert not list((tmp_path / "c").glob(".*.tmp-*")), "the temporary folder became the cache entry"
    # A killed run's temporary folder is removed; one still being written is not.
    old, new = (tmp_path / "c" / f".{on_disk.path.name}.tmp-{s}" for s in ("old", "new"))
    for d in (old, new):
        d.mkdir()
        (d / "tensors.npy").write_bytes(b"partial")
    past = time.time() - 7200
    os.utime(old / "tensors.npy", (past, past))
    _remove_stale(on_disk.path)
    assert not old.exists() and new.exists()


def test_streamed_rows_read_exactly_what_the_array_holds(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.standard_normal((50, 2, 3, 4)).astype(np.float16)
    np.save(tmp_path / "t.npy", arr)
    mm = np.load(tmp_path / "t.npy", mmap_mode="r")
    idx = np.array([3, 4, 5, 9, 10, 30, 31, 49, 0])
    rows = StreamedRows(mm, idx)
    assert len(rows) == len(idx)
    pos = torch.tensor([8, 2, 0, 1, 6, 6, 7])  # unsorted, with a repeat
    assert np.array_equal(rows[pos].numpy(), arr[idx[pos.numpy()]])
    assert np.array_equal(rows[1:7:2].numpy(), arr[idx[1:7:2]])
    assert rows[torch.zeros(0, dtype=torch.int64)].shape == (0, 2, 3, 4)
    with pytest.raises(ValueError, match="memory-mapped"):
        StreamedRows(np.asarray(arr), idx)


def test_block_shuffled_order_is_a_seeded_permutation_with_local_batches():
    n = 1000
    a = block_shuffled_order(n, torch.Generator().manual_seed(0), block=50, window=4)
    b = block_shuffled_order(n, torch.Generator().manual_seed(0), block=50, window=4)
    c = block_shuffled_order(n, torch.Generator().manual_seed(1), block=50, window=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(a.tolist()) == list(range(n))
    # Every window of 200 consecutive positions draws from 4 blocks only: reads stay local on disk.
    for w in range(0, n, 200):
        assert len({int(i) // 50 for i in a[w : w + 200]}) <= 4
    assert not torch.equal(a, torch.arange(n))


def test_prefetched_keeps_order_and_runs_ahead_a_bounded_amount():
    started: list[int] = []

    def work(i: int) -> int:
        started.append(i)
        return i * i

    seen = []
    for item, value in prefetched(work, range(10), depth=2):
        assert value == item * item
        assert max(started) <= item + 3  # never far ahead of the consumer
        seen.append(item)
    assert seen == list(range(10))
    assert list(prefetched(work, [1, 2], depth=0)) == [(1, 1), (2, 4)]


def test_stream_decision_and_memory_sizes():
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("2G") == 2 << 30 and parse_bytes(1000) == 1000
    assert parse_bytes("1.5GiB") == int(1.5 * (1 << 30)) and parse_bytes(None) is None
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ConfigError):
            parse_bytes(bad)
    assert should_stream("auto", 100 << 20, memory_limit=150 << 20)[0]
    assert not should_stream("auto", 10 << 20, memory_limit=150 << 20)[0]
    assert should_stream("auto", 40 << 20, copies=4, memory_limit=150 << 20)[0]  # 4 ranks on one machine
    assert should_stream("on", 1)[0] and not should_stream("off", 1 << 50)[0]
    with pytest.raises(ConfigError):
        should_stream("sometimes", 1)


# --- 3D at scale: 2.5D ---


def test_slices_as_channels_spec_and_preprocessing():
    from medclf.io import image_from_array

    kw = dict(spatial_dims=2, size=(32, 32), channels=8, slices_as_channels=8)
    spec = PreprocessSpec(**kw, crop_foreground=False)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    # Specs without 2.5D serialise as before: old caches and bundles keep their keys.
    assert "slices_as_channels" not in PreprocessSpec().to_dict()
    vol = np.zeros((40, 48, 48), np.float32)
    vol[5:12, 8:28, 8:28] = 1.0  # a lesion near the bottom of the volume, far from its centre
    x = preprocess(image_from_array(vol, source="v"), spec)
    assert x.shape == (8, 32, 32) and x.dtype == np.float32
    assert x[:3].max() > 0.3 and x[5:].max() < 0.05, "slabs cover the whole depth, in order"
    with pytest.raises(InputRejected, match="3D volumes"):
        preprocess(image_from_array(np.zeros((48, 48), np.float32), source="2d"), spec)
    with pytest.raises(ConfigError):
        PreprocessSpec(spatial_dims=2, size=(32, 32), channels=1, slices_as_channels=8)
    with pytest.raises(ConfigError):
        PreprocessSpec(spatial_dims=3, size=(8, 8, 8), channels=4, slices_as_channels=4)


def test_nifti_csv_manifest_trains_2_5d_and_predicts_volumes(tmp_path):
    from medclf.api import load_bundle
    from medclf.data.simulate import make_dataset
    from medclf.training import train

    data = make_dataset(tmp_path / "vol", n_per_class=10, dims=3, size=24, seed=3, manifest=True)
    assert (data / "manifest.csv").exists()
    res = train(
        data / "manifest.csv",
        tmp_path / "m25",
        epochs=1,
        size=24,
        arch="compact-s",
        slices_as_channels=6,
        progress=False,
    )
    b = load_bundle(res.bundle)
    assert b.spec.slices_as_channels == 6 and b.spec.spatial_dims == 2 and b.spec.channels == 6
    assert b.manifest["model"]["spatial_dims"] == 2 and b.manifest["model"]["in_channels"] == 6
    vols = sorted(data.rglob("*.nii.gz"))[:2]
    out = b.predict(vols)  # prediction slices the volumes exactly as training did
    assert all("predicted" in r for r in out), out


def test_slices_as_channels_refuses_2d_data(sim_data, tmp_path):
    from medclf.training import train

    with pytest.raises(ConfigError, match="needs volumes"):
        train(sim_data, tmp_path / "x", epochs=1, slices_as_channels=4, progress=False)


def test_planner_falls_back_to_2_5d_when_3d_cannot_fit_the_budget(monkeypatch):
    from medclf import planner
    from medclf.planner import Fingerprint, choose_size_and_epochs, initial_plan

    # Throughput as measured on a slow machine: 3D at 1 volume/s, 2D at 500 images/s (no real timing here).
    def measured(plan, size, arch_kwargs, **kw):
        return 1.0 if plan.spec.spatial_dims == 3 else 500.0

    monkeypatch.setattr(planner, "measure_throughput", measured)

    fp = Fingerprint(
        n_samples=200,
        class_counts={"train": {"a": 100, "b": 100}},
        spatial_dims=3,
        median_shape=[40, 48, 48],
        min_side=40,
        max_side=48,
        channels=1,
        colour_fraction=0.0,
        formats={"nifti": 10},
        modalities={"unknown": 10},
        n_probed=10,
        n_unreadable_probed=0,
    )
    plan = initial_plan(fp, 200, {"arch": "compact-s"})
    plan = choose_size_and_epochs(plan, n_train=200, budget_s=60, fp=fp, overrides={"arch": "compact-s"})
    assert plan.spec.slices_as_channels == 16 and plan.spec.spatial_dims == 2
    assert any("2.5D" in r for r in plan.reasons)
    # Asked for 3D explicitly (0), it stays 3D however slow.
    kept = initial_plan(fp, 200, {"arch": "compact-s", "slices_as_channels": 0})
    kept = choose_size_and_epochs(
        kept, n_train=200, budget_s=60, fp=fp, overrides={"arch": "compact-s", "slices_as_channels": 0}
    )
    assert kept.spec.spatial_dims == 3 and not kept.spec.slices_as_channels


def test_planner_narrows_the_network_when_even_the_smallest_size_is_too_slow(monkeypatch):
    from medclf import planner
    from medclf.planner import Fingerprint, choose_size_and_epochs, initial_plan

    # A slow machine (no real timing here): compact at 40 images/s, the quarter-compute compact-s at 160.
    def measured(plan, size, arch_kwargs, **kw):
        return 160.0 if plan.arch == "compact-s" else 40.0

    monkeypatch.setattr(planner, "measure_throughput", measured)
    fp = Fingerprint(
        n_samples=4000,
        class_counts={"train": {"a": 2000, "b": 2000}},
        spatial_dims=2,
        median_shape=[28, 28],
        min_side=28,
        max_side=28,
        channels=1,
        colour_fraction=0.0,
        formats={"npz": 4000},
        modalities={"unknown": 4000},
        n_probed=10,
        n_unreadable_probed=0,
    )
    # 4000 images: 37 target epochs, 22 at least. compact: 100 s/epoch; compact-s: 25 s/epoch.
    plan = choose_size_and_epochs(initial_plan(fp, 4000, {}), n_train=4000, budget_s=600, fp=fp, overrides={})
    assert plan.arch == "compact-s" and plan.epochs == 24
    assert any("switching to the narrower compact-s" in r for r in plan.reasons)
    # An architecture the user chose is kept, however slow; and a budget that fits keeps compact.
    kept = choose_size_and_epochs(
        initial_plan(fp, 4000, {"arch": "compact"}),
        n_train=4000,
        budget_s=600,
        fp=fp,
        overrides={"arch": "compact"},
    )
    assert kept.arch == "compact" and kept.epochs == 6
    roomy = choose_size_and_epochs(
        initial_plan(fp, 4000, {}), n_train=4000, budget_s=3000, fp=fp, overrides={}
    )
    assert roomy.arch == "compact"


def test_streaming_pins_the_mmap_threshold_where_the_c_library_is_glibc():
    import platform

    from medclf.data.stream import return_freed_batches_to_os

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert return_freed_batches_to_os() is expected
