"""The time an early stop left (:func:`use_leftover_budget`): more members with other seeds on the first
member's plan and validation split, fused by their mean, without ever costing the first model."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from medclf import sanity
from medclf.budget import MIN_RUN_S, Budget, member_seconds
from medclf.bundle import WEIGHTS, load_bundle, save_bundle, update_bundle
from medclf.errors import MedclfError
from medclf.fusion import EnsembleResult
from medclf.planner import Plan
from medclf.training.bag import Bag
from medclf.training.config import TrainConfig, TrainResult
from medclf.training.run import train_one

# At most this many members in all, the first included.
MAX_LEFTOVER_MEMBERS = 5


def use_leftover_budget(
    first: TrainResult,
    data: str | Path,
    out: Path,
    cfg: TrainConfig,
    budget: Budget,
    progress: bool,
    console: Console,
) -> TrainResult:
    """When training stopped early, spend the rest of the time budget on more members (other seeds, the
    same validation split and plan) and fuse them by their mean: small datasets converge in a fraction of
    the budget, and their noisy validation split makes one model a lottery ticket.

    This never costs the first model: ``out`` keeps its bundle until the fused one replaces it (atomically),
    every extra member trains on the first member's plan (same preprocessing, dimensions and channels), and
    when a member or the fusion fails for any reason the best single member becomes the bundle and the
    failure is reported (console, ``bundle.json`` ``leftover``, ``TrainResult.leftover_failure``)."""
    left = budget.left()
    per_member = leftover_member_seconds(first.history, first.best_epoch)
    budget.reserve_leftover_fusion()
    n_more = min(MAX_LEFTOVER_MEMBERS - 1, int(budget.available() // per_member))
    if n_more < 1:
        return first
    bag = Bag(data, out, cfg, budget, progress=progress, console=console)
    shutil.rmtree(bag.work, ignore_errors=True)
    bag.work.mkdir(parents=True)
    members = [bag.work / "member-0"]
    shutil.copytree(out, members[0])
    console.print(
        f"[bold]Early stop left {left / 60:.1f} min of the budget[/]: training {n_more} more member(s) with "
        "other seeds on the same validation split, then fusing them by their mean (seed bagging)"
    )
    more, failure = _train_more(bag, first, n_more)
    members += more
    fused = None
    if len(members) >= 2:
        recipe = {
            "bagging": "seeds (time left after an early stop)",
            "members": len(members),
            "seed": cfg.seed,
        }
        try:
            fused = bag.fuse(members, "mean", recipe)
        except Exception as exc:
            failure = (
                failure + "; " if failure else ""
            ) + f"fusing {len(members)} members failed: {_one_line(exc)}"
    if fused is None:
        result = _keep_best_member(first, members, out, failure or "no extra member finished", console)
    else:
        result = _fused(first, fused, members, failure, out, cfg)
    bag.clean()
    return replace(result, seconds=budget.elapsed())


def leftover_member_seconds(history: list[dict[str, Any]], best_epoch: int) -> float:
    """What one extra member costs: the time the first member took to reach its best epoch, plus headroom.

    Later members skip decoding (cached) and planning, and their schedules follow their own share of the
    clock, so a member given this much anneals within as many epochs as the first needed for its best
    model. (Pricing a member at the first run's whole training time, patience included, fitted none after
    a late early stop: BreastMNIST, 10 min, a busy CPU, left 280 s unused.)"""
    return member_seconds(sum(h["seconds"] for h in history[: max(best_epoch, 1)]))


def _train_more(bag: Bag, first: TrainResult, n_more: int) -> tuple[list[Path], str | None]:
    """Members 2 to ``n_more + 1``, each with an equal share of what is left; the members that finished,
    and why the next one did not (None: all did)."""
    # The first member's measured pace decides the others' epochs.
    base = Plan.from_dict(first.plan.to_dict())
    if first.history:
        base.epoch_seconds = float(np.mean([h["seconds"] for h in first.history]))
    members: list[Path] = []
    for k in range(1, n_more + 1):
        member = bag.work / f"member-{k}"
        share = bag.budget.share(n_more + 1 - k)
        try:
            train_one(
                bag.data,
                member,
                config=bag.member_config(k, share, seeds=True),
                progress=bag.progress,
                console=bag.console,
                budget=bag.budget.child(max(share, MIN_RUN_S)),
                base_plan=base,
            )
        except Exception as exc:  # the members trained so far (and the first bundle) stay
            return members, f"member {k + 1} failed: {_one_line(exc)}"
        members.append(member)
    return members, None


def _fused(
    first: TrainResult,
    fused: EnsembleResult,
    members: list[Path],
    failure: str | None,
    out: Path,
    cfg: TrainConfig,
) -> TrainResult:
    """The result of a fused leftover bag: the sanity verdict judged again and the first member's run
    recorded in the bundle."""
    verdict = sanity.judge(fused.val_metrics or first.val_metrics, first.references or {}, first.schedule)
    # The first member's run, which the fused bundle's own record (an ensemble) does not hold.
    leftover = {
        "members": len(members),
        "failure": failure,
        "first_member": {
            "schedule": first.schedule,
            "epoch_seconds": [h["seconds"] for h in first.history],
        },
    }
    update_bundle(out, {"sanity": verdict.to_dict(), "leftover": leftover})
    return replace(
        first,
        bundle=fused.bundle,
        val_metrics=fused.val_metrics or first.val_metrics,
        members=members if cfg.keep_checkpoints else [],
        sanity=verdict.to_dict(),
        leftover_failure=failure,
    )


def _keep_best_member(
    first: TrainResult, members: list[Path], out: Path, failure: str, console: Console
) -> TrainResult:
    """The fallback when the leftover members cannot be fused: the member with the best validation AUC
    (then accuracy) becomes the bundle at ``out``, which records why (``leftover``)."""

    def score(path: Path) -> tuple[float, float]:
        val = load_bundle(path).manifest.get("metrics", {}).get("val", {})
        return (val.get("auc") or -1.0, val.get("accuracy") or -1.0)

    best = max(members, key=score)
    console.print(
        f"[bold yellow]warning:[/] the leftover-budget ensemble was not made ({failure}); keeping the best "
        f"single member ({best.name}, of {len(members)}) as the bundle"
    )
    b = load_bundle(best)
    manifest = {k: v for k, v in b.manifest.items() if k not in ("files", "self_sha256")}
    manifest["leftover"] = {"members": len(members), "failure": failure, "kept": best.name}
    extra = {name: b.path / name for name in b.manifest["files"] if name != WEIGHTS}
    save_bundle(out, model=b.model, manifest=manifest, extra_files=extra)
    return replace(
        first,
        val_metrics=manifest.get("metrics", {}).get("val", first.val_metrics),
        best_epoch=int(manifest.get("recipe", {}).get("best_epoch", first.best_epoch)),
        history=manifest.get("history", first.history),
        sanity=manifest.get("sanity", first.sanity),
        leftover_failure=failure,
    )


def _one_line(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, MedclfError) else f"{type(exc).__name__}: {exc}"
    return " ".join(str(text).split())[:300]
