"""Do the splits of a MedMNIST file come from the same distribution? A diagnostic for test-set shift.

    .venv/bin/python benchmarks/shift.py DATA.npz [--seed 0] [--bundle B]
    .venv/bin/python benchmarks/shift.py DATA.npz --null-trials 25

The first two measurements use a gradient-boosted tree classifier on per-image standardised pixels:

1. **Domain classifier**: for each pair of splits and each class, can a classifier tell the images of one split
   from the other's (5-fold cross-validated AUC, equal numbers drawn from each)? 0.5 means indistinguishable.
   Within a class, so that a different class mix cannot explain it.
2. **Layout-only classifiers**: trained on the training split to predict the label from coarse layout alone
   (the image averaged down to 4x4 or 7x7 cells, or only the ring of pixels outside the central region), scored
   on validation and test. A label predictable from framing on validation but less so on test is a shortcut that
   validation cannot expose.

3. With ``--bundle B`` (a model trained on DATA), **label-free adaptation**: the model's AUC on validation
   and test as it is, and after re-estimating its batch-norm statistics on each split's own images (AdaBN,
   Li et al. 2016; no labels used). A shift in low-level image statistics would show as a gain on test.

``--null-trials N`` instead measures how far the audit's shift check (:mod:`medclf.data.shift`) strays from
0.5 when nothing differs: two disjoint draws of training images, N trials, one run against the mean of three.

Example (PneumoniaMNIST; the fusion note in BENCHMARKS.md quotes it):

    .venv/bin/python benchmarks/shift.py ../shared/datasets/medmnist/pneumoniamnist.npz \
        --bundle runs/bench/pneumonia-default/model
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score

from medclf.data.samples import SPLITS
from medclf.data.shift import domain_auc, layout_features
from medclf.data.signatures import image_signature
from medclf.errors import MedclfError
from medclf.io import Image
from medclf.io.npz import read_npz


def _fail(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    raise SystemExit(2)


def load_splits(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images N x H x W float32, labels N)} of a 2D single-label MedMNIST .npz."""
    if not path.is_file():
        _fail(f"{path} not found")
    try:
        data = read_npz(path)  # the project's guarded reader: size limits, never unpickles
    except MedclfError as e:
        _fail(str(e))
    out = {}
    for split in SPLITS:
        if f"{split}_images" not in data or f"{split}_labels" not in data:
            _fail(f"{path}: no {split}_images / {split}_labels (a MedMNIST .npz has train, val and test)")
        x, y = data[f"{split}_images"], data[f"{split}_labels"]
        if x.ndim != 3 or y.ndim != 2 or y.shape[1] != 1:
            _fail(
                f"{path}: {split} images {x.shape}, labels {y.shape}: this diagnostic takes 2D greyscale, one label"
            )
        out[split] = (x.astype(np.float32), y[:, 0].astype(int))
    return out


def standardise(x: np.ndarray) -> np.ndarray:
    """Each image to zero mean and unit variance: brightness and contrast alone cannot explain a difference."""
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = x.std(axis=(1, 2), keepdims=True)
    return (x - mean) / np.maximum(std, 1e-6)


def pooled(cells: int) -> Callable[[np.ndarray], np.ndarray]:
    def features(x: np.ndarray) -> np.ndarray:
        k = x.shape[1] // cells
        z = standardise(x)[:, : cells * k, : cells * k]
        return z.reshape(len(z), cells, k, cells, k).mean(axis=(2, 4)).reshape(len(z), -1)

    return features


def border_ring(x: np.ndarray, margin: float = 0.18) -> np.ndarray:
    """Only the pixels within ``margin`` of the edges: what framing, not the centre, tells."""
    h, w = x.shape[1:]
    keep = np.ones((h, w), dtype=bool)
    mh, mw = round(h * margin), round(w * margin)
    keep[mh : h - mh, mw : w - mw] = False
    return standardise(x)[:, keep]


def all_pixels(x: np.ndarray) -> np.ndarray:
    return standardise(x).reshape(len(x), -1)


def open_bundle(path: Path) -> Any:
    """The bundle at ``path`` (exit 2 with the reason when it is not one), checked before any work."""
    from medclf.bundle import load_bundle
    from medclf.errors import MedclfError

    try:
        bundle = load_bundle(path)
    except MedclfError as e:
        _fail(str(e))
    if len(bundle.classes) != 2:
        _fail(f"{path}: {len(bundle.classes)} classes; the AdaBN check reports binary AUC")
    return bundle


