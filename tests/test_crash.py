"""Crash safety with real SIGKILLs: training resumes losing at most one epoch, a kill while a bundle
is being written leaves the previous bundle intact and loadable, and the audit log survives a killed server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medclf.bundle import load_bundle

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _checkpointed_epoch(ckpt: Path) -> int:
    try:
        return int(json.loads((ckpt / "state.json").read_text())["epoch"]) + 1
    except (OSError, ValueError, KeyError):
        return 0


def test_kill_9_during_training_then_resume_loses_at_most_one_epoch(sim_data, tmp_path):
    out = tmp_path / "model"
    ckpt = tmp_path / "model.ckpt"
    args = [
        sys.executable,
        "-m",
        "medclf",
        "train",
        str(sim_data),
        "--out",
        str(out),
        "--epochs",
        "10",  # killed after 3: the resumed run has epochs left to train (patience is at least 8)
        "--size",
        "32",
        "--arch",
        "compact-s",
        "--batch-size",
        "16",
        "--no-progress",
    ]
    log = tmp_path / "first.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=ENV)
        try:
            assert _wait_for(lambda: _checkpointed_epoch(ckpt) >= 3, timeout=240), "no checkpoint appeared"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must not leave a bundle"
    saved = _checkpointed_epoch(ckpt)
    done_before_kill = len(re.findall(r"^epoch \d+/", log.read_text(), flags=re.M))
    # Epochs are printed after their checkpoint is written: every finished epoch is saved.
    assert saved >= done_before_kill >= 2

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    resumed_after = int(re.search(r"Resuming after epoch (\d+)", resumed.stderr).group(1))
    # The only work lost is the epoch that was running at the kill.
    assert resumed_after == saved
    b = load_bundle(out)
    epochs = [h["epoch"] for h in b.manifest["history"]]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) > resumed_after
    assert not ckpt.exists()  # checkpoints are removed once the bundle is complete


WRITER = """
import sys, torch
from medclf.bundle import save_bundle
from medclf.models import create_model
out = sys.argv[1]
model = create_model("compact-s", 1, 3, 2)
manifest = {"model": {"arch": "compact-s", "kwargs": {}, "in_channels": 1, "n_classes": 3, "spatial_dims": 2},
            "classes": ["a", "b", "c"], "preprocess": {"size": [32, 32]}}
big = bytes(8 << 20)  # a large extra file makes every write take a while
i = 0
while True:
    i += 1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    save_bundle(out, model=model, manifest={**manifest, "generation": i}, extra_files={"padding.bin": big})
    print(i, flush=True)
"""


@pytest.mark.parametrize("delay", [0.15, 0.4, 0.9])
def test_kill_9_while_writing_a_bundle_keeps_a_loadable_bundle(tiny_bundle, tmp_path, delay):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(tiny_bundle, out)
    before = load_bundle(out).sha256
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, env=ENV)
    time.sleep(1.5 + delay)  # interpreter and torch start-up, then somewhere inside a write
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    b = load_bundle(out)  # verifies every hash: whole old or whole new, never a mix
    assert b.sha256 == before or isinstance(b.manifest.get("generation"), int)


def _start_server(bundle: Path, db: Path, log: Path) -> tuple[subprocess.Popen, str]:
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "medclf", "serve", str(bundle), "--port", str(port), "--audit-db", str(db)]
    proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=ENV)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    assert _wait_for(up, 120), "the server did not start"
    return proc, url


def test_the_audit_log_survives_a_killed_server(tiny_bundle, sim_data, tmp_path):
    import sqlite3
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from medclf.serve.auditlog import read_rows

    db, log = tmp_path / "audit.db", tmp_path / "server.log"
    image = sorted((sim_data / "test").rglob("*.png"))[0]
    payload = {"file": (image.name, image.read_bytes())}
    proc, url = _start_server(tiny_bundle, db, log)
    for _ in range(12):
        assert httpx.post(f"{url}/v1/predict", files=payload, timeout=60).status_code == 200
    assert _wait_for(lambda: len(read_rows(db, limit=1000)) >= 12, 30)

    def post(_: int) -> int:
        with contextlib.suppress(httpx.HTTPError):  # the server dies under these requests
            return httpx.post(f"{url}/v1/predict", files=payload, timeout=60).status_code
        return 0

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, i) for i in range(40)]
        time.sleep(0.5)  # the kill lands while requests are being answered and logged
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        answered = sum(f.result() == 200 for f in futures)

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    rows = read_rows(db, limit=1000)
    assert len(rows) >= 12 and all(r["status"] == 200 for r in rows[:12])
    # A row is committed before its answer is sent: every 200 a client received, even in the last moment
    # before the kill, has its row.
    assert sum(r["status"] == 200 for r in rows) >= 12 + answered
    # A new server appends to the same log.
    proc, url = _start_server(tiny_bundle, db, log)
    try:
        assert httpx.post(f"{url}/v1/predict", files=payload, timeout=60).status_code == 200
        assert _wait_for(lambda: len(read_rows(db, limit=1000)) == len(rows) + 1, 30)
    finally:
        proc.terminate()
        proc.wait(30)
