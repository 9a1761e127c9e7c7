"""The gate every HTTP request passes before the routes: keys in URLs, API keys, and the audit row.

A pure ASGI middleware (:class:`RequestGate`), so that it sees every request the application answers,
including the ones the router refuses (404/405 under ``/v1``, validation errors) and the ones it refuses
itself:

1. **No keys in URLs.** A query parameter named like a key (``api_key``, ``token``, ...) or whose value is
   one of the server's keys gets 400 (``key_in_query``): URLs end up in proxy logs and browser history.
   uvicorn's access log never shows other parameters than ``explain`` (see :mod:`medclf.serve.http_guard`).
2. **API keys**: with a key file, every ``/v1`` request and ``/openapi.json`` need a valid key, checked here
   before routing (so an unauthenticated client cannot tell a route from a 404 either), else 401.
3. **The audit log fails closed.** Every ``/v1`` request gets one row, whatever its status. The response is
   held back until the row is committed; when it cannot be (:class:`~medclf.serve.auditlog.AuditWriteError`)
   the client gets 503 ``audit_unavailable`` instead, and the row goes to the server log (stderr). While
   the log is failing, ``/v1`` requests are refused with that 503 at once, without doing the work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any
from urllib.parse import parse_qsl

from medclf.serve.auditlog import AuditLog, AuditRecord, AuditWriteError
from medclf.serve.auth import KeyStore

log = logging.getLogger("medclf.serve")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]

AUDIT_STATE = "medclf_audit"  # scope["state"][AUDIT_STATE]: the request's AuditRecord, for the routes to fill
_KEY_PARAMETER = re.compile(
    r"^(api[-_]?key|x[-_]api[-_]key|key|apikey|token|access[-_]token|auth|authori[sz]ation|bearer)$", re.I
)
_UNKNOWN_ENDPOINT = "/v1/*"  # an unknown path is not written to the log: it could hold anything


def api_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key from ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``."""
    key = auth = None
    for name, value in headers:
        if name == b"x-api-key":
            key = value.decode("latin-1")
        elif name == b"authorization":
            auth = value.decode("latin-1")
    if not key and auth and auth[:7].lower() == "bearer ":
        key = auth[7:].strip()
    return key or None


