"""Inference benchmark: one trained bundle, compressed every way, measured in one run.

    .venv/bin/python benchmarks/inference.py --bundle runs/bench/brain-default/model \\
        --data ../shared/datasets/brain-tumor-mri --name brain
    .venv/bin/python benchmarks/inference.py --bundle runs/bench/pneumonia-default/model \\
        --data ../shared/datasets/medmnist/pneumoniamnist.npz --name pneumonia
    .venv/bin/python benchmarks/inference.py --render-only     # the tables of the saved results

From the bundle it makes (with ``medclf export``, in ``--work``) an ONNX + int8 bundle of the same network,
a structurally pruned one (``--prune``, fine-tuned) and a distilled student (``--student``); pass
``--pruned`` / ``--distilled`` to reuse ones made before. For every row it measures:

* **file**: the size of the model file that engine loads (``model.safetensors``, ``model.onnx`` or
  ``model.int8.onnx``) and the parameter count;
* **batch 64**: images/s of the model alone on preprocessed tensors (real test images), after warm-up;
* **model latency**: p50/p99 of one preprocessed image through the model alone;
* **end-to-end latency**: p50/p99 of ``Predictor.predict([jpeg])`` for one 512x512 JPEG file: reading,
  decoding, preprocessing, the model, the out-of-distribution guard and the answer; what a server does per
  request, without HTTP. Brain: 512x512 JPEGs of the test split; other datasets: test images upscaled to
  512x512 and saved as JPEG;
* **test accuracy and AUC**: ``medclf.evaluate`` on the test split minus copies of training images.

PyTorch eager is the bundle as it is normally run: fp32, the module as loaded, ``torch.no_grad``, default
threads. ONNX Runtime runs with the threads of :func:`medclf.engines.ort_threads`. Timings are taken in
``--rounds`` interleaved rounds (every row once per round) and the best round is reported, all rounds kept in
the JSON. Results:
``benchmarks/results/inference-<name>.json`` and a markdown table on stdout. Timings on a shared machine
are indicative only: rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

ENGINE_FILES = {"torch": "model.safetensors", "onnx-fp32": "model.onnx", "onnx-int8": "model.int8.onnx"}


def percentile_ms(times: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(times) * 1000, q)), 2)


def time_calls(fn: Any, n: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def throughput(run: Any, x: np.ndarray, min_seconds: float) -> float:
    for _ in range(2):
        run(x)
    n, t0 = 0, time.perf_counter()
    while True:
        run(x)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds and n >= 3:
            return len(x) * n / elapsed


def jpeg_inputs(samples: Any, work: Path, n: int) -> list[Path]:
    """Up to ``n`` 512x512 JPEG files of the test split (or test images upscaled to 512x512 JPEGs)."""
    from PIL import Image as PILImage

    test = samples.indices("test")
    found: list[Path] = []
    for i in test if not samples.arrays else []:
        p = Path(samples.refs[i])
        if p.suffix.lower() in (".jpg", ".jpeg"):
            with PILImage.open(p) as im:
                if im.size == (512, 512):
                    found.append(p)
        if len(found) >= n:
            return found
    folder = work / "jpeg512"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, i in enumerate(rng.choice(test, size=min(n, len(test)), replace=False)):
        img = samples.load(int(i)).pixels
        arr = img[0] if img.shape[0] == 1 else np.moveaxis(img[:3], 0, -1)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        p = folder / f"test{k}.jpg"
        PILImage.fromarray(arr).resize((512, 512), PILImage.BICUBIC).save(p, quality=95)
        found.append(p)
    return found


class Row:
    """One model + engine: its static facts, then timings from several interleaved rounds."""

    def __init__(self, label: str, bundle_path: Path, engine: str) -> None:
        import medclf
        from medclf.compress.prune import n_params

        self.bundle = medclf.load_bundle(bundle_path)
        self.engine, self.run = self.bundle.runner(engine)
        self.record: dict[str, Any] = {
            "row": label,
            "bundle": str(bundle_path),
            "engine": self.engine,
            "arch": self.bundle.arch,
            "arch_kwargs": self.bundle.manifest["model"].get("kwargs", {}),
            "params": n_params(self.bundle.model),
            "file": ENGINE_FILES[self.engine],
            "file_bytes": (bundle_path / ENGINE_FILES[self.engine]).stat().st_size,
            "rounds": [],
        }
        self.k = 0

    def measure(self, x64: np.ndarray, jpegs: list[Path], args: argparse.Namespace) -> None:
        single = x64[:1]
        thr = throughput(self.run, x64, args.min_seconds)
        model_t = time_calls(lambda: self.run(single), args.latency_runs)

        def one_file() -> None:
            res = self.bundle.predict([jpegs[self.k % len(jpegs)]], engine=self.engine)
            self.k += 1
            assert "error" not in res[0], res[0]

        e2e_t = time_calls(one_file, args.latency_runs)
        self.record["rounds"].append(
            {
                "batch64_images_per_s": round(thr, 1),
                "model_latency_ms": {"p50": percentile_ms(model_t, 50), "p99": percentile_ms(model_t, 99)},
                "e2e_latency_ms": {"p50": percentile_ms(e2e_t, 50), "p99": percentile_ms(e2e_t, 99)},
            }
        )

    def summarise(self) -> None:
        """The best round per figure: on a shared machine the others carry other processes' load."""
        rounds = self.record["rounds"]
        self.record["batch64_images_per_s"] = max(r["batch64_images_per_s"] for r in rounds)
        for key in ("model_latency_ms", "e2e_latency_ms"):
            self.record[key] = min((r[key] for r in rounds), key=lambda v: v["p50"])

    def evaluate(self, data: Path, work: Path) -> None:
        import medclf

        label = self.record["row"]
        m = medclf.evaluate(
            self.bundle,
            data,
            work / "eval" / label.replace(" ", "_"),
            engine=self.engine,
            n_bootstrap=200,
            progress=False,
        )
        self.record["test"] = {
            "n": m["n"],
            "accuracy": m["accuracy"],
            "auc": m["auc"],
            "n_removed_duplicates": m["n_removed_duplicates"],
        }
        r = self.record
        print(
            f"  {label:40s} {r['batch64_images_per_s']:8.1f} img/s  "
            f"model p50 {r['model_latency_ms']['p50']} ms  e2e p50 {r['e2e_latency_ms']['p50']} ms  "
            f"acc {m['accuracy']:.4f}",
            file=sys.stderr,
        )


