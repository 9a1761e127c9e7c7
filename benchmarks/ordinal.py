"""Ordinal grades: medclf's ordinal head (CORN) against a plain multi-class head, same data, budget and seed.

    .venv/bin/python benchmarks/ordinal.py [--dataset retina] [--budget 10m] [--seed 0]
        [--tasks ordinal,multiclass,ordinal-balanced] [--train-args "--folds 5"]

Each run is what a user runs: ``python -m medclf train DATA --task ordinal|multiclass --time-budget B``, then
``python -m medclf evaluate``. The evaluation scores both models as graders (``metrics.json`` ``ordinal``):
accuracy, MAE, quadratic weighted kappa and within-one accuracy with bootstrap intervals (the ordinal model
decides by the median of its grade distribution, the multi-class model by its most probable class), and
MedMNIST's own AUC (macro one-vs-rest) and ACC (argmax), next to the published table; ``ordinal-balanced``
adds the ordinal head trained with balanced class weights (the default before grades were learnt at the
training prior). ``--train-args`` go to every ``medclf train``. Results:
``benchmarks/results/ordinal-<dataset>.json``, rendered into BENCHMARKS.md by ``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

from contention import cpu  # noqa: E402  (the CPU model and flags, as every benchmark records them)

DATASETS: dict[str, dict[str, Any]] = {
    "retina": {
        "data": SHARED / "medmnist" / "retinamnist.npz",
        "title": "RetinaMNIST (28 px, official splits)",
        # MedMNIST v2's table (test AUC, ACC); the issue's floor is the best row.
        "published": [("ResNet-18 (28)", 0.717, 0.524), ("Google AutoML Vision", 0.750, 0.531)],
        "floor": {"auc": 0.75, "argmax_accuracy": 0.531},
    },
    "knee": {
        "data": SHARED / "knee-oa-kl",
        "title": "knee-oa-kl (Kellgren-Lawrence 0-4, 128 px as shared, published splits)",
        "published": [("Chen et al. 2019, VGG-19 ordinal loss (224 px): accuracy / MAE", 0.697, 0.344)],
        "floor": {},
    },
}


HEADS = {
    "ordinal": "`medclf train --task ordinal` (CORN head)",
    "multiclass": "`--task multiclass`",
    "ordinal-balanced": "`--task ordinal --class-weights balanced` (grades weighted as balanced)",
}
# What each run of --tasks adds to `medclf train`.
TASK_ARGS = {
    "ordinal": ["--task", "ordinal"],
    "multiclass": ["--task", "multiclass"],
    "ordinal-balanced": ["--task", "ordinal", "--class-weights", "balanced"],
}


def run(cmd: list[str], log: Path) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t


def knee_manifest(root: Path, out: Path) -> Path:
    """knee-oa-kl as a CSV manifest with patient ids: file names are the patient id then L or R (left and right
    knees of one person), so both knees stay on one side of any split the run carves and the bootstrap
    resamples patients."""
    import csv

    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split", "patient_id"])
        for split in ("train", "val", "test"):
            for f in sorted((root / split).glob("*/*.png")):
                w.writerow([str(f.resolve()), f.parent.name, split, f.stem.rstrip("LR")])
    return out


def one(dataset: str, task: str, budget: str, seed: int, work: Path, extra: list[str]) -> dict[str, Any]:
    data = DATASETS[dataset]["data"]
    if dataset == "knee":
        data = knee_manifest(data, work / "knee-manifest.csv")
    out = work / f"{dataset}-{task}"
    out.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "medclf"]
    train_s = run(
        [*py, "train", str(data), "--out", str(out / "model"), "--time-budget", budget, *TASK_ARGS[task],
         "--seed", str(seed), *extra],
        out / "train.log",
    )  # fmt: skip
    run([*py, "evaluate", str(out / "model"), str(data), "--out", str(out / "eval")], out / "evaluate.log")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    grades = metrics["ordinal"]
    manifest = json.loads((out / "model" / "bundle.json").read_text())
    recipe = manifest["recipe"]
    return {
        "task": task,
        "train_wall_s": round(train_s, 1),
        "plan": f"{manifest['model']['arch']} {manifest['input']['shape']}"
        + (f", {recipe['folds']} folds" if recipe.get("folds") else "")
        + (f", {recipe['members']} members" if recipe.get("members") else ""),
        "epochs_run": recipe.get("epochs_run"),  # None for an ensemble (leftover members)
        "train_args": extra,
        "n_test": grades["n"],
        # Every test image, copies of training images included, as MedMNIST's published table scored them.
        "all_samples": {k: metrics["all_samples"][k] for k in ("n", "auc", "accuracy")}
        if metrics.get("all_samples")
        else None,
        **{k: grades[k] for k in ("auc", "argmax_accuracy", "accuracy", "mae", "qwk", "within_one_accuracy")},
        "ci": {k: grades["ci"].get(k) for k in ("auc", "accuracy", "mae", "qwk", "within_one_accuracy")},
        "decision_rule": grades["decision_rule"],
    }


def render(result: dict[str, Any]) -> str:
    cfg = DATASETS[result["dataset"]]
    c = result["cpu"]
    lines = [
        f"## Ordinal grades: {cfg['title']}"
        + (f", `{' '.join(result['train_args'])}`" if result.get("train_args") else "")
        + f", seed {result['seed']}",
        "",
        "`benchmarks/ordinal.py`: "
        + " vs ".join(HEADS.get(r["task"], f"`--task {r['task']}`") for r in result["runs"])
        + f", `--time-budget {result['budget']}`"
        + (f" `{' '.join(result['train_args'])}`" if result.get("train_args") else "")
        + f", seed {result['seed']}, then `medclf evaluate`. Test split "
        f"(copies of training images removed). CPU: {c['model']}, {c['allowed']} of {c['cores']} cores; flags: "
        f"{', '.join(c['flags']) or 'none of AVX-512, AVX-VNNI, AMX'}.",
        "",
        "| head | plan | epochs | n test | AUC (MedMNIST) | ACC argmax (MedMNIST) | accuracy (decision) | MAE "
        "| QWK | within one | AUC / ACC, every test image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v: Any, ci: Any = None) -> str:
        if v is None:
            return "n/a"
        return f"{v:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")

    def every(r: dict[str, Any]) -> str:
        a = r.get("all_samples")
        return f"{a['auc']:.3f} / {a['accuracy']:.3f} (n {a['n']})" if a else "n/a"

    for r in result["runs"]:
        ci = r["ci"]
        lines.append(
            f"| {r['task']} | {r['plan']} | {r['epochs_run'] or 'n/a'} | {r['n_test']} | {f(r['auc'], ci['auc'])} "
            f"| {f(r['argmax_accuracy'])} | {f(r['accuracy'], ci['accuracy'])} | {f(r['mae'], ci['mae'])} "
            f"| {f(r['qwk'], ci['qwk'])} | {f(r['within_one_accuracy'], ci['within_one_accuracy'])} | {every(r)} |"
        )
    lines += ["", "Published: " + "; ".join(f"{name} {a} / {b}" for name, a, b in cfg["published"]) + "."]
    floor = cfg["floor"]
    if floor:
        ordinal = next(r for r in result["runs"] if r["task"] == "ordinal")
        met = all((ordinal[k] or 0) >= v for k, v in floor.items())
        every_image = ordinal.get("all_samples") or {}
        met_every = bool(every_image) and (
            every_image["auc"] >= floor["auc"] and every_image["accuracy"] >= floor["argmax_accuracy"]
        )
        verdict = "met" if met else "NOT met"
        if not met and met_every:
            verdict += f" on the clean test split; met on every test image (n {every_image['n']}), as MedMNIST scored"
        lines.append(
            f"Floor (ordinal head): AUC >= {floor['auc']} and ACC >= {floor['argmax_accuracy']}: {verdict}."
        )
    if result.get("note"):
        lines += ["", f"Note: {result['note']}"]
    lines += ["", f"{result['date']}: `{result['command']}`", ""]
    return "\n".join(lines)


def render_spread(results: list[dict[str, Any]]) -> str:
    """The ordinal head across the seeds of one configuration (dataset, budget, train args): each seed's
    MedMNIST AUC and ACC, their mean and spread, and in how many seeds the floor holds. Empty unless at
    least two seeds of a configuration with a floor were run."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        key = (r["dataset"], r["budget"], " ".join(r.get("train_args") or []))
        groups.setdefault(key, []).append(r)
    lines: list[str] = []
    for (dataset, budget, train_args), rs in groups.items():
        floor = DATASETS[dataset]["floor"]
        rows = sorted(
            ((r["seed"], next(x for x in r["runs"] if x["task"] == "ordinal"), r["date"]) for r in rs
             if any(x["task"] == "ordinal" for x in r["runs"])),
            key=lambda t: t[0],
        )  # fmt: skip
        if len({seed for seed, _, _ in rows}) < 2 or not floor:
            continue
        auc = np.array([o["auc"] for _, o, _ in rows])
        acc = np.array([o["argmax_accuracy"] for _, o, _ in rows])
        met = sum(a >= floor["auc"] and b >= floor["argmax_accuracy"] for a, b in zip(auc, acc, strict=True))
        lines += [
            f"## Ordinal grades across seeds: {DATASETS[dataset]['title']}, `--time-budget {budget}`"
            + (f" `{train_args}`" if train_args else ""),
            "",
            "The ordinal head's test AUC and ACC (argmax) of every seed run with this configuration (one section "
            "above each): the spread a user should expect from one run.",
            "",
            "| seed | AUC | ACC (argmax) | date |",
            "|---|---|---|---|",
            *(f"| {seed} | {o['auc']:.4f} | {o['argmax_accuracy']:.4f} | {date} |" for seed, o, date in rows),
            f"| mean (sd) | {auc.mean():.4f} ({auc.std(ddof=1):.4f}) | {acc.mean():.4f} ({acc.std(ddof=1):.4f}) | |",
            "",
            f"Floor (AUC >= {floor['auc']} and ACC >= {floor['argmax_accuracy']}) met in {met} of {len(rows)} "
            "seeds" + ("; met by the mean." if auc.mean() >= floor["auc"] and acc.mean() >= floor["argmax_accuracy"]
                       else "; NOT met by the mean."),
            "",
        ]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=list(DATASETS), default="retina")
    ap.add_argument("--budget", default="10m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", default="ordinal,multiclass", help=f"runs, of {', '.join(TASK_ARGS)}")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "ordinal")
    ap.add_argument(
        "--train-args", default="", help="more `medclf train` options for both heads, e.g. '--folds 5'"
    )
    ap.add_argument(
        "--out-name", default=None, help="result file in benchmarks/results (default ordinal-<dataset>.json)"
    )
    args = ap.parse_args()
    extra = args.train_args.split()
    unknown = [t for t in args.tasks.split(",") if t not in TASK_ARGS]
    if unknown:
        raise SystemExit(f"unknown --tasks {', '.join(unknown)} (known: {', '.join(TASK_ARGS)})")
    if not DATASETS[args.dataset]["data"].exists():
        raise SystemExit(f"{DATASETS[args.dataset]['data']} is absent (see ../shared/datasets/README.md)")
    result = {
        "dataset": args.dataset,
        "budget": args.budget,
        "seed": args.seed,
        "cpu": cpu(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/ordinal.py " + shlex.join(sys.argv[1:]),
        "train_args": extra,
        "runs": [
            one(args.dataset, t, args.budget, args.seed, args.work, extra) for t in args.tasks.split(",")
        ],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / (args.out_name or f"ordinal-{args.dataset}.json")).write_text(json.dumps(result, indent=2))
    print(render(result))


if __name__ == "__main__":
    main()
