"""Out-of-distribution guard on real data: every model against the test images of every other dataset.

    .venv/bin/python benchmarks/ood.py                                   # the bundles of benchmarks/run.py
    .venv/bin/python benchmarks/ood.py --bundle breast=runs/x/model --bundle brain=runs/y/model
    .venv/bin/python benchmarks/ood.py --engine onnx-int8                # the guard on another engine

For each bundle (a model trained on one of the shared datasets) the in-distribution set is that dataset's
test split minus every test image that copies a training image; the out-of-distribution sets are the test
splits of all the other shared datasets (brain tumour MRI, PneumoniaMNIST chest X-ray, BreastMNIST
ultrasound, RetinaMNIST colour fundus photographs, knee X-rays, NIH chest X-rays), each taken through the
bundle's own preprocessing, as ``medclf predict`` would. For every pair it reports the AUROC of the
bundle's OOD score (out-of-distribution = positive) and the fraction of each set flagged at the bundle's
threshold: on the in-distribution test images that fraction is the false-alarm rate.

Datasets whose folder is missing are skipped (and listed). Results: ``benchmarks/results/ood.json`` and
``benchmarks/results/ood.md`` (the table for BENCHMARKS.md), with the command, machine and date.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "results"

# name -> (title, path under ../shared/datasets)
DATASETS: dict[str, tuple[str, str]] = {
    "brain": ("brain tumour MRI (JPEG)", "brain-tumor-mri"),
    "pneumonia": ("PneumoniaMNIST (chest X-ray)", "medmnist/pneumoniamnist.npz"),
    "breast": ("BreastMNIST (ultrasound)", "medmnist/breastmnist.npz"),
    "retina": ("RetinaMNIST (colour fundus)", "medmnist/retinamnist.npz"),
    "knee": ("knee X-ray (KL grade)", "knee-oa-kl"),
    "nih": ("NIH ChestX-ray14 subset", "nih-chestxray14-1000"),
}
# The bundles benchmarks/run.py writes (its `default` rows), used when no --bundle is given.
DEFAULT_BUNDLES = {name: ROOT / "runs" / "bench" / f"{name}-default" / "model" for name in DATASETS}


def load_samples(name: str) -> Any:
    """The dataset as a SampleSet (NIH: the images with their published split; labels are not needed)."""
    from medclf.data.samples import SampleSet
    from medclf.data.sources import load_source

    path = SHARED / DATASETS[name][1]
    if name != "nih":
        return load_source(path)
    with (path / "splits.csv").open(newline="") as fh:
        rows = [(r["Image Index"], r["split"]) for r in csv.DictReader(fh)]
    split = {"train": "train", "valid": "val", "val": "val", "test": "test"}
    return SampleSet(
        refs=[str(path / "images" / f) for f, _ in rows],
        labels=np.zeros(len(rows), dtype=np.int64),
        splits=[split[s] for _, s in rows],
        patient_ids=[None] * len(rows),
        classes=["image"],
        source=str(path),
        kind="folder",
        root=str(path),
    )


def test_tensors(name: str, spec: Any, *, in_distribution: bool) -> np.ndarray:
    """The test split of ``name`` preprocessed with ``spec`` (through the cache, as training reads data).

    In distribution: minus the test images that copy a training image (the whole dataset is prepared so
    that copies are found). Out of distribution: every readable test image."""
    from medclf.data.cache import prepare

    samples = load_samples(name)
    if not in_distribution:
        samples = samples.subset(samples.indices("test"))
    prepared = prepare(samples, spec, progress=False)
    rows = prepared.ok & (np.array(samples.splits) == "test")
    if in_distribution:
        rows &= ~prepared.train_copy
    return np.asarray(prepared.tensors[np.flatnonzero(rows)], dtype=np.float32)


def _scores(b: Any, x: np.ndarray, engine: str) -> dict[str, np.ndarray]:
    """The guard's flags and score, and each of its component scores, for preprocessed inputs ``x``."""
    features = b.features(x, engine)
    flags, score = b.ood.flags(features, x)
    return {"flags": flags, "score": score, **b.ood.component_scores(features, x)}


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def score_pairs(
    bundles: dict[str, Path], engine: str, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Every bundle against the test images of every other available dataset."""
    from medclf.predictor import Predictor

    available = [n for n in DATASETS if (SHARED / DATASETS[n][1]).exists()]
    models = []
    for model_name, path in bundles.items():
        b = Predictor.load(path)
        if b.ood is None:
            raise SystemExit(f"{path} has no OOD guard")
        ins = _scores(b, test_tensors(model_name, b.spec, in_distribution=True), engine)
        record: dict[str, Any] = {
            "model": model_name,
            "bundle": str(path),
            "bundle_sha256": b.sha256,
            "arch": b.arch,
            "input": list(b.spec.input_shape),
            "method": b.manifest["ood"].get("method"),
            "detector_version": int(b.manifest["ood"].get("version", 1)),
            "threshold": float(b.ood.threshold),
            "in_distribution": {"n": len(ins["score"]), "false_alarms": float(ins["flags"].mean())},
            "out_of_distribution": {},
        }
        log(
            f"{model_name}: {len(ins['score'])} in-distribution test images, false alarms {ins['flags'].mean():.3f}"
        )
        for other in available:
            if other == model_name:
                continue
            outs = _scores(b, test_tensors(other, b.spec, in_distribution=False), engine)
            entry = {
                "n": len(outs["score"]),
                "auroc": _auroc(ins["score"], outs["score"]),
                "flagged": float(outs["flags"].mean()),
                # Each component alone; "features" is the score of the guard before version 2.
                "auroc_by_score": {k: _auroc(ins[k], outs[k]) for k in ("features", "input") if k in ins},
            }
            record["out_of_distribution"][other] = entry
            log(
                f"  vs {other}: AUROC {entry['auroc']:.4f} {entry['auroc_by_score']}, flagged {entry['flagged']:.3f}"
            )
        models.append(record)
    return models


def markdown(result: dict[str, Any]) -> str:
    names = list(DATASETS)
    lines = [
        "Out-of-distribution guard: AUROC of each model's OOD score, its in-distribution test images against "
        "the test images of every other dataset (flagged fraction at the bundle's threshold in brackets), and "
        "the false-alarm rate on its own test images (minus copies of training images). "
        f"Engine `{result['engine']}`. {result['date']}: `{result['command']}`",
        "",
        "| model (input) | false alarms | " + " | ".join(DATASETS[n][0] for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for m in result["models"]:
        cells = []
        for n in names:
            o = m["out_of_distribution"].get(n)
            cells.append("—" if o is None else f"{o['auroc']:.3f} ({o['flagged']:.0%})")
        shape = "x".join(str(s) for s in m["input"][1:])
        lines.append(
            f"| {DATASETS[m['model']][0]} ({shape}, {m['input'][0]} ch, {m['arch']}, guard v{m['detector_version']}) | "
            f"{m['in_distribution']['false_alarms']:.1%} of {m['in_distribution']['n']} | "
            + " | ".join(cells)
            + " |"
        )
    worst = min(
        (o["auroc"] for m in result["models"] for o in m["out_of_distribution"].values()),
        default=float("nan"),
    )
    lines += [
        "",
        f"Lowest AUROC over all pairs: {worst:.3f}.",
        "",
        "The feature score alone (the guard before version 2: Mahalanobis distance of the penultimate features), "
        "same models and images, AUROC:",
        "",
        "| model | " + " | ".join(DATASETS[n][0] for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for m in result["models"]:
        cells = []
        for n in names:
            o = m["out_of_distribution"].get(n)
            cells.append("—" if o is None else f"{o['auroc_by_score']['features']:.3f}")
        lines.append(f"| {DATASETS[m['model']][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--bundle",
        action="append",
        default=[],
        metavar="DATASET=PATH",
        help=f"a bundle trained on DATASET ({', '.join(DATASETS)}); repeatable. Default: the bundles of "
        "benchmarks/run.py that exist",
    )
    ap.add_argument("--engine", default="auto", help="torch, onnx-fp32, onnx-int8 or auto")
    ap.add_argument("--out", type=Path, default=RESULTS / "ood.json")
    args = ap.parse_args()

    bundles: dict[str, Path] = {}
    for item in args.bundle:
        name, _, path = item.partition("=")
        if name not in DATASETS or not path:
            raise SystemExit(
                f"--bundle {item!r}: expected DATASET=PATH with DATASET one of {', '.join(DATASETS)}"
            )
        bundles[name] = Path(path)
    if not bundles:
        bundles = {n: p for n, p in DEFAULT_BUNDLES.items() if (p / "bundle.json").exists()}
    if not bundles:
        raise SystemExit("no bundles: give --bundle DATASET=PATH (or run benchmarks/run.py first)")

    result: dict[str, Any] = {
        "engine": args.engine,
        "models": score_pairs(bundles, args.engine),
        "datasets_missing": [n for n in DATASETS if not (SHARED / DATASETS[n][1]).exists()],
        "command": " ".join(["python benchmarks/ood.py", *sys.argv[1:]]),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