def render(result: dict[str, Any]) -> str:
    rows = result["rows"]
    base = next(r for r in rows if r["row"] == "PyTorch eager fp32")
    lines = [
        f"### Inference: {result['name']} ({result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"{result['date']})",
        "",
        "| model | engine | params | file | batch 64 img/s | x eager | model p50 / p99 ms | "
        "512 JPEG end-to-end p50 / p99 ms | test acc | test AUC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = r["batch64_images_per_s"] / base["batch64_images_per_s"]
        lines.append(
            f"| {r['row']} | {r['engine']} | {r['params'] / 1e6:.2f} M | {r['file_bytes'] / 1e6:.2f} MB "
            f"({r['file']}) | {r['batch64_images_per_s']:.0f} | {speed:.1f}x | "
            f"{r['model_latency_ms']['p50']} / {r['model_latency_ms']['p99']} | "
            f"{r['e2e_latency_ms']['p50']} / {r['e2e_latency_ms']['p99']} | "
            f"{r['test']['accuracy']:.4f} | {r['test']['auc']:.4f} |"
        )
    heading = (
        "Acceptance (issue 5):"
        if result["name"] == "brain"
        else "Issue 5's checks applied to this model (its acceptance floors are set for the brain model):"
    )
    lines += ["", heading, ""]
    for check in result["acceptance"]:
        lines.append(f"- {'PASS' if check['pass'] else 'FAIL'}: {check['what']} ({check['measured']})")
    return "\n".join(lines)


