"""Multi-label findings end to end on the NIH ChestX-ray14 subset (1,000 radiographs, 14 findings).

    .venv/bin/python benchmarks/multilabel.py [--budget 10m] [--seed 0] [--loss bce]

Each step is what a user runs on NIH's files as they are (``Data_Entry_2017_subset.csv`` + ``images/`` and the
publisher's ``splits.csv``):

1. ``medclf audit CSV --split-file splits.csv``: per-finding counts, co-occurrence, and the patients whose
   images sit in more than one split (the publisher's split is not by patient);
2. ``medclf train CSV --split-file splits.csv --time-budget B``: a sigmoid per finding, per-finding thresholds
   chosen on the publisher's validation split;
3. ``medclf evaluate``: per-finding AUC/AP/sensitivity/specificity at those thresholds, macro/micro AUC and mAP
   with intervals resampled by patient, on the test split minus copies of training images;
4. ``medclf predict`` on one test image: its ``findings`` answer;
5. ``medclf export --onnx --int8 --data CSV``: ONNX parity and the int8 model's per-finding agreement with fp32
   (the same decision at the bundle's thresholds) on the validation split.

No accuracy floor (the set is small and its labels were mined from reports); CheXNet's mean AUC of about 0.84 on
the full set at 224 px is given for scale only. Results: ``benchmarks/results/multilabel-nih.json``, rendered
into BENCHMARKS.md by ``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "results"
DATA = SHARED / "nih-chestxray14-1000"
sys.path.insert(0, str(ROOT / "benchmarks"))

from contention import cpu  # noqa: E402  (the CPU model and flags, as every benchmark records them)

CHEXNET_MEAN_AUC = 0.84  # Rajpurkar et al. 2017, 14 findings, full ChestX-ray14 at 224 px (for scale only)


def run(cmd: list[str], log: Path) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="10m", help="training --time-budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loss", choices=("bce", "asymmetric"), default="bce")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "multilabel")
    args = ap.parse_args()
    csv_path, split_file = DATA / "Data_Entry_2017_subset.csv", DATA / "splits.csv"
    if not csv_path.exists():
        raise SystemExit(f"{DATA} is absent (see ../shared/datasets/README.md)")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "medclf"]
    data = [str(csv_path), "--split-file", str(split_file)]

    audit_s, _ = run(
        [*py, "audit", *data, "--out", str(work / "audit.json"), "--no-progress"], work / "audit.log"
    )
    audit = json.loads((work / "audit.json").read_text())
    train_s, _ = run(
        [*py, "train", *data, "--out", str(work / "model"), "--time-budget", args.budget, "--seed", str(args.seed),
         "--multilabel-loss", args.loss, "--no-progress"],
        work / "train.log",
    )  # fmt: skip
    eval_s, _ = run(
        [*py, "evaluate", str(work / "model"), *data, "--out", str(work / "eval"), "--no-progress"],
        work / "evaluate.log",
    )
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    manifest = json.loads((work / "model" / "bundle.json").read_text())
    with split_file.open(newline="") as fh:
        first_test = next(r["Image Index"] for r in csv.DictReader(fh) if r["split"] == "test")
    _, out = run(
        [*py, "predict", str(work / "model"), str(DATA / "images" / first_test)], work / "predict.log"
    )
    answer = json.loads(out)[0]
    export_s, _ = run(
        [*py, "export", str(work / "model"), "--out", str(work / "model-int8"), "--onnx", "--int8",
         "--data", str(csv_path), "--no-progress"],
        work / "export.log",
    )  # fmt: skip
    steps = {
        s["step"]: s
        for s in json.loads((work / "model-int8" / "bundle.json").read_text())["compression"]["steps"]
    }

    result: dict[str, Any] = {
        "dataset": "nih-chestxray14-1000",
        "budget": args.budget,
        "seed": args.seed,
        "loss": args.loss,
        "cpu": cpu(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/multilabel.py " + " ".join(sys.argv[1:]),
        "audit": {
            "wall_s": round(audit_s, 1),
            "n_samples": audit["n_samples"],
            "counts": audit["counts"],
            "no_finding": audit["findings"]["no_finding"],
            "images_by_number_of_findings": audit["findings"]["images_by_number_of_findings"],
            "top_pairs": audit["findings"]["top_pairs"][:5],
            "patients": audit["patients"],
            "label_conflicts": len(audit["label_conflicts"]),
        },
        "train": {
            "wall_s": round(train_s, 1),
            "plan": f"{manifest['model']['arch']} {manifest['input']['shape']}",
            "epochs_run": manifest["recipe"].get("epochs_run"),
            # Leftover-budget seed bagging makes an ensemble of members (medclf.folds): how many.
            "members": len(manifest.get("ensemble", {}).get("members", [])) or 1,
            "best_epoch": manifest["recipe"].get("best_epoch"),
            "val_macro_auc": manifest["metrics"]["val"]["macro_auc"],
            "thresholds": manifest["thresholds"]["labels"],
        },
        "evaluate": {
            "wall_s": round(eval_s, 1),
            "n": metrics["n"],
            "n_patients": metrics["n_patients"],
            "n_removed_duplicates": metrics["n_removed_duplicates"],
            "macro_auc": metrics["macro_auc"],
            "micro_auc": metrics["micro_auc"],
            "map": metrics["map"],
            "ci": {k: metrics["ci"].get(k) for k in ("macro_auc", "map", "unit", "level", "n_bootstrap")},
            "per_label": {
                name: {
                    k: e[k]
                    for k in ("n_positive", "auc", "ap", "threshold", "sensitivity", "specificity", "ci")
                }
                for name, e in metrics["per_label"].items()
            },
            "notes": metrics["notes"],
        },
        "predict": {"image": first_test, "positive": answer["positive"], "findings": answer["findings"]},
        "export": {
            "wall_s": round(export_s, 1),
            "onnx_max_abs_prob_diff": steps["onnx"]["parity"]["max_abs_prob_diff"],
            "int8_size_ratio_vs_fp32": steps["int8"]["size_ratio_vs_fp32"],
            "int8_agreement_with_fp32": steps["int8"]["agreement_with_fp32"],
            "int8_agreement_per_finding": steps["int8"]["agreement_per_finding_with_fp32"],
            "val_macro_auc": {
                "fp32": steps["int8"]["val_before"]["auc"],
                "int8": steps["int8"]["val_after"]["auc"],
            },
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "multilabel-nih.json").write_text(json.dumps(result, indent=2))
    print(render(result))


def render(result: dict[str, Any]) -> str:
    c, a, t, e = result["cpu"], result["audit"], result["train"], result["evaluate"]

    def f(v: Any, ci: Any = None) -> str:
        if v is None:
            return "n/a"
        return f"{v:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci and ci[0] is not None else "")

    p = a["patients"]
    lines = [
        "## Multi-label findings: NIH ChestX-ray14 subset (1,000 radiographs at 64 px, 14 findings)",
        "",
        f"`benchmarks/multilabel.py`: NIH's files as they are (`Data_Entry_2017_subset.csv`, `images/`, the "
        f"publisher's `splits.csv`): `medclf audit`, `medclf train --time-budget {result['budget']} "
        f"--multilabel-loss {result['loss']}` (seed {result['seed']}), `medclf evaluate`, `medclf predict`. "
        f"CPU: {c['model']}, {c['allowed']} of {c['cores']} cores; flags: "
        f"{', '.join(c['flags']) or 'none of AVX-512, AVX-VNNI, AMX'}.",
        "",
        f"Audit ({a['wall_s']} s): {a['n_samples']} images, {a['no_finding']} with no finding; "
        f"{p['n_patients']} patients, **{p['crossing_splits']} of them with images in more than one split** "
        f"(the publisher's split is not by patient); {a['label_conflicts']} label conflicts. Most frequent pairs: "
        + "; ".join(f"{' + '.join(x['findings'])} {x['images']}" for x in a["top_pairs"])
        + ".",
        "",
        f"Training ({t['wall_s']} s): {t['plan']}, "
        + (
            f"{t['epochs_run']} epochs (best {t['best_epoch']})"
            if t["members"] == 1
            else f"{t['members']} members from the budget's leftover time, fused by their mean"
        )
        + f", validation macro AUC {f(t['val_macro_auc'])}; per-finding thresholds chosen on validation (Youden).",
        "",
        f"Test split: n = {e['n']} images of {e['n_patients']} patients ({e['n_removed_duplicates']} copies of "
        f"training images removed); macro AUC {f(e['macro_auc'], e['ci']['macro_auc'])}, micro AUC "
        f"{f(e['micro_auc'])}, mAP {f(e['map'], e['ci']['map'])}; {100 * e['ci']['level']:g}% intervals from "
        f"{e['ci']['n_bootstrap']} resamples by {e['ci']['unit']}.",
        "",
        "| finding | positives | AUC | AP | threshold | sensitivity | specificity |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in e["per_label"].items():
        ci = r["ci"]
        lines.append(
            f"| {name} | {r['n_positive']} | {f(r['auc'], ci['auc'])} | {f(r['ap'], ci['ap'])} | "
            f"{r['threshold']:.3f} | {f(r['sensitivity'], ci['sensitivity'])} | "
            f"{f(r['specificity'], ci['specificity'])} |"
        )
    pr, ex = result["predict"], result["export"]
    worst = min(ex["int8_agreement_per_finding"].items(), key=lambda kv: kv[1])
    lines += [
        "",
        f"Export ({ex['wall_s']} s): ONNX max |p_onnx - p_torch| {ex['onnx_max_abs_prob_diff']:.1e}; int8 "
        f"{ex['int8_size_ratio_vs_fp32']}x smaller, the same per-finding decision as fp32 on "
        f"{100 * ex['int8_agreement_with_fp32']:.1f}% of (validation image, finding) pairs (lowest: {worst[0]} "
        f"{100 * worst[1]:.1f}%), validation macro AUC {f(ex['val_macro_auc']['fp32'])} (fp32) vs "
        f"{f(ex['val_macro_auc']['int8'])} (int8).",
        "",
        f"For scale only: CheXNet's mean AUC over the 14 findings was about {CHEXNET_MEAN_AUC} on the full set "
        "(112,120 images) at 224 px. `medclf predict` on "
        f"{pr['image']}: positive findings {', '.join(pr['positive']) or 'none'}.",
        "",
        f"{result['date']}: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
