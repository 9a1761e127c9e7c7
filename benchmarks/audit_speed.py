"""How long ``medclf audit`` takes on the brain MRI set, and what its shortcut check finds (issue 19).

    .venv/bin/python benchmarks/audit_speed.py [--data ../shared/datasets/brain-tumor-mri]

Runs ``medclf audit DATA`` once, as a user would (decoding every image, duplicates, leakage, the split-shift
check and the shortcut check), on a cold start; records the wall time, the CPU's model and vector flags, and
each class's cue-only AUC with its interval and the cues named. Results: ``benchmarks/results/audit-<name>.json``;
``benchmarks/run.py`` renders them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from contention import cpu, medclf  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "brain-tumor-mri")
    ap.add_argument("--name", default="brain")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "audit.json"
        _, seconds, _ = medclf(
            "audit", str(args.data), "--out", str(out), "--no-progress", log=Path(tmp) / "log"
        )
        report = json.loads(out.read_text())
    shortcuts = report.get("shortcuts") or {}
    result: dict[str, Any] = {
        "command": "python benchmarks/audit_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu(),
        "data": str(args.data),
        "seconds": round(seconds, 1),
        "n_samples": shortcuts.get("n_samples"),
        "shortcut_seconds": shortcuts.get("seconds"),
        "flagged": shortcuts.get("flagged"),
        "flagged_keys": shortcuts.get("flagged_keys"),
        "per_class": {
            name: {k: c.get(k) for k in ("auc", "ci", "flagged", "cues")}
            for name, c in (shortcuts.get("per_class") or {}).items()
        },
    }
    dest = RESULTS / f"audit-{args.name}.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    flags = ", ".join(r["cpu"]["flags"]) or "no AVX-512, AVX-VNNI or AMX"
    lines = [
        f"### `medclf audit` on {Path(r['data']).name}: {r['seconds']} s, shortcut check included",
        "",
        f"{r['n_samples']} images; the shortcut check itself took {r['shortcut_seconds']} s of it. Flagged: "
        f"{'yes' if r['flagged'] else 'no'} (groups: {', '.join(r['flagged_keys'] or []) or '-'}). CPU: "
        f"{r['cpu']['model']} ({flags}), {r['cpu']['allowed']} cores. {r['date']}: `{r['command']}`",
        "",
        "| class | cue-only AUC (95% CI) | flagged | strongest cues |",
        "|---|---|---|---|",
    ]
    for name, c in r["per_class"].items():
        ci = c.get("ci") or [None, None]
        auc = "n/a" if c.get("auc") is None else f"{c['auc']:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"
        lines.append(
            f"| {name} | {auc} | {'yes' if c.get('flagged') else 'no'} | {', '.join(c.get('cues') or [])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
