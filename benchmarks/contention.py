"""Training on a busy machine: ``medclf train`` with and without one competing CPU-bound process.

    .venv/bin/python benchmarks/contention.py                       # everything below (about 55 min)
    .venv/bin/python benchmarks/contention.py --only audit,short    # just the audit and the 2-minute runs
    .venv/bin/python benchmarks/contention.py --render              # print the markdown of saved results

What it runs (issue 20's acceptance), each as the user would, through ``python -m medclf``:

* **train under contention**: for PneumoniaMNIST and BreastMNIST, ``medclf train --time-budget 10m`` then
  ``medclf evaluate`` on the quiet machine, and the same again while one competing process keeps one core
  busy (a single-threaded pure-Python loop, started before ``train`` and killed after ``evaluate``). Per run:
  test AUC and accuracy (copies of training images removed), the plan (network, input size), epochs planned
  and run, whether the schedule annealed, mean epoch seconds of the first member, the threads chosen, the
  sanity gate's verdict. The slowdown is the contended mean epoch time over the quiet one (the same plan is
  not guaranteed: the planner times the machine it finds, so both plans are listed).
* **audit under contention**: ``medclf audit`` on BreastMNIST with the shift check, wall seconds, with and
  without the competing process.
* **a short budget**: BreastMNIST ``--time-budget 2m`` on the quiet machine with seeds 0, 1, 2: test accuracy
  against the accuracy of always answering the training split's majority class, and the gate's verdict
  (a failed gate must be loud: console, bundle, evaluate report).

The CPU's model and vector flags (AVX-512, AVX-VNNI, AMX) come with the results. Results:
``benchmarks/results/contention.json``; ``--render`` (and ``benchmarks/run.py``) turn them into markdown.
``--budget``, ``--short-budget``, ``--subset`` and ``--datasets`` exist to check the script end to end
in a few minutes; such runs are smoke tests, not results.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets" / "medmnist"
RESULTS = ROOT / "benchmarks" / "results" / "contention.json"
DATASETS = {
    "pneumonia": {"file": "pneumoniamnist.npz", "floor": {"auc": 0.975, "accuracy": 0.90}},
    "breast": {"file": "breastmnist.npz", "floor": {"auc": 0.901, "accuracy": 0.863}},
}
MAX_SLOWDOWN = 2.5
AUDIT_LIMIT_S = 20.0
FLAGS = re.compile(r"^(avx512[a-z0-9_]*|avx_vnni[a-z0-9_]*|amx[a-z0-9_]*)$")


def cpu() -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?"
    )
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "flags:")
    flags = sorted({f for f in line.split(":", 1)[1].split() if FLAGS.match(f)})
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:
        allowed = os.cpu_count() or 1
    return {"model": model, "flags": flags, "cores": os.cpu_count(), "allowed": allowed}


class Competitor:
    """One single-threaded CPU-bound process (a pure-Python busy loop) for the duration of a ``with``."""

    def __enter__(self) -> Competitor:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True:\n    pass"])
        time.sleep(2.0)  # running before medclf measures the machine
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def medclf(*args: str, log: Path) -> tuple[int, float, str]:
    """``python -m medclf ARGS``: (exit code, wall seconds, stderr), stderr also saved to ``log``."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "medclf", *args], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode not in (0, 3):
        raise SystemExit(f"medclf {' '.join(args)} failed ({proc.returncode}); see {log}")
    return proc.returncode, seconds, proc.stderr


def subset(src: Path, dest: Path, n: int) -> Path:
    """The first ``n`` images of each split of a MedMNIST file (smoke tests only)."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k][:n] for k in z.files}
    dest.parent.mkdir(parents=True, exist_ok=True)
    np.savez(dest, **arrays)
    return dest


def majority_accuracy(data: Path) -> float:
    """Test accuracy of always answering the training split's most frequent class."""
    with np.load(data, allow_pickle=False) as z:
        train, test = z["train_labels"].ravel(), z["test_labels"].ravel()
    return float(np.mean(test == np.bincount(train).argmax()))


