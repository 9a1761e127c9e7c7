"""``MODEL_CARD.md``: what a bundle is, what it was trained on, and the limits a user must know.

Written from the bundle manifest at training time (after Mitchell et al., "Model Cards for Model
Reporting", FAT* 2019): model, data, validation figures, and the known limitations, first of all the
shortcut check (acquisition cues that predict the label in the training data).
"""

from __future__ import annotations

from typing import Any

from medclf.data.shortcuts import cue_words


def model_card(manifest: dict[str, Any]) -> str:
    """The model card as Markdown, from a training manifest (see :func:`medclf.training.train`)."""
    model = manifest.get("model", {})
    recipe = manifest.get("recipe", {})
    data = manifest.get("data", {})
    val = manifest.get("metrics", {}).get("val", {})
    lines = [
        "# Model card",
        "",
        "## Model",
        f"- Architecture: {model.get('arch')} ({model.get('spatial_dims')}D, input "
        f"{manifest.get('input', {}).get('shape')})",
        f"- Classes: {', '.join(manifest.get('classes', []))}",
        f"- Augmentation: {recipe.get('augment')}; shortcut mitigation: {recipe.get('shortcut_mitigation', 'off')}",
        "",
        "## Training data",
        f"- Source: {data.get('source')} ({data.get('kind')}), counts per split and class: {data.get('counts')}",
        f"- Validation copies of training images left out of model selection: {data.get('n_val_train_copies')}",
        "",
        "## Validation (model selection split)",
        f"- n = {val.get('n')}, accuracy {_f(val.get('accuracy'))}, AUC {_f(val.get('auc'))}",
        "- The validation split comes from the same collection as the training data: it shares its sources, "
        "scanners and any confound between them and the labels.",
        "",
        "## Shortcut check",
        *shortcut_lines(manifest.get("shortcuts")),
        "",
        "## Intended use and limitations",
        "- Research use. Not a medical device; not validated for clinical decisions.",
        "- Validate on data from each site it will serve (external validation) before relying on it; scores on "
        "splits of the training collection do not show how it behaves on other scanners or populations.",
        "",
    ]
    return "\n".join(lines)


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


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.3f}"
