"""External validation, subgroups and site recalibration of one bundle on the brain MRI set, end to end.

    .venv/bin/python benchmarks/external_validation.py --bundle B --data ../shared/datasets/brain-tumor-mri \
        --out runs/external [--name brain]

The steps, each one ``medclf`` command (printed before it runs, so it can be rerun by hand):

1. **Class map** (``evaluate --class-map``): the Testing images listed in a CSV manifest *without* the
   Training split, as an external data set arrives, labelled tumour/normal through
   ``tumour=glioma,meningioma,pituitary;normal=notumor``. Copies of training images can then only be found
   through the hashes and signatures the bundle carries; the numbers removed (exact, near) are recorded.
2. **Subgroups** (``evaluate --by size,mode``): the Testing split of DATA by image size and colour mode.
3. **Recalibration**: the Testing images are split in two halves, stratified by class (seed 0): ``val`` is
   a "site sample", ``test`` is held out. ``recalibrate --split val --positive tumour --sensitivity 0.95``
   writes a new bundle; ``evaluate --split test`` then scores the original and the recalibrated bundle on
   the held-out half, with the operating point's sensitivity/specificity.

Writes the manifests and outputs under ``--out`` and a summary to
``benchmarks/results/external-<name>.json``. Caveat: the two Testing halves are not independent sites
(Testing holds near-duplicates of itself), so step 3 shows the mechanics and the held-out figures, not a
site transfer.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from medclf.data.sources import load_source

CLASS_MAP = "tumour=glioma,meningioma,pituitary;normal=notumor"


def medclf(*args: str) -> None:
    cmd = [sys.executable, "-m", "medclf", *args]
    print("$ medclf " + " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run(cmd, check=True)


def write_manifests(data: str, out: Path) -> tuple[Path, Path]:
    """testing.csv (the Testing images only) and site.csv (the same, split val/test half and half)."""
    samples = load_source(data)
    test = samples.indices("test")
    rng = np.random.default_rng(0)
    half: dict[int, str] = {}
    for c in range(len(samples.classes)):
        rows = test[samples.labels[test] == c]
        rows = rows[rng.permutation(len(rows))]
        for j, i in enumerate(rows):
            half[int(i)] = "val" if j < len(rows) // 2 else "test"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, with_split in (("testing.csv", False), ("site.csv", True)):
        path = out / name
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "split"] if with_split else ["path", "label"])
            for i in test:
                row = [str(Path(samples.refs[i]).resolve()), samples.classes[samples.labels[i]]]
                w.writerow([*row, half[int(i)]] if with_split else row)
        paths.append(path)
    return paths[0], paths[1]


def headline(metrics_file: Path) -> dict[str, Any]:
    m = json.loads(metrics_file.read_text())
    keep = (
        "n",
        "n_removed_duplicates",
        "n_removed_exact",
        "n_removed_near",
        "accuracy",
        "auc",
        "ci",
        "per_class",
    )
    out = {k: m.get(k) for k in keep}
    if "operating_point" in m:
        out["operating_point"] = {
            k: m["operating_point"][k]
            for k in ("rule", "threshold", "evaluated", "achieved")
            if k in m["operating_point"]
        }
    if "subgroups" in m:
        out["subgroups"] = {
            key: {
                "groups": [
                    {"group": g["group"], "n": g["n"], "accuracy": g["accuracy"], "tested": g["tested"]}
                    for g in a["groups"]
                ],
                "largest_gap": a["largest_gap"],
                "warnings": a["warnings"],
            }
            for key, a in m["subgroups"].items()
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--name", default="brain")
    args = ap.parse_args()
    out: Path = args.out
    testing, site = write_manifests(args.data, out)
    common = ["--no-progress"]

    medclf(
        "evaluate",
        args.bundle,
        str(testing),
        "--class-map",
        CLASS_MAP,
        "--out",
        str(out / "classmap"),
        *common,
    )
    medclf("evaluate", args.bundle, args.data, "--by", "size,mode", "--out", str(out / "subgroups"), *common)
    recal = out / "recalibrated"
    medclf(
        "recalibrate", args.bundle, str(site), "--split", "val", "--class-map", CLASS_MAP,
        "--positive", "tumour", "--sensitivity", "0.95", "--out", str(recal), *common,
    )  # fmt: skip
    for name, bundle in (("heldout-original", args.bundle), ("heldout-recalibrated", str(recal))):
        medclf(
            "evaluate", bundle, str(site), "--split", "test", "--class-map", CLASS_MAP, "--out", str(out / name), *common
        )  # fmt: skip

    sys.path.insert(0, str(Path(__file__).parent))
    from contention import cpu

    summary = {
        "command": "python benchmarks/external_validation.py " + " ".join(sys.argv[1:]),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu(),
        "bundle": args.bundle,
        "data": args.data,
        "class_map": CLASS_MAP,
        "classmap": headline(out / "classmap" / "metrics.json"),
        "subgroups": headline(out / "subgroups" / "metrics.json"),
        "recalibration": json.loads((recal / "bundle.json").read_text())["operating_point"],
        "heldout_original": headline(out / "heldout-original" / "metrics.json"),
        "heldout_recalibrated": headline(out / "heldout-recalibrated" / "metrics.json"),
    }
    dest = Path(__file__).parent / "results" / f"external-{args.name}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary written to {dest}")


if __name__ == "__main__":
    main()
