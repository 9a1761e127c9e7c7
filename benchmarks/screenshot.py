"""The web page's screenshot for the docs: a demo brain MRI case and its heatmap, from simulated data only.

    .venv/bin/python benchmarks/screenshot.py [--out docs/web-page.png] [--work DIR]

1. simulates brain MRI slices (``medclf.data.simulate``, the ``moderate`` difficulty of ``medclf demo``;
   never ``../shared`` data);
2. trains a small model, evaluates it on the test split and stores the test metrics in the bundle (so the
   page shows them);
3. starts ``medclf serve`` on a free loopback port;
4. drives Debian's Chromium (headless, through Playwright) to upload the test tumour case the model is most
   sure of, waits for the result and saves a screenshot of the page.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def train_demo_bundle(work: Path, *, n_per_class: int, epochs: int, seed: int) -> tuple[Path, Path]:
    from medclf.api import evaluate, load_bundle, train
    from medclf.bundle import update_bundle
    from medclf.data.simulate import make_dataset

    data = make_dataset(
        work / "simulated-brain-mri",
        n_per_class=n_per_class,
        size=96,
        seed=seed,
        difficulty="moderate",
        overwrite=True,
    )
    bundle = work / "brain-mri-demo"
    train(data, bundle, size=64, epochs=epochs, arch="compact", seed=seed, progress=False)
    test = evaluate(bundle, data, work / "eval", progress=False)
    metrics = dict(load_bundle(bundle).manifest.get("metrics", {}))
    metrics["test"] = {k: v for k, v in test.items() if k != "all_samples"}
    update_bundle(bundle, {"metrics": metrics})
    return data, bundle


def most_confident_case(bundle: Path, data: Path, label: str = "tumour") -> Path:
    from medclf.api import load_bundle

    cases = sorted((data / "test" / label).glob("*.png"))
    results = load_bundle(bundle).predict(cases)
    scored = [(r["probabilities"][label], Path(r["path"])) for r in results if "probabilities" in r]
    return max(scored)[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "web-page.png")
    ap.add_argument("--work", type=Path, default=None, help="Working folder (default: a temporary one)")
    ap.add_argument("--n-per-class", type=int, default=150)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} is missing: install Debian's chromium package (make system-deps)")
    from playwright.sync_api import expect, sync_playwright

    with tempfile.TemporaryDirectory(prefix="medclf-screenshot-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data, bundle = train_demo_bundle(
            work, n_per_class=args.n_per_class, epochs=args.epochs, seed=args.seed
        )
        case = most_confident_case(bundle, data)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "medclf", "serve", str(bundle), "--port", str(port),
             "--audit-db", str(work / "audit.db"), "--log-level", "warning"],
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("medclf serve did not start")
                time.sleep(0.2)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
                page.goto(url + "/")
                expect(page.locator("#metrics")).to_contain_text("Accuracy", timeout=30_000)
                page.set_input_files("#file", str(case))
                expect(page.locator("#viewer")).to_be_visible(timeout=60_000)
                page.evaluate("document.getElementById('status').textContent = ''")
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
                predicted = page.locator("#predicted").inner_text()
                browser.close()
        finally:
            server.terminate()
            server.wait(30)
    print(f"{args.out}: case {case.name} (label tumour), predicted {predicted}")


if __name__ == "__main__":
    main()