def adapted_aucs(bundle: Any, data: Path) -> list[tuple[str, float, float, int]]:
    """(split, AUC as trained, AUC after AdaBN on that split, n) for val and test, copies of train left out."""
    import copy

    import torch

    from medclf.data.cache import prepare
    from medclf.data.references import read_train_references
    from medclf.data.sources import load_source
    from medclf.evaluation.runner import _map_labels

    samples = load_source(data, default_split="test")
    labels = _map_labels(samples, bundle.classes, data)
    train_hashes = set(read_train_references(bundle.path, bundle.manifest.get("files", {})).hashes)
    prepared = prepare(samples, bundle.spec, progress=False, extra_train_hashes=train_hashes)
    split_of = np.array(samples.splits)

    def positive_probs(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])
        return torch.softmax(logits.float(), dim=1)[:, 1].numpy()

    def adapted(x: torch.Tensor) -> torch.nn.Module:
        model = copy.deepcopy(bundle.model)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over every batch, not an exponential one
                m.train()
        with torch.no_grad():
            for i in range(0, len(x), 256):
                model(x[i : i + 256])
        return model

    rows = []
    for split in ("val", "test"):
        rows_i = np.flatnonzero((split_of == split) & prepared.ok & (labels >= 0) & ~prepared.train_copy)
        x = torch.as_tensor(np.asarray(prepared.tensors[rows_i]), dtype=torch.float32)
        y = labels[rows_i]
        plain = roc_auc_score(y, positive_probs(bundle.model, x))
        rows.append((split, plain, roc_auc_score(y, positive_probs(adapted(x), x)), len(y)))
    return rows


def null_spread(train: tuple[np.ndarray, np.ndarray], trials: int, seed: int) -> None:
    """The audit check's AUC when nothing differs: two disjoint draws from the largest training class, on the
    audit's own features (standardised 32x32 thumbnails pooled to 8x8), one run against the mean of three."""
    x, y = train
    images = x[y == np.bincount(y).argmax()]
    sig = np.stack([image_signature(Image(pixels=v[None], spacing=(1.0, 1.0), format="npz")) for v in images])
    features = layout_features(sig, np.zeros(len(sig), dtype=bool))
    rng = np.random.default_rng(seed)
    print(f"Domain AUC with no shift: {trials} trials, two disjoint draws of 3n training images each")
    print("| n per side | Mann-Whitney null SE | one run: SD (max) | mean of 3: SD (max) |")
    print("|---|---|---|---|")
    for n in (36, 60, 120):
        if len(features) < 6 * n:
            print(f"| {n} | too few images ({len(features)}) | | |")
            continue
        one, three = [], []
        for t in range(trials):
            order = rng.permutation(len(features))
            a, b = features[order[: 3 * n]], features[order[3 * n : 6 * n]]
            runs = [domain_auc(a, b, seed=10 * t + k, max_per_side=n, repeats=1)[0] for k in range(3)]
            one.append(runs[0])
            three.append(float(np.mean(runs)))
        se = np.sqrt((2 * n + 1) / (12 * n**2))
        print(
            f"| {n} | {se:.3f} | {np.std(one):.3f} ({max(one):.3f}) | {np.std(three):.3f} ({max(three):.3f}) |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a MedMNIST 2D .npz (train/val/test, one label)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bundle", type=Path, help="a model trained on DATA: also run the AdaBN check")
    parser.add_argument(
        "--null-trials",
        type=int,
        default=0,
        help="instead: spread of the audit's domain AUC under no shift (two disjoint draws of training images)",
    )
    args = parser.parse_args(argv)
    splits = load_splits(args.data)
    if args.null_trials:
        null_spread(splits["train"], args.null_trials, args.seed)
        return
    bundle = open_bundle(args.bundle) if args.bundle is not None else None
    classes = sorted(set(np.concatenate([y for _, y in splits.values()]).tolist()))

    print("Domain classifier: cross-validated AUC of telling two splits apart, within one class (0.5 = same)")
    print("| splits | " + " | ".join(f"class {c}" for c in classes) + " |")
    print("|---|" + "---|" * len(classes))
    for s1, s2 in itertools.combinations(SPLITS, 2):
        cells = []
        for c in classes:
            a, b = splits[s1][0][splits[s1][1] == c], splits[s2][0][splits[s2][1] == c]
            if min(len(a), len(b)) < 10:
                cells.append("too few")
                continue
            auc, n = domain_auc(all_pixels(a), all_pixels(b), seed=args.seed, max_per_side=len(a) + len(b))
            cells.append(f"{auc:.3f} (n={n} each)")
        print(f"| {s1} vs {s2} | " + " | ".join(cells) + " |")

    if len(classes) != 2:
        return
    print()
    print("Label from layout only: trained on train, AUC on validation and test")
    print("| features | val AUC | test AUC |")
    print("|---|---|---|")
    (xt, yt), (xv, yv), (xs, ys) = (splits[s] for s in SPLITS)
    extractors = {
        "4x4 cells": pooled(4),
        "7x7 cells": pooled(7),
        "border ring": border_ring,
        "all pixels": all_pixels,
    }
    for name, features in extractors.items():
        clf = HistGradientBoostingClassifier(max_iter=300, random_state=args.seed).fit(features(xt), yt)
        val = roc_auc_score(yv, clf.predict_proba(features(xv))[:, 1])
        test = roc_auc_score(ys, clf.predict_proba(features(xs))[:, 1])
        print(f"| {name} | {val:.3f} | {test:.3f} |")
    if bundle is not None:
        print()
        print(
            f"Label-free adaptation of {args.bundle}: batch-norm statistics re-estimated on each split's images"
        )
        print("| split | n | AUC as trained | AUC after AdaBN |")
        print("|---|---|---|---|")
        for split, plain, adapted, n in adapted_aucs(bundle, args.data):
            print(f"| {split} | {n} | {plain:.4f} | {adapted:.4f} |")


if __name__ == "__main__":
    main()
