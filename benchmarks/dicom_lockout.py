"""Can one peer lock others out of ``medclf dicom-node``? (issue 21, item 9)

    .venv/bin/python benchmarks/dicom_lockout.py [--bundle DIR] [--hold 75] [--echo-every 20] [--holders 4]
                                                 [--silent 4] [-- EXTRA dicom-node OPTIONS]

Starts ``medclf dicom-node`` (its defaults, plus any options after ``--``) on a free loopback port, then
runs two attacks from 127.0.0.2 while a well-behaved peer on 127.0.0.3 tries to open an association (and
C-ECHO) once a second:

1. keep-alive: ``--holders`` associations kept open for ``--hold`` seconds with a C-ECHO every
   ``--echo-every`` seconds;
2. silent connections: ``--silent`` TCP connections that never send a byte, for ``--hold`` seconds.

For each attack it records how many of the other peer's attempts failed and the longest run of failures
(seconds), and how many of the attacker's connections the node served. Results:
``benchmarks/results/dicom_lockout.json``. Needs 127.0.0.2 and 127.0.0.3 as local addresses (Linux).
Without ``--bundle`` a small bundle is trained first (simulated data, 32 px, 2 epochs), as in the tests.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from contention import cpu as cpu_info  # noqa: E402  (the machine's model and vector flags)

RESULTS = ROOT / "benchmarks" / "results" / "dicom_lockout.json"
AE_TITLE = "MEDCLF"
ATTACKER, VICTIM = "127.0.0.2", "127.0.0.3"


def small_bundle(work: Path) -> Path:
    from medclf.data.simulate import make_dataset
    from medclf.training import train

    data = make_dataset(work / "data", n_per_class=24, size=64, seed=0)
    train(data, work / "model", epochs=2, size=32, batch_size=16, arch="compact-s", progress=False)
    return work / "model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def associate(port: int, source: str):
    ae = AE(ae_title="BENCH")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=AE_TITLE, bind_address=(source, 0))


def probe_while(port: int, stop: threading.Event) -> dict[str, float | int]:
    """The well-behaved peer: one association + C-ECHO per second until ``stop``."""
    attempts = failures = 0
    longest = 0.0
    failing_since: float | None = None
    while not stop.is_set():
        started = time.monotonic()
        assoc = associate(port, VICTIM)
        ok = assoc.is_established and assoc.send_c_echo().Status == 0x0000
        if assoc.is_established:
            assoc.release()
        attempts += 1
        if ok:
            failing_since = None
        else:
            failures += 1
            failing_since = failing_since if failing_since is not None else started
            longest = max(longest, time.monotonic() - failing_since)
        stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))
    return {"attempts": attempts, "failed": failures, "longest_lockout_s": round(longest, 1)}


def keep_alive_attack(port: int, holders: int, hold: float, echo_every: float) -> dict:
    stop = threading.Event()
    result: dict = {}
    prober = threading.Thread(target=lambda: result.update(probe_while(port, stop)))
    held = [associate(port, ATTACKER) for _ in range(holders)]
    prober.start()
    end = time.monotonic() + hold
    while time.monotonic() < end:
        for a in held:
            if a.is_established:
                a.send_c_echo()
        time.sleep(min(echo_every, max(0.0, end - time.monotonic())))
    served = sum(a.is_established for a in held)
    stop.set()
    prober.join()
    for a in held:
        if a.is_established:
            a.release()
    return {"attacker_associations_served": served, "of": holders, "other_peer": result}


def silent_attack(port: int, silent: int, hold: float) -> dict:
    stop = threading.Event()
    result: dict = {}
    prober = threading.Thread(target=lambda: result.update(probe_while(port, stop)))
    socks = []
    for _ in range(silent):
        s = socket.socket()
        s.bind((ATTACKER, 0))
        s.connect(("127.0.0.1", port))
        socks.append(s)
    prober.start()
    time.sleep(hold)
    stop.set()
    prober.join()
    closed_by_node = 0
    for s in socks:
        s.setblocking(False)
        try:
            closed_by_node += s.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed_by_node += 1
        s.close()
    return {"silent_connections": silent, "closed_by_the_node": closed_by_node, "other_peer": result}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--hold", type=float, default=75.0)
    parser.add_argument("--echo-every", type=float, default=20.0)
    parser.add_argument("--holders", type=int, default=4)
    parser.add_argument("--silent", type=int, default=4)
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or small_bundle(Path(tmp))
        port = free_port()
        cmd = [sys.executable, "-m", "medclf", "dicom-node", str(bundle), "--out", str(Path(tmp) / "out")]
        node = subprocess.Popen(
            [*cmd, "--port", str(port), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            deadline = time.monotonic() + 120
            while not associate(port, VICTIM).is_established:
                if node.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"the node did not start: {node.stderr.read().decode() if node.stderr else ''}"
                    )
                time.sleep(0.5)
            keep_alive = keep_alive_attack(port, args.holders, args.hold, args.echo_every)
            time.sleep(2)
            silent = silent_attack(port, args.silent, args.hold)
        finally:
            node.terminate()
            node.wait(timeout=30)
    report = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "cpu": cpu_info(),
        "command": " ".join(["benchmarks/dicom_lockout.py", *sys.argv[1:]]),
        "node_options": extra,
        "keep_alive": keep_alive,
        "silent": silent,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