class RequestGate:
    """See the module documentation. ``routes`` is the application's route list (read at the first
    request, so routes added after the middleware count too)."""

    def __init__(
        self,
        app: Callable[..., Any],
        *,
        keys: KeyStore | None,
        audit: AuditLog | None,
        model_sha256: str,
        routes: list[Any],
    ) -> None:
        self.app = app
        self.keys = keys
        self.audit = audit
        self.model_sha256 = model_sha256
        self._routes = routes
        self._endpoints: frozenset[str] | None = None

    def endpoint(self, path: str) -> str:
        if self._endpoints is None:
            self._endpoints = frozenset(
                p for r in self._routes if isinstance(p := getattr(r, "path", None), str)
            )
        return path if path in self._endpoints else _UNKNOWN_ENDPOINT

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        api = path == "/v1" or path.startswith("/v1/")
        protected = self.keys is not None and (api or path == "/openapi.json")
        rec = AuditRecord(
            request_id=uuid.uuid4().hex, endpoint=self.endpoint(path), model_sha256=self.model_sha256
        )
        t0 = time.perf_counter()
        refusal = self._refusal(scope, rec, protected)
        audit = self.audit if api else None
        if audit is None:
            if refusal is not None:
                await _send_json(send, *refusal)
            else:
                await self.app(scope, receive, send)
            return
        if audit.failing:  # refuse at once, without doing the work; the row can only go to the server log
            rec.status, rec.error_reason, rec.latency_ms = 503, "audit_unavailable", _ms(t0)
            _log_unwritten(rec, audit.last_error)
            await _send_json(send, *_audit_unavailable())
            return

        if refusal is not None:
            rec.status, rec.error_reason = refusal[0], refusal[1]["reason"]
            rec.latency_ms = _ms(t0)
            await self._answer(send, rec, [], refusal)
            return
        held: list[Message] = []  # the response, sent only once its row is committed
        disconnected = False

        async def receive_watching() -> Message:
            nonlocal disconnected
            message = await receive()
            if message.get("type") == "http.disconnect":
                disconnected = True
            return message

        async def hold(message: Message) -> None:
            held.append(message)

        scope.setdefault("state", {})[AUDIT_STATE] = rec
        try:
            await self.app(scope, receive_watching, hold)
        except BaseException as exc:
            # Unhandled (the server answers 500), or the client went away (nginx's 499).
            gone = disconnected or not isinstance(exc, Exception)
            rec.status, rec.error_reason = (499, "cancelled") if gone else (500, "internal")
            rec.latency_ms = _ms(t0)
            problem = await self._write(rec)
            if problem:
                _log_unwritten(rec, problem)
            raise
        start = next((m for m in held if m.get("type") == "http.response.start"), None)
        rec.status = int(start["status"]) if start else 500
        if rec.status >= 400 and rec.error_reason is None:
            rec.error_reason = _reason(held)
        rec.latency_ms = _ms(t0)
        await self._answer(send, rec, held, None)

    async def _answer(
        self,
        send: Send,
        rec: AuditRecord,
        held: list[Message],
        refusal: tuple[int, dict[str, str], dict[str, str]] | None,
    ) -> None:
        """Commit the row, then send the response; 503 instead when the row cannot be committed."""
        problem = await self._write(rec)
        if problem:
            rec.status, rec.error_reason = 503, "audit_unavailable"
            _log_unwritten(rec, problem)
            await _send_json(send, *_audit_unavailable())
        elif refusal is not None:
            await _send_json(send, *refusal)
        else:
            for message in held:
                await send(message)

    def _refusal(
        self, scope: Scope, rec: AuditRecord, protected: bool
    ) -> tuple[int, dict[str, str], dict[str, str]] | None:
        query = scope.get("query_string", b"").decode("latin-1")
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            named = any(_KEY_PARAMETER.match(name) for name, _ in pairs)
            valid = self.keys is not None and any(self.keys.verify(v) for _, v in pairs if v)
            if named or valid:
                message = (
                    "an API key must not be sent in the URL (URLs end up in logs and browser history); send it "
                    "as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
                )
                if valid:
                    message += ". This key has been exposed: replace it (medclf serve-keys)"
                return 400, {"error": message, "reason": "key_in_query"}, {}
        if protected:
            assert self.keys is not None
            rec.key_id = self.keys.verify(api_key(scope.get("headers", ())))
            if rec.key_id is None:
                return (
                    401,
                    {
                        "error": "missing or invalid API key (send it as 'Authorization: Bearer KEY' or "
                        "'X-API-Key: KEY')",
                        "reason": "unauthorized",
                    },
                    {"www-authenticate": "Bearer"},
                )
        return None

    async def _write(self, rec: AuditRecord) -> str | None:
        """None once the row is committed, else why it is not."""
        assert self.audit is not None
        try:
            await asyncio.wrap_future(self.audit.record(rec))
        except AuditWriteError as exc:
            return str(exc)
        return None


def _audit_unavailable() -> tuple[int, dict[str, str], dict[str, str]]:
    return (
        503,
        {
            "error": "the audit log cannot be written, so the request was not served; retry later",
            "reason": "audit_unavailable",
        },
        {"retry-after": "5"},
    )


def _log_unwritten(rec: AuditRecord, why: str) -> None:
    log.error("audit row not written to the database (%s): %s", why, json.dumps(asdict(rec), sort_keys=True))


def _reason(held: list[Message]) -> str:
    body = b"".join(m.get("body", b"") for m in held if m.get("type") == "http.response.body")
    try:
        reason = json.loads(body).get("reason")
    except (ValueError, AttributeError):
        reason = None
    return reason if isinstance(reason, str) else "error"


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


async def _send_json(send: Send, status: int, body: dict[str, str], headers: dict[str, str]) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
