"""Benchmark runner: train + evaluate the default recipe on the real datasets, write BENCHMARKS.md.

    .venv/bin/python benchmarks/run.py                      # every dataset
    .venv/bin/python benchmarks/run.py --dataset pneumonia  # one row only; the others are kept

Each run's result goes to ``benchmarks/results/<name>.json`` (with the command, machine, versions and
date); ``BENCHMARKS.md`` is regenerated from all result files, so any row can be rerun alone. The
datasets live in ``../shared/datasets`` (see its README); they are never copied into the repository.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "results"

DATASETS = {
    "pneumonia": {
        "data": SHARED / "medmnist" / "pneumoniamnist.npz",
        "budget": "10m",
        "title": "PneumoniaMNIST (28 px, test n=624)",
        "published": "ResNet-18 (28) .944 / .854; ResNet-50 (224) .962 / .884; AutoML Vision .991 / .946",
        "target": {"auc": 0.975, "accuracy": 0.90},
    },
    "breast": {
        "data": SHARED / "medmnist" / "breastmnist.npz",
        "budget": "10m",
        "title": "BreastMNIST (28 px, test n=156)",
        "published": "ResNet-18 (28) .901 / .863; ResNet-50 (224) .866 / .842; AutoML Vision .919 / .861",
        "target": {"auc": 0.901, "accuracy": 0.863},
    },
    "brain": {
        "data": SHARED / "brain-tumor-mri",
        "budget": "20m",
        "title": "Brain Tumor MRI (4 classes; Testing minus copies of Training images)",
        "published": "96-99 % accuracy claimed (pretrained CNNs, GPU, duplicates not removed)",
        "target": {"auc": 0.99, "accuracy": 0.94},
    },
}


def machine() -> dict[str, str]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def run_one(name: str, out_root: Path, budget: str | None, seed: int) -> dict:
    import medclf

    cfg = DATASETS[name]
    data = cfg["data"]
    if not data.exists():
        raise SystemExit(f"{data} not found: the benchmarks need ../shared/datasets")
    budget = budget or cfg["budget"]
    out = out_root / name
    t0 = time.perf_counter()
    result = medclf.train(data, out / "model", time_budget=budget, seed=seed, progress=False)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    metrics = medclf.evaluate(result.bundle, data, out / "eval", progress=False)
    eval_s = time.perf_counter() - t1
    return {
        "dataset": name,
        "title": cfg["title"],
        "published": cfg["published"],
        "target": cfg["target"],
        "method": f"medclf default recipe ({result.plan.arch}, {result.plan.spec.size[0]} px, "
        f"{len(result.history)} epochs, augment {result.plan.augment})",
        "time_budget": budget,
        "train_wall_s": round(train_s, 1),
        "eval_wall_s": round(eval_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
        "metrics": {
            k: metrics.get(k)
            for k in ("n", "accuracy", "balanced_accuracy", "auc", "ece", "ci", "n_removed_duplicates")
        },
        "all_samples": {k: metrics["all_samples"].get(k) for k in ("n", "accuracy", "auc")},
        "val": {k: result.val_metrics.get(k) for k in ("n", "accuracy", "auc")},
        "command": (
            f"medclf train {data} --out {out / 'model'} --time-budget {budget} --seed {seed} && "
            f"medclf evaluate {out / 'model'} {data} --out {out / 'eval'}"
        ),
        "runner": "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": machine(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "medclf_version": medclf.__version__,
    }


def _ci(m: dict, key: str) -> str:
    ci = (m.get("ci") or {}).get(key)
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] is not None else ""


def render(results: list[dict]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Produced by `benchmarks/run.py` (regenerate everything with `make bench`, one row with "
        "`.venv/bin/python benchmarks/run.py --dataset NAME`). Test figures exclude every test image that is "
        "an exact or near copy of a training image (`n removed`); the `all samples` columns keep them, as "
        "published protocols do. 95 % intervals: percentile bootstrap, 1000 resamples. Wall times include "
        "decoding and preprocessing (first run, empty cache).",
        "",
        "## Foundation: default recipe under a time budget (CPU)",
        "",
        "| dataset | method | budget | train wall | test n (removed) | accuracy [95 % CI] | AUC [95 % CI] "
        "| all samples acc / AUC | target acc / AUC | published (AUC / acc) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, a, t = r["metrics"], r["all_samples"], r["target"]
        lines.append(
            f"| {r['title']} | {r['method']} | {r['time_budget']} | {r['train_wall_s'] / 60:.1f} min "
            f"| {m['n']} ({m['n_removed_duplicates']}) | {m['accuracy']:.4f}{_ci(m, 'accuracy')} "
            f"| {m['auc']:.4f}{_ci(m, 'auc')} | {a['accuracy']:.4f} / {a['auc']:.4f} "
            f"| {t['accuracy']} / {t['auc']} | {r['published']} |"
        )
    lines += ["", "### How each row was produced", ""]
    for r in results:
        mc = r["machine"]
        lines += [
            f"- **{r['dataset']}** ({r['date']}; {mc['cpu']}, {mc['cores']} cores, torch {mc['torch']}, "
            f"GPU: {mc['gpu']}; peak RSS {r['peak_rss_mb']:.0f} MB): `{r['command']}`",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=[*DATASETS, "all"], default="all")
    ap.add_argument("--budget", help="override the time budget (e.g. 5m)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    ap.add_argument("--render-only", action="store_true", help="rewrite BENCHMARKS.md from saved results")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.render_only:
        names = list(DATASETS) if args.dataset == "all" else [args.dataset]
        for name in names:
            res = run_one(name, args.out, args.budget, args.seed)
            (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2))
            print(json.dumps(res["metrics"], indent=2))
    results = [
        json.loads((RESULTS / f"{n}.json").read_text()) for n in DATASETS if (RESULTS / f"{n}.json").exists()
    ]
    (ROOT / "BENCHMARKS.md").write_text(render(results))
    print(f"BENCHMARKS.md updated ({len(results)} rows)")


if __name__ == "__main__":
    main()
