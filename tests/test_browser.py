"""The web page end to end: a real server on loopback, Debian's Chromium (headless) driven by Playwright.

Uploads a simulated brain MRI slice, waits for the answer, checks that the predicted class, the bar chart
and the heatmap appear, and that a refused file shows the server's message. The screenshot is kept in
``test-artifacts/`` (git-ignored). Skips when /usr/bin/chromium or the playwright package is absent; no
browser is ever downloaded.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medclf.api import load_bundle

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
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

if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is not installed (Debian package 'chromium'; `make test` installs it)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory) -> Iterator[str]:
    """`medclf serve`'s app under uvicorn, in a thread, on a free loopback port; yields its URL."""
    import uvicorn

    from medclf.serve.app import create_app

    app = create_app(tiny_bundle, audit_db=str(tmp_path_factory.mktemp("audit") / "audit.db"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # a port nobody else can take between choosing and listening
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_upload_shows_prediction_heatmap_and_model_card(server, browser, tiny_bundle, sim_data, tmp_path):
    image = sorted((sim_data / "test" / "tumour").glob("*.png"))[0]
    [expected] = load_bundle(tiny_bundle).predict([image])
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.goto(server + "/")

    sync_api.expect(page.locator("#model-badge")).to_contain_text("compact-s", timeout=30_000)
    sync_api.expect(page.locator(".notice")).to_contain_text("not a diagnosis")
    sync_api.expect(page.locator("#metrics")).to_contain_text("Accuracy")

    page.set_input_files("#file", str(image))
    sync_api.expect(page.locator("#result")).to_be_visible(timeout=60_000)
    sync_api.expect(page.locator("#predicted")).to_have_text(expected["predicted"])
    assert page.locator("#bars li").count() == 3
    sync_api.expect(page.locator("#bars li.top .name")).to_have_text(expected["predicted"])
    heat = page.locator("#heatmap-image")
    sync_api.expect(heat).to_be_visible()
    assert heat.get_attribute("src").startswith("data:image/png;base64,")
    assert page.evaluate("document.getElementById('heatmap-image').naturalWidth") > 0
    assert page.evaluate("document.getElementById('input-image').naturalWidth") > 0
    sync_api.expect(page.locator("#viewer-caption")).to_contain_text("Grad-CAM")

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "web-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    ood = page.locator("#ood-warning")
    if expected["ood"]:
        sync_api.expect(ood).to_be_visible()
    else:
        sync_api.expect(ood).to_be_hidden()

    # An image unlike any brain slice (a bright checkerboard) gets its answer and a visible warning.
    checker = tmp_path / "checker.png"
    PILImage.fromarray((np.indices((64, 64)).sum(0) // 8 % 2 * 255).astype(np.uint8)).save(checker)
    page.set_input_files("#file", str(checker))
    sync_api.expect(ood).to_be_visible(timeout=60_000)
    sync_api.expect(ood).to_contain_text("unlike the images")

    junk = tmp_path / "scan.dcm"
    junk.write_bytes(b"this is a text file, not a scan " * 20)
    page.set_input_files("#file", str(junk))
    sync_api.expect(page.locator("#error")).to_be_visible(timeout=30_000)
    sync_api.expect(page.locator("#error-text")).to_contain_text("unsupported or unrecognised file content")
    sync_api.expect(page.locator("#error-reason")).to_contain_text("unsupported_format")
    page.screenshot(path=str(ARTIFACTS / "web-page-refused.png"), full_page=True)
    page.close()
    # The refused upload logs a 415 on the console, which is expected; nothing else may go wrong.
    assert [p for p in problems if "415" not in p] == [], problems
