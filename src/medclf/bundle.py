"""Model bundles: one folder (or its .zip) that carries everything needed to use a model.

Layout::

    bundle/
      bundle.json          architecture, preprocessing spec, classes, recipe, data fingerprint, metrics,
                           package versions, the sha256 of every other file, and its own sha256
      model.safetensors    weights (safetensors: no pickle, no code execution on load)
      ...                  optional: report.html, MODEL_CARD.md, train_hashes.json, model.onnx

Loading checks every hash and refuses any mismatch, then checks bundle.json against the manifest's JSON
Schema (:mod:`medclf.manifest`: typed sections, ``manifest_version``) and refuses, in one line naming the
field, a manifest that does not fit. Writing is atomic: the new bundle is assembled in a
temporary sibling folder and swapped in with one rename, so a crash never leaves half a bundle that looks
whole, and the previous bundle survives until the new one is complete.

Hashes prove integrity, not origin: ``signatures.json`` (not listed in ``bundle.json``, so signing leaves
the sha256 alone) carries Ed25519 signatures over the bundle's sha256 (:mod:`medclf.signing`,
:func:`sign_bundle`); ``load_bundle(..., trusted_keys=DIR)`` refuses a bundle no trusted key signed.

A bundle is untrusted input until checked, and loading stays within bounds: ``bundle.json`` is read only up
to 8 MiB and 64 levels of nesting; the safetensors header's tensor names, shapes and dtypes must match the
network the manifest describes, built first on PyTorch's ``meta`` device (no memory), and within a
parameter budget (``$MEDCLF_MAX_BUNDLE_PARAMETERS``, default 200 M), before any weight is allocated; only
plain files are read (a symbolic link is refused); from a ``.zip`` only the listed members are unpacked,
into a temporary folder that is deleted when the :class:`Bundle` is closed, collected or the process ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import functools
import hashlib
import io
import json
import math
import os
import platform
import shutil
import stat
import tempfile
import uuid
import weakref
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medclf._version import __version__
from medclf.errors import BundleError, ConfigError, MedclfError
from medclf.manifest import MANIFEST_VERSION, Manifest, ManifestInvalid, check_manifest
from medclf.models import create_model
from medclf.preprocess import PreprocessSpec
from medclf.signing import (
    MAX_SIGNATURES_BYTES,
    SIGNATURES,
    SignatureCheck,
    TrustedKeys,
    as_trusted_keys,
    check_signatures,
    describe,
    dump_signatures,
    load_private_key,
    parse_signatures,
    require_trusted,
    sign,
    with_signature,
)

FORMAT = "medclf-bundle"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
WEIGHTS = "model.safetensors"
_SELF_PLACEHOLDER = "0" * 64
MAX_ZIP_BYTES = 4 << 30  # refuse zip bombs: no bundle is anywhere near 4 GiB unpacked
# Bounds on what a bundle may make us read or allocate before it is trusted (real manifests: ~20 KB, a few
# hundred containers, depth < 10; real safetensors headers: < 1 MB).
MAX_MANIFEST_BYTES = 8 << 20
MAX_MANIFEST_DEPTH = 64
MAX_MANIFEST_CONTAINERS = 100_000
MAX_BUNDLE_FILES = 256
MAX_ZIP_MEMBERS = 4096
MAX_WEIGHTS_HEADER_BYTES = 16 << 20
MAX_PARAMETERS_ENV = "MEDCLF_MAX_BUNDLE_PARAMETERS"
DEFAULT_MAX_PARAMETERS = 200_000_000  # values in the weights (and in the network's parameters and buffers)
# Only the methods zipfile inflates in bounded steps (bzip2/LZMA members inflate a whole chunk at once).
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ITEMSIZE = {name: dt.itemsize for dt, name in _SAFETENSORS_DTYPES.items()}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    # The installed distributions' versions, read from their metadata: importing MONAI only to read its
    # version costs seconds (it loads all its submodules, MLflow's handler among them) in every training.
    from importlib.metadata import version

    return {
        "medclf": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": version("monai"),
        "numpy": np.__version__,
        "scikit-learn": version("scikit-learn"),
    }


@dataclass
class Bundle:
    """A loaded, verified model bundle: its files, manifest and network. Running it is the job of
    :class:`medclf.predictor.Predictor`."""

    path: Path
    manifest: dict[str, Any]
    model: nn.Module
    spec: PreprocessSpec
    classes: list[str]
    # What was loaded: the folder itself, or the .zip that ``path`` (a temporary folder) was unpacked from.
    source: Path | None = None
    # The signatures the bundle carries, checked against its sha256 (and the trusted keys, when given).
    signatures: list[SignatureCheck] = field(default_factory=list, repr=False, compare=False)
    trust_checked: bool = False
    _cleanup: Any = field(default=None, repr=False, compare=False)

    def signature_summary(self) -> str:
        """Who signed this bundle and whether it counts, in one line ("unsigned" when nobody did)."""
        return describe(self.signatures, self.trust_checked)

    def close(self) -> None:
        """Delete the temporary folder a .zip bundle was unpacked into (also done when the Bundle is
        garbage-collected or the process exits). A folder bundle is left alone."""
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def sha256(self) -> str:
        """The bundle's identity: the sha256 of its bundle.json, which pins every other file's hash."""
        return str(self.manifest["self_sha256"])

    @property
    def arch(self) -> str:
        return str(self.manifest["model"]["arch"])

    @property
    def temperature(self) -> float:
        return Manifest.from_dict(self.manifest).temperature

    @property
    def finding_temperatures(self) -> tuple[float, ...] | None:
        """See :attr:`medclf.manifest.Manifest.finding_temperatures`."""
        return Manifest.from_dict(self.manifest).finding_temperatures

    @property
    def output_temperature(self) -> float | tuple[float, ...]:
        """What divides the logits before the softmax or sigmoid (one, or one per finding)."""
        return Manifest.from_dict(self.manifest).output_temperature

    def file(self, name: str) -> Path:
        if name not in self.manifest.get("files", {}):
            raise BundleError(f"{self.path}: the bundle has no file {name!r}")
        return self.path / name

    def read_file(self, name: str, limit: int = 16 << 20) -> bytes:
        """The bytes of a listed file, read now (a plain file, never through a link) and checked against
        its sha256 again: what is shown is what was verified, even if the folder changed since loading."""
        label = str(self.source or self.path)
        with _open_plain(self.file(name), label, name) as fh:
            data = _read_bounded(fh, limit, label, name)
        if hashlib.sha256(data).hexdigest() != self.manifest["files"][name]:
            raise BundleError(f"{label}: integrity check failed: sha256 of {name} does not match {MANIFEST}")
        return data


def build_model_from_manifest(manifest: Mapping[str, Any]) -> nn.Module:
    m = manifest["model"]
    return create_model(m["arch"], m["in_channels"], m["n_classes"], m["spatial_dims"], **m.get("kwargs", {}))


def omitted_keys(manifest: Mapping[str, Any], label: str = "bundle") -> list[str]:
    """The tensors a backbone bundle (``kind: backbone``, from ``medclf pretrain``) leaves out of its weights:
    its output layer. Only a backbone may omit any; a classifier's weights are always whole."""
    model = manifest.get("model")
    omitted = model.get("omitted", []) if isinstance(model, dict) else []
    if not omitted:
        return []
    if manifest.get("kind") != "backbone":
        raise BundleError(f"{label}: only a backbone bundle may omit tensors of its network")
    if not isinstance(omitted, list) or not all(isinstance(k, str) for k in omitted):
        raise BundleError(f"{label}: {MANIFEST}'s model.omitted must be a list of tensor names")
    return list(omitted)


