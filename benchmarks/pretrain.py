"""Self-supervised pretraining: the "starter" backbone, then fine-tuning from it against training from scratch.

    .venv/bin/python benchmarks/pretrain.py [--pretrain-budget 60m] [--budget 5m] [--seeds 0,1,2]
                                           [--datasets breast] [--backbone runs/pretrain/starter]

1. The starter recipe (documented in README, "Pretraining"): ``medclf pretrain`` on the TRAINING splits of every
   shared dataset medclf reads (BreastMNIST first: its 28 px greyscale preprocessing is the backbone's;
   PneumoniaMNIST, RetinaMNIST, the brain MRI Training folder, knee-oa-kl train, the NIH subset's train rows),
   never a validation or test split, within ``--pretrain-budget`` on the CPU. Skipped when ``--backbone``
   already holds a backbone bundle.
2. For each dataset and seed: ``medclf train`` from scratch (the backbone's architecture and input size, so
   only the initialisation differs) and ``medclf train --init-from BACKBONE``, each with ``--time-budget
   --budget``, then ``medclf evaluate`` on the official test split (copies of training images removed).
   ``--arms`` adds ``init-from-lp`` (``--linear-probe 0.3``), ``init-from-ft`` (``--linear-probe 0``) and
   ``default``, the planner's own choice with no options (another network or size, perhaps: the from-scratch
   baseline a user gets). Each fine-tuning run records the linear-probe share it used;
   ``--refresh-probe-shares`` fills them in for a result file written before runs recorded them.

Results: ``benchmarks/results/pretrain.json`` (the backbone's recipe, epochs, loss and k-NN curves; per run
the test AUC and accuracy with bootstrap intervals; per arm the mean and spread over seeds), rendered by
:func:`render`. Every command goes through ``python -m medclf`` as a user runs it.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

from contention import cpu  # noqa: E402  (the CPU model and flags, as every benchmark records them)

DATASETS: dict[str, dict[str, Any]] = {
    "breast": {
        "data": SHARED / "medmnist" / "breastmnist.npz",
        "title": "BreastMNIST (28 px, official splits)",
        "goal": {"auc": 0.95, "accuracy": 0.90},
        "published": "best published 0.940 AUC / 0.906 ACC (MedMNIST+, 128 px, ImageNet-pretrained)",
    },
    "pneumonia": {
        "data": SHARED / "medmnist" / "pneumoniamnist.npz",
        "title": "PneumoniaMNIST (28 px, official splits)",
        "goal": {},
        "published": "ResNet-18 (28) 0.944 / 0.854; best of MedMNIST+ 0.989 / 0.916 (224 px)",
    },
    "brain": {
        "data": SHARED / "brain-tumor-mri",
        "title": "Brain Tumor MRI (Testing minus copies of Training)",
        "goal": {},
        "published": "96-99 % accuracy claimed (pretrained CNNs, duplicates mostly not removed)",
    },
}


# scratch: the backbone's architecture and size from random weights; init-from: the backbone as the planner
# fine-tunes it (each run records its linear-probe share, which the tables show); init-from-lp: a linear probe
# for the first 30 % of the epochs, then fine-tuning (--linear-probe 0.3); init-from-ft: every layer
# fine-tuned from the first epoch (--linear-probe 0); default: what the planner chooses for the dataset with
# no options (optional).
ARMS = ("scratch", "init-from", "init-from-lp", "init-from-ft", "default")
PROBE_ARGS = {"init-from-lp": ["--linear-probe", "0.3"], "init-from-ft": ["--linear-probe", "0"]}


def starter_sources(work: Path) -> list[str]:
    """Every shared dataset medclf reads, as pretraining sources (breastmnist first: it sets the spec). Only
    training splits are read (``--splits train``); the NIH subset, whose folder holds all its splits, goes
    through a manifest of its train rows alone (labels left empty: pretraining ignores them)."""
    sources = [
        SHARED / "medmnist" / "breastmnist.npz",
        SHARED / "medmnist" / "pneumoniamnist.npz",
        SHARED / "medmnist" / "retinamnist.npz",
        SHARED / "brain-tumor-mri",
        SHARED / "knee-oa-kl",
    ]
    found = [str(s) for s in sources if s.exists()]
    nih = SHARED / "nih-chestxray14-1000"
    if (nih / "splits.csv").exists():
        manifest = work / "nih-train.csv"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        with (nih / "splits.csv").open(newline="") as fh, manifest.open("w", newline="") as out:
            w = csv.writer(out)
            w.writerow(["path", "split"])
            for row in csv.DictReader(fh):
                if row["split"].strip().lower() == "train":  # no label column: pretraining ignores labels
                    w.writerow([str((nih / "images" / row["Image Index"]).resolve()), "train"])
        found.append(str(manifest))
    return found


def run(cmd: list[str], log: Path) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t


def pretrain_starter(backbone: Path, budget: str, work: Path, extra: list[str]) -> dict[str, Any]:
    py = [sys.executable, "-m", "medclf"]
    sources = starter_sources(work)
    wall = None
    if not (backbone / "bundle.json").exists():
        backbone.parent.mkdir(parents=True, exist_ok=True)
        wall = run(
            [*py, "pretrain", *sources, "--out", str(backbone), "--time-budget", budget, "--splits", "train",
             "--no-progress", *extra],
            work / "pretrain.log",
        )  # fmt: skip
    m = json.loads((backbone / "bundle.json").read_text())
    pre = m["pretraining"]
    return {
        "bundle": str(backbone),
        "sha256": m["self_sha256"],
        "command": f"medclf pretrain {' '.join(sources)} --out {backbone} --time-budget {budget} --splits train"
        + "".join(f" {a}" for a in extra),
        "wall_s": round(wall, 1) if wall is not None else pre.get("seconds"),
        "arch": m["model"]["arch"],
        "input": [m["preprocess"]["channels"], *m["preprocess"]["size"]],
        "sources": [{k: s[k] for k in ("path", "splits", "images", "unreadable")} for s in pre["sources"]],
        "images": pre["images"],
        "epochs": pre["epochs"],
        "batch_size": pre["batch_size"],
        "schedule": pre["schedule"],
        "loss_curve": pre["loss_curve"],
        "knn_probe": pre["knn_probe"],
    }


def one(
    dataset: str, arm: str, seed: int, budget: str, backbone: dict[str, Any], work: Path
) -> dict[str, Any]:
    data = DATASETS[dataset]["data"]
    out = work / f"{dataset}-{arm}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "medclf"]
    cmd = [*py, "train", str(data), "--out", str(out / "model"), "--time-budget", budget, "--seed", str(seed)]
    cmd += ["--no-progress"]
    if arm.startswith("init-from"):
        cmd += ["--init-from", backbone["bundle"], *PROBE_ARGS.get(arm, [])]
    elif arm == "scratch":  # the backbone's network and input size: only the starting weights differ
        cmd += ["--arch", backbone["arch"], "--size", str(backbone["input"][-1])]
    wall = run(cmd, out / "train.log")
    run([*py, "evaluate", str(out / "model"), str(data), "--out", str(out / "eval")], out / "evaluate.log")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    manifest = json.loads((out / "model" / "bundle.json").read_text())
    recipe = manifest.get("recipe", {})
    return {
        "dataset": dataset,
        "arm": arm,
        "seed": seed,
        "train_wall_s": round(wall, 1),
        "plan": f"{manifest['model']['arch']} {manifest['input']['shape']}",
        "linear_probe": probe_share(manifest, (out / "train.log").read_text()) if arm != "scratch" else None,
        "epochs_run": recipe.get("epochs_run"),
        "n_test": metrics.get("n"),
        "auc": metrics.get("auc"),
        "accuracy": metrics.get("accuracy"),
        "ci": {k: (metrics.get("ci") or {}).get(k) for k in ("auc", "accuracy")},
    }


def probe_share(manifest: dict[str, Any], train_log: str) -> float | None:
    """The linear-probe share a fine-tuning run used: its bundle's recipe (one model), the first member's
    record (a leftover-budget ensemble), else the plan as ``medclf train`` printed it (bundles written before
    ensembles recorded it)."""
    recipe = manifest.get("recipe", {})
    if "linear_probe" in recipe:
        return float(recipe["linear_probe"])
    first = (manifest.get("leftover") or {}).get("first_member") or {}
    if "linear_probe" in first:
        return float(first["linear_probe"])
    if "fine-tuning from" not in train_log:
        return None
    said = re.search(r"linear probe \(output layer only\) for the first (\d+)% of the epochs", train_log)
    return int(said.group(1)) / 100 if said else 0.0


def refresh_probe_shares(result: dict[str, Any], work: Path) -> None:
    """Fill in the probe shares a result file lacks from its runs' bundles and logs in ``work``."""
    for r in result["runs"]:
        run_dir = work / f"{r['dataset']}-{r['arm']}-seed{r['seed']}"
        if r["arm"] != "scratch" and r.get("linear_probe") is None and (run_dir / "train.log").exists():
            manifest = json.loads((run_dir / "model" / "bundle.json").read_text())
            r["linear_probe"] = probe_share(manifest, (run_dir / "train.log").read_text())


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        for arm in ARMS:
            mine = [r for r in runs if r["dataset"] == dataset and r["arm"] == arm]
            if not mine:
                continue
            row: dict[str, Any] = {"dataset": dataset, "arm": arm, "seeds": len(mine)}
            row["linear_probe"] = (
                list(dict.fromkeys(r.get("linear_probe") for r in mine)) if arm != "scratch" else []
            )
            for k in ("auc", "accuracy"):
                values = [r[k] for r in mine if r[k] is not None]
                row[k] = statistics.mean(values) if values else None
                row[f"{k}_sd"] = statistics.stdev(values) if len(values) > 1 else None
            rows.append(row)
    return rows


