"""What the shortcut mitigation's augmentation costs: time per batch of each ``decue`` transform.

    .venv/bin/python benchmarks/decue_cost.py [--size 96] [--batch 64] [--images 5712] [--repeats 20]

Times every transform of the ``decue`` preset (random padding, resolution loss, histogram curves, JPEG
re-compression), applied as in training (each with its own probability, to whole batches of random images in
[0, 1]), and the ``light`` preset for comparison; prints milliseconds per batch and the seconds they add to
one epoch of ``--images`` training images (default: the brain set's Training split). The mitigation's other
part, weighted sampling, costs one ``torch.multinomial`` per epoch. The full cost in context (epochs that fit
a budget) is in ``benchmarks/stress.py``'s ``seconds_per_epoch``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from medclf.augment import build_augmentation, decue_transforms


def per_batch_ms(fn, x: torch.Tensor, repeats: int) -> float:
    gen = torch.Generator().manual_seed(0)
    fn(x, gen)  # warm-up (first-call allocations, MONAI/PIL imports)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(x, gen)
    return 1000 * (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--images", type=int, default=5712, help="training images per epoch")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    x = torch.rand(args.batch, 1, args.size, args.size, generator=torch.Generator().manual_seed(1))
    batches = args.images / args.batch
    rows = {}
    for t in decue_transforms(2):
        rows[type(t).__name__ + f" (p={t.p})"] = per_batch_ms(t, x, args.repeats)
    rows["decue preset (all four)"] = per_batch_ms(build_augmentation("decue"), x, args.repeats)
    rows["light preset (for comparison)"] = per_batch_ms(build_augmentation("light"), x, args.repeats)
    print(f"batch {args.batch} x 1 x {args.size} x {args.size}, {torch.get_num_threads()} torch threads")
    print(f"{'transform':40s} {'ms/batch':>9s} {'s/epoch':>8s}")
    for name, ms in rows.items():
        print(f"{name:40s} {ms:9.1f} {ms * batches / 1000:8.1f}")
    print(json.dumps({"size": args.size, "batch": args.batch, "images": args.images, "ms_per_batch": rows}))


if __name__ == "__main__":
    main()