def train_and_evaluate(data: Path, work: Path, budget: str, seed: int = 0) -> dict[str, Any]:
    model, ev = work / "model", work / "eval"
    rc, train_s, log = medclf(
        "train", str(data), "--out", str(model), "--time-budget", budget, "--seed", str(seed),
        "--no-progress", log=work / "train.log",
    )  # fmt: skip
    medclf("evaluate", str(model), str(data), "--out", str(ev), "--no-progress", log=work / "evaluate.log")
    metrics = json.loads((ev / "metrics.json").read_text())
    manifest = json.loads((model / "bundle.json").read_text())
    recipe = manifest.get("recipe", {})
    first = (manifest.get("leftover") or {}).get("first_member") or {}
    schedule = recipe.get("schedule") or first.get("schedule") or {}
    seconds = [h["seconds"] for h in manifest.get("history", [])] or first.get("epoch_seconds") or []
    threads = re.findall(r"threads: (\d+) thread", log)
    plan = re.search(r"^Plan arch=(\S+) .*? input=(\([^)]*\))", log, flags=re.M)
    gate = manifest.get("sanity") or {}
    report = (ev / "report.html").read_text(encoding="utf-8")
    return {
        "test_auc": metrics.get("auc"),
        "test_accuracy": metrics.get("accuracy"),
        "plan": f"{plan.group(1)} {plan.group(2)}" if plan else None,
        "members": (manifest.get("leftover") or {}).get("members", 1),
        "planned_epochs": schedule.get("planned_epochs"),
        "epochs_run": schedule.get("epochs_run"),
        "schedule_completed": schedule.get("completed"),
        "stop_reason": schedule.get("stop_reason"),
        "mean_epoch_s": round(float(np.mean(seconds)), 2) if seconds else None,
        "threads": int(threads[0]) if threads else None,
        "thread_changes": re.findall(r"Threads: (\d+ -> \d+)", log),
        "train_wall_s": round(train_s, 1),
        "exit_code": rc,
        "gate_passed": gate.get("passed"),
        "gate_warnings": gate.get("warnings", []),
        "warned_in_console": "WARNING: the sanity check failed" in log,
        "warned_in_report": "failed its training sanity check" in report,
    }


def run_training(names: list[str], budget: str, work: Path, n_subset: int | None) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        data = SHARED / DATASETS[name]["file"]
        if n_subset:
            data = subset(data, work / "data" / f"{name}-{n_subset}.npz", n_subset)
        print(f"=== {name}, {budget}: quiet", flush=True)
        quiet = train_and_evaluate(data, work / f"{name}-quiet", budget)
        print(f"=== {name}, {budget}: one competing process", flush=True)
        with Competitor():
            busy = train_and_evaluate(data, work / f"{name}-contended", budget)
        slowdown = (
            round(busy["mean_epoch_s"] / quiet["mean_epoch_s"], 2)
            if busy["mean_epoch_s"] and quiet["mean_epoch_s"]
            else None
        )
        rows.append(
            {"dataset": name, "budget": budget, "floor": DATASETS[name]["floor"], "quiet": quiet,
             "contended": busy, "slowdown": slowdown}
        )  # fmt: skip
    return rows


def run_audit(work: Path, n_subset: int | None) -> dict[str, Any]:
    data = SHARED / DATASETS["breast"]["file"]
    if n_subset:
        data = subset(data, work / "data" / f"breast-{n_subset}.npz", n_subset)
    out: dict[str, Any] = {}
    for label in ("quiet", "contended"):
        print(f"=== audit, breast: {label}", flush=True)
        args = ("audit", str(data), "--out", str(work / f"audit-{label}.json"), "--no-progress")
        if label == "quiet":
            _, seconds, _ = medclf(*args, log=work / f"audit-{label}.log")
        else:
            with Competitor():
                _, seconds, _ = medclf(*args, log=work / f"audit-{label}.log")
        report = json.loads((work / f"audit-{label}.json").read_text())
        out[label] = {
            "wall_s": round(seconds, 1),
            "shift_pairs": len((report.get("split_shift") or {}).get("results", [])),
        }
    return out


