"""How much do models agree on a test set, and how far could combining them go?

    .venv/bin/python benchmarks/agreement.py NAME=EVAL_DIR [NAME=EVAL_DIR ...] [--positive CLASS]
        [--combine NAME+NAME ...]

Each EVAL_DIR is the output folder of ``medclf evaluate`` (or ``medclf baseline``) on the same data, holding
``predictions.csv``. For a binary task it prints each model's test AUC and accuracy, the correlation of the
models' logits (models that make the same errors gain nothing from being averaged), the AUC and accuracy of
the requested probability averages, and, for each model, the best accuracy any threshold reaches. That last
figure picks the threshold on the test labels themselves: it is an upper bound for diagnosis only, never a
result.

Example (the PneumoniaMNIST rows of ``benchmarks/run.py``):

    .venv/bin/python benchmarks/agreement.py ens=runs/bench/pneumonia-ensemble/eval-mean-tta \\
        default=runs/bench/pneumonia-default/eval svm=runs/bench/pneumonia-baseline/baseline \\
        --combine ens+default ens+svm
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score


def _fail(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    raise SystemExit(2)


def _load(folder: Path, positive: str | None) -> tuple[pd.Series, np.ndarray, str]:
    csv = folder / "predictions.csv"
    if not csv.is_file():
        _fail(f"{csv} not found: give the output folder of `medclf evaluate`")
    d = pd.read_csv(csv)
    classes = [c.removeprefix("prob_") for c in d.columns if c.startswith("prob_")]
    if len(classes) != 2:
        _fail(f"{csv}: {len(classes)} classes; this diagnostic is for binary tasks")
    pos = positive or classes[1]
    if pos not in classes:
        _fail(f"{csv}: no class {pos!r} (classes: {', '.join(classes)})")
    return d.set_index("path")["label"], d.set_index("path")[f"prob_{pos}"].to_numpy(), pos


def best_threshold_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    """Highest accuracy over all thresholds (chosen on these very labels: an upper bound only)."""
    order = np.argsort(-p)
    # Predicting the top k as positive: correct = positives among them + negatives outside them.
    tp = np.concatenate([[0], np.cumsum(y[order])])
    k = np.arange(len(y) + 1)
    correct = tp + ((len(y) - y.sum()) - (k - tp))
    return float(correct.max() / len(y))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", metavar="NAME=EVAL_DIR")
    ap.add_argument("--positive", help="the positive class (default: the second class)")
    ap.add_argument("--combine", nargs="*", default=[], metavar="NAME+NAME", help="probability averages")
    args = ap.parse_args(argv)

    labels, probs, positive = None, {}, None
    for item in args.models:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            _fail(f"{item!r}: write NAME=EVAL_DIR")
        lab, p, positive = _load(Path(folder), args.positive)
        if labels is None:
            labels = lab
        elif not lab.index.equals(labels.index) or not (lab == labels).all():
            _fail(f"{folder}: not the same test samples and labels as the first model")
        probs[name] = p
    assert labels is not None
    y = (labels == positive).to_numpy()

    print(f"n={len(y)}, positive class {positive!r} ({y.mean():.1%})")
    print(f"{'model':<24} {'AUC':>7} {'acc@0.5':>8} {'best-threshold acc (bound)':>27}")

    def line(name: str, p: np.ndarray) -> None:
        auc, acc = roc_auc_score(y, p), float(((p >= 0.5) == y).mean())
        print(f"{name:<24} {auc:7.4f} {acc:8.4f} {best_threshold_accuracy(y, p):27.4f}")

    for name, p in probs.items():
        line(name, p)
    for combo in args.combine:
        names = combo.split("+")
        unknown = [n for n in names if n not in probs]
        if unknown:
            _fail(f"--combine {combo}: unknown model(s) {', '.join(unknown)}")
        line(f"mean({combo})", np.mean([probs[n] for n in names], axis=0))

    if len(probs) > 1:
        clipped = {k: np.clip(v, 1e-6, 1 - 1e-6) for k, v in probs.items()}
        logits = np.array([np.log(v / (1 - v)) for v in clipped.values()])
        corr = np.corrcoef(logits)
        names = list(probs)
        print("\nlogit correlation")
        print(" " * 12 + "".join(f"{n[:10]:>11}" for n in names))
        for i, n in enumerate(names):
            print(f"{n[:10]:<12}" + "".join(f"{c:11.3f}" for c in corr[i]))


if __name__ == "__main__":
    sys.exit(main())
