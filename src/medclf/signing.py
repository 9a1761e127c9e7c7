"""Ed25519 signatures over model bundles: who vouches for a bundle, and whether we trust them.

A bundle's hashes (``bundle.json`` seals the sha256 of every file, and its own) prove integrity, not
origin: anyone can edit a bundle and recompute them. A signature binds a bundle's sha256 to a key.

- **What is signed**: the bundle's sha256 (the ``self_sha256`` of ``bundle.json``, which pins every other
  file's sha256), the signer's name and the signing time, behind a fixed domain prefix (:func:`message`).
- **Where**: ``signatures.json`` in the bundle, which ``bundle.json`` does not list: signing does not change
  the bundle's sha256, several people can sign, and adding or removing a signature never breaks the hash
  check. A signature made for another sha256 does not verify.
- **Trust**: a folder of public keys (:class:`TrustedKeys`). A signature counts only when it verifies and
  its key is one of them; the trusted key's file name, not the name written in the signature, says who
  signed.
- **Keys**: PEM (PKCS#8 private, SubjectPublicKeyInfo public), OpenSSH (``ssh-ed25519 ...``), or the raw
  32 bytes (binary, hex or base64). :func:`generate_key_pair` writes ``NAME.key`` (mode 0600) and
  ``NAME.pub``. ``$MEDCLF_KEY_PASSPHRASE``, when set, encrypts new private keys and decrypts PEM ones.

Uses the ``cryptography`` package (OpenSSL's Ed25519); nothing here is hand-written cryptography.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medclf.errors import BundleError, ConfigError

SIGNATURES = "signatures.json"
FORMAT = "medclf-signatures"
ALGORITHM = "ed25519"
PASSPHRASE_ENV = "MEDCLF_KEY_PASSPHRASE"
_DOMAIN = b"medclf bundle signature v1\n"
MAX_SIGNATURES_BYTES = 1 << 20
MAX_SIGNATURES = 64
MAX_KEY_FILE_BYTES = 64 << 10
MAX_TRUSTED_KEYS = 1024
MAX_SIGNER_CHARS = 200
_KEY_SUFFIXES = (".pub", ".pem")


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def message(*, bundle_sha256: str, signer: str, signed_at: str, public_key: str) -> bytes:
    """The exact bytes that are signed: a domain prefix, then the fields as canonical JSON."""
    fields = {
        "algorithm": ALGORITHM,
        "bundle_sha256": bundle_sha256,
        "public_key": public_key,
        "signed_at": signed_at,
        "signer": signer,
    }
    return _DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(
    bundle_sha256: str, private_key: Ed25519PrivateKey, signer: str, *, signed_at: str | None = None
) -> dict[str, str]:
    """One signature entry (as stored in ``signatures.json``) over ``bundle_sha256``."""
    _check_sha256(bundle_sha256)
    signer = _check_signer(signer)
    signed_at = signed_at or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    public_key = base64.b64encode(_raw(private_key.public_key())).decode()
    msg = message(bundle_sha256=bundle_sha256, signer=signer, signed_at=signed_at, public_key=public_key)
    return {
        "algorithm": ALGORITHM,
        "bundle_sha256": bundle_sha256,
        "signer": signer,
        "signed_at": signed_at,
        "public_key": public_key,
        "signature": base64.b64encode(private_key.sign(msg)).decode(),
    }


@dataclass(frozen=True)
class SignatureCheck:
    """What one signature entry of a bundle proves."""

    signer: str  # the name written in the signature (self-declared; trusted_as is the one to believe)
    key_id: str  # fingerprint of the key it names ("" when the entry is malformed)
    signed_at: str
    valid: bool  # verifies with its key, over this bundle's sha256
    problem: str | None = None  # why it is not valid
    trusted_as: str | None = None  # the trusted key file it matches (None: not trusted, or nothing to check)

    @property
    def trusted(self) -> bool:
        return self.valid and self.trusted_as is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "signer": self.signer,
            "key_id": self.key_id,
            "signed_at": self.signed_at,
            "valid": self.valid,
            "problem": self.problem,
            "trusted": self.trusted,
            "trusted_key": self.trusted_as,
        }

    def describe(self, trust_checked: bool) -> str:
        who = f"{self.signer!r} (key {self.key_id or '?'}, signed {self.signed_at or '?'})"
        if not self.valid:
            return f"{who}: INVALID, {self.problem}"
        if self.trusted_as:
            return f"{who}: valid, trusted key {self.trusted_as}"
        if trust_checked:
            return f"{who}: valid, but the key is NOT among the trusted keys"
        return f"{who}: valid signature; key not checked (no trusted keys given)"


class TrustedKeys:
    """Public keys whose signatures are trusted, read from a folder of ``*.pub`` / ``*.pem`` files (or one
    key file). Each key is known by its file name."""

    def __init__(self, keys: dict[bytes, str], source: str) -> None:
        self._by_raw = dict(keys)
        self.source = source

    @classmethod
    def load(cls, path: str | Path) -> TrustedKeys:
        p = Path(path)
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix in _KEY_SUFFIXES and not f.name.startswith("."))
        else:
            raise ConfigError(f"--trusted-keys {p}: no such folder or key file")
        if len(files) > MAX_TRUSTED_KEYS:
            raise ConfigError(f"--trusted-keys {p}: more than {MAX_TRUSTED_KEYS} key files")
        keys: dict[bytes, str] = {}
        for f in files:
            keys.setdefault(_raw(load_public_key(f)), f.name)
        if not keys:
            raise ConfigError(f"--trusted-keys {p}: no public key files (*.pub, *.pem) in it")
        return cls(keys, str(p))

    def name_of(self, public_key: Ed25519PublicKey) -> str | None:
        return self._by_raw.get(_raw(public_key))

    def __len__(self) -> int:
        return len(self._by_raw)


def as_trusted_keys(trusted: str | Path | TrustedKeys | None) -> TrustedKeys | None:
    if trusted is None or isinstance(trusted, TrustedKeys):
        return trusted
    return TrustedKeys.load(trusted)


def check_signatures(
    entries: Sequence[dict[str, Any]], bundle_sha256: str, trusted: TrustedKeys | None
) -> list[SignatureCheck]:
    """Check every entry against ``bundle_sha256`` and, when given, the trusted keys."""
    return [_check_entry(e, bundle_sha256, trusted) for e in entries]


def require_trusted(checks: Iterable[SignatureCheck], trusted: TrustedKeys, label: str) -> None:
    """Refuse (one line) unless at least one signature is valid and made with a trusted key."""
    checks = list(checks)
    if any(c.trusted for c in checks):
        return
    if not checks:
        why = "it is not signed"
    else:
        why = "; ".join(c.describe(trust_checked=True) for c in checks)
    raise BundleError(f"{label}: refused: no valid signature by a trusted key ({trusted.source}): {why}")


def describe(checks: Sequence[SignatureCheck], trust_checked: bool) -> str:
    """One line for people: who signed, and whether it counts."""
    if not checks:
        return "unsigned"
    return "; ".join(c.describe(trust_checked) for c in checks)


# -- the signatures file --------------------------------------------------------------------------------
def parse_signatures(raw: bytes, label: str) -> list[dict[str, Any]]:
    """The entries of a ``signatures.json``'s bytes; a malformed file is refused (one line)."""
    if len(raw) > MAX_SIGNATURES_BYTES:
        raise BundleError(f"{label}: {SIGNATURES} is larger than {MAX_SIGNATURES_BYTES >> 10} KiB")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"{label}: {SIGNATURES} is not valid JSON ({exc})") from None
    entries = doc.get("signatures") if isinstance(doc, dict) and doc.get("format") == FORMAT else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BundleError(f"{label}: {SIGNATURES} is not a medclf signature file")
    if len(entries) > MAX_SIGNATURES:
        raise BundleError(f"{label}: {SIGNATURES} holds more than {MAX_SIGNATURES} signatures")
    return entries


