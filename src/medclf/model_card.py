"""``MODEL_CARD.md``: what a bundle is, what it was trained on, how well it did, and the limits a user must know.

Written from the bundle manifest by everything that writes a bundle (training, fusion, export/compression,
recalibration), in the sections of Mitchell et al., "Model Cards for Model Reporting" (FAT* 2019): intended
use, model, data, evaluation with intervals, the shortcut check and subgroup findings when present, the
out-of-distribution guard, limitations. Every figure comes from the manifest; nothing is typed in by hand.
"""

from __future__ import annotations

from typing import Any

from medclf.data.shortcuts import cue_words

__all__ = ["MODEL_CARD", "model_card", "shortcut_lines"]

MODEL_CARD = "MODEL_CARD.md"
NOT_FOR_DIAGNOSIS = (
    "**Not for diagnosis.** Research software, not a medical device: its outputs must not be used for clinical "
    "decisions."
)


def model_card(manifest: dict[str, Any]) -> str:
    """The model card as Markdown, from a bundle manifest (``bundle.json`` before sealing)."""
    sections = [
        ["# Model card", "", NOT_FOR_DIAGNOSIS],
        _intended_use(manifest),
        _model(manifest),
        _data(manifest),
        _training(manifest),
        _evaluation(manifest),
        ["## Shortcut check", "", *shortcut_lines(manifest.get("shortcuts"))],
        _subgroups(manifest),
        _ood(manifest),
        _limitations(manifest),
    ]
    return "\n\n".join("\n".join(s) for s in sections if s).rstrip() + "\n"


def _intended_use(m: dict[str, Any]) -> list[str]:
    data = m.get("data", {})
    classes = ", ".join(str(c) for c in m.get("classes", []))
    lines = [
        "## Intended use",
        "",
        f"- Task: assign one of {len(m.get('classes', []))} classes ({classes}) to an image like those of the "
        f"training data (`{data.get('source', '?')}`, {data.get('kind', '?')}).",
        "- Intended users: researchers and engineers evaluating medical image classifiers. Out of scope: "
        "diagnosis, triage or any decision about a patient; images of another modality, body part or "
        "acquisition than the training data (the out-of-distribution guard flags some, not all, of them).",
    ]
    op = m.get("operating_point")
    if op:
        lines.append(f"- Decision rule for the yes/no answer (`decision`): {op.get('rule', '?')}.")
    return lines


def _model(m: dict[str, Any]) -> list[str]:
    model, recipe = m.get("model", {}), m.get("recipe", {})
    shape = m.get("input", {}).get("shape")
    lines = ["## Model", ""]
    ensemble = m.get("ensemble")
    if ensemble or recipe.get("kind") == "ensemble":
        members = (ensemble or {}).get("members") or []
        lines.append(
            f"- Ensemble ({recipe.get('method', (ensemble or {}).get('method', '?'))}) of {len(members)} "
            f"members; input {shape}"
        )
    else:
        lines.append(
            f"- Architecture: {model.get('arch')} {model.get('kwargs') or ''}, {model.get('spatial_dims')}D, "
            f"input {shape}"
        )
    cal = m.get("calibration") or {}
    per = cal.get("temperatures")
    if isinstance(per, dict) and per:  # multi-label: one per finding
        shown = ", ".join(f"{name} {_f(t, 3)}" for name, t in per.items())
        lines.append(
            f"- Calibration: temperature per finding {shown} ({cal.get('fitted_on', 'validation split')})"
        )
    elif cal.get("temperature") is not None:
        lines.append(
            f"- Calibration: temperature {_f(cal['temperature'], 4)} ({cal.get('fitted_on', 'validation split')})"
        )
    comp = m.get("compression")
    if comp:
        steps = ", ".join(str(s.get("step")) for s in comp.get("steps", []))
        lines.append(
            f"- Compressed from bundle {str(comp.get('source', {}).get('sha256', '?'))[:12]} ({steps}); "
            f"default engine {comp.get('default_engine')}"
        )
    rec = m.get("recalibration")
    if rec:
        lines.append(
            f"- Recalibrated from bundle {str(rec.get('source_bundle_sha256', '?'))[:12]} on a site sample "
            "(`medclf recalibrate`)"
        )
    return lines


