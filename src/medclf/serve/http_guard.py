"""Connection-level defences of ``medclf serve``, below HTTP routing: what uvicorn does not bound itself.

uvicorn (0.54, httptools parser) closes a keep-alive connection that stays idle after a response, but
nothing else: a connection that never completes its request head is kept forever, httptools buffers a
header field of any size before the application sees it, and ``limit_concurrency`` counts idle
connections, so a few hundred silent sockets made every request, ``/healthz`` included, answer 503.
:class:`GuardedHttpToolsProtocol` is uvicorn's own protocol with four additions (:class:`ConnectionLimits`):

- **a deadline for the request head** (``header_timeout_s``), counted from the connection's start or from
  the previous response; a connection without a complete head by then is closed (408 when it had sent
  something). A response sent before its request body ended (a refusal) is followed by at most
  ``linger_s`` of discarding the rest of the body, then the connection is closed. An answer the client
  has not read by the next deadline is dropped with the connection (abort);
- **head size limits checked on the raw bytes, before the parser sees them**: one line (the request line or
  a header field) at most ``max_line_bytes``, the whole head at most ``max_head_bytes`` and
  ``max_fields`` fields; beyond, 431 and the connection is closed, so at most one read's worth (256 KiB)
  plus the limit is ever held;
- **a per-client connection cap** (``max_client_connections``; IPv6 clients count per /64). Trusted
  proxies (uvicorn's ``FORWARDED_ALLOW_IPS``, by default 127.0.0.1) are not capped: they carry many
  clients, so cap at the proxy;
- **a total connection cap** (``max_connections``): a new connection beyond it evicts the connection that
  has waited longest for its request head, so silent sockets cannot lock healthy clients out.

Refused connections never reach the application (there is no request yet to audit); they are counted and
logged as one warning line per reason at most every 10 s.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import logging
import os
import socket
import struct
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("medclf.serve")

_REPORT_EVERY_S = 10.0


@dataclass(frozen=True)
class ConnectionLimits:
    """Limits of one server process (``medclf serve`` options of the same names)."""

    header_timeout_s: float = 5.0
    # nginx's large_client_header_buffers and gunicorn's limit_request_field_size are 8 KiB per line.
    max_line_bytes: int = 8 * 1024
    max_head_bytes: int = 64 * 1024
    max_fields: int = 100  # gunicorn's limit_request_fields
    max_client_connections: int = 32  # 0: no per-client cap
    max_connections: int = 1000
    linger_s: float = 10.0
    # Comma-separated addresses or networks, or "*": uvicorn takes the client's address from their
    # X-Forwarded-For header, and they are not capped per client. uvicorn's own setting is the default.
    trusted_proxies: str = field(default_factory=lambda: os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1"))

    def __post_init__(self) -> None:
        from medclf.errors import ConfigError

        if self.header_timeout_s <= 0:
            raise ConfigError("--header-timeout must be positive")
        if self.max_client_connections < 0:
            raise ConfigError("--max-client-connections must be 0 (no cap) or more")
        if self.max_connections < 1:
            raise ConfigError("--max-connections must be at least 1")


def _parse_networks(spec: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None:
    """None means every address ("*"). Other entries uvicorn accepts (a Unix socket's name) match no TCP
    client, so they are skipped."""
    nets = []
    for item in (s.strip() for s in spec.split(",")):
        if item == "*":
            return None
        with suppress(ValueError):
            nets.append(ipaddress.ip_network(item, strict=False))
    return nets


def client_key(host: str) -> str:
    """What the per-client cap counts: the IPv4 address, or the /64 of an IPv6 address (one subscriber's
    prefix: a single host can use any address in it)."""
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


class HeadScanner:
    """Measures one request head on the raw bytes, as they arrive, before the HTTP parser buffers them."""

    __slots__ = ("fields", "head_bytes", "limits", "line_bytes", "prev_cr", "started")

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.reset()

    def reset(self) -> None:
        self.head_bytes = 0
        self.line_bytes = 0  # of the line not yet ended
        self.fields = 0
        self.started = False  # the request line has ended
        self.prev_cr = False  # the last byte seen was '\r'

    def scan(self, data: bytes) -> tuple[int | None, str | None]:
        """``(end, problem)``: ``end`` is the offset just after the blank line that ends the head, or None
        when ``data`` does not hold it; ``problem`` names the limit exceeded, if one is."""
        lim = self.limits
        pos, n = 0, len(data)
        while pos < n:
            nl = data.find(b"\n", pos)
            stop = n if nl < 0 else nl + 1
            self.line_bytes += stop - pos
            self.head_bytes += stop - pos
            if self.line_bytes > lim.max_line_bytes:
                return None, "header_field_too_large"
            if self.head_bytes > lim.max_head_bytes:
                return None, "header_too_large"
            if nl < 0:
                self.prev_cr = data[-1] == 0x0D
                return None, None
            cr_before = data[nl - 1] == 0x0D if nl > pos else self.prev_cr
            blank = self.line_bytes == 1 or (self.line_bytes == 2 and cr_before)
            self.line_bytes = 0
            self.prev_cr = False
            pos = stop
            if blank:
                if self.started:
                    return stop, None
                continue  # empty lines before a request line: the parser skips them, we count them
            if self.started:
                self.fields += 1
                if self.fields > lim.max_fields:
                    return None, "too_many_header_fields"
            self.started = True
        return None, None

    def charge(self, data: bytes) -> str | None:
        """Count bytes the parser took without a scan (a pipelined request that began inside a body read):
        all of them, as if they were head bytes, which errs on the side of refusing."""
        self.started = True
        self.head_bytes += len(data)
        self.line_bytes = len(data) - (data.rfind(b"\n") + 1)
        self.prev_cr = bool(data) and data[-1] == 0x0D
        if self.line_bytes > self.limits.max_line_bytes:
            return "header_field_too_large"
        if self.head_bytes > self.limits.max_head_bytes:
            return "header_too_large"
        return None


class _ServerGuard:
    """State shared by the connections of one server: per-client counts, who waits for a head, refusals."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.trusted = _parse_networks(limits.trusted_proxies)
        self.per_client: Counter[str] = Counter()
        self.waiting: dict[GuardedHttpToolsProtocol, None] = {}  # insertion order = longest waiting first
        self.refused: Counter[str] = Counter()
        self._report: asyncio.TimerHandle | None = None

    def is_trusted(self, host: str) -> bool:
        if self.trusted is None:
            return True
        try:
            addr = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        return any(addr in net for net in self.trusted)

    def note(self, reason: str, loop: asyncio.AbstractEventLoop) -> None:
        self.refused[reason] += 1
        if self._report is None:
            self._flush()
            self._report = loop.call_later(_REPORT_EVERY_S, self._timer, loop)

    def _timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._report = None
        if self.refused:
            self._flush()
            self._report = loop.call_later(_REPORT_EVERY_S, self._timer, loop)

    def _flush(self) -> None:
        if self.refused:
            counts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.refused.items()))
            log.warning("refused or closed connections: %s", counts)
            self.refused.clear()


