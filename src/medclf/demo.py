"""``medclf demo``: the whole path on simulated brain MRI, with no downloads and no shared data.

1. simulate axial brain MRI slices from the MNI152 template (normal / tumour / oedema), and plant two
   copies of training images in the test split (one byte-identical, one re-encoded and resized), the kind of
   leakage real datasets carry;
2. audit the data (the planted copies must be found);
3. train with the planner under a time budget;
4. evaluate on the test split minus copies of training images, with the HTML report;
5. predict a few new cases the model has never seen.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from PIL import Image as PILImage
from rich.rule import Rule
from rich.table import Table

from medclf import reporting
from medclf.data.simulate import CLASSES, make_dataset


def run_demo(
    out: str | Path,
    *,
    n_per_class: int = 200,
    time_budget: str = "120s",
    size: int = 96,
    seed: int = 0,
    difficulty: str = "moderate",
) -> dict[str, object]:
    """Run the demo into ``out`` and return the test metrics. It shows its steps through the active reporter
    (:mod:`medclf.reporting`)."""
    from medclf.api import audit, evaluate, load_bundle, train

    rep = reporting.current()
    out = Path(out)
    t0 = time.perf_counter()
    data = out / "data"
    new_cases = out / "new-cases"
    for p in (data, new_cases):
        if p.exists():
            shutil.rmtree(p)
    rep.print(Rule("[bold]1. Simulated brain MRI[/]"))
    make_dataset(
        data,
        n_per_class=n_per_class,
        dims=2,
        size=size,
        seed=seed,
        splits={"train": 0.7, "test": 0.3},
        difficulty=difficulty,
    )
    make_dataset(
        new_cases, n_per_class=2, dims=2, size=size, seed=seed + 1000, splits=None, difficulty=difficulty
    )
    planted = _plant_leakage(data)
    rep.print(
        f"{3 * n_per_class} cases in {data} ({', '.join(CLASSES)}); planted {len(planted)} test "
        f"copies of training images: {', '.join(p.name for p in planted)}"
    )

    rep.print(Rule("[bold]2. Audit[/]"))
    report = audit(data, progress=False)
    report.render()
    report.write_json(out / "audit.json")

    rep.print(Rule("[bold]3. Train[/]"))
    result = train(data, out / "model", time_budget=time_budget, seed=seed)

    rep.print(Rule("[bold]4. Evaluate (test split minus copies of training images)[/]"))
    metrics = evaluate(result.bundle, data, out / "eval", progress=False)

    rep.print(Rule("[bold]5. Predict new cases[/]"))
    bundle = load_bundle(result.bundle)
    table = Table("file", "predicted", "confidence", "true class")
    for r in bundle.predict(new_cases):
        truth = Path(r["path"]).parent.name
        table.add_row(
            Path(r["path"]).name,
            r.get("predicted", r.get("error", "")),
            f"{r.get('confidence', 0):.3f}",
            truth,
        )
    rep.print(table)
    rep.print(Rule())
    rep.print(
        f"[bold green]Done in {time.perf_counter() - t0:.0f} s.[/] Report: {out / 'eval' / 'report.html'}  "
        f"Bundle: {result.bundle}"
    )
    return metrics


def _plant_leakage(data: Path) -> list[Path]:
    """Copy one training image into the test split byte for byte, and another re-encoded and resized."""
    planted = []
    for k, cls in enumerate(CLASSES[:2]):
        src = sorted((data / "train" / cls).glob("*.png"))[k]
        dest = data / "test" / cls / f"copy_of_{src.stem}{'.png' if k == 0 else '.jpg'}"
        if k == 0:
            shutil.copyfile(src, dest)
        else:
            im = PILImage.open(src)
            im.resize((im.width * 3 // 4, im.height * 3 // 4), PILImage.Resampling.LANCZOS).save(
                dest, quality=90
            )
        planted.append(dest)
    return planted
