"""Training throughput: medclf's default recipe against a plain PyTorch loop, and where the time goes.

    .venv/bin/python benchmarks/throughput.py [--data ../shared/datasets/brain-tumor-mri] [--size 96]

Both loops train the same network (the planner's default, ``compact``) on the same images at the same input
size and batch size:

* **plain**: a standard ``Dataset`` that decodes and resizes each JPEG on every access (PIL), a
  ``DataLoader`` with one worker per core, fp32, contiguous tensors, per-sample flips — what most training
  scripts do;
* **medclf**: the real training loop (``medclf.training.Loop``): preprocessed tensors cached once, batched
  augmentation, bf16 autocast and channels-last where the CPU supports them, EMA, freed C-heap memory kept
  for the next step (``medclf.allocator``). The plain loop runs in a fresh process, on the C library's
  defaults, as a plain script would.

Both train for the same number of epochs (``--epochs``, default 3) and are then scored on the same test
images (the clean test split: copies of training images removed), so the speed-up is shown not to cost
accuracy. It also measures the machine's fp32 and bf16 matrix-multiply peak, counts the network's FLOPs
per training image (``torch.utils.flop_counter``) and reports achieved GFLOP/s, and breaks the first epoch
of the medclf loop into data, augmentation, forward, backward, optimizer and EMA time. Results:
``benchmarks/results/throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]


def cpu_flags() -> list[str]:
    """The vector extensions that decide CPU training speed (AVX-512 and its bf16/VNNI parts, AVX-VNNI,
    AMX), from /proc/cpuinfo: the 3x criterion is stated for an AVX-512 bf16 CPU."""
    import re

    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return []
    wanted = re.compile(r"^(avx512[a-z0-9_]*|avx_vnni[a-z0-9_]*|amx[a-z0-9_]*)$")
    return sorted({f for f in line.split(":", 1)[1].split() if wanted.match(f)})


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


class PlainJPEGDataset(Dataset):
    """Decode + greyscale + resize on every access: the usual per-sample pipeline."""

    def __init__(self, paths: list[str], labels: np.ndarray, size: int, flip: bool = True) -> None:
        self.paths, self.labels, self.size, self.flip = paths, labels, size, flip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        im = PILImage.open(self.paths[i]).convert("L").resize((self.size, self.size), PILImage.BILINEAR)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[i])


def plain_loop(
    paths: list[str],
    labels: np.ndarray,
    test_paths: list[str],
    test_labels: np.ndarray,
    size: int,
    batch: int,
    arch_kwargs: dict,
    n_classes: int,
    epochs: int,
) -> dict:
    from medclf.models import create_model

    torch.manual_seed(0)
    model = create_model("compact", 1, n_classes, 2, **arch_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    loader = DataLoader(
        PlainJPEGDataset(paths, labels, size),
        batch_size=batch,
        shuffle=True,
        num_workers=os.cpu_count() or 1,
        drop_last=True,
        persistent_workers=True,
    )
    steps = epochs * len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.2)
    model.train()
    seen, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
    dt = time.perf_counter() - t0
    model.eval()
    test = DataLoader(PlainJPEGDataset(test_paths, test_labels, size, flip=False), batch_size=128)
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x, _ in test]).numpy()
    return {
        "images": seen,
        "seconds": dt,
        "images_per_s": seen / dt,
        "epochs": epochs,
        "test_accuracy": float((pred == test_labels).mean()),
    }


def medclf_loop(data: Path, size: int, epochs: int) -> dict:
    """``epochs`` real epochs of medclf's loop (the first with a timing breakdown), then the clean test
    accuracy of its EMA model."""
    from medclf import training
    from medclf.data.cache import prepare
    from medclf.data.sources import load_source
    from medclf.data.splits import ensure_validation
    from medclf.planner import Plan, arch_kwargs_for, resolve_amp
    from medclf.preprocess import PreprocessSpec

    samples = ensure_validation(load_source(data), fraction=0.15, seed=0)
    spec = PreprocessSpec(size=(size, size))
    t = time.perf_counter()
    prepared = prepare(samples, spec, progress=False)
    prepare_s = time.perf_counter() - t
    plan = Plan(
        arch="compact",
        arch_kwargs=arch_kwargs_for("compact", size, 2),
        spec=spec,
        batch_size=64,
        epochs=epochs,
        lr=2e-3,
        weight_decay=0.05,
        augment="light",
        amp=resolve_amp("auto"),
        channels_last=True,
        ema=True,
        patience=100,
        label_smoothing=0.0,
    )
    splits = np.array(samples.splits)
    train_idx = np.flatnonzero(prepared.ok & (splits == "train"))
    val_idx = np.flatnonzero(prepared.ok & (splits == "val"))
    test_idx = np.flatnonzero(prepared.ok & (splits == "test") & ~prepared.train_copy)
    cfg = training.TrainConfig(seed=0)
    data = training.LoopData(samples, prepared, train_idx, val_idx)
    loop = training.Loop(plan, data, cfg)
    phases = {k: 0.0 for k in ("data", "augment", "forward", "backward", "optimizer", "ema")}
    n = 0
    loop.model.train()
    t_start = time.perf_counter()
    perm = torch.randperm(len(train_idx), generator=loop.gen)
    bs = plan.batch_size
    for start in range(0, len(perm) - bs + 1, bs):
        t0 = time.perf_counter()
        idx = perm[start : start + bs]
        x = loop.rows.train_x[idx].float()
        y = loop.rows.train_y[idx]
        t1 = time.perf_counter()
        x = loop.rows.aug(x, loop.gen).contiguous(memory_format=torch.channels_last)
        t2 = time.perf_counter()
        with loop.autocast():
            logits = loop.model(x)
        loss = F.cross_entropy(logits.float(), y, weight=loop.class_weights)
        t3 = time.perf_counter()
        loop.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t4 = time.perf_counter()
        loop.optimizer.step()
        loop.scheduler.step()
        t5 = time.perf_counter()
        loop.ema.update_parameters(loop.model)
        t6 = time.perf_counter()
        for k, a, b in (
            ("data", t0, t1),
            ("augment", t1, t2),
            ("forward", t2, t3),
            ("backward", t3, t4),
            ("optimizer", t4, t5),
            ("ema", t5, t6),
        ):
            phases[k] += b - a
        n += len(y)
    first_epoch_s = time.perf_counter() - t_start
    for epoch in range(1, epochs):
        loop.epoch = epoch
        loop.train_epoch()
        n += (len(train_idx) // bs) * bs
    train_s = time.perf_counter() - t_start
    x_test = torch.from_numpy(np.asarray(prepared.tensors[test_idx], dtype=np.float32))
    probs = loop.predict(x_test, loop.eval_model())
    test_accuracy = float((probs.argmax(1) == samples.labels[test_idx]).mean())
    # FLOPs of one training step (forward + backward) per image
    x = loop.rows.train_x[:bs].float().contiguous(memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(loop.model(x), loop.rows.train_y[:bs]).backward()
    flops_per_image = counter.get_total_flops() / bs
    return {
        "images": n,
        "seconds": train_s,
        "images_per_s": n / train_s,
        "epochs": epochs,
        "test_accuracy": test_accuracy,
        "n_test": len(test_idx),
        "first_epoch_phases_s": {k: round(v, 2) for k, v in phases.items()},
        "first_epoch_phases_share": {k: round(v / first_epoch_s, 3) for k, v in phases.items()},
        "prepare_once_s": round(prepare_s, 1),
        "train_flops_per_image": flops_per_image,
        "amp": plan.amp,
        "arch_kwargs": plan.arch_kwargs,
        "paths": [samples.refs[i] for i in train_idx],
        "labels": samples.labels[train_idx].tolist(),
        "test_paths": [samples.refs[i] for i in test_idx],
        "test_labels": samples.labels[test_idx].tolist(),
        "n_classes": len(samples.classes),
    }


def plain_in_fresh_process(job: dict) -> dict:
    """The plain loop in a process of its own: medclf's loop changes how this process's C heap behaves
    (``medclf.allocator``), and the plain loop must run as a plain script runs, on the C library's defaults."""
    with tempfile.TemporaryDirectory() as tmp:
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job))
        proc = subprocess.run(
            [sys.executable, __file__, "--plain-job", str(job_file)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"the plain loop failed:\n{proc.stderr[-2000:]}")
        return json.loads((Path(tmp) / "plain.json").read_text())


def run_plain_job(job_file: Path) -> None:
    job = json.loads(job_file.read_text())
    result = plain_loop(
        job["paths"],
        np.array(job["labels"]),
        job["test_paths"],
        np.array(job["test_labels"]),
        job["size"],
        job["batch"],
        job["arch_kwargs"],
        job["n_classes"],
        job["epochs"],
    )
    (job_file.parent / "plain.json").write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plain-job", type=Path, help=argparse.SUPPRESS)  # internal: the plain loop's process
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "brain-tumor-mri")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=3, help="epochs each loop trains before it is scored")
    args = ap.parse_args()
    if args.plain_job:
        return run_plain_job(args.plain_job)
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    from medclf import allocator, reporting

    with reporting.use(reporting.ConsoleReporter()):  # medclf's messages on stderr, as the CLI shows them
        ours = medclf_loop(args.data, args.size, epochs=args.epochs)
    job = {k: ours.pop(k) for k in ("paths", "labels", "test_paths", "test_labels", "n_classes")}
    job.update(size=args.size, batch=64, arch_kwargs=ours["arch_kwargs"], epochs=args.epochs)
    plain = plain_in_fresh_process(job)
    gflop = ours["train_flops_per_image"] / 1e9
    result = {
        "data": str(args.data),
        "size": args.size,
        "matmul_peak_gflops": {"fp32": round(peak32, 1), "bf16": round(peak16, 1)},
        "medclf": {**ours, "achieved_gflops": round(gflop * ours["images_per_s"], 1)},
        "plain": {**plain, "achieved_gflops": round(gflop * plain["images_per_s"], 1)},
        "speedup": round(ours["images_per_s"] / plain["images_per_s"], 2),
        "command": f"python benchmarks/throughput.py --data {os.path.relpath(args.data, ROOT)} --size {args.size} "
        f"--epochs {args.epochs}",
        "threads": torch.get_num_threads(),
        # medclf's loop keeps freed C-heap memory for the next step (medclf.allocator); the plain loop runs in
        # a fresh process on the C library's defaults.
        "medclf_keeps_freed_memory": allocator.keep_freed_memory(),
        "cpu_flags": cpu_flags(),
        "cpu": next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "?",
        ),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out = ROOT / "benchmarks" / "results" / "throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
