"""Shortcut mitigation at training time: check the training split, then make acquisition cues useless.

:func:`shortcut_step` runs the shortcut check (:mod:`medclf.data.shortcuts`) on the training split, with
the cues the cache's decoding pass recorded, and with ``--shortcut-mitigation auto`` turns the mitigation
on when a class is flagged (``on``: always; ``off``: never, the check still runs and warns). The
mitigation has two parts, both written into the plan (and so into the bundle):

- augmentation: the planned preset gets the ``decue`` transforms appended (random padding, resolution
  loss, histogram/contrast curves, JPEG re-compression; :mod:`medclf.augment`), so the cues that told the
  sources apart vary within every class;
- sampling: training batches are drawn with :func:`group_balance_weights` over class x acquisition group
  (the group from the most telling flagged cue, e.g. the image size), so within each class the rare
  acquisition groups are seen more often. Weights are tempered (square root of full balance): a handful
  of images repeated fifty times per epoch would be memorised, not generalised from.

Preprocessing already takes away what it can for every model: the foreground crop removes empty borders,
and padding to a square before resizing keeps each image's aspect ratio (``PreprocessSpec.crop_foreground``,
``keep_aspect``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.markup import escape

from medclf import reporting
from medclf.data.acquisition import sample_cues
from medclf.data.samples import SampleSet
from medclf.data.scan import ScanResult
from medclf.data.shortcuts import ShortcutReport, check_shortcuts, group_labels_for_balance
from medclf.errors import ConfigError
from medclf.planner import Plan

MODES = ("auto", "on", "off")
DECUE = "decue"
# Exponent of the class x group balance: 1 = every group of a class weighs as much as any other, 0 = off.
BALANCE_POWER = 0.5


def check_mode(mode: str) -> str:
    """Validate ``--shortcut-mitigation`` (one-line ConfigError otherwise)."""
    if mode not in MODES:
        raise ConfigError(f"--shortcut-mitigation must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def group_balance_weights(
    labels: np.ndarray, groups: list[str], *, power: float = BALANCE_POWER
) -> np.ndarray:
    """Per-sample sampling weights that balance acquisition groups within each class.

    Within class ``c`` with ``G_c`` groups, a sample of group ``g`` (``n_cg`` samples) gets
    ``(n_c / (G_c n_cg)) ** power``; each class's weights are then rescaled to sum to ``n_c``, so the class
    mix (handled by the loss's class weights) is unchanged. ``power=1`` equalises the groups of a class,
    ``0`` gives uniform weights. Returns float64 weights with mean 1.
    """
    labels = np.asarray(labels)
    w = np.ones(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        names, inverse, counts = np.unique(
            np.array([groups[i] for i in members]), return_inverse=True, return_counts=True
        )
        raw = (len(members) / (len(names) * counts[inverse])) ** power
        w[members] = raw * len(members) / raw.sum()
    return w / w.mean() if len(w) else w


def shortcut_step(
    plan: Plan,
    samples: SampleSet,
    scan_result: ScanResult,
    train_idx: np.ndarray,
    *,
    mode: str,
    decide: bool,
    seed: int = 0,
    workers: int = 1,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Check the training split for shortcuts and (``decide``) set the plan's mitigation.

    Returns the bundle manifest's ``shortcuts`` section and the per-training-sample sampling weights
    (``None`` for plain shuffling). ``decide=False`` (a resumed run) keeps the plan's decision.
    """
    rep = reporting.current()
    cues = scan_result.cues
    if cues is None or len(cues) != len(samples):
        # A cache written before cues were recorded: header cues only (no pixel decoding).
        cues = sample_cues(samples, workers=workers)
    report = check_shortcuts(samples, cues, indices=train_idx, seed=seed)
    for text in report.warnings():
        rep.print(f"[bold yellow]![/] {escape(text)}")
    if decide:
        _decide(plan, report, mode)
        if plan.shortcut_mitigation == "on" or report.flagged:
            rep.print(f"  - {escape(plan.reasons[-1])}")
    weights = None
    if plan.balance_by:
        sub = samples.subset(train_idx)
        groups = group_labels_for_balance(sub, [cues[i] for i in train_idx], plan.balance_by)
        weights = group_balance_weights(sub.labels, groups)
    report.mitigation = plan.shortcut_mitigation
    section = report.to_manifest()
    section.update(
        mode=mode, augment=plan.augment, balance_by=list(plan.balance_by), balance_power=BALANCE_POWER
    )
    return section, weights


def _decide(plan: Plan, report: ShortcutReport, mode: str) -> None:
    flagged = report.flagged
    if mode == "off" or (mode == "auto" and not flagged):
        plan.shortcut_mitigation = "off"
        if flagged:
            plan.reasons.append(
                "shortcut check flagged acquisition cues; mitigation off (--shortcut-mitigation off)"
            )
        return
    plan.shortcut_mitigation = "on"
    parts = [p for p in plan.augment.split("+") if p != "none"]
    if DECUE not in parts:
        parts.append(DECUE)
    plan.augment = "+".join(parts)
    keys = report.flagged_keys or _best_keys(report)
    plan.balance_by = keys[:1]
    why = (
        f"shortcut check flagged {', '.join(c.cls for c in report.flagged_classes)}"
        if flagged
        else "--shortcut-mitigation on"
    )
    balance = f"; sampling balanced over class x {plan.balance_by[0]}" if plan.balance_by else ""
    plan.reasons.append(f"{why}: shortcut mitigation on, augmentation '{plan.augment}'{balance}")


def _best_keys(report: ShortcutReport) -> list[str]:
    """Group keys of the strongest cues of any class (for ``on`` when nothing was flagged)."""
    from medclf.data.shortcuts import CUE_GROUP_KEY

    best: dict[str, float] = {}
    for c in report.per_class:
        for cue in c.top_cues:
            key = CUE_GROUP_KEY.get(cue) or (cue[7:] if cue.startswith("column:") else None)
            if key:
                best[key] = max(best.get(key, 0.0), c.cue_aucs[cue])
    return sorted(best, key=lambda k: -best[k])
