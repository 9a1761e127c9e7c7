"""API keys for the HTTP API: stored hashed, checked in constant time, required off loopback.

The key file holds one line per key, ``KEY_ID:sha256:HEX`` (``#`` starts a comment). A key is 32 random
bytes (URL-safe base64) that is shown once, when it is made, and never stored: a leaked key file does not
leak a key. Its 256 bits of entropy make a fast hash sufficient (no password-style stretching is needed).
The file is re-read when it changes, so a key removed with ``medclf serve-keys remove`` stops working
without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import socket
import tempfile
import threading
from contextlib import suppress
from pathlib import Path

from medclf.errors import ConfigError

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LINE_RE = re.compile(r"^(?P<id>[^:\s]+):sha256:(?P<hex>[0-9a-f]{64})$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def read_key_file(path: str | Path) -> dict[str, str]:
    """``{key_id: sha256 hex}`` from a key file; a malformed line is a :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{p}: no such API key file (create one with `medclf serve-keys add {p}`)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the API key file ({exc})") from exc
    keys: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE_RE.match(line)
        if not m:
            raise ConfigError(f"{p}:{n}: expected KEY_ID:sha256:HEX (64 hex digits), never a key itself")
        if m["id"] in keys:
            raise ConfigError(f"{p}:{n}: key id {m['id']!r} appears twice")
        keys[m["id"]] = m["hex"]
    return keys


def _write_key_file(path: Path, keys: dict[str, str]) -> None:
    lines = ["# medclf API keys: KEY_ID:sha256:HEX. Hashes only; the keys themselves are never stored."]
    lines += [f"{kid}:sha256:{digest}" for kid, digest in keys.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_key(path: str | Path, key_id: str | None = None) -> tuple[str, str]:
    """Make a new key, store its hash in ``path`` (created if needed, mode 0600); return ``(key_id, key)``."""
    p = Path(path)
    keys = read_key_file(p) if p.exists() else {}
    if key_id is None:
        key_id = f"key-{secrets.token_hex(4)}"
    if not _ID_RE.match(key_id):
        raise ConfigError(f"key id {key_id!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if key_id in keys:
        raise ConfigError(f"{p}: a key with id {key_id!r} exists already")
    key = "mk_" + secrets.token_urlsafe(32)
    keys[key_id] = hash_key(key)
    _write_key_file(p, keys)
    return key_id, key


def remove_key(path: str | Path, key_id: str) -> None:
    p = Path(path)
    keys = read_key_file(p)
    if key_id not in keys:
        raise ConfigError(f"{p}: no key with id {key_id!r}")
    del keys[key_id]
    _write_key_file(p, keys)


class KeyStore:
    """The keys of one key file, re-read whenever the file's modification time or size changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, str] = {}
        self._reload()
        if not self._keys:
            raise ConfigError(
                f"{self.path}: the API key file holds no keys; add one with `medclf serve-keys add`"
            )

    def _reload(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise ConfigError(
                f"{self.path}: no such API key file (create one with `medclf serve-keys add {self.path}`)"
            ) from None
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read the API key file ({exc.strerror})") from exc
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._keys = read_key_file(self.path)
            self._stamp = stamp

    def verify(self, key: str | None) -> str | None:
        """The id of the key, or None when it is missing or not one of ours."""
        if not key:
            return None
        with self._lock:
            with suppress(ConfigError):  # a file being rewritten or broken: keep the keys loaded last
                self._reload()
            keys = dict(self._keys)
        digest = hash_key(key)
        found = None
        for key_id, stored in keys.items():  # compare against all, in constant time each
            if hmac.compare_digest(stored, digest):
                found = key_id
        return found


def is_loopback(host: str) -> bool:
    """True when ``host`` only ever means this machine (127.0.0.0/8, ::1, or a name resolving only there)."""
    name = host.strip("[]")
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    addresses = {str(info[4][0]) for info in infos}  # IPv4/IPv6 socket addresses start with the host
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_exposure(host: str, api_key_file: str | Path | None) -> None:
    """Refuse to serve beyond this machine without API keys."""
    if api_key_file is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host} without API keys: anyone who can reach it could use the model. "
            "Create a key with `medclf serve-keys add keys.txt` and pass --api-key-file keys.txt, "
            "or listen on 127.0.0.1"
        )
