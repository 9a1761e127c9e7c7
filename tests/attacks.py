"""Denial-of-service attacks on an HTTP server, for tests/test_serve_hostile.py and benchmarks/attack.py.

Raw sockets, one thread per attack, each recording what the server did to it. Attack connections come
from other loopback addresses (127.0.0.2, ...: Linux routes all of 127/8 to the loopback interface), so
that per-client limits can be told apart from the healthy client's on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def loopback_sources(n: int, first: int = 2) -> list[str]:
    """``n`` loopback addresses other than 127.0.0.1, or [] where a socket cannot bind one (not Linux)."""
    addresses = [f"127.0.{k // 254}.{k % 254 + 1}" for k in range(first - 1, first - 1 + n)]
    try:
        with socket.socket() as s:
            s.bind((addresses[0], 0))
    except OSError:
        return []
    return addresses


def _connect(host: str, port: int, source: str, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
    s.setblocking(True)
    return s


@dataclass
class SocketFates:
    """What became of a group of attack connections."""

    opened: int = 0
    failed_to_open: int = 0
    closed_by_server: int = 0
    still_open: int = 0  # when the attack stopped
    answers: dict[str, int] = field(default_factory=dict)  # status line the server sent, or "(closed)"
    open_seconds: list[float] = field(default_factory=list)  # how long each closed one was held open

    def note_answer(self, data: bytes) -> None:
        line = data.split(b"\r\n", 1)[0].decode("latin-1", "replace")[:60] or "(closed)"
        self.answers[line] = self.answers.get(line, 0) + 1


def _watch(
    socks: list[tuple[socket.socket, float]],
    fates: SocketFates,
    stop: threading.Event,
    tick: Callable[[list[socket.socket]], None],
) -> None:
    """Poll ``socks`` (with their opening times) until ``stop``; a readable socket is one the server
    answered or closed."""
    opened_at = {s: t for s, t in socks}
    open_socks = [s for s, _ in socks]
    while open_socks and not stop.is_set():
        tick(open_socks)
        readable, _, _ = select.select(open_socks, [], [], 0.05)
        for s in readable:
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            fates.note_answer(data)
            fates.closed_by_server += 1
            fates.open_seconds.append(time.monotonic() - opened_at[s])
            open_socks.remove(s)
            s.close()
    fates.still_open = len(open_socks)
    for s in open_socks:
        s.close()


class IdleConnections(threading.Thread):
    """``per_source`` connections from each source address that never send a byte."""

    def __init__(self, host: str, port: int, sources: list[str], per_source: int) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.sources, self.per_source = host, port, sources, per_source
        self.fates = SocketFates()
        self.stop = threading.Event()

    def run(self) -> None:
        socks = []
        for source in self.sources:
            for _ in range(self.per_source):
                try:
                    socks.append((_connect(self.host, self.port, source), time.monotonic()))
                    self.fates.opened += 1
                except OSError:
                    self.fates.failed_to_open += 1
        _watch(socks, self.fates, self.stop, lambda _: None)


class SlowHeaders(threading.Thread):
    """Connections that send a request head one header line every ``interval`` seconds, never ending it."""

    def __init__(
        self, host: str, port: int, sources: list[str], per_source: int, interval: float = 0.5
    ) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.sources, self.per_source = host, port, sources, per_source
        self.interval = interval
        self.fates = SocketFates()
        self.stop = threading.Event()

    def run(self) -> None:
        socks = []
        for source in self.sources:
            for _ in range(self.per_source):
                try:
                    s = _connect(self.host, self.port, source)
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                    socks.append((s, time.monotonic()))
                    self.fates.opened += 1
                except OSError:
                    self.fates.failed_to_open += 1
        last = [time.monotonic()]

        def tick(open_socks: list[socket.socket]) -> None:
            if time.monotonic() - last[0] < self.interval:
                return
            last[0] = time.monotonic()
            for s in open_socks:
                with contextlib.suppress(OSError):  # the server closed it: the poll sees it
                    s.send(b"X-Slow: 1\r\n")

        _watch(socks, self.fates, self.stop, tick)


class HugeHeader(threading.Thread):
    """One request whose header field is ``size`` bytes long, sent as fast as the server takes it."""

    def __init__(self, host: str, port: int, source: str, size: int) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.source, self.size = host, port, source, size
        self.sent = 0
        self.answer = ""  # the status line the server sent, or the error that ended the sending

    def run(self) -> None:
        chunk = b"a" * 65536
        try:
            s = _connect(self.host, self.port, self.source, timeout=30)
        except OSError as exc:
            self.answer = f"connect: {type(exc).__name__}"
            return
        with s:
            try:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
                while self.sent < self.size:
                    self.sent += s.send(chunk[: self.size - self.sent])
                s.sendall(b"\r\n\r\n")
            except OSError as exc:
                self.answer = type(exc).__name__
            try:
                data = s.recv(4096)
                if data:
                    self.answer = data.split(b"\r\n", 1)[0].decode("latin-1")
            except OSError as exc:
                self.answer = self.answer or type(exc).__name__


@dataclass
class Probe:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


class Prober(threading.Thread):
    """A healthy client: ``GET path`` (or ``POST`` of ``body``) on a new connection every ``interval`` s,
    from 127.0.0.1, as a load balancer's health check does; records every answer and latency."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str = "/healthz",
        body: bytes | None = None,
        interval: float = 0.1,
        timeout: float = 5.0,
    ) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.path, self.body = host, port, path, body
        self.interval, self.timeout = interval, timeout
        self.probe = Probe()
        self.stop = threading.Event()

    def once(self) -> None:
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            if self.body is None:
                conn.request("GET", self.path)
            else:
                conn.request("POST", self.path, body=self.body)
            r = conn.getresponse()
            r.read()
            status = r.status
        except (OSError, http.client.HTTPException) as exc:
            self.probe.failures.append(type(exc).__name__)
            return
        finally:
            conn.close()
        self.probe.latencies.append(time.perf_counter() - t0)
        if status == 200:
            self.probe.ok += 1
        else:
            self.probe.failures.append(str(status))

    def run(self) -> None:
        while not self.stop.is_set():
            self.once()
            self.stop.wait(self.interval)