_STATUS_LINES = {
    408: b"HTTP/1.1 408 Request Timeout\r\n",
    429: b"HTTP/1.1 429 Too Many Requests\r\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
    503: b"HTTP/1.1 503 Service Unavailable\r\n",
}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of :class:`ConnectionLimits` (see the module doc).

    Pass it to uvicorn as ``http=functools.partial(GuardedHttpToolsProtocol, limits=...)``.
    """

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        guard = getattr(self.server_state, "medclf_guard", None)
        if guard is None or guard.limits != limits:
            guard = _ServerGuard(limits)
            self.server_state.medclf_guard = guard  # type: ignore[attr-defined]
        self.guard: _ServerGuard = guard
        self.scanner = HeadScanner(limits)
        self.awaiting_head = True  # no complete request head since the last request ended
        self.body_pending = False  # a request head arrived, its body has not ended
        self._client_key: str | None = None  # set when counted against the per-client cap
        self._deadline: asyncio.TimerHandle | None = None
        self._unchecked_feed = False
        self._began_unchecked = False
        self._answered = 0  # responses completed on this connection

    # -- connection lifecycle
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        guard, lim = self.guard, self.limits
        host = self.client[0] if self.client else None
        if host is not None and lim.max_client_connections and not guard.is_trusted(host):
            key = client_key(host)
            if guard.per_client[key] >= lim.max_client_connections:
                self._refuse(429, "client_connection_cap", b"too many connections from this client\n")
                return
            guard.per_client[key] += 1
            self._client_key = key
        if len(self.connections) > lim.max_connections:
            victim = next((p for p in guard.waiting if p is not self), None)
            if victim is None:
                self._refuse(503, "server_full", b"the server has no free connection\n")
                return
            victim._close("evicted_waiting_for_head", reset=bool(victim.transport.get_write_buffer_size()))
        self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self.guard.waiting.pop(self, None)
        if self._client_key is not None:
            counts = self.guard.per_client
            counts[self._client_key] -= 1
            if counts[self._client_key] <= 0:
                del counts[self._client_key]
            self._client_key = None
        super().connection_lost(exc)

    # -- bytes in
    def data_received(self, data: bytes) -> None:
        while data and self.awaiting_head and not self.transport.is_closing():
            end, problem = self.scanner.scan(data)
            if problem:
                self._refuse(431, problem, f"request head refused: {problem.replace('_', ' ')}\n".encode())
                return
            if end is None:
                super().data_received(data)
                return
            head, data = data[:end], data[end:]
            super().data_received(head)
            # The parser ran on_headers_complete (and, without a body, on_message_complete) in there; if it
            # did not see the head end where we did, we keep scanning with the counts so far.
        if data and not self.transport.is_closing():
            self._unchecked_feed, self._began_unchecked = True, False
            try:
                super().data_received(data)
            finally:
                self._unchecked_feed = False
            if self.awaiting_head and self._began_unchecked and not self.transport.is_closing():
                problem = self.scanner.charge(data)
                if problem:
                    self._refuse(
                        431, problem, f"request head refused: {problem.replace('_', ' ')}\n".encode()
                    )

    # -- parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._unchecked_feed:
            self._began_unchecked = True

    def on_headers_complete(self) -> None:
        self.awaiting_head = False
        self.body_pending = True
        self._cancel_deadline()
        self.guard.waiting.pop(self, None)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.body_pending = False
        self.awaiting_head = True
        self.scanner.reset()
        self._began_unchecked = False
        if self.cycle is not None and not self._busy():
            self._wait_for_head()  # answered before its body ended; the body is in: wait for the next head

    def on_response_complete(self) -> None:
        self._answered += 1
        super().on_response_complete()  # starts the next pipelined request, if one is queued
        if self._busy():
            return
        if self.transport.is_closing():  # "Connection: close": it closes once the answer is sent...
            if self.transport.get_write_buffer_size():
                self._arm(self.limits.header_timeout_s)  # ...or is aborted if the client does not read it
            return
        if self.body_pending:
            self._arm(self.limits.linger_s)  # answered (refused) before the body ended: discard it, briefly
        elif self.awaiting_head:
            self._wait_for_head()

    def _busy(self) -> bool:
        """A request of this connection is being answered."""
        return self.cycle is not None and not self.cycle.response_complete

    # -- deadlines and refusals
    def _wait_for_head(self) -> None:
        self.guard.waiting.pop(self, None)
        self.guard.waiting[self] = None
        self._arm(self.limits.header_timeout_s)

    def _arm(self, seconds: float) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(seconds, self._on_deadline)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_deadline(self) -> None:
        self._deadline = None
        busy = self._busy()
        if not busy and self.transport.get_write_buffer_size():
            # Its last answer is still unsent after a header timeout: a client that does not read. A plain
            # close would wait for the buffer to drain, for as long as the client holds on.
            self._close("answer_not_read", reset=True)
            return
        if self.transport.is_closing():
            return
        if self.awaiting_head and not busy:
            if self.scanner.head_bytes:
                self._refuse(408, "header_timeout", b"the request head did not arrive in time\n")
            elif self._answered:
                self._close(None)  # an idle keep-alive connection: nothing to report
            else:
                self._close("idle_timeout")
        elif self.body_pending and not busy:
            self._close("body_after_response_timeout")

    def _refuse(self, status: int, reason: str, message: bytes) -> None:
        self.transport.write(
            _STATUS_LINES[status]
            + b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % len(message)
            + message
        )
        self._close(reason)

    def _close(self, reason: str | None, reset: bool = False) -> None:
        """Close (``reset``: at once, dropping whatever is unsent) and count the reason, if there is one."""
        self._cancel_deadline()
        self.guard.waiting.pop(self, None)
        if reason:
            self.guard.note(reason, self.loop)
        if reset:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:  # an RST, so the kernel drops what it still holds for the client too
                with suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
        elif not self.transport.is_closing():
            self.transport.close()


# ------------------------------------------------------------------------------------ the access log
# Query parameters whose values may appear in the access log; every other parameter is redacted (a key sent
# in a URL by mistake must not end up in a log file).
_LOGGED_PARAMETERS = frozenset({"explain"})


def redact_query(path_with_query: str) -> str:
    """``/v1/predict?explain=true&api_key=SECRET`` -> ``/v1/predict?explain=true&[redacted]``."""
    path, sep, query = path_with_query.partition("?")
    if not sep:
        return path
    kept, dropped = [], False
    for part in query.split("&"):
        name = part.split("=", 1)[0]
        if name in _LOGGED_PARAMETERS:
            kept.append(part)
        elif part:
            dropped = True
    if dropped:
        kept.append("[redacted]")
    return path + ("?" + "&".join(kept) if kept else "")


class RedactQueryFilter(logging.Filter):
    """For uvicorn's access logger: the request's query string, minus anything not known to be harmless."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (args[0], args[1], redact_query(args[2]), args[3], args[4])
        return True


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's logging configuration with :class:`RedactQueryFilter` on the access log (a dict, so it
    reaches worker processes too)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["medclf_redact_query"] = {"()": f"{__name__}.RedactQueryFilter"}
    config["loggers"]["uvicorn.access"].setdefault("filters", []).append("medclf_redact_query")
    # The server's own warnings (refused connections, unwritten audit rows) go where uvicorn's go.
    config["loggers"]["medclf.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config
