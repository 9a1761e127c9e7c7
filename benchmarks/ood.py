"""Out-of-distribution guard on real data: does a brain MRI model know a chest X-ray when it sees one?

    .venv/bin/python benchmarks/ood.py [--bundle runs/bench/brain-default/model]

Scores, with the bundle's own OOD guard (Mahalanobis distance on penultimate features, fitted on its
training split), the brain tumour MRI test images that copy no training image (in distribution) and the
test images of PneumoniaMNIST (paediatric chest X-ray) and BreastMNIST (breast ultrasound) (out of
distribution), all through the bundle's own preprocessing. Reports the AUROC of the score for each
out-of-distribution set against the brain images, and the fraction flagged at the bundle's threshold.
Results: ``benchmarks/results/ood.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


def main() -> None:
    from sklearn.metrics import roc_auc_score

    from medclf.bundle import load_bundle
    from medclf.data.cache import prepare
    from medclf.data.sources import load_source
    from medclf.io import image_from_array
    from medclf.preprocess import preprocess

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=ROOT / "runs" / "bench" / "brain-default" / "model")
    ap.add_argument("--brain", type=Path, default=SHARED / "brain-tumor-mri")
    args = ap.parse_args()
    b = load_bundle(args.bundle)
    if b.ood is None:
        raise SystemExit(f"{args.bundle} has no OOD guard")

    samples = load_source(args.brain)
    prepared = prepare(samples, b.spec, progress=False)
    splits = np.array(samples.splits)
    rows = np.flatnonzero(prepared.ok & (splits == "test") & ~prepared.train_copy)
    flags, brain = b.ood_scores(np.asarray(prepared.tensors[rows], dtype=np.float32))
    result: dict = {
        "bundle": str(args.bundle),
        "bundle_sha256": b.sha256,
        "method": b.manifest["ood"]["method"],
        "threshold": b.ood.threshold,
        "in_distribution": {
            "set": "brain tumour MRI, Testing minus copies of Training images",
            "n": len(rows),
            "flagged": float(flags.mean()),
        },
        "out_of_distribution": [],
        "command": " ".join(["python benchmarks/ood.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    for name, title in (
        ("pneumoniamnist", "PneumoniaMNIST test (chest X-ray)"),
        ("breastmnist", "BreastMNIST test (ultrasound)"),
    ):
        with np.load(SHARED / "medmnist" / f"{name}.npz", allow_pickle=False) as z:
            images = z["test_images"]
        x = np.stack(
            [preprocess(image_from_array(im, source=f"{name}:{i}"), b.spec) for i, im in enumerate(images)]
        )
        f, scores = b.ood_scores(x)
        y = np.r_[np.zeros(len(brain)), np.ones(len(scores))]
        result["out_of_distribution"].append(
            {
                "set": title,
                "n": len(scores),
                "flagged": float(f.mean()),
                "auroc_vs_brain": float(roc_auc_score(y, np.r_[brain, scores])),
            }
        )
    out = ROOT / "benchmarks" / "results" / "ood.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
