"""Shortcut stress test on brain-tumor-mri: does the model find tumours in images from another source?

    .venv/bin/python benchmarks/stress.py                          # both recipes, 20 min each (the real row)
    .venv/bin/python benchmarks/stress.py --time-budget 1m --size 32 --fraction 0.1 --work /tmp/stress
                                                                   # a smoke test of the pipeline only

In ``brain-tumor-mri/Training`` almost every tumour image is 512 x 512 (one source) and almost every
``notumor`` image is another size (another source): the image's source predicts its label. This script builds
the purest form of that confound and measures what it costs:

- **training data**: Training without its non-512 x 512 tumour images (so every tumour the model sees
  comes from the 512 x 512 source), plus Testing as the ``test`` split, written as a CSV manifest in
  ``--work``; medclf carves its validation split from the training rows as usual;
- **stress set**: every non-512 x 512 tumour image of Training and Testing, minus copies among them and of
  any training image (same bytes, or near copies by the audit's signatures, correlation >= the audit's
  threshold);
- for each recipe, ``medclf train`` with the same ``--time-budget`` and seed: ``off`` (the default recipe with
  the mitigation switched off) and ``on`` (``--shortcut-mitigation on``); then ``medclf evaluate`` on the
  Testing split (copies of training images removed, as ``evaluate`` always does: the "clean test") and on
  the stress set;
- per recipe: **tumour sensitivity** on the stress set (a tumour image counts as found when any tumour
  class is predicted) with a 95 % percentile-bootstrap interval (2,000 resamples), n; clean-test accuracy
  and macro AUC with ``evaluate``'s intervals; epochs run and seconds per epoch (what the mitigation costs).

Writes ``--out`` (default ``benchmarks/results/brain-stress.json``; with ``--fraction`` below 1 the default is
``<work>/brain-stress.json``, smoke tests never overwrite the real row) and prints a Markdown section for
BENCHMARKS.md. The dataset is read from ``../shared/datasets`` (see its README), never copied.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "brain-tumor-mri"
RESULTS = ROOT / "benchmarks" / "results"
NORMAL = "notumor"
SIDE = 512
N_BOOTSTRAP = 2000


def _fail(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    raise SystemExit(2)


def build_split(data: Path, work: Path, *, fraction: float, seed: int, workers: int) -> dict[str, Any]:
    """Write ``work/train.csv`` (train + test rows) and ``work/stress.csv``; return the counts."""
    from medclf.data.scan import scan
    from medclf.data.signatures import NEAR_THRESHOLD, find_duplicates, nearest
    from medclf.data.sources import load_source

    samples = load_source(data)
    if NORMAL not in samples.classes or not samples.has_split("test"):
        _fail(f"{data}: expected Training/ and Testing/ folders with a '{NORMAL}' class")
    if fraction < 1.0:
        rng = np.random.default_rng(seed)
        samples = samples.subset(np.flatnonzero(rng.random(len(samples)) < fraction))
    print(f"scanning {len(samples)} images ({workers} workers)...", file=sys.stderr)
    sr = scan(samples, workers=workers, progress=False)
    cues = sr.cues or [{} for _ in range(len(samples))]
    normal = samples.classes.index(NORMAL)
    is_tumour = (samples.labels >= 0) & (samples.labels != normal)
    is_512 = np.array([c.get("width") == SIDE and c.get("height") == SIDE for c in cues], dtype=bool)
    split = np.array(samples.splits)
    usable = sr.decoded & ~sr.constant

    train = (split == "train") & ~(is_tumour & ~is_512) & sr.ok
    test = (split == "test") & sr.ok
    candidates = np.flatnonzero(is_tumour & ~is_512 & usable)
    # Copies of training images (exact bytes, or the same picture re-encoded / resized) are not "unseen".
    train_hashes = {sr.hashes[i] for i in np.flatnonzero(train)}
    best, _ = nearest(sr.signatures[candidates], sr.signatures[np.flatnonzero(train & usable)])
    copy_of_train = np.array([sr.hashes[i] in train_hashes for i in candidates]) | (best >= NEAR_THRESHOLD)
    kept = candidates[~copy_of_train]
    # Copies among the stress images: keep the first of each duplicate group.
    groups = find_duplicates(
        [sr.hashes[i] for i in kept],
        sr.signatures[kept],
        np.ones(len(kept), dtype=bool),
        near_threshold=NEAR_THRESHOLD,
    )
    drop = {m for g in groups for m in g.members[1:]}
    stress = np.array([i for j, i in enumerate(kept) if j not in drop], dtype=np.int64)

    work.mkdir(parents=True, exist_ok=True)
    _write_csv(
        work / "train.csv",
        samples,
        [(i, "train") for i in np.flatnonzero(train)] + [(i, "test") for i in np.flatnonzero(test)],
    )
    _write_csv(work / "stress.csv", samples, [(int(i), "test") for i in stress])
    counts = {
        "train": _counts(samples, np.flatnonzero(train)),
        "test": _counts(samples, np.flatnonzero(test)),
        "stress": _counts(samples, stress),
        "stress_candidates": len(candidates),
        "stress_removed_train_copies": int(copy_of_train.sum()),
        "stress_removed_duplicates": len(drop),
        "removed_from_training_non512_tumours": int(((split == "train") & is_tumour & ~is_512).sum()),
        "scan_seconds": round(sr.seconds, 1),
    }
    return counts


def _counts(samples: Any, idx: np.ndarray) -> dict[str, int]:
    c = np.bincount(samples.labels[idx], minlength=len(samples.classes))
    return {name: int(n) for name, n in zip(samples.classes, c, strict=True)}


def _write_csv(path: Path, samples: Any, rows: list[tuple[int, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        for i, s in rows:
            w.writerow([samples.refs[i], samples.classes[samples.labels[i]], s])


def medclf(*args: str) -> None:
    cmd = [sys.executable, "-m", "medclf", *args]
    print("$ " + " ".join(cmd[2:]), file=sys.stderr)
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        _fail(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}")


def sensitivity(predictions: Path, seed: int) -> dict[str, Any]:
    """Share of tumour images predicted as any tumour class, with a percentile-bootstrap 95 % interval."""
    with predictions.open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["predicted"]]
    if not rows:
        _fail(f"{predictions}: no predictions")
    found = np.array([r["predicted"] != NORMAL for r in rows], dtype=float)
    rng = np.random.default_rng(seed)
    boot = found[rng.integers(0, len(found), (N_BOOTSTRAP, len(found)))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    per_class: dict[str, dict[str, float]] = {}
    for label in sorted({r["label"] for r in rows}):
        sel = np.array([r["label"] == label for r in rows])
        per_class[label] = {"n": int(sel.sum()), "sensitivity": round(float(found[sel].mean()), 4)}
    return {
        "n": len(found),
        "sensitivity": round(float(found.mean()), 4),
        "ci95": [round(float(lo), 4), round(float(hi), 4)],
        "per_class": per_class,
        "called_notumor": int((1 - found).sum()),
    }


def run_recipe(recipe: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = work / recipe
    bundle = out / "model"
    train_args = ["train", str(work / "train.csv"), "--out", str(bundle), "--time-budget", args.time_budget]
    train_args += ["--shortcut-mitigation", recipe, "--seed", str(args.seed), "--no-progress"]
    if args.size:
        train_args += ["--size", str(args.size)]
    # A cache of its own per recipe (unless one is given): both recipes pay for decoding within their budget.
    cache = args.cache_dir or str(out / "cache")
    train_args += ["--cache-dir", cache]
    t0 = time.perf_counter()
    medclf(*train_args)
    train_s = time.perf_counter() - t0
    common = ["--split", "test", "--no-progress", "--cache-dir", cache]
    medclf("evaluate", str(bundle), str(work / "train.csv"), "--out", str(out / "eval-clean"), *common)
    medclf("evaluate", str(bundle), str(work / "stress.csv"), "--out", str(out / "eval-stress"), *common)
    manifest = json.loads((bundle / "bundle.json").read_text())
    clean = json.loads((out / "eval-clean" / "metrics.json").read_text())
    history = manifest.get("history", [])
    epoch_s = [h["seconds"] for h in history if "seconds" in h]
    return {
        "recipe": recipe,
        "augment": manifest["recipe"].get("augment"),
        "balance_by": manifest["recipe"].get("balance_by", []),
        "input": manifest["input"]["shape"],
        "arch": manifest["model"]["arch"],
        "epochs_run": len(history),
        "seconds_per_epoch": round(float(np.median(epoch_s)), 2) if epoch_s else None,
        "train_seconds": round(train_s, 1),
        "shortcuts": {
            k: manifest.get("shortcuts", {}).get(k)
            for k in ("flagged", "flagged_keys", "mitigation", "seconds")
        },
        "stress": sensitivity(out / "eval-stress" / "predictions.csv", args.seed),
        "clean_test": {
            "n": clean["n"],
            "n_removed_duplicates": clean.get("n_removed_duplicates"),
            "accuracy": clean["accuracy"],
            "accuracy_ci95": clean.get("ci", {}).get("accuracy"),
            "auc": clean.get("auc"),
            "auc_ci95": clean.get("ci", {}).get("auc"),
        },
    }


def markdown(result: dict[str, Any]) -> str:
    c = result["counts"]
    lines = [
        "### Shortcut stress test (brain-tumor-mri)",
        "",
        f"Command: `{result['command']}` (time budget {result.get('time_budget', '?')} per recipe); "
        f"{result['machine']}; {result['date']}.",
        "",
        f"Training: Training minus its {c['removed_from_training_non512_tumours']} non-512 x 512 tumour images "
        f"({sum(c['train'].values())} images). Stress set: {sum(c['stress'].values())} non-512 x 512 tumour "
        f"images of Training and Testing ({c['stress_candidates']} found, {c['stress_removed_train_copies']} "
        f"copies of training images and {c['stress_removed_duplicates']} duplicates among them removed). "
        "Clean test: Testing minus copies of training images.",
        "",
        "| recipe | augmentation | stress tumour sensitivity (95% CI) | n | clean-test accuracy (95% CI) | "
        "clean-test AUC | epochs | s/epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["recipes"]:
        s, t = r["stress"], r["clean_test"]
        acc_ci = t.get("accuracy_ci95") or [None, None]
        lines.append(
            f"| {r['recipe']} | {r['augment']}{' + balance by ' + ','.join(r['balance_by']) if r['balance_by'] else ''} "
            f"| {s['sensitivity']:.3f} ({s['ci95'][0]:.3f}-{s['ci95'][1]:.3f}) | {s['n']} "
            f"| {t['accuracy']:.4f} ({_f(acc_ci[0])}-{_f(acc_ci[1])}) | {_f(t.get('auc'))} "
            f"| {r['epochs_run']} | {r['seconds_per_epoch']} |"
        )
    return "\n".join(lines) + "\n"


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.4f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the brain-tumor-mri folder")
    ap.add_argument(
        "--work", type=Path, default=ROOT / "runs" / "stress", help="manifests, bundles, evaluations"
    )
    ap.add_argument("--time-budget", default="20m", help="per recipe (medclf train --time-budget)")
    ap.add_argument("--size", type=int, default=None, help="input size (default: the planner's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", default="off,on", help="comma-separated --shortcut-mitigation values")
    ap.add_argument(
        "--fraction", type=float, default=1.0, help="use a random share of the images (smoke tests)"
    )
    ap.add_argument("--workers", type=int, default=2, help="decoding processes of the scan")
    ap.add_argument(
        "--cache-dir", default=None, help="one tensor cache for all recipes (default: one per recipe)"
    )
    ap.add_argument("--out", type=Path, default=None, help="result JSON")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        _fail(f"{args.data} not found: the shared datasets folder is only on the team's machines")
    if not 0 < args.fraction <= 1:
        _fail("--fraction must be in (0, 1]")
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not recipes or any(r not in ("off", "on", "auto") for r in recipes):
        _fail("--recipes takes off, on and/or auto, comma-separated")
    out = args.out or (
        RESULTS / "brain-stress.json" if args.fraction == 1 else args.work / "brain-stress.json"
    )

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run import machine

    counts = build_split(args.data, args.work, fraction=args.fraction, seed=args.seed, workers=args.workers)
    print(json.dumps(counts), file=sys.stderr)
    results = [run_recipe(r, args.work, args) for r in recipes]
    m = machine()
    result = {
        "command": "python benchmarks/stress.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.date.today().isoformat(),
        "machine": f"{m['cpu']} ({m['isa']}), {m['cores']} cores, torch {m['torch']}",
        "time_budget": args.time_budget,
        "fraction": args.fraction,
        "counts": counts,
        "recipes": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