def _data(m: dict[str, Any]) -> list[str]:
    data = m.get("data", {})
    lines = ["## Data", "", f"- Source: `{data.get('source', '?')}` ({data.get('kind', '?')})"]
    counts = data.get("counts")
    if isinstance(counts, dict) and counts:
        for split, per_class in counts.items():
            if isinstance(per_class, dict):
                text = ", ".join(f"{c} {n}" for c, n in per_class.items())
                lines.append(f"- {split}: {text}")
            else:
                lines.append(f"- {split}: {per_class}")
    if data.get("n_unreadable"):
        lines.append(f"- Unreadable files left out: {data['n_unreadable']}")
    if data.get("n_val_train_copies") is not None:
        lines.append(
            f"- Validation images that copy a training image, left out of model selection: "
            f"{data['n_val_train_copies']}"
        )
    return lines


def _training(m: dict[str, Any]) -> list[str]:
    recipe = m.get("recipe", {})
    if recipe.get("kind") == "ensemble" or not recipe:
        return []
    lines = ["## Training", ""]
    budget = recipe.get("time_budget_s")
    sched = recipe.get("schedule") or {}
    lines.append(
        f"- Time budget {_duration(budget)}, {recipe.get('seconds', '?')} s used; epochs run "
        f"{recipe.get('epochs_run', '?')} of {sched.get('planned_epochs', '?')} planned; best epoch "
        f"{recipe.get('best_epoch', '?')}"
    )
    if sched:
        done = (
            "completed (learning rate annealed)" if sched.get("completed") else "**cut before it annealed**"
        )
        lines.append(f"- Schedule ({sched.get('mode', '?')}): {done}")
    if recipe.get("augmentation") or recipe.get("augment"):
        lines.append(f"- Augmentation: {recipe.get('augmentation') or recipe.get('augment')}")
    lines.append(f"- Shortcut mitigation: {recipe.get('shortcut_mitigation', 'off')}")
    cpu = recipe.get("cpu") or {}
    if cpu:
        lines.append(f"- Device {recipe.get('device', '?')}, threads {cpu.get('threads', '?')}")
    return lines


def _evaluation(m: dict[str, Any]) -> list[str]:
    val = (m.get("metrics") or {}).get("val") or {}
    lines = ["## Evaluation", ""]
    if not val:
        lines.append("- No validation figures in this bundle.")
    else:
        ci = val.get("ci") or {}
        level = ci.get("level", 0.95)
        lines.append(
            f"Validation split (n = {val.get('n')}, drawn from the training collection; "
            f"{round(100 * level)} % percentile-bootstrap intervals where computed):"
        )
        lines.append("")
        lines.append(f"- Accuracy {_ci(val.get('accuracy'), ci.get('accuracy'))}")
        if val.get("balanced_accuracy") is not None:
            lines.append(
                f"- Balanced accuracy {_ci(val.get('balanced_accuracy'), ci.get('balanced_accuracy'))}"
            )
        if val.get("auc") is not None:
            lines.append(
                f"- AUC {_ci(val.get('auc'), ci.get('auc'))} ({val.get('auc_definition', '')})".rstrip()
            )
        if val.get("ece") is not None:
            lines.append(f"- Expected calibration error {_f(val.get('ece'))}")
        per_class = val.get("per_class") or {}
        if per_class:
            lines += ["", "| class | n | sensitivity | specificity | AUC |", "|---|---|---|---|---|"]
            for name, c in per_class.items():
                lines.append(
                    f"| {name} | {c.get('support', '')} | {_f(c.get('sensitivity'))} | "
                    f"{_f(c.get('specificity'))} | {_f(c.get('auc'))} |"
                )
    gate = m.get("sanity")
    if gate:
        lines.append("")
        majority = gate.get("majority") or {}
        baseline = gate.get("baseline") or {}
        refs = f"majority class ({majority.get('class', '?')}) accuracy {_f(majority.get('accuracy'))}"
        if baseline:
            refs += f", thumbnail baseline accuracy {_f(baseline.get('accuracy'))}"
        if gate.get("passed", True):
            lines.append(f"- Sanity gate: passed ({refs})")
        else:
            lines.append(f"- **Sanity gate FAILED** ({refs}): " + "; ".join(gate.get("warnings", [])))
    op = m.get("operating_point")
    if op:
        achieved = op.get("achieved") or {}
        intervals = achieved.get("ci") or {}
        parts = [
            f"{key} {_ci(achieved[key], intervals.get(key))}"
            for key in ("sensitivity", "specificity")
            if isinstance(achieved.get(key), (int, float))
        ]
        lines.append(
            f"- Operating point: {op.get('rule', '?')}"
            + (f"; on the site sample it was fitted on: {', '.join(parts)}" if parts else "")
            + " (optimistic: confirm with `medclf evaluate` on other images from the site)"
        )
    comp = m.get("compression") or {}
    for engine, figures in (comp.get("val_after") or {}).items():
        if isinstance(figures, dict) and figures.get("accuracy") is not None:
            lines.append(
                f"- After compression, engine {engine}: validation accuracy {_f(figures['accuracy'])}"
            )
    return lines


