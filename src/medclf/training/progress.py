"""What a run shows while it trains (through :mod:`medclf.reporting`): the plan, and a progress bar or one
line per epoch."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from medclf import reporting
from medclf import threads as threads_mod
from medclf.data.samples import SampleSet
from medclf.planner import Fingerprint, Plan


def print_plan(
    plan: Plan,
    fp: Fingerprint,
    samples: SampleSet,
    policy: threads_mod.ThreadPolicy | None = None,
) -> None:
    """The data, the plan and the reasons for its choices, and the thread policy."""
    summary = samples.summary()
    if samples.task == "multilabel":  # images per split (the summary counts findings)
        summary = {
            s: {"images": int((samples.known & (np.array(samples.splits) == s)).sum())} for s in summary
        }
    counts = ", ".join(f"{s}: {sum(c.values())}" for s, c in summary.items())
    rep = reporting.current()
    rep.print(
        f"[bold]Data[/] {samples.source} ({samples.kind}; {counts}; classes {', '.join(samples.classes)})"
    )
    rep.print(
        f"[bold]Plan[/] arch={plan.arch} {plan.arch_kwargs} input={plan.spec.input_shape} "
        f"batch={plan.batch_size} epochs={plan.epochs} lr={plan.lr:g} augment={plan.augment} amp={plan.amp} "
        f"ema={plan.ema} denoise={plan.spec.denoise}"
    )
    for r in plan.reasons:
        rep.print(f"  - {r}")
    if policy is not None:
        rep.print(f"  - threads: {policy.describe()}")


class ProgressDisplay:
    """A live progress bar where the reporter draws one (unless disabled); one plain line per epoch
    otherwise, so logs and CI output still show how training went."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.reporter = reporting.current()
        self.total, self.start = total, start
        self.live = enabled and self.reporter.live
        self.bar: reporting.ProgressBar | None = None
        self._exit = contextlib.ExitStack()

    def __enter__(self) -> ProgressDisplay:
        if self.live:
            self.bar = self._exit.enter_context(
                self.reporter.progress(
                    "epoch", self.total, completed=self.start, info=True, transient=False, clock="elapsed"
                )
            )
        return self

    def update(
        self, row: dict[str, float], best: float, remaining_s: float, total: int | None = None
    ) -> None:
        if total is not None:
            self.total = total
        info = (
            f"loss {row['loss']:.4f}  val AUC {row['val_auc']:.4f} (best {best:.4f})  "
            f"acc {row['val_acc']:.3f}  left ~{remaining_s / 60:.1f} min"
        )
        if self.bar is not None:
            self.bar.update(completed=int(row["epoch"]), total=self.total, info=info)
        else:
            self.reporter.print(f"epoch {int(row['epoch'])}/{self.total}  {info}  ({row['seconds']:.1f} s)")

    def __exit__(self, *exc: Any) -> None:
        self._exit.__exit__(*exc)
