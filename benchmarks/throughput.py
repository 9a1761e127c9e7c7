"""Training throughput: medclf's default recipe against a plain PyTorch loop, and where the time goes.

    .venv/bin/python benchmarks/throughput.py [--data ../shared/datasets/brain-tumor-mri] [--size 96]

Both loops train the same network (the planner's default, ``compact``) on the same images at the same input
size and batch size:

* **plain**: a standard ``Dataset`` that decodes and resizes each JPEG on every access (PIL), a
  ``DataLoader`` with one worker per core, fp32, contiguous tensors, per-sample flips — what most training
  scripts do;
* **medclf**: the real training loop (``medclf.training._Loop``): preprocessed tensors cached once, batched
  augmentation, bf16 autocast and channels-last where the CPU supports them, EMA.

It also measures the machine's fp32 and bf16 matrix-multiply peak, counts the network's FLOPs per training
image (``torch.utils.flop_counter``) and reports achieved GFLOP/s, and breaks one epoch of the medclf loop
into data, augmentation, forward, backward, optimizer and EMA time. Results: ``benchmarks/results/throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


class PlainJPEGDataset(Dataset):
    """Decode + greyscale + resize on every access: the usual per-sample pipeline."""

    def __init__(self, paths: list[str], labels: np.ndarray, size: int) -> None:
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        im = PILImage.open(self.paths[i]).convert("L").resize((self.size, self.size), PILImage.BILINEAR)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[i])


def plain_loop(
    paths: list[str],
    labels: np.ndarray,
    size: int,
    batch: int,
    arch_kwargs: dict,
    n_classes: int,
    max_images: int,
) -> dict:
    from medclf.models import create_model

    torch.manual_seed(0)
    model = create_model("compact", 1, n_classes, 2, **arch_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(
        PlainJPEGDataset(paths, labels, size),
        batch_size=batch,
        shuffle=True,
        num_workers=os.cpu_count() or 1,
        drop_last=True,
        persistent_workers=False,
    )
    model.train()
    seen, t0, warm = 0, None, 2
    for step, (x, y) in enumerate(loader):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step + 1 == warm:
            t0 = time.perf_counter()
        elif step + 1 > warm:
            seen += len(y)
        if seen >= max_images:
            break
    dt = time.perf_counter() - t0
    return {"images": seen, "seconds": dt, "images_per_s": seen / dt}


def medclf_loop(data: Path, size: int, max_epochs: int) -> dict:
    """One (or more) real epochs of medclf's loop with a timing breakdown."""
    from rich.console import Console

    from medclf import training
    from medclf.data.cache import prepare
    from medclf.data.sources import load_source
    from medclf.data.splits import ensure_validation
    from medclf.planner import Plan, arch_kwargs_for, resolve_amp
    from medclf.preprocess import PreprocessSpec

    samples = ensure_validation(load_source(data), fraction=0.15, seed=0)
    spec = PreprocessSpec(size=(size, size))
    t = time.perf_counter()
    prepared = prepare(samples, spec, progress=False, console=Console(stderr=True))
    prepare_s = time.perf_counter() - t
    plan = Plan(
        arch="compact",
        arch_kwargs=arch_kwargs_for("compact", size, 2),
        spec=spec,
        batch_size=64,
        epochs=max_epochs,
        lr=2e-3,
        weight_decay=0.05,
        augment="light",
        amp=resolve_amp("auto"),
        channels_last=True,
        ema=True,
        patience=100,
        label_smoothing=0.0,
    )
    train_idx = np.flatnonzero(prepared.ok & (np.array(samples.splits) == "train"))
    val_idx = np.flatnonzero(prepared.ok & (np.array(samples.splits) == "val"))
    cfg = training.TrainConfig(seed=0)
    loop = training._Loop(
        plan,
        samples,
        prepared,
        train_idx,
        val_idx,
        cfg,
        "cpu",
        Path("/tmp/unused.ckpt"),
        Console(stderr=True),
        False,
    )
    phases = {k: 0.0 for k in ("data", "augment", "forward", "backward", "optimizer", "ema")}
    n = 0
    loop.model.train()
    t_epoch = time.perf_counter()
    perm = torch.randperm(len(train_idx), generator=loop.gen)
    bs = plan.batch_size
    for start in range(0, len(perm) - bs + 1, bs):
        t0 = time.perf_counter()
        idx = perm[start : start + bs]
        x = loop.train_x[idx].float()
        y = loop.train_y[idx]
        t1 = time.perf_counter()
        x = loop.aug(x, loop.gen).contiguous(memory_format=torch.channels_last)
        t2 = time.perf_counter()
        with loop._autocast():
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
    epoch_s = time.perf_counter() - t_epoch
    # FLOPs of one training step (forward + backward) per image
    x = loop.train_x[:bs].float().contiguous(memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(loop.model(x), loop.train_y[:bs]).backward()
    flops_per_image = counter.get_total_flops() / bs
    return {
        "images": n,
        "seconds": epoch_s,
        "images_per_s": n / epoch_s,
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "phases_share": {k: round(v / epoch_s, 3) for k, v in phases.items()},
        "prepare_once_s": round(prepare_s, 1),
        "train_flops_per_image": flops_per_image,
        "amp": plan.amp,
        "arch_kwargs": plan.arch_kwargs,
        "paths": [samples.refs[i] for i in train_idx],
        "labels": samples.labels[train_idx].tolist(),
        "n_classes": len(samples.classes),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "brain-tumor-mri")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--plain-images", type=int, default=1536, help="images timed in the plain loop")
    args = ap.parse_args()
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    ours = medclf_loop(args.data, args.size, max_epochs=1)
    paths, labels = ours.pop("paths"), np.array(ours.pop("labels"))
    plain = plain_loop(
        paths, labels, args.size, 64, ours["arch_kwargs"], ours.pop("n_classes"), args.plain_images
    )
    gflop = ours["train_flops_per_image"] / 1e9
    result = {
        "data": str(args.data),
        "size": args.size,
        "matmul_peak_gflops": {"fp32": round(peak32, 1), "bf16": round(peak16, 1)},
        "medclf": {**ours, "achieved_gflops": round(gflop * ours["images_per_s"], 1)},
        "plain": {**plain, "achieved_gflops": round(gflop * plain["images_per_s"], 1)},
        "speedup": round(ours["images_per_s"] / plain["images_per_s"], 2),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out = ROOT / "benchmarks" / "results" / "throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