def _subgroups(m: dict[str, Any]) -> list[str]:
    shortcuts = m.get("shortcuts") or {}
    keys = shortcuts.get("flagged_keys") or []
    lines = ["## Subgroups", ""]
    sub = m.get("subgroups")
    if sub:  # a manifest that carries subgroup findings (none written by medclf today)
        for key, found in sub.items():
            lines.append(f"- {key}: {found}")
    elif keys:
        lines.append(
            "- The shortcut check flagged acquisition groups; this bundle holds no subgroup figures. Measure them "
            f"on your test data: `medclf evaluate BUNDLE DATA --by {','.join(keys[:2])}`."
        )
    else:
        lines.append(
            "- No subgroup figures in this bundle: `medclf evaluate BUNDLE DATA --by KEY` (a manifest column, "
            "`size`, `format`, a DICOM keyword) reports each group with intervals."
        )
    return lines


def _ood(m: dict[str, Any]) -> list[str]:
    ood = m.get("ood")
    if not ood:
        return ["## Out-of-distribution guard", "", "- None in this bundle: every input gets a class."]
    return [
        "## Out-of-distribution guard",
        "",
        f"- {ood.get('method', '?')}; threshold {_f(ood.get('threshold'))} "
        f"({ood.get('threshold_from', 'validation split')}). Inputs above it are answered with a warning "
        "(`ood: true`) and get no finding in a DICOM SR.",
    ]


def _limitations(m: dict[str, Any]) -> list[str]:
    lines = [
        "## Limitations",
        "",
        "- The validation figures come from the training collection: they share its sources, scanners and any "
        "confound between them and the labels, so they do not show how the model behaves elsewhere. Validate on "
        "data from each site it will serve (`medclf evaluate --class-map`, `--by`) before relying on it.",
    ]
    if (m.get("shortcuts") or {}).get("flagged"):
        lines.append(
            "- The shortcut check found acquisition cues that predict the label: the model may have learnt the "
            "source rather than the finding (see above)."
        )
    gate = m.get("sanity") or {}
    if gate and not gate.get("passed", True):
        lines.append("- The sanity gate failed: the model is not clearly better than trivial answers.")
    lines.append(f"- {NOT_FOR_DIAGNOSIS}")
    return lines


def shortcut_lines(section: dict[str, Any] | None) -> list[str]:
    """The shortcut check of a bundle manifest as Markdown bullet lines (also used by reports)."""
    if not section:
        return ["- Not run (bundle made before the shortcut check existed)."]
    if not section.get("checked"):
        return [f"- Not run: {'; '.join(section.get('notes', [])) or 'skipped'}."]
    out = []
    if section.get("flagged"):
        out.append(
            "- **Warning: possible shortcut.** Acquisition cues alone (not the image content) predict these "
            "classes in the training data. A model can learn the source instead of the disease; test scores on "
            "splits that share the confound will not reveal it. Evaluate by acquisition group "
            f"(`medclf evaluate --by {','.join(section.get('flagged_keys', [])[:2]) or 'size'}`) and on "
            "external data."
        )
    else:
        out.append(
            f"- No class is predicted by acquisition cues alone (cue-only AUC below {section.get('threshold')} "
            "or not clearly above chance)."
        )
    for cls, c in section.get("per_class", {}).items():
        if c.get("auc") is None:
            continue
        ci = c.get("ci") or [None, None]
        cues = ", ".join(cue_words(k) for k in c.get("cues", [])) or "-"
        flag = " **flagged**" if c.get("flagged") else ""
        out.append(
            f"- {cls}: cue-only AUC {_f(c['auc'])} (95% CI {_f(ci[0])}-{_f(ci[1])}){flag}; cues: {cues}"
        )
    out.append(f"- Mitigation: {section.get('mitigation', 'off')}")
    return out


def _ci(value: Any, interval: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(interval, (list, tuple)) and len(interval) == 2 and None not in interval:
        return f"{_f(value)} ({_f(interval[0])}-{_f(interval[1])})"
    return _f(value)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "none (fixed epochs)"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _f(v: Any, digits: int = 3) -> str:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return "n/a" if v is None else str(v)
    return f"{float(v):.{digits}f}"