def run_short(work: Path, budget: str, seeds: list[int], n_subset: int | None) -> list[dict[str, Any]]:
    data = SHARED / DATASETS["breast"]["file"]
    if n_subset:
        data = subset(data, work / "data" / f"breast-{n_subset}.npz", n_subset)
    majority = majority_accuracy(data)
    rows = []
    for seed in seeds:
        print(f"=== breast, {budget}, seed {seed} (quiet)", flush=True)
        r = train_and_evaluate(data, work / f"breast-{budget}-seed{seed}", budget, seed=seed)
        above = r["test_accuracy"] is not None and r["test_accuracy"] > majority
        loud = r["gate_passed"] is False and r["warned_in_console"] and r["warned_in_report"]
        rows.append({"seed": seed, "majority_accuracy": round(majority, 4), **r, "ok": bool(above or loud)})
    return rows


def merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Re-running some datasets or sections replaces those and keeps the rest, which keep their own date and
    command (a training row carries its own; earlier files held one date for everything)."""
    out = {**old, **{k: v for k, v in new.items() if k != "training"}}
    # A section re-run now carries the run's own date and CPU: drop those it had from an earlier run.
    out["section_dates"] = {k: v for k, v in old.get("section_dates", {}).items() if k not in new}
    out["section_cpus"] = {k: v for k, v in old.get("section_cpus", {}).items() if k not in new}
    for section in ("audit", "short"):
        if section not in new and section in old:
            out[section] = old[section]
            out["section_dates"][section] = old.get("section_dates", {}).get(
                section, f"{old['date']}: `{old['command']}`"
            )
            out["section_cpus"][section] = old.get("section_cpus", {}).get(section, old["cpu"])
    # Rows from an earlier run keep the date, command and CPU they were measured with.
    earlier = {"date": old["date"], "command": old["command"], "cpu": old["cpu"]}
    if "training" in new:
        fresh = {row["dataset"] for row in new["training"]}
        kept = [{**earlier, **row} for row in old.get("training", []) if row["dataset"] not in fresh]
        out["training"] = kept + new["training"]
    elif "training" in old:
        out["training"] = [{**earlier, **r} for r in old["training"]]
    return out


def _cpu_words(c: dict[str, Any]) -> str:
    flags = ", ".join(c["flags"]) or "none of AVX-512, AVX-VNNI, AMX"
    return f"{c['model']}, {c['allowed']} of {c['cores']} cores usable; flags: {flags}"


def render(result: dict[str, Any]) -> str:
    c = result["cpu"]

    def elsewhere(other: dict[str, Any] | None) -> str:  # a row measured on another CPU says which
        return f" On another CPU: {_cpu_words(other)}." if other and other != c else ""

    lines = [
        "## Training on a busy machine (one competing CPU-bound process)",
        "",
        f"`benchmarks/contention.py`: each run as a user runs it (`python -m medclf train`, then `evaluate`), "
        f"on the quiet machine and beside one single-threaded busy loop started before training. CPU of the "
        f"last run (rows measured on another say so): {_cpu_words(c)}.",
        "",
    ]
    if result.get("training"):
        lines += [
            "| dataset | budget | machine | plan | epochs run / planned | annealed | mean epoch s | threads "
            "| test AUC | test accuracy | gate |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in result["training"]:
            for label in ("quiet", "contended"):
                r = row[label]
                lines.append(
                    f"| {row['dataset']} | {row['budget']} | {label} | {r['plan']}"
                    + (f", {r['members']} members" if r["members"] > 1 else "")
                    + f" | {r['epochs_run']} / {r['planned_epochs']} | {r['schedule_completed']} "
                    f"| {r['mean_epoch_s']} | {r['threads']}"
                    + (f" ({', '.join(r['thread_changes'])})" if r["thread_changes"] else "")
                    + f" | {_f(r['test_auc'])} | {_f(r['test_accuracy'])} | "
                    + ("passed" if r["gate_passed"] else "FAILED")
                    + " |"
                )
        lines.append("")
        for row in result["training"]:
            floor, r = row["floor"], row["contended"]
            met = (r["test_auc"] or 0) >= floor["auc"] and (r["test_accuracy"] or 0) >= floor["accuracy"]
            slow = row["slowdown"]
            lines.append(
                f"- {row['dataset']} under contention: AUC/accuracy floor {floor['auc']}/{floor['accuracy']} "
                f"{'met' if met else 'NOT met'}; epoch-time slowdown {slow}x (limit {MAX_SLOWDOWN}x: "
                f"{'met' if slow is not None and slow <= MAX_SLOWDOWN else 'NOT met'})."
                + (f" Run {row['date']}: `{row['command']}`." if row.get("date") else "")
                + elsewhere(row.get("cpu"))
            )
        lines.append("")
    if result.get("audit"):
        a = result["audit"]
        lines.append(
            f"`medclf audit` on BreastMNIST with the shift check: {a['quiet']['wall_s']} s quiet, "
            f"{a['contended']['wall_s']} s under contention (limit {AUDIT_LIMIT_S:.0f} s: "
            f"{'met' if a['contended']['wall_s'] < AUDIT_LIMIT_S else 'NOT met'})."
        )
        lines.append("")
    if result.get("short"):
        rows = result["short"]
        lines += [
            f"BreastMNIST `--time-budget {result['short_budget']}` (quiet), against always answering the "
            f"majority class (test accuracy "
            f"{rows[0]['majority_accuracy']:.3f}):",
            "",
            "| seed | test accuracy | test AUC | epochs run / planned | gate | warned (console, report) |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['seed']} | {_f(r['test_accuracy'])} | {_f(r['test_auc'])} | {r['epochs_run']} / "
                f"{r['planned_epochs']} | {'passed' if r['gate_passed'] else 'FAILED'} | "
                f"{r['warned_in_console']}, {r['warned_in_report']} |"
            )
        ok = all(r["ok"] for r in rows)
        lines += [
            "",
            f"Above the majority class or loudly warned on every seed: {'yes' if ok else 'NO'}.",
            "",
        ]
    for section, when in result.get("section_dates", {}).items():
        lines.append(f"The {section} rows: {when}." + elsewhere(result.get("section_cpus", {}).get(section)))
    lines.append(
        f"Last run {result['date']}: `{result['command']}`"
        + (" (smoke settings)" if result.get("smoke") else "")
    )
    return "\n".join(lines)


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="training,audit,short", help="comma-separated: training, audit, short")
    ap.add_argument("--datasets", default="pneumonia,breast")
    ap.add_argument("--budget", default="10m", help="time budget of the training runs")
    ap.add_argument("--short-budget", default="2m", help="time budget of the short BreastMNIST runs")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the short runs")
    ap.add_argument("--subset", type=int, default=None, help="first N images per split (smoke tests only)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "contention")
    ap.add_argument("--render", action="store_true", help="print the markdown of the saved results and stop")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(RESULTS.read_text())))
        return
    only = set(args.only.split(","))
    result: dict[str, Any] = {
        "cpu": cpu(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/contention.py " + " ".join(sys.argv[1:]),
        "smoke": args.subset is not None,
        "short_budget": args.short_budget,
    }
    if "training" in only:
        rows = run_training(args.datasets.split(","), args.budget, args.work, args.subset)
        for row in rows:
            row.update(date=result["date"], command=result["command"], cpu=result["cpu"])
        result["training"] = rows
    if "audit" in only:
        result["audit"] = run_audit(args.work, args.subset)
    if "short" in only:
        seeds = [int(s) for s in args.seeds.split(",")]
        result["short"] = run_short(args.work, args.short_budget, seeds, args.subset)
    out = RESULTS if not result["smoke"] else args.work / "contention.json"
    if out.exists() and not result["smoke"]:
        result = merged(json.loads(out.read_text()), result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(render(result))
    print(f"\nResults: {out}")


if __name__ == "__main__":
    main()
