"""Training-step speed of the default ``compact`` network with its stem as it is, and with the stem's
max-pool moved before its batch norm and ReLU (``stem_pool_first=True``; new plans get it when
``medclf.planner.STEM_POOL_FIRST`` is on, e.g. ``MEDCLF_STEM_POOL_FIRST=1`` for measuring accuracy).

    .venv/bin/python benchmarks/stem_order.py [--size 96] [--batch 64] [--compile]

The stem of ``compact`` with ``stem_stride=2`` runs conv -> batch norm -> ReLU at full resolution and then
max-pools; the batch norm, ReLU and their backward passes are memory-bound there. ReLU commutes with
max-pooling; batch norm after the pool normalises pooled responses instead (a different network, so its
accuracy must be measured before any adoption). Each setting: 3 warm-up steps, then the best of 3 rounds of
10 steps (forward, backward, AdamW) on random inputs. Prints img/s; writes nothing.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from medclf.models import create_model


def step_rate(pool_first: bool, size: int, batch: int, bf16: bool, compile_: bool) -> float:
    torch.manual_seed(0)
    model = create_model("compact", 1, 4, 2, stem_stride=2, stem_pool_first=pool_first)
    x = torch.randn(batch, 1, size, size)
    if bf16:  # the default recipe's setting on a CPU with AVX-512 bf16
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    y = torch.randint(0, 4, (batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if compile_ else model

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = forward(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(10):
            step()
        best = min(best, (time.perf_counter() - t) / 10)
    return batch / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="torch.compile the network too")
    args = ap.parse_args()
    print(f"compact, stem_stride 2, {args.size} px, batch {args.batch}, {torch.get_num_threads()} threads")
    for bf16, label in ((True, "bf16 autocast, channels-last"), (False, "fp32, contiguous")):
        as_is = step_rate(False, args.size, args.batch, bf16, args.compile)
        moved = step_rate(True, args.size, args.batch, bf16, args.compile)
        print(
            f"{label}: stem as is {as_is:.1f} img/s, pool first {moved:.1f} img/s ({moved / as_is - 1:+.0%})"
        )


if __name__ == "__main__":
    main()