def save_bundle(
    out: str | Path,
    *,
    model: nn.Module,
    manifest: dict[str, Any],
    extra_files: Mapping[str, bytes | str | Path] | None = None,
    writers: Mapping[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write a bundle atomically to ``out`` and return its path.

    ``manifest`` must hold at least ``model`` (arch, in_channels, n_classes, spatial_dims, kwargs),
    ``classes`` and ``preprocess``; format, versions, dates, package versions and hashes are added here,
    and the result must fit :data:`medclf.manifest.SCHEMA` (a ``ValueError`` naming the field otherwise).
    ``extra_files`` maps file names to contents (bytes/str) or to existing files to copy; ``writers`` maps
    file names to callables that write that file given its destination path.
    """
    out = Path(out)
    for key in ("model", "classes", "preprocess"):
        if key not in manifest:
            raise ValueError(f"bundle manifest needs {key!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        for name, content in (extra_files or {}).items():
            _check_new_name(name)
            dest = tmp / name
            if isinstance(content, Path):
                shutil.copyfile(content, dest)
            elif isinstance(content, bytes):
                dest.write_bytes(content)
            else:
                dest.write_text(content, encoding="utf-8")
        for name, write in (writers or {}).items():
            _check_new_name(name)
            write(tmp / name)
        full = dict(manifest)
        full.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            manifest_version=MANIFEST_VERSION,
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            versions=package_versions(),
            files={p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.name != MANIFEST},
            self_sha256=_SELF_PLACEHOLDER,
        )
        sealed = _seal(full)
        check_manifest(json.loads(sealed))  # as load_bundle will: a writer's bug fails here, not later
        (tmp / MANIFEST).write_bytes(sealed)
        for p in tmp.iterdir():
            _fsync(p)
        _fsync(tmp)
        _swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def update_bundle(
    path: str | Path, changes: Mapping[str, Any], extra_files: Mapping[str, bytes | str | Path] | None = None
) -> Path:
    """Rewrite a bundle (atomically) with some manifest fields changed, e.g. test metrics added.

    The bundle's sha256 changes, so its signatures are dropped: sign the new bundle again."""
    b = load_bundle(path)
    if b.source != b.path:
        raise BundleError(f"{path}: update a bundle folder, not a .zip (unpack it, or update the folder)")
    manifest = {k: v for k, v in b.manifest.items() if k not in ("files", "self_sha256")}
    manifest.update(changes)
    keep = {name: b.path / name for name in b.manifest["files"] if name != WEIGHTS}
    keep.update(extra_files or {})
    return save_bundle(b.path, model=b.model, manifest=manifest, extra_files=keep)


def load_bundle(
    path: str | Path,
    *,
    expected_sha256: str | None = None,
    trusted_keys: str | Path | TrustedKeys | None = None,
    max_parameters: int | None = None,
) -> Bundle:
    """Load and verify a bundle folder or ``.zip``. Any integrity failure raises :class:`BundleError`.

    ``expected_sha256``: refuse any other bundle (a pin). ``trusted_keys``: a folder of Ed25519 public keys
    (or one key file, or :class:`~medclf.signing.TrustedKeys`); the bundle must carry a valid signature by
    one of them. ``max_parameters``: the most values the weights and the network may hold (default
    ``$MEDCLF_MAX_BUNDLE_PARAMETERS`` or 200 M), checked before anything is allocated. Without the first two,
    an unsigned bundle loads as before; its signatures, if any, are checked and reported in
    :attr:`Bundle.signatures`.
    """
    p = Path(path)
    trusted = as_trusted_keys(trusted_keys)  # a bad key folder fails before the bundle is touched
    expected = normalise_sha256(expected_sha256) if expected_sha256 is not None else None
    budget = _parameter_budget(max_parameters)
    if p.is_file() and zipfile.is_zipfile(p):
        folder = _extract_zip(p)
        try:
            bundle = _load_folder(folder, str(p), expected, trusted, budget)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        bundle.source = p
        bundle._cleanup = weakref.finalize(bundle, _remove_unpacked, str(folder), os.getpid())
        return bundle
    if not p.is_dir():
        raise BundleError(f"{p}: not a model bundle (expected a folder or .zip holding {MANIFEST})")
    return _load_folder(p, str(p), expected, trusted, budget)


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Check bundle.json's own hash and the hash of every file it lists; return the manifest.

    Only plain files are read: a listed file (or bundle.json) that is a symbolic link is refused."""
    p = Path(path)
    return _verify_folder(p, str(p))


def sign_bundle(
    path: str | Path, key: str | Path | Any, *, signer: str | None = None, signed_at: str | None = None
) -> SignatureCheck:
    """Add an Ed25519 signature over the bundle's sha256 to its ``signatures.json`` (a folder is updated in
    place, a .zip rewritten atomically). ``key``: a private key file (see :mod:`medclf.signing`) or an
    ``Ed25519PrivateKey``; ``signer``: the name recorded (default: the key file's name). The bundle's sha256
    does not change; an earlier signature by the same key is replaced."""
    p = Path(path)
    if isinstance(key, (str, Path)):
        private = load_private_key(key)
        signer = signer or Path(key).name.split(".")[0]
    else:
        private = key
    signer = signer or "unnamed"
    if p.is_file() and zipfile.is_zipfile(p):
        folder = _extract_zip(p)
        try:
            check = _sign_folder(folder, str(p), private, signer, signed_at)
            _write_zip(folder, verify_bundle(folder), p)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return check
    if not p.is_dir():
        raise BundleError(f"{p}: not a model bundle (expected a folder or .zip holding {MANIFEST})")
    return _sign_folder(p, str(p), private, signer, signed_at)


def zip_bundle(path: str | Path, dest: str | Path | None = None) -> Path:
    """Pack a (verified) bundle folder into a .zip next to it, or at ``dest``: bundle.json, the files it
    lists and signatures.json; nothing else, and never a symbolic link."""
    p = Path(path)
    manifest = verify_bundle(p)
    dest = Path(dest) if dest else p.with_suffix(".zip")
    _write_zip(p, manifest, dest)
    return dest


def normalise_sha256(value: str) -> str:
    """A bundle sha256 given by a person (64 hex digits, any case) in the form manifests use."""
    text = str(value).strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ConfigError(f"--bundle-sha256 must be 64 hexadecimal digits, not {str(value)[:80]!r}")
    return text


# -- loading, within bounds -------------------------------------------------------------------------------
def _load_folder(
    p: Path, label: str, expected: str | None, trusted: TrustedKeys | None, budget: int
) -> Bundle:
    manifest = _verify_folder(p, label)
    if expected and manifest["self_sha256"] != expected:
        raise BundleError(
            f"{label}: integrity check failed: bundle sha256 is {manifest['self_sha256']}, expected {expected}"
        )
    checks = check_signatures(_read_signatures(p, label), manifest["self_sha256"], trusted)
    if trusted is not None:
        require_trusted(checks, trusted, label)
    _check_weights(p, manifest, label, budget)
    try:
        spec = PreprocessSpec.from_dict(manifest["preprocess"])
        model = build_model_from_manifest(manifest)
        state = load_file(str(p / WEIGHTS))
        # A backbone lacks its output layer (checked by _check_weights): that layer keeps random weights.
        model.load_state_dict(state, strict=not omitted_keys(manifest))
    except (KeyError, TypeError, RuntimeError, SafetensorError, ValueError, AttributeError) as exc:
        raise BundleError(f"{label}: the bundle's model cannot be built from its manifest: {exc}") from exc
    model.eval()
    return Bundle(
        path=p,
        manifest=manifest,
        model=model,
        spec=spec,
        classes=list(manifest["classes"]),
        source=p,
        signatures=checks,
        trust_checked=trusted is not None,
    )


def _verify_folder(p: Path, label: str) -> dict[str, Any]:
    if not (p / MANIFEST).exists() and not (p / MANIFEST).is_symlink():
        raise BundleError(f"{label}: not a model bundle ({MANIFEST} is missing)")
    with _open_plain(p / MANIFEST, label, MANIFEST) as fh:
        raw = _read_bounded(fh, MAX_MANIFEST_BYTES, label, MANIFEST)
    manifest = _parse_manifest(raw, label)
    for name, digest in manifest["files"].items():
        h = hashlib.sha256()
        with _open_plain(p / name, label, name) as fh:
            for chunk in iter(functools.partial(fh.read, 1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != digest:
            raise BundleError(f"{label}: integrity check failed: sha256 of {name} does not match {MANIFEST}")
    return manifest


def _parse_manifest(raw: bytes, label: str) -> dict[str, Any]:
    """bundle.json's bytes -> the manifest, after its size, nesting, format, version and own hash."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{label}: refused: {MANIFEST} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    if raw.count(b"{") + raw.count(b"[") > MAX_MANIFEST_CONTAINERS:
        raise BundleError(f"{label}: refused: {MANIFEST} holds more than {MAX_MANIFEST_CONTAINERS} objects")
    try:
        manifest = json.loads(raw)
    except RecursionError:
        raise BundleError(f"{label}: refused: {MANIFEST} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, or a number too long to convert
        raise BundleError(f"{label}: integrity check failed: {MANIFEST} is not valid JSON ({exc})") from None
    if _nesting(manifest) > MAX_MANIFEST_DEPTH:
        raise BundleError(
            f"{label}: refused: {MANIFEST} is nested more than {MAX_MANIFEST_DEPTH} levels deep"
        )
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{label}: {MANIFEST} is not a medclf bundle manifest")
    version = manifest.get("format_version", -1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{label}: {MANIFEST} is not a medclf bundle manifest (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{label}: bundle format {version} is newer than this medclf understands "
            f"({FORMAT_VERSION}); upgrade medclf"
        )
    claimed = manifest.get("self_sha256")
    if not isinstance(claimed, str) or len(claimed) != 64:
        raise BundleError(f"{label}: integrity check failed: {MANIFEST} carries no self hash")
    actual = hashlib.sha256(raw.replace(claimed.encode(), _SELF_PLACEHOLDER.encode(), 1)).hexdigest()
    if actual != claimed:
        raise BundleError(f"{label}: integrity check failed: {MANIFEST} was modified (sha256 mismatch)")
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise BundleError(f"{label}: integrity check failed: {MANIFEST} lists no {WEIGHTS}")
    if len(files) > MAX_BUNDLE_FILES:
        raise BundleError(f"{label}: refused: {MANIFEST} lists more than {MAX_BUNDLE_FILES} files")
    for name, digest in files.items():
        _check_name(name)
        if name in (MANIFEST, SIGNATURES):
            raise BundleError(f"{label}: {MANIFEST} must not list {name}")
        if not isinstance(digest, str) or len(digest) != 64:
            raise BundleError(f"{label}: integrity check failed: {MANIFEST} has no sha256 for {name}")
    try:
        check_manifest(manifest)
    except ManifestInvalid as exc:
        raise BundleError(f"{label}: refused: {MANIFEST}'s {exc}") from None
    return manifest


def _nesting(obj: Any) -> int:
    """How deeply JSON containers nest in ``obj`` (iteratively: a deep document must not exhaust the stack)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in node if isinstance(child, (dict, list)))
    return deepest


def _read_signatures(p: Path, label: str) -> list[dict[str, Any]]:
    f = p / SIGNATURES
    if not f.exists() and not f.is_symlink():
        return []
    with _open_plain(f, label, SIGNATURES) as fh:
        return parse_signatures(_read_bounded(fh, MAX_SIGNATURES_BYTES, label, SIGNATURES), label)


def _sign_folder(p: Path, label: str, private: Any, signer: str, signed_at: str | None) -> SignatureCheck:
    manifest = _verify_folder(p, label)
    sha = manifest["self_sha256"]
    entry = sign(sha, private, signer, signed_at=signed_at)
    entries = with_signature(_read_signatures(p, label), entry)
    tmp = p / f".{SIGNATURES}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(dump_signatures(entries))
        _fsync(tmp)
        os.replace(tmp, p / SIGNATURES)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(p)
    return check_signatures([entry], sha, None)[0]


def _parameter_budget(max_parameters: int | None) -> int:
    if max_parameters is not None:
        return int(max_parameters)
    text = os.environ.get(MAX_PARAMETERS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PARAMETERS
    try:
        value = int(float(text))
    except ValueError:
        raise ConfigError(f"${MAX_PARAMETERS_ENV} must be a number of parameters, not {text!r}") from None
    if value <= 0:
        raise ConfigError(f"${MAX_PARAMETERS_ENV} must be positive")
    return value


def _check_weights(p: Path, manifest: Mapping[str, Any], label: str, budget: int) -> None:
    """Refuse weights that do not fit the manifest's network, or exceed the budget, before allocating:
    the safetensors header is read, and the network is built on the ``meta`` device (shapes only)."""
    header = _weights_header(p / WEIGHTS, label)
    stored = sum(math.prod(shape) for _, shape in header.values())
    if stored > budget:
        raise BundleError(
            f"{label}: refused: {WEIGHTS} holds {stored:,} values, more than the limit of {budget:,} "
            f"(${MAX_PARAMETERS_ENV})"
        )
    try:
        with torch.device("meta"):
            network = build_model_from_manifest(manifest)
    except (
        KeyError,
        TypeError,
        ValueError,
        RuntimeError,
        AttributeError,
        IndexError,
        ArithmeticError,
        NotImplementedError,
        MedclfError,
    ) as exc:
        raise BundleError(f"{label}: the bundle's model cannot be built from its manifest: {exc}") from None
    needed = sum(t.numel() for t in network.parameters()) + sum(t.numel() for t in network.buffers())
    if needed > budget:
        raise BundleError(
            f"{label}: refused: the network {MANIFEST} describes has {needed:,} parameters, more than the "
            f"limit of {budget:,} (${MAX_PARAMETERS_ENV})"
        )
    omitted = omitted_keys(manifest, label)
    if not set(omitted) <= network.state_dict().keys():
        raise BundleError(f"{label}: {MANIFEST} omits tensors the network does not have")
    expected = {
        k: (_SAFETENSORS_DTYPES.get(v.dtype, str(v.dtype)), tuple(v.shape))
        for k, v in network.state_dict().items()
        if k not in omitted
    }
    missing, unexpected = sorted(expected.keys() - header.keys()), sorted(header.keys() - expected.keys())
    if missing or unexpected:
        what = f"lacks {missing[:3]}" if missing else f"has unexpected tensors {unexpected[:3]}"
        raise BundleError(f"{label}: {WEIGHTS} does not fit the network {MANIFEST} describes: it {what}")
    for name, (dtype, shape) in expected.items():
        if header[name] != (dtype, shape):
            raise BundleError(
                f"{label}: {WEIGHTS} does not fit the network {MANIFEST} describes: {name} is "
                f"{header[name][0]} {list(header[name][1])}, the network needs {dtype} {list(shape)}"
            )


def _weights_header(path: Path, label: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype, shape) from a safetensors file's header, after checking it describes the file."""

    def bad(why: str) -> BundleError:
        return BundleError(f"{label}: {WEIGHTS} is not a valid safetensors file ({why})")

    with _open_plain(path, label, WEIGHTS) as fh:
        size = os.fstat(fh.fileno()).st_size
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise bad("too short")
        n = int.from_bytes(prefix, "little")
        if n > MAX_WEIGHTS_HEADER_BYTES or 8 + n > size:
            raise bad(f"a header of {n} bytes")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, offsets = (
            (info.get(k) for k in ("dtype", "shape", "data_offsets"))
            if isinstance(info, dict)
            else (None, None, None)
        )
        if (
            dtype not in _ITEMSIZE
            or not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise bad(f"tensor {str(name)[:80]!r} is described wrongly")
        begin, end = offsets
        if not 0 <= begin <= end <= size - 8 - n or end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise bad(f"tensor {str(name)[:80]!r} does not fit its bytes")
        out[name] = (dtype, tuple(shape))
    return out


def _open_plain(path: Path, label: str, name: str) -> IO[bytes]:
    """Open a bundle file for reading, refusing symbolic links and anything but a regular file."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise BundleError(f"{label}: integrity check failed: {name} is missing") from None
    except OSError as exc:
        if path.is_symlink():
            raise BundleError(
                f"{label}: refused: {name} is a symbolic link (a bundle holds only plain files)"
            ) from None
        raise BundleError(f"{label}: cannot read {name} ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"{label}: refused: {name} is not a regular file")
    return os.fdopen(fd, "rb")


def _read_bounded(fh: IO[bytes], limit: int, label: str, name: str) -> bytes:
    data = fh.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{label}: refused: {name} is larger than {limit >> 10} KiB")
    return data


# -- zip files ----------------------------------------------------------------------------------------------
def _extract_zip(path: Path) -> Path:
    """Unpack bundle.json, the files it lists and signatures.json (nothing else) into a new temporary
    folder, within declared and total size bounds; refuse, with one line, anything unreadable."""
    label = str(path)
    try:
        _check_zip_directory(path, label)
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise BundleError(f"{label}: not a readable zip file ({exc})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise BundleError(f"{label}: refused: the zip holds more than {MAX_ZIP_MEMBERS} entries")
        members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            _check_name(info.filename)
            if info.filename in members:
                raise BundleError(f"{label}: refused: the zip holds {info.filename!r} twice")
            members[info.filename] = info
        if MANIFEST not in members:
            raise BundleError(f"{label}: not a model bundle ({MANIFEST} is missing)")
        raw = _zip_read(zf, members[MANIFEST], MAX_MANIFEST_BYTES, label)
        manifest = _parse_manifest(raw, label)
        wanted = list(manifest["files"])
        for name in wanted:
            if name not in members:
                raise BundleError(f"{label}: integrity check failed: {name} is missing")
        if sum(members[name].file_size for name in wanted) > MAX_ZIP_BYTES:
            raise BundleError(
                f"{label}: refused: the files the bundle lists claim more than {MAX_ZIP_BYTES >> 30} GiB"
            )
        limits = {name: members[name].file_size for name in wanted}
        if SIGNATURES in members:
            limits[SIGNATURES] = MAX_SIGNATURES_BYTES
        target = Path(tempfile.mkdtemp(prefix="medclf-bundle-"))
        try:
            (target / MANIFEST).write_bytes(raw)
            for name, limit in limits.items():
                with open(target / name, "xb") as out:
                    _zip_copy(zf, members[name], out, limit, label)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
    return target


def _check_zip_directory(path: Path, label: str) -> None:
    """Refuse a zip whose central directory (which zipfile reads whole into objects) is too large, from
    its end record, before zipfile parses it."""
    end_record = getattr(zipfile, "_EndRecData", None)  # CPython's reader of the end record (and ZIP64's)
    if end_record is None:
        return
    with open(path, "rb") as fh:
        rec = end_record(fh)
    if not rec:
        return
    # CPython's private end-record layout, beside _EndRecData; typeshed does not describe it.
    entries, size = rec[zipfile._ECD_ENTRIES_TOTAL], rec[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    if entries > MAX_ZIP_MEMBERS or size > MAX_ZIP_MEMBERS * 1024:
        raise BundleError(f"{label}: refused: the zip holds more than {MAX_ZIP_MEMBERS} entries")


def _remove_unpacked(folder: str, owner_pid: int) -> None:
    # Only the process that unpacked it: a forked worker that drops its copy of the Bundle must not.
    if os.getpid() == owner_pid:
        shutil.rmtree(folder, ignore_errors=True)


def _zip_read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, label: str) -> bytes:
    buf = io.BytesIO()
    _zip_copy(zf, info, buf, limit, label)
    return buf.getvalue()


def _zip_copy(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: IO[bytes], limit: int, label: str) -> None:
    """Copy one member to ``out``: a plain, unencrypted, stored or deflated file of at most ``limit``
    bytes, whose CRC checks."""
    name = info.filename
    mode = info.external_attr >> 16  # Unix mode; many writers store no file type (0): a plain file
    if info.is_dir() or stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise BundleError(f"{label}: refused: {name} in the zip is {kind}")
    if info.flag_bits & 0x1:
        raise BundleError(f"{label}: refused: {name} in the zip is encrypted")
    if info.compress_type not in _ZIP_METHODS:
        # zipfile's table of method names, which typeshed leaves out.
        method = zipfile.compressor_names.get(info.compress_type, str(info.compress_type))  # type: ignore[attr-defined]
        raise BundleError(
            f"{label}: refused: {name} in the zip uses compression method {method!r} (only stored and deflate)"
        )
    if info.file_size > limit:
        raise BundleError(f"{label}: refused: {name} in the zip is larger than {limit:,} bytes")
    written = 0
    try:
        with zf.open(info) as src:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > info.file_size:
                    raise BundleError(f"{label}: refused: {name} in the zip is larger than it declares")
                out.write(chunk)
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        OSError,
        NotImplementedError,
        RuntimeError,
        ValueError,
    ) as exc:
        raise BundleError(f"{label}: cannot read {name} from the zip: {exc}") from None
    if written != info.file_size:
        raise BundleError(f"{label}: cannot read {name} from the zip: it is shorter than it declares")


def _write_zip(folder: Path, manifest: Mapping[str, Any], dest: Path) -> None:
    """Pack bundle.json, the files it lists and signatures.json, atomically (a temporary file, renamed)."""
    names = [MANIFEST, *sorted(manifest["files"])]
    if (folder / SIGNATURES).exists() or (folder / SIGNATURES).is_symlink():
        names.append(SIGNATURES)
    label = str(folder)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            for name in names:
                with _open_plain(folder / name, label, name) as src:
                    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = (stat.S_IFREG | 0o644) << 16
                    info.file_size = os.fstat(src.fileno()).st_size
                    with zf.open(info, "w") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _check_name(name: str) -> None:
    # Only flat, plain file names: a manifest or zip must never point outside the bundle folder.
    if (
        not isinstance(name, str)
        or not name
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name in (".", "..")
        or name.startswith(".")
    ):
        raise BundleError(f"unsafe file name in bundle: {name!r}")


def _check_new_name(name: str) -> None:
    _check_name(name)
    if name in (MANIFEST, WEIGHTS, SIGNATURES):
        raise ValueError(f"{name} is written by save_bundle / sign_bundle, not as an extra file")


def _seal(manifest: dict[str, Any]) -> bytes:
    text = json.dumps(manifest, indent=2, sort_keys=False, default=_json_default).encode()
    digest = hashlib.sha256(text).hexdigest()
    return text.replace(_SELF_PLACEHOLDER.encode(), digest.encode(), 1)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _fsync(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2


def check_out(out: str | Path, sources: list[str | Path] | tuple[str | Path, ...] = ()) -> None:
    """Refuse, before any work, an output a bundle could not be written to, or one that would write into the
    data: ``out`` must be a folder path whose parent is a folder, not a file or a non-bundle folder with
    contents (what :func:`save_bundle` would refuse after the run), and neither ``out`` nor its checkpoint
    (``<out>.ckpt``) may lie in a source folder or be a source file, where a later run would read them as
    data (a checkpoint folder becomes a class)."""
    p = Path(out).expanduser()
    if p.parent.exists() and not p.parent.is_dir():
        raise ConfigError(f"{p}: {p.parent} is a file, not a folder")
    _refuse_non_bundle(p)
    targets = [p.resolve(), p.with_name(p.name + ".ckpt").resolve()]
    for source in sources:
        if not isinstance(source, (str, Path)):  # samples already read: no folder of their own to protect
            continue
        src = Path(source).expanduser().resolve()
        # A folder medclf scans for images (class or plain folders); a manifest folder lists its images.
        scanned = src.is_dir() and not (src / "manifest.csv").is_file()
        for t in targets:
            if t == src or (scanned and t.is_relative_to(src)):
                raise ConfigError(f"--out {p}: inside the data source {source}; write the bundle elsewhere")


def _refuse_non_bundle(out: Path) -> None:
    """A file, or a folder with contents that is not a bundle, is never replaced by a bundle."""
    if not out.exists():
        return
    if not out.is_dir():
        raise BundleError(f"{out}: exists and is not a bundle folder; refusing to overwrite it")
    if (out / MANIFEST).exists() is False and any(out.iterdir()):
        raise BundleError(f"{out}: exists and is not a bundle; refusing to overwrite it")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Atomically make ``tmp`` appear at ``out``; the previous ``out`` (if any) is removed afterwards."""
    if not out.exists():
        os.rename(tmp, out)
        return
    _refuse_non_bundle(out)
    if _rename_exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous bundle
        return
    # No renameat2 (not Linux): two renames; a crash between them leaves the old bundle at `old`.
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _rename_exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    res = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return res == 0