def _probe(shares: list[float | None] | None) -> str:
    """ " (probe 30 %)", " (no probe)" after an --init-from arm's name; nothing for scratch."""
    if not shares:
        return ""
    said = {None: "probe share not recorded", 0.0: "no probe"}
    return " (" + ", ".join(said.get(v) or f"probe {v:.0%}" for v in shares) + ")"


def render(result: dict[str, Any]) -> str:
    b, c = result["backbone"], result["cpu"]
    knn = (b.get("knn_probe") or {}).get("accuracy_curve") or []
    budget = re.search(r"--time-budget (\S+)", b["command"])
    lines = [
        f"## Self-supervised pretraining: the {budget.group(1) + ' ' if budget else ''}starter backbone, "
        "fine-tuned vs from scratch ("
        + ", ".join(
            DATASETS[d]["title"].split(" (")[0] for d in dict.fromkeys(r["dataset"] for r in result["runs"])
        )
        + ")",
        "",
        f"`benchmarks/pretrain.py`: `{b['command']}` ({b['images']} training images of {len(b['sources'])} "
        f"sources, no test or validation split; {b['arch']} at {b['input']}; {b['epochs']} epochs of SimCLR, "
        f"batch {b['batch_size']}, {b['wall_s']} s; SSL loss {b['loss_curve'][0]:.3f} -> {b['loss_curve'][-1]:.3f}"
        + (f"; k-NN probe accuracy {knn[0]:.3f} -> {knn[-1]:.3f}" if knn else "")
        + f"). Then `medclf train` with `--time-budget {result['budget']}` per run, from scratch (same "
        f"architecture and size) or `--init-from` the backbone (the linear-probe share of the epochs as each "
        f"run recorded it: 0 = every layer fine-tunes from the first epoch), seeds "
        f"{result['seeds']}, and `medclf evaluate` "
        f"on the test split. CPU: {c['model']}, {c['allowed']} of {c['cores']} cores; flags: "
        f"{', '.join(c['flags']) or 'none of AVX-512, AVX-VNNI, AMX'}.",
        "",
        "| dataset | start | seeds | test AUC mean (sd) | test accuracy mean (sd) |",
        "|---|---|---|---|---|",
    ]

    def f(v: Any, sd: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}" + (f" ({sd:.3f})" if sd is not None else "")

    for s in summarise(result["runs"]):  # recomputed: older result files lack the probe shares
        lines.append(
            f"| {s['dataset']} | {s['arm']}{_probe(s.get('linear_probe'))} | {s['seeds']} | {f(s['auc'], s['auc_sd'])} "
            f"| {f(s['accuracy'], s['accuracy_sd'])} |"
        )
    lines += [
        "",
        "| dataset | start | seed | epochs | test AUC (95 % CI) | test accuracy (95 % CI) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:

        def g(k: str, r: dict[str, Any] = r) -> str:
            ci = r["ci"].get(k)
            return "n/a" if r[k] is None else f"{r[k]:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")

        lines.append(
            f"| {r['dataset']} | {r['arm']}{_probe([r.get('linear_probe')] if r['arm'] != 'scratch' else [])} "
            f"| {r['seed']} | {r['epochs_run'] or 'n/a (ensemble)'} | {g('auc')} "
            f"| {g('accuracy')} |"
        )
    if not any(r["arm"] == "scratch" for r in result["runs"]):
        lines.append(
            "\nNo scratch arm in this run: training from scratch does not depend on the backbone, so the "
            "scratch rows of the same dataset, budget and seeds are those of the other backbone's section."
        )
    for d in dict.fromkeys(r["dataset"] for r in result["runs"]):
        lines.append(f"\n{DATASETS[d]['title']}: {DATASETS[d]['published']}.")
    lines += ["", f"{result['date']}: `{result['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-budget", default="60m")
    ap.add_argument("--budget", default="5m", help="time budget of each supervised run")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--datasets", default="breast", help=f"comma-separated: {', '.join(DATASETS)}")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "pretrain")
    ap.add_argument("--backbone", type=Path, default=None, help="reuse (or write) the backbone bundle here")
    ap.add_argument("--pretrain-args", default="", help="extra `medclf pretrain` options (e.g. --size 28)")
    ap.add_argument("--out-name", default="pretrain.json")
    ap.add_argument("--arms", default="scratch,init-from", help=f"comma-separated: {', '.join(ARMS)}")
    ap.add_argument(
        "--refresh-probe-shares",
        action="store_true",
        help="train nothing: fill in the linear-probe shares the result file lacks from the runs in --work",
    )
    args = ap.parse_args()
    if args.refresh_probe_shares:
        path = RESULTS / args.out_name
        result = json.loads(path.read_text())
        refresh_probe_shares(result, args.work)
        path.write_text(json.dumps(result, indent=2))
        print(render(result))
        return
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    for d in datasets:
        if d not in DATASETS or not DATASETS[d]["data"].exists():
            raise SystemExit(f"{d}: unknown or absent (see ../shared/datasets/README.md)")
    args.work.mkdir(parents=True, exist_ok=True)
    backbone = pretrain_starter(
        args.backbone or args.work / "starter", args.pretrain_budget, args.work, args.pretrain_args.split()
    )
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or not set(arms) <= set(ARMS):
        raise SystemExit(f"--arms: choose from {', '.join(ARMS)}")
    runs = [
        one(d, arm, seed, args.budget, backbone, args.work)
        for d in datasets
        for seed in seeds
        for arm in arms
    ]
    result = {
        "backbone": backbone,
        "budget": args.budget,
        "seeds": seeds,
        "cpu": cpu(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/pretrain.py " + " ".join(sys.argv[1:]),
        "runs": runs,
        "summary": summarise(runs),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.out_name).write_text(json.dumps(result, indent=2))
    print(render(result))


if __name__ == "__main__":
    main()
