"""MLflow tracking on real data, as a user runs it (issue 24 item 1's acceptance), plus its cost.

    .venv/bin/python benchmarks/tracking.py                                # BreastMNIST, 12 epochs: a few minutes
    .venv/bin/python benchmarks/tracking.py --dataset pneumoniamnist.npz --epochs 8

In a fresh folder (the default store is ``runs/mlruns`` under the current folder):

1. **kill and resume**: ``medclf train DATA --out model --epochs E --track`` is killed with SIGKILL once
   ``--kill-after`` epochs are checkpointed, then run again with ``--resume --track``. MLflow's Python client
   then lists the run: one run, the same id before and after, its status, the epochs logged (steps of
   ``val_auc``; a step logged twice means the kill fell between logging an epoch and checkpointing it), the
   final ``val.auc``, and the registered model version with its bundle sha256 against the bundle on disk.
2. **cost**: the same recipe uninterrupted, with and without ``--track`` (wall seconds of the command, which
   include MLflow's import, creating the SQLite store and copying the bundle into it).

Results: ``benchmarks/results/tracking.json`` (and the run's stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets" / "medmnist"
RESULTS = ROOT / "benchmarks" / "results" / "tracking.json"


def medclf(args: list[str], cwd: Path) -> tuple[int, float, str]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "medclf", *args], capture_output=True, text=True, cwd=cwd)
    return proc.returncode, time.perf_counter() - t, proc.stderr


def checkpointed(ckpt: Path) -> int:
    try:
        return int(json.loads((ckpt / "state.json").read_text())["epoch"]) + 1
    except (OSError, ValueError, KeyError):
        return 0


def kill_and_resume(data: Path, work: Path, recipe: list[str], kill_after: int) -> dict[str, Any]:
    from mlflow import MlflowClient

    from medclf.bundle import load_bundle
    from medclf.tracking import local_store_uri

    args = ["train", str(data), "--out", "model", *recipe, "--track"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "medclf", *args],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 900
    while checkpointed(work / "model.ckpt") < kill_after and proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("no checkpoint appeared in 15 min")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = checkpointed(work / "model.ckpt")
    before = json.loads((work / "model.mlflow.json").read_text())["run_id"]
    rc, seconds, err = medclf([*args, "--resume"], work)
    if rc not in (0, 3):
        raise SystemExit(f"resume failed ({rc}): {err[-2000:]}")
    uri = local_store_uri(work)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("medclf")
    runs = client.search_runs([exp.experiment_id])
    run = runs[0]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_auc"))
    versions = client.search_model_versions("name='model'")
    return {
        "epochs_checkpointed_at_kill": saved,
        "runs_in_store": len(runs),
        "run_id_before_kill": before,
        "run_id_after_resume": run.info.run_id,
        "same_run": before == run.info.run_id,
        "status": run.info.status,
        "resumes_tag": run.data.tags.get("medclf.resumes"),
        "val_auc_steps": steps,
        "steps_logged_twice": sorted({s for s in steps if steps.count(s) > 1}),
        "val.auc": run.data.metrics.get("val.auc"),
        "registered_versions": [str(v.version) for v in versions],
        "version_sha256_matches_bundle": bool(versions)
        and versions[0].tags.get("bundle_sha256") == load_bundle(work / "model").sha256,
        "resume_wall_s": round(seconds, 1),
    }


def cost(data: Path, root: Path, recipe: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, extra in (("untracked", []), ("tracked", ["--track"])):
        work = root / name
        work.mkdir()
        rc, seconds, err = medclf(["train", str(data), "--out", "model", *recipe, *extra], work)
        if rc not in (0, 3):
            raise SystemExit(f"{name} run failed ({rc}): {err[-2000:]}")
        recipe_rec = json.loads((work / "model" / "bundle.json").read_text())["recipe"]
        out[name] = {"wall_s": round(seconds, 1), "training_s": recipe_rec.get("seconds")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="breastmnist.npz", help="a file in ../shared/datasets/medmnist")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--kill-after", type=int, default=4, help="epochs checkpointed before the SIGKILL")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--results", type=Path, default=RESULTS, help="where to write the JSON results")
    args = ap.parse_args()
    data = SHARED / args.dataset
    if not data.exists():
        raise SystemExit(f"{data} is not here (../shared/datasets is only on the team's machines)")
    recipe = ["--epochs", str(args.epochs), "--size", str(args.size), "--seed", "0", "--no-progress"]
    with tempfile.TemporaryDirectory(prefix="medclf-tracking-") as tmp:
        root = Path(tmp)
        (root / "resume").mkdir()
        result = {
            "dataset": args.dataset,
            "recipe": recipe,
            "kill_and_resume": kill_and_resume(data, root / "resume", recipe, args.kill_after),
            "cost": cost(data, root, recipe),
        }
    from medclf.tracking import system_info

    result["system"] = system_info()
    result["date"] = time.strftime("%Y-%m-%d")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
