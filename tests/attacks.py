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


class _HeldConnections(threading.Thread):
    """Connections held open from each source address, polled until :attr:`stop`; a readable one is one
    the server answered or closed. With ``reconnect_after``, each one the server closes is opened again
    that many seconds later (a persistent attacker)."""

    def __init__(
        self,
        host: str,
        port: int,
        sources: list[str],
        per_source: int,
        reconnect_after: float | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.sources, self.per_source = host, port, sources, per_source
        self.reconnect_after = reconnect_after
        self.fates = SocketFates()
        self.stop = threading.Event()

    def open(self, source: str) -> socket.socket:
        return _connect(self.host, self.port, source)

    def tick(self, socks: list[socket.socket]) -> None:
        """Called every poll (about every 50 ms)."""

    def _open(self, source: str, held: dict[socket.socket, tuple[str, float]]) -> None:
        try:
            held[self.open(source)] = (source, time.monotonic())
            self.fates.opened += 1
        except OSError:
            self.fates.failed_to_open += 1

    def run(self) -> None:
        held: dict[socket.socket, tuple[str, float]] = {}
        due: list[tuple[float, str]] = []
        for source in self.sources:
            for _ in range(self.per_source):
                self._open(source, held)
        while (held or due) and not self.stop.is_set():
            now = time.monotonic()
            for when, source in [d for d in due if d[0] <= now]:
                due.remove((when, source))
                self._open(source, held)
            socks = list(held)
            self.tick(socks)
            readable = select.select(socks, [], [], 0.05)[0] if socks else []
            if not socks:
                time.sleep(0.05)
            for s in readable:
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                self.fates.note_answer(data)
                self.fates.closed_by_server += 1
                source, opened_at = held.pop(s)
                self.fates.open_seconds.append(time.monotonic() - opened_at)
                s.close()
                if self.reconnect_after is not None:
                    due.append((time.monotonic() + self.reconnect_after, source))
        self.fates.still_open = len(held)
        for s in held:
            s.close()


class IdleConnections(_HeldConnections):
    """``per_source`` connections from each source address that never send a byte."""


class SlowHeaders(_HeldConnections):
    """Connections that send a request head one header line every ``interval`` seconds, never ending it."""

    def __init__(self, *args: object, interval: float = 0.5, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.interval = interval
        self._last = time.monotonic()

    def open(self, source: str) -> socket.socket:
        s = _connect(self.host, self.port, source)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        return s

    def tick(self, socks: list[socket.socket]) -> None:
        if time.monotonic() - self._last < self.interval:
            return
        self._last = time.monotonic()
        for s in socks:
            with contextlib.suppress(OSError):  # the server closed it: the poll sees it
                s.send(b"X-Slow: 1\r\n")


class HugeHeader(threading.Thread):
    """A request whose header field is ``size`` bytes long, sent as fast as the server takes it; with
    ``repeat``, one after another until :attr:`stop`. :attr:`sent` and :attr:`answer` describe the first."""

    def __init__(self, host: str, port: int, source: str, size: int, repeat: bool = False) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.source, self.size, self.repeat = host, port, source, size, repeat
        self.sent = 0
        self.answer = ""  # the status line the server sent, or the error that ended the sending
        self.attempts = 0
        self.stop = threading.Event()

    def _one(self) -> tuple[int, str]:
        chunk = b"a" * 65536
        sent, answer = 0, ""
        try:
            s = _connect(self.host, self.port, self.source, timeout=120)
        except OSError as exc:
            return 0, f"connect: {type(exc).__name__}"
        with s:
            try:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
                while sent < self.size and not self.stop.is_set():
                    sent += s.send(chunk[: self.size - sent])
                s.sendall(b"\r\n\r\n")
            except OSError as exc:
                answer = type(exc).__name__
            try:
                data = s.recv(4096)
                if data:
                    answer = data.split(b"\r\n", 1)[0].decode("latin-1")
            except OSError as exc:
                answer = answer or type(exc).__name__
        return sent, answer

    def run(self) -> None:
        self.sent, self.answer = self._one()
        self.attempts = 1
        while self.repeat and not self.stop.is_set():
            self._one()
            self.attempts += 1
            self.stop.wait(0.1)


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
