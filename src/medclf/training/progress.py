"""What a run shows while it trains: the plan, and a progress bar or one line per epoch."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.console import Console

from medclf import threads as threads_mod
from medclf.data.samples import SampleSet
from medclf.planner import Fingerprint, Plan


def print_plan(
    console: Console,
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
    console.print(
        f"[bold]Data[/] {samples.source} ({samples.kind}; {counts}; classes {', '.join(samples.classes)})"
    )
    console.print(
        f"[bold]Plan[/] arch={plan.arch} {plan.arch_kwargs} input={plan.spec.input_shape} "
        f"batch={plan.batch_size} epochs={plan.epochs} lr={plan.lr:g} augment={plan.augment} amp={plan.amp} "
        f"ema={plan.ema} denoise={plan.spec.denoise}"
    )
    for r in plan.reasons:
        console.print(f"  - {r}")
    if policy is not None:
        console.print(f"  - threads: {policy.describe()}")


class ProgressDisplay:
    """A live progress bar on a terminal (unless disabled); one plain line per epoch otherwise, so logs
    and CI output still show how training went."""

    def __init__(self, console: Console, total: int, start: int, enabled: bool) -> None:
        self.console, self.total = console, total
        self.live = enabled and console.is_terminal
        self.progress: Any = None
        self.start = start

    def __enter__(self) -> ProgressDisplay:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("epoch"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def update(
        self, row: dict[str, float], best: float, remaining_s: float, total: int | None = None
    ) -> None:
        if total is not None and total != self.total:
            self.total = total
            if self.progress is not None:
                self.progress.update(self.task, total=total)
        info = (
            f"loss {row['loss']:.4f}  val AUC {row['val_auc']:.4f} (best {best:.4f})  "
            f"acc {row['val_acc']:.3f}  left ~{remaining_s / 60:.1f} min"
        )
        if self.progress is not None:
            self.progress.update(self.task, completed=int(row["epoch"]), info=info)
        else:
            self.console.print(f"epoch {int(row['epoch'])}/{self.total}  {info}  ({row['seconds']:.1f} s)")

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
