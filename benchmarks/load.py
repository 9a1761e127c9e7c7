"""Load test of ``medclf serve`` on loopback: throughput and latency at 1, 8 and 32 concurrent clients.

    .venv/bin/python benchmarks/load.py [--bundle DIR] [--requests 10000] [--time-limit 600]

Starts ``medclf serve`` as its own process on a free loopback port, then, for each level of concurrency,
runs that many asyncio clients (httpx, one keep-alive connection each; a single client is a plain
blocking ``http.client`` connection, so its latency is the server's and not an asyncio client's) that POST
a simulated brain MRI slice (PNG, raw body) to ``/v1/predict`` until the level's request count is reached
or its time limit passes. Every non-200 answer and every transport error counts as an error. Afterwards the audit log must
hold one row per request sent. Results: ``benchmarks/results/load.json``.

Without ``--bundle`` a small bundle is trained first (simulated data, 32 px, ``compact-s``, 2 epochs), as
in the tests. Client and server share this machine's cores, so the numbers are a lower bound for a
server with the machine to itself.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "load.json"


def small_bundle(work: Path) -> tuple[Path, Path]:
    from medclf.data.simulate import make_dataset
    from medclf.training import train

    data = make_dataset(work / "data", n_per_class=24, size=64, seed=0, overwrite=True)
    bundle = work / "bundle"
    train(data, bundle, epochs=2, size=32, batch_size=16, arch="compact-s", progress=False)
    return bundle, sorted((data / "test" / "tumour").glob("*.png"))[0]


def demo_image(work: Path) -> Path:
    from medclf.data.simulate import make_dataset

    data = make_dataset(work / "image", n_per_class=1, size=64, seed=1, splits=None, overwrite=True)
    return sorted((data / "tumour").glob("*.png"))[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"medclf serve exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit("medclf serve did not become ready")


def run_single(url: str, payload: bytes, n_requests: int, time_limit: float) -> dict:
    """One client, one request at a time, on one keep-alive connection (``http.client``): the latency a
    caller sees, without an asyncio client's own overhead (httpx added ~10 ms per request here, on the
    cores the server also uses)."""
    import http.client
    from urllib.parse import urlsplit

    host = urlsplit(url)
    latencies: list[float] = []
    server_ms: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    deadline = time.monotonic() + time_limit
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
    headers = {"Content-Type": "application/octet-stream"}
    t_start = time.perf_counter()
    while sent < n_requests and time.monotonic() < deadline:
        sent += 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v1/predict", body=payload, headers=headers)
            r = conn.getresponse()
            body = r.read()
            ok, kind = r.status == 200, f"http_{r.status}"
        except (OSError, http.client.HTTPException) as exc:
            ok, kind = False, type(exc).__name__
            conn.close()
            conn = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
        latencies.append(time.perf_counter() - t0)
        if ok:
            server_ms.append(json.loads(body)["latency_ms"])
        else:
            errors[kind] = errors.get(kind, 0) + 1
    conn.close()
    level = _summary(1, n_requests, sent, errors, time.perf_counter() - t_start, latencies)
    level["client"] = "http.client, one keep-alive connection"
    if server_ms:
        level["server_latency_ms_p50"] = round(float(np.percentile(server_ms, 50)), 2)
    return level


async def run_level(url: str, payload: bytes, concurrency: int, n_requests: int, time_limit: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    deadline = time.monotonic() + time_limit

    async def client() -> None:
        nonlocal sent
        async with httpx.AsyncClient(
            base_url=url, timeout=60, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)
        ) as http:
            while sent < n_requests and time.monotonic() < deadline:
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await http.post(
                        "/v1/predict", content=payload, headers={"content-type": "application/octet-stream"}
                    )
                    ok = r.status_code == 200
                    kind = f"http_{r.status_code}"
                except httpx.HTTPError as exc:
                    ok, kind = False, type(exc).__name__
                latencies.append(time.perf_counter() - t0)
                if not ok:
                    errors[kind] = errors.get(kind, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    level = _summary(concurrency, n_requests, sent, errors, time.perf_counter() - t0, latencies)
    level["client"] = f"{concurrency} asyncio httpx clients, one keep-alive connection each"
    return level


def _summary(
    concurrency: int,
    n_requests: int,
    sent: int,
    errors: dict[str, int],
    seconds: float,
    latencies: list[float],
) -> dict:
    ms = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests_planned": n_requests,
        "requests_sent": sent,
        "stopped_by_time_limit": sent < n_requests,
        "errors": int(sum(errors.values())),
        "errors_by_kind": errors,
        "seconds": round(seconds, 2),
        "throughput_rps": round(sent / seconds, 1),
        "latency_ms": {
            "p50": round(float(np.percentile(ms, 50)), 2),
            "p90": round(float(np.percentile(ms, 90)), 2),
            "p99": round(float(np.percentile(ms, 99)), 2),
            "max": round(float(ms.max()), 2),
            "mean": round(float(ms.mean()), 2),
        },
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="Bundle to serve (default: train a small one)")
    ap.add_argument("--image", type=Path, help="Image to send (default: a simulated brain MRI slice)")
    ap.add_argument("--levels", default="1,8,32", help="Concurrent clients per level")
    ap.add_argument("--requests", type=int, default=10000, help="Requests at the highest level")
    ap.add_argument("--requests-low", type=int, default=1000, help="Requests at each lower level")
    ap.add_argument("--time-limit", type=float, default=600, help="Seconds per level at most")
    ap.add_argument("--threads", type=int, default=2, help="Server inference threads")
    ap.add_argument("--queue", type=int, default=64, help="Server queue (must exceed the concurrency)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    levels = [int(v) for v in args.levels.split(",")]

    with tempfile.TemporaryDirectory(prefix="medclf-load-") as tmp:
        work = Path(tmp)
        if args.bundle:
            bundle, image = args.bundle, args.image or demo_image(work)
        else:
            bundle, image = small_bundle(work)
            image = args.image or image
        payload = image.read_bytes()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        audit_db = work / "audit.db"
        cmd = [
            sys.executable, "-m", "medclf", "serve", str(bundle), "--port", str(port),
            "--threads", str(args.threads), "--queue", str(args.queue), "--audit-db", str(audit_db),
            "--log-level", "warning",
        ]  # fmt: skip
        server = subprocess.Popen(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        try:
            wait_ready(url, server)
            load_before = os.getloadavg()
            results = []
            for c in levels:
                n = args.requests if c == max(levels) else args.requests_low
                level = (
                    run_single(url, payload, n, args.time_limit)
                    if c == 1
                    else asyncio.run(run_level(url, payload, c, n, args.time_limit))
                )
                print(json.dumps(level), flush=True)
                results.append(level)
            load_after = os.getloadavg()
        finally:
            server.terminate()
            server.wait(60)
        with sqlite3.connect(audit_db) as conn:
            audit_rows = conn.execute(
                "SELECT COUNT(*) FROM requests WHERE endpoint = '/v1/predict'"
            ).fetchone()[0]
        sent = sum(r["requests_sent"] for r in results)

    report = {
        "benchmark": "medclf serve load test (POST /v1/predict, raw PNG body, loopback)",
        "command": " ".join(["python benchmarks/load.py", *sys.argv[1:]]),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_name(),
            "cpus_usable": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "python": platform.python_version(),
            "nice": os.nice(0),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in load_after],
        },
        "server": {
            "bundle": "trained by this script (compact-s, 32 px)" if not args.bundle else str(args.bundle),
            "threads": args.threads,
            "queue": args.queue,
            "workers": 1,
            "payload_bytes": len(payload),
        },
        "note": "client and server run on the same machine and share its cores",
        "levels": results,
        "audit_rows": audit_rows,
        "audit_rows_match_requests": audit_rows == sent,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