def render_all() -> str:
    """The tables of every saved ``inference-*.json`` (for BENCHMARKS.md)."""
    return "\n\n".join(render(json.loads(f.read_text())) for f in sorted(RESULTS.glob("inference-*.json")))


def acceptance(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["row"]: r for r in rows}
    eager, fp32, int8 = by["PyTorch eager fp32"], by["ONNX Runtime fp32"], by["ONNX Runtime int8"]
    checks = []

    def add(what: str, ok: bool, measured: str) -> None:
        checks.append({"what": what, "pass": bool(ok), "measured": measured})

    r1 = int8["batch64_images_per_s"] / eager["batch64_images_per_s"]
    add("int8 throughput >= 6x PyTorch eager fp32 (batch 64)", r1 >= 6, f"{r1:.1f}x")
    r2 = int8["batch64_images_per_s"] / fp32["batch64_images_per_s"]
    add("int8 throughput >= 2x ONNX Runtime fp32 (batch 64)", r2 >= 2, f"{r2:.1f}x")
    drop = (eager["test"]["accuracy"] - int8["test"]["accuracy"]) * 100
    add("int8 test accuracy loss <= 1 point", drop <= 1.0, f"{drop:+.2f} points")
    size = eager["file_bytes"] / int8["file_bytes"]
    size_onnx = fp32["file_bytes"] / int8["file_bytes"]
    add(
        "int8 model file >= 3.5x smaller",
        min(size, size_onnx) >= 3.5,
        f"{size:.2f}x vs model.safetensors, {size_onnx:.2f}x vs model.onnx",
    )
    p50 = int8["e2e_latency_ms"]["p50"]
    add("int8 single 512x512 JPEG p50 < 15 ms, preprocessing included", p50 < 15, f"{p50} ms")
    student = next((r for r in rows if r["row"].startswith("distilled") and r["engine"] == "torch"), None)
    if student is not None:
        ratio = eager["params"] / student["params"]
        add("distilled student >= 4x smaller than its teacher", ratio >= 4, f"{ratio:.1f}x fewer parameters")
        gap = (eager["test"]["accuracy"] - student["test"]["accuracy"]) * 100
        add("distilled student within 2 points of the teacher", gap <= 2, f"{gap:+.2f} points")
    return checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="the trained bundle (the teacher)")
    ap.add_argument("--data", type=Path, help="the data it was trained on")
    ap.add_argument("--name", help="results go to benchmarks/results/inference-NAME.json")
    ap.add_argument("--render-only", action="store_true", help="print the tables of the saved results")
    ap.add_argument("--work", type=Path, default=None, help="where the compressed bundles are written")
    ap.add_argument("--prune", type=float, default=0.5, help="fraction of channels to prune (0: skip)")
    ap.add_argument("--prune-epochs", type=int, default=None)
    ap.add_argument("--student", default="compact-s", help="student architecture ('' to skip)")
    ap.add_argument(
        "--student-kwargs",
        default='{"width": 14}',
        help="student architecture arguments as JSON (compact-s at its default width 16 has 3.99x fewer "
        "parameters than compact; width 14: 5.2x)",
    )
    ap.add_argument("--distill-epochs", type=int, default=None)
    ap.add_argument("--distill-budget", default=None, help="time limit of distillation, e.g. 10m")
    ap.add_argument("--pruned", type=Path, default=None, help="reuse this pruned bundle")
    ap.add_argument("--distilled", type=Path, default=None, help="reuse this distilled bundle")
    ap.add_argument("--int8-format", default="qdq")
    ap.add_argument("--min-seconds", type=float, default=3.0, help="per throughput measurement")
    ap.add_argument("--latency-runs", type=int, default=100, help="per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best is reported")
    args = ap.parse_args()
    if args.render_only:
        print(render_all())
        return
    if not (args.bundle and args.data and args.name):
        ap.error("--bundle, --data and --name are required (unless --render-only)")

    import medclf
    from medclf.data.sources import load_source
    from run import machine

    work = args.work or Path(tempfile.mkdtemp(prefix=f"medclf-inference-{args.name}-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    made: dict[str, Any] = {}

    def make(key: str, out: Path, **options: Any) -> Path:
        t = time.perf_counter()
        print(f"making {key}: medclf export {options}", file=sys.stderr)
        res = medclf.export(args.bundle, out, data=args.data, progress=False, **options)
        made[key] = {"bundle": str(out), "seconds": round(time.perf_counter() - t, 1), "options": options}
        made[key]["compression"] = res.compression
        return out

    compressed = make("onnx-int8", work / "int8", onnx=True, int8=True, int8_format=args.int8_format)
    pruned = args.pruned
    if pruned is None and args.prune:
        pruned = make(
            "pruned", work / "pruned", prune=args.prune, epochs=args.prune_epochs, onnx=True, int8=True
        )
    distilled = args.distilled
    if distilled is None and args.student:
        distilled = make(
            "distilled",
            work / "distilled",
            student=args.student,
            student_kwargs=json.loads(args.student_kwargs),
            epochs=args.distill_epochs,
            time_budget=args.distill_budget,
            onnx=True,
            int8=True,
        )
    for key, given in (("pruned", args.pruned), ("distilled", args.distilled)):
        if given is not None:  # made before: record how
            made[key] = {"bundle": str(given), "reused": True}
            made[key]["compression"] = medclf.load_bundle(given).manifest["compression"]

    b = medclf.load_bundle(compressed)
    samples = load_source(args.data, default_split="test")
    from medclf.data.cache import prepare

    prepared = prepare(samples, b.spec, progress=False)
    test = np.flatnonzero(prepared.ok & (np.array(samples.splits) == "test"))
    x64 = np.asarray(prepared.tensors[test[:64]], dtype=np.float32)
    jpegs = jpeg_inputs(samples, work, 20)

    plan = [
        ("PyTorch eager fp32", compressed, "torch"),
        ("ONNX Runtime fp32", compressed, "onnx-fp32"),
        ("ONNX Runtime int8", compressed, "onnx-int8"),
    ]
    if pruned is not None:
        steps = medclf.load_bundle(pruned).manifest["compression"]["steps"]
        p = round(100 * float(next(s["amount"] for s in steps if s["step"] == "prune")))
        plan += [(f"pruned {p}% PyTorch", pruned, "torch"), (f"pruned {p}% int8", pruned, "onnx-int8")]
    if distilled is not None:
        student = medclf.load_bundle(distilled)
        width = student.manifest["model"]["kwargs"].get("width")
        arch = f"{student.arch}{f' (width {width})' if width else ''}"
        plan += [
            (f"distilled {arch} PyTorch", distilled, "torch"),
            (f"distilled {arch} int8", distilled, "onnx-int8"),
        ]
    measured = [
        Row(label, Path(path), engine)
        for label, path, engine in plan
        if engine == "torch" or ENGINE_FILES[engine] in medclf.load_bundle(path).manifest["files"]
    ]
    # Interleaved rounds: a burst of load from another process spoils one round of one row, not a row.
    for rnd in range(args.rounds):
        print(f"timing round {rnd + 1}/{args.rounds}", file=sys.stderr)
        for row in measured:
            row.measure(x64, jpegs, args)
    for row in measured:
        row.summarise()
        row.evaluate(args.data, work)
    rows = [row.record for row in measured]

    from medclf.engines import ort_threads

    result = {
        "name": args.name,
        "bundle": str(args.bundle),
        "data": str(args.data),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {**machine(), "ort_threads": ort_threads()},
        "command": " ".join(["python", "benchmarks/inference.py", *sys.argv[1:]]),
        "jpeg_inputs": [str(p) for p in jpegs[:3]]
        + ([f"... ({len(jpegs)} files)"] if len(jpegs) > 3 else []),
        "made": made,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
        "note": "timings: best of the interleaved rounds (all rounds are kept per row); on a shared "
        "machine they are indicative only",
    }
    result["acceptance"] = acceptance(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"inference-{args.name}.json"
    out.write_text(json.dumps(result, indent=2))
    print(render(result))
    print(f"\nwritten {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
