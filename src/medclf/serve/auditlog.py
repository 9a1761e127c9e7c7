"""The audit log: one SQLite row per API request, written by a background thread.

What a row holds: the time (UTC), a request id, the endpoint, the HTTP status, the API key's *id* (never
the key), the model's sha256, the sha256 and size of the uploaded bytes, the result (class and
confidence), the latency and the error reason. What it never holds: file names, DICOM tags, patient
names, ids or dates, client addresses. The input's hash lets an auditor match a row to a file they hold
without the log revealing whose file it was.

The database runs in WAL mode, so ``medclf audit-log show`` can read while the server writes. Rows are
committed in small batches by one writer thread (a group commit: concurrent requests share one
transaction). The log fails closed: :meth:`AuditLog.record` returns a future that completes only when the
row is committed, and the server answers a request only after that; when the row cannot be written (the
database locked beyond ``busy_timeout_s``, the disk full, ...) the future raises :class:`AuditWriteError`
and the server refuses the request with 503 instead. While writes fail, :attr:`AuditLog.failing` is true and
the writer tries every second whether it can write again.
"""

from __future__ import annotations

import datetime as _dt
import queue
import sqlite3
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from medclf.errors import ConfigError

COLUMNS_SQL = """
CREATE TABLE IF NOT EXISTS requests (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    time          TEXT NOT NULL,
    request_id    TEXT NOT NULL,
    endpoint      TEXT NOT NULL,
    status        INTEGER NOT NULL,
    key_id        TEXT,
    model_sha256  TEXT,
    input_sha256  TEXT,
    input_bytes   INTEGER,
    predicted     TEXT,
    confidence    REAL,
    explained     INTEGER NOT NULL DEFAULT 0,
    latency_ms    REAL,
    error_reason  TEXT
)
"""


@dataclass
class AuditRecord:
    request_id: str
    endpoint: str
    model_sha256: str | None = None
    status: int = 0
    key_id: str | None = None
    input_sha256: str | None = None
    input_bytes: int | None = None
    predicted: str | None = None
    confidence: float | None = None
    explained: bool = False
    latency_ms: float | None = None
    error_reason: str | None = None
    time: str = ""


_FIELDS = [f.name for f in fields(AuditRecord)]


class AuditWriteError(Exception):
    """A row could not be committed; the request it describes must not be answered as if it were."""


def _connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=busy_timeout_s, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: each commit is synced to disk before the answer it vouches for is sent, so a power cut cannot
    # lose a row either (NORMAL survives only a crashed process). Group commits share one sync.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(COLUMNS_SQL)
    conn.commit()
    return conn


_PROBE_EVERY_S = 1.0


class AuditLog:
    """Append-only request log. :meth:`record` queues a row and returns a future that completes when the row
    is committed (or raises :class:`AuditWriteError`); it never blocks the caller on the disk itself."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = _connect(self.path, busy_timeout_s)
        except sqlite3.Error as exc:
            raise ConfigError(f"{self.path}: cannot open the audit log ({exc})") from exc
        self._queue: queue.Queue[tuple[AuditRecord, Future[None]] | threading.Event | None] = queue.Queue()
        self.write_errors = 0
        self.failing = False  # the last write (or probe) failed; cleared by the next one that succeeds
        self.last_error = ""
        self._thread = threading.Thread(target=self._writer, name="medclf-audit", daemon=True)
        self._thread.start()

    def record(self, rec: AuditRecord) -> Future[None]:
        if not rec.time:
            rec.time = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
        done: Future[None] = Future()
        self._queue.put((rec, done))
        return done

    def flush(self, timeout: float = 10.0) -> None:
        """Return once every record queued so far is committed (or has failed)."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._conn.close()

    def _probe(self) -> None:
        """Can we write again? Take the write lock and let it go."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            self.last_error = str(exc)
            with suppress(sqlite3.Error):
                self._conn.rollback()
            return
        self.failing = False

    def _writer(self) -> None:
        sql = f"INSERT INTO requests ({', '.join(_FIELDS)}) VALUES ({', '.join('?' * len(_FIELDS))})"
        while True:
            try:
                item = self._queue.get(timeout=_PROBE_EVERY_S if self.failing else None)
            except queue.Empty:
                self._probe()
                continue
            batch: list[tuple[AuditRecord, Future[None]]] = []
            events: list[threading.Event] = []
            stop = False
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    events.append(item)
                else:
                    batch.append(item)
                if len(batch) >= 256:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    with self._conn:
                        self._conn.executemany(sql, [_row(rec) for rec, _ in batch])
                except sqlite3.Error as exc:
                    self.write_errors += len(batch)
                    self.failing, self.last_error = True, str(exc)
                    for _, done in batch:
                        done.set_exception(AuditWriteError(f"the audit log cannot be written ({exc})"))
                else:
                    self.failing = False
                    for _, done in batch:
                        done.set_result(None)
            for e in events:
                e.set()
            if stop:
                return


def _row(rec: AuditRecord) -> tuple[Any, ...]:
    d = asdict(rec)
    d["explained"] = int(bool(d["explained"]))
    return tuple(d[name] for name in _FIELDS)


def read_rows(path: str | Path, *, limit: int = 50) -> list[dict[str, Any]]:
    """The newest ``limit`` rows, oldest first."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no audit log here (the server writes it; see `medclf serve --audit-db`)")
    try:
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=10.0)
        conn.row_factory = sqlite3.Row
        try:
            rows = conn.execute("SELECT * FROM requests ORDER BY id DESC LIMIT ?", (max(int(limit), 0),))
            out = [dict(r) for r in rows]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise ConfigError(f"{p}: not a medclf audit log ({exc})") from exc
    return out[::-1]


_SHOWN = (
    "time",
    "status",
    "key_id",
    "endpoint",
    "predicted",
    "confidence",
    "latency_ms",
    "input_sha256",
    "model_sha256",
    "error_reason",
)


def format_rows(rows: Iterable[dict[str, Any]]) -> str:
    """A plain text table (hashes shortened to 12 hex digits)."""

    def cell(name: str, v: Any) -> str:
        if v is None:
            return "-"
        if name.endswith("sha256"):
            return str(v)[:12]
        if name == "confidence":
            return f"{v:.3f}"
        if name == "latency_ms":
            return f"{v:.1f}"
        return str(v)

    table = [list(_SHOWN)] + [[cell(n, r.get(n)) for n in _SHOWN] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(_SHOWN))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    )
