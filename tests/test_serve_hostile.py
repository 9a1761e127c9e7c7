"""A real `medclf serve` process under a barrage of hostile uploads: only 4xx answers, /healthz keeps
answering throughout, good requests sent during the barrage still succeed, and the server's memory stays
bounded."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from .hostile_corpus import build_corpus

MEMORY_CEILING = 1 << 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tiny_bundle, tmp_path):
    port = _free_port()
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medclf",
            "serve",
            str(tiny_bundle),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--audit-db",
            str(tmp_path / "audit.db"),
            "--log-level",
            "warning",
            "--queue",
            "8",
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # A file, not a pipe: nobody reads the server's output while it runs, and a full pipe would stall it.
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)
    yield url, proc
    proc.terminate()
    proc.wait(30)


def test_hostile_barrage_gets_only_4xx_while_health_checks_answer(server, sim_data, tmp_path):
    url, proc = server
    corpus = [e for e in build_corpus(tmp_path / "corpus") if e.kind != "filesystem"]
    server_ps = psutil.Process(proc.pid)
    peak = {"rss": 0}
    health: list[int | str] = []
    good_answers: list[int | str] = []
    good = sorted((sim_data / "test").rglob("*.png"))[0]
    stop = threading.Event()

    def watch() -> None:
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                peak["rss"] = max(
                    peak["rss"], sum(p.memory_info().rss for p in [server_ps, *server_ps.children(True)])
                )
                try:
                    health.append(c.get(f"{url}/healthz").status_code)
                    if len(health) % 10 == 0:  # a good upload now and then, in the middle of the barrage
                        r = c.post(
                            f"{url}/v1/predict", files={"file": (good.name, good.read_bytes())}, timeout=60
                        )
                        good_answers.append(r.status_code)
                except httpx.HTTPError as exc:
                    health.append(type(exc).__name__)
                time.sleep(0.05)

    def send(entry) -> tuple[str, int]:
        with httpx.Client(timeout=60) as c:
            r = c.post(f"{url}/v1/predict", files={"file": (entry.path.name, entry.path.read_bytes())})
            return entry.path.name, r.status_code

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, corpus * 2))
    after = httpx.post(f"{url}/v1/predict", files={"file": (good.name, good.read_bytes())}, timeout=60)
    stop.set()
    watcher.join(15)

    not_4xx = [(name, code) for name, code in answers if not 400 <= code < 500]
    assert not not_4xx, not_4xx
    assert len(health) >= 5 and set(health) == {200}, health
    # 429 is a fair answer for a good request that arrives while the bounded queue is full of hostile ones.
    assert good_answers and set(good_answers) <= {200, 429} and 200 in good_answers, good_answers
    assert after.status_code == 200 and "predicted" in after.json()
    assert proc.poll() is None
    assert peak["rss"] < MEMORY_CEILING, f"server peak RSS {peak['rss'] / 2**20:.0f} MiB"