def dump_signatures(entries: Sequence[dict[str, Any]]) -> bytes:
    return (
        json.dumps({"format": FORMAT, "version": 1, "signatures": list(entries)}, indent=2) + "\n"
    ).encode()


def with_signature(entries: Sequence[dict[str, Any]], new: dict[str, str]) -> list[dict[str, Any]]:
    """``entries`` plus ``new``; an earlier signature by the same key over the same bundle is replaced."""
    same = (new["public_key"], new["bundle_sha256"])
    kept = [e for e in entries if (e.get("public_key"), e.get("bundle_sha256")) != same]
    if len(kept) >= MAX_SIGNATURES:
        raise BundleError(f"the bundle already carries {MAX_SIGNATURES} signatures")
    return [*kept, new]


# -- keys -------------------------------------------------------------------------------------------------
def generate_key_pair(prefix: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``PREFIX.key`` (PKCS#8 PEM, mode 0600; encrypted with
    ``$MEDCLF_KEY_PASSPHRASE`` when set) and ``PREFIX.pub`` (SubjectPublicKeyInfo PEM). Never overwrites."""
    prefix = Path(prefix)
    private_path, public_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for p in (private_path, public_path):
        if p.exists() or p.is_symlink():
            raise ConfigError(f"{p} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    passphrase = os.environ.get(PASSPHRASE_ENV)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode())
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    prefix.parent.mkdir(parents=True, exist_ok=True)
    _write_new(private_path, pem, 0o600)
    try:
        _write_new(public_path, pub, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    data = _read_key_file(path)
    p = Path(path)
    passphrase = os.environ.get(PASSPHRASE_ENV)
    password = passphrase.encode() if passphrase else None
    key: Any
    try:
        if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
            key = serialization.load_ssh_private_key(data, password)
        elif b"-----BEGIN" in data:
            if b"PUBLIC KEY" in data:
                raise ConfigError(f"{p}: is a public key; signing needs the private key")
            key = serialization.load_pem_private_key(data, password)
        else:
            key = Ed25519PrivateKey.from_private_bytes(_raw_bytes(data, p))
    except TypeError as exc:  # a passphrase missing, or given for an unencrypted key
        raise ConfigError(f"{p}: cannot read the private key ({exc}; see ${PASSPHRASE_ENV})") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{p}: not a readable Ed25519 private key ({_first_line(exc)})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{p}: is a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    data = _read_key_file(path)
    p = Path(path)
    key: Any
    try:
        if data.lstrip().startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data.strip())
        elif b"-----BEGIN" in data:
            if b"PRIVATE KEY" in data:
                raise ConfigError(f"{p}: is a private key; keep only public keys with the trusted keys")
            key = serialization.load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(_raw_bytes(data, p))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{p}: not a readable Ed25519 public key ({_first_line(exc)})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{p}: is a {type(key).__name__}, not an Ed25519 public key")
    return key


# -- internals --------------------------------------------------------------------------------------------
def _check_entry(e: dict[str, Any], bundle_sha256: str, trusted: TrustedKeys | None) -> SignatureCheck:
    def text(name: str) -> str:
        value = e.get(name)
        return value if isinstance(value, str) else ""

    signer = _printable(text("signer"))[:MAX_SIGNER_CHARS]
    signed_at = _printable(text("signed_at"))[:40]

    def bad(problem: str, kid: str = "") -> SignatureCheck:
        return SignatureCheck(signer, kid, signed_at, valid=False, problem=problem)

    if e.get("algorithm") != ALGORITHM:
        return bad(f"unknown algorithm {_printable(str(e.get('algorithm')))[:40]!r}")
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(text("public_key"), validate=True))
        signature = base64.b64decode(text("signature"), validate=True)
    except (ValueError, binascii.Error):
        return bad("malformed key or signature")
    kid = key_id(public)
    if text("signer") != signer or not signer or text("signed_at") != signed_at:
        return bad("malformed signer or time", kid)
    signed_sha = text("bundle_sha256")
    if signed_sha != bundle_sha256:
        return bad(f"made for another bundle (sha256 {_printable(signed_sha)[:16]}...)", kid)
    msg = message(bundle_sha256=signed_sha, signer=signer, signed_at=signed_at, public_key=text("public_key"))
    try:
        public.verify(signature, msg)
    except InvalidSignature:
        return bad("the signature does not verify (altered or forged)", kid)
    return SignatureCheck(
        signer, kid, signed_at, valid=True, trusted_as=trusted.name_of(public) if trusted else None
    )


def _raw(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_bytes(data: bytes, p: Path) -> bytes:
    """32 raw key bytes, given as binary, hex or base64."""
    if len(data) == 32:
        return data
    text = data.strip()
    for decode in (bytes.fromhex, lambda t: base64.b64decode(t, validate=True)):
        try:
            raw = decode(text.decode("ascii"))
        except (ValueError, UnicodeDecodeError, binascii.Error):
            continue
        if len(raw) == 32:
            return raw
    raise ValueError("expected PEM, OpenSSH, or 32 raw bytes (binary, hex or base64)")


def _read_key_file(path: str | Path) -> bytes:
    p = Path(path)
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{p}: not a regular file")
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise ConfigError(f"{p}: too large to be a key file")
        return p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the key file ({exc.strerror})") from None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _check_sha256(value: str) -> None:
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise BundleError(f"not a sha256: {value!r}")


def _check_signer(signer: str) -> str:
    signer = signer.strip()
    if not signer or len(signer) > MAX_SIGNER_CHARS or _printable(signer) != signer:
        raise ConfigError(f"--signer must be 1 to {MAX_SIGNER_CHARS} printable characters")
    return signer


def _printable(text: str) -> str:
    return "".join(ch for ch in text if ch.isprintable())


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
