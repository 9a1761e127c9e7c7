"""Model bundles: one folder (or its .zip) that carries everything needed to use a model.

Layout::

    bundle/
      bundle.json          architecture, preprocessing spec, classes, recipe, data fingerprint, metrics,
                           package versions, the sha256 of every other file, and its own sha256
      model.safetensors    weights (safetensors: no pickle, no code execution on load)
      ...                  optional: report.html, MODEL_CARD.md, train_hashes.json, model.onnx

Loading checks every hash and refuses any mismatch. Writing is atomic: the new bundle is assembled in a
temporary sibling folder and swapped in with one rename, so a crash never leaves half a bundle that looks
whole, and the previous bundle survives until the new one is complete.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medclf import __version__
from medclf.errors import BundleError
from medclf.models import create_model
from medclf.preprocess import PreprocessSpec

FORMAT = "medclf-bundle"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
WEIGHTS = "model.safetensors"
_SELF_PLACEHOLDER = "0" * 64
MAX_ZIP_BYTES = 4 << 30  # refuse zip bombs: no bundle is anywhere near 4 GiB unpacked


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    import monai
    import sklearn

    return {
        "medclf": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


@dataclass
class Bundle:
    """A loaded, verified model bundle."""

    path: Path
    manifest: dict[str, Any]
    model: nn.Module
    spec: PreprocessSpec
    classes: list[str]
    # Inference engines built so far (ONNX Runtime sessions are costly to create): see medclf.engines.
    runners: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _ood: Any = field(default=None, repr=False, compare=False)

    @property
    def sha256(self) -> str:
        """The bundle's identity: the sha256 of its bundle.json, which pins every other file's hash."""
        return str(self.manifest["self_sha256"])

    @property
    def arch(self) -> str:
        return str(self.manifest["model"]["arch"])

    @property
    def temperature(self) -> float:
        return float(self.manifest.get("calibration", {}).get("temperature", 1.0))

    def file(self, name: str) -> Path:
        if name not in self.manifest.get("files", {}):
            raise BundleError(f"{self.path}: the bundle has no file {name!r}")
        return self.path / name

    def predict(
        self,
        inputs: Any,
        *,
        batch_size: int = 32,
        engine: str = "auto",
        tta: bool | str | Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Classify file paths, folders, numpy arrays or :class:`~medclf.io.Image` objects.

        Returns one dict per input: ``path``, ``predicted``, ``probabilities``; or ``path`` and ``error``
        for an input that cannot be used (the others still get their answers). ``engine``: see
        :mod:`medclf.engines` (``auto`` runs the bundle's ONNX model when it has one). ``tta``: see
        :meth:`predict_tensors`.
        """
        from medclf.inference import predict_inputs

        return predict_inputs(self, inputs, batch_size=batch_size, engine=engine, tta=tta)

    def explain(
        self,
        inputs: Any,
        out_dir: str | Path,
        *,
        method: str = "auto",
        targets: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Predict like :meth:`predict` and write one heatmap overlay PNG per input into ``out_dir``.

        ``method``: ``auto`` (Grad-CAM, or occlusion when the model has no CAM layer), ``gradcam``,
        ``gradcampp`` or ``occlusion``; ``targets``: the class to explain per input path (default: the
        predicted one). See :mod:`medclf.explain`. Successful entries gain ``heatmap`` (the PNG's path).
        """
        from medclf.explain import explain_inputs

        return explain_inputs(self, inputs, out_dir, method=method, targets=targets)

    @property
    def ood(self) -> Any:
        """The out-of-distribution detector fitted at training (:class:`medclf.ood.OODDetector`), or None."""
        info = self.manifest.get("ood")
        if not info:
            return None
        if self._ood is None:
            from medclf.ood import OODDetector

            self._ood = OODDetector.load(self.file(info["file"]), info)
        return self._ood

    def ood_scores(
        self, x: np.ndarray | torch.Tensor, *, engine: str = "auto"
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(flags, scores) of the OOD guard for preprocessed inputs, or None when the bundle has none.

        The features come from ``engine`` (an exported ONNX graph carries them), so an ONNX prediction
        does not also run the PyTorch model; the input statistics (detector version 2) from ``x`` itself."""
        detector = self.ood
        if detector is None:
            return None
        from medclf.engines import features_for

        return detector.flags(features_for(self, x, engine), x)

    def tta_views(self, tta: bool | str | Sequence[str] | None) -> list[str]:
        """The test-time view names that ``tta`` means for this bundle's inputs ([] for none)."""
        from medclf.tta import resolve

        return resolve(tta, self.spec.size)

    def engine(self, name: str = "auto") -> str:
        """The concrete engine (``torch``, ``onnx-fp32`` or ``onnx-int8``) ``name`` means for this bundle."""
        from medclf.engines import resolve_engine

        return resolve_engine(self.manifest.get("files", {}), name)

    def predict_tensors(
        self,
        x: np.ndarray | torch.Tensor,
        *,
        batch_size: int = 64,
        engine: str = "auto",
        tta: bool | str | Sequence[str] | None = None,
        calibrated: bool = True,
    ) -> np.ndarray:
        """Class probabilities (float64) for already preprocessed inputs ``(N, C, *size)``.

        The bundle's temperature is applied to the logits of whichever engine runs (``calibrated=False``:
        not, for reporting calibration before scaling). ``tta``: test-time augmentation, ``True`` for the
        default views or a list of view names (see :mod:`medclf.tta`); the probabilities are averaged."""
        from medclf.engines import probabilities, runner_for

        views = self.tta_views(tta)
        if views:
            from medclf.tta import predict_with_tta

            def plain(v: np.ndarray) -> np.ndarray:
                return self.predict_tensors(v, batch_size=batch_size, engine=engine, calibrated=calibrated)

            return predict_with_tta(plain, x, views)
        _, run = runner_for(self, engine)
        temperature = self.temperature if calibrated else 1.0
        out = [
            probabilities(run(x[start : start + batch_size]), temperature)
            for start in range(0, len(x), batch_size)
        ]
        if not out:
            return np.zeros((0, len(self.classes)), dtype=np.float64)
        return np.concatenate(out)


def build_model_from_manifest(manifest: Mapping[str, Any]) -> nn.Module:
    m = manifest["model"]
    return create_model(m["arch"], m["in_channels"], m["n_classes"], m["spatial_dims"], **m.get("kwargs", {}))


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
    ``classes`` and ``preprocess``; format, version, dates, package versions and hashes are added here.
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
            _check_name(name)
            dest = tmp / name
            if isinstance(content, Path):
                shutil.copyfile(content, dest)
            elif isinstance(content, bytes):
                dest.write_bytes(content)
            else:
                dest.write_text(content, encoding="utf-8")
        for name, write in (writers or {}).items():
            _check_name(name)
            write(tmp / name)
        full = dict(manifest)
        full.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            versions=package_versions(),
            files={p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.name != MANIFEST},
            self_sha256=_SELF_PLACEHOLDER,
        )
        (tmp / MANIFEST).write_bytes(_seal(full))
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
    """Rewrite a bundle (atomically) with some manifest fields changed, e.g. test metrics added."""
    b = load_bundle(path)
    manifest = {k: v for k, v in b.manifest.items() if k not in ("files", "self_sha256")}
    manifest.update(changes)
    keep = {name: b.path / name for name in b.manifest["files"] if name != WEIGHTS}
    keep.update(extra_files or {})
    return save_bundle(b.path, model=b.model, manifest=manifest, extra_files=keep)


def load_bundle(path: str | Path, *, expected_sha256: str | None = None) -> Bundle:
    """Load and verify a bundle folder or ``.zip``. Any integrity failure raises :class:`BundleError`."""
    p = Path(path)
    if p.is_file() and zipfile.is_zipfile(p):
        return _load_zip(p, expected_sha256)
    if not p.is_dir():
        raise BundleError(f"{p}: not a model bundle (expected a folder or .zip holding {MANIFEST})")
    manifest = verify_bundle(p)
    if expected_sha256 and manifest["self_sha256"] != expected_sha256:
        raise BundleError(
            f"{p}: integrity check failed: bundle sha256 is {manifest['self_sha256']}, expected {expected_sha256}"
        )
    try:
        spec = PreprocessSpec.from_dict(manifest["preprocess"])
        model = build_model_from_manifest(manifest)
        state = load_file(str(p / WEIGHTS))
        model.load_state_dict(state, strict=True)
    except (KeyError, TypeError, RuntimeError, SafetensorError, ValueError) as exc:
        raise BundleError(f"{p}: the bundle's model cannot be built from its manifest: {exc}") from exc
    model.eval()
    return Bundle(path=p, manifest=manifest, model=model, spec=spec, classes=list(manifest["classes"]))


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Check bundle.json's own hash and the hash of every file it lists; return the manifest."""
    p = Path(path)
    mpath = p / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{p}: not a model bundle ({MANIFEST} is missing)")
    raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{p}: integrity check failed: {MANIFEST} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{p}: {MANIFEST} is not a medclf bundle manifest")
    if int(manifest.get("format_version", -1)) > FORMAT_VERSION:
        raise BundleError(
            f"{p}: bundle format {manifest.get('format_version')} is newer than this medclf understands "
            f"({FORMAT_VERSION}); upgrade medclf"
        )
    claimed = manifest.get("self_sha256")
    if not isinstance(claimed, str) or len(claimed) != 64:
        raise BundleError(f"{p}: integrity check failed: {MANIFEST} carries no self hash")
    actual = hashlib.sha256(raw.replace(claimed.encode(), _SELF_PLACEHOLDER.encode(), 1)).hexdigest()
    if actual != claimed:
        raise BundleError(f"{p}: integrity check failed: {MANIFEST} was modified (sha256 mismatch)")
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise BundleError(f"{p}: integrity check failed: {MANIFEST} lists no {WEIGHTS}")
    for name, digest in files.items():
        _check_name(name)
        f = p / name
        if not f.is_file():
            raise BundleError(f"{p}: integrity check failed: {name} is missing")
        if sha256_file(f) != digest:
            raise BundleError(f"{p}: integrity check failed: sha256 of {name} does not match {MANIFEST}")
    return manifest


def zip_bundle(path: str | Path, dest: str | Path | None = None) -> Path:
    """Pack a (verified) bundle folder into a .zip next to it, or at ``dest``."""
    p = Path(path)
    verify_bundle(p)
    dest = Path(dest) if dest else p.with_suffix(".zip")
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(p.iterdir()):
            if f.is_file():
                zf.write(f, arcname=f.name)
    os.replace(tmp, dest)
    return dest


def _load_zip(path: Path, expected_sha256: str | None) -> Bundle:
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if sum(i.file_size for i in infos) > MAX_ZIP_BYTES:
            raise BundleError(
                f"{path}: refusing to unpack: the zip claims more than {MAX_ZIP_BYTES >> 30} GiB"
            )
        for info in infos:
            _check_name(info.filename)
        target = Path(tempfile.mkdtemp(prefix="medclf-bundle-"))
        zf.extractall(target)
    bundle = load_bundle(target, expected_sha256=expected_sha256)
    return bundle


def _check_name(name: str) -> None:
    # Only flat, plain file names: a manifest or zip must never point outside the bundle folder.
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise BundleError(f"unsafe file name in bundle: {name!r}")


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


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Atomically make ``tmp`` appear at ``out``; the previous ``out`` (if any) is removed afterwards."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not out.is_dir():
        raise BundleError(f"{out}: exists and is not a bundle folder; refusing to overwrite it")
    if (out / MANIFEST).exists() is False and any(out.iterdir()):
        raise BundleError(f"{out}: exists and is not a bundle; refusing to overwrite it")
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
