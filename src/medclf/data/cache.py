"""Decode and preprocess a dataset once; keep the result on disk as memory-mapped tensors.

One pass (:func:`medclf.data.scan.scan`) decodes every file in parallel workers, computes what the audit
needs (content hash, near-duplicate signature, sizes, intensities) and applies the preprocessing spec. The
tensors land in ``<cache>/<key>/tensors.npy`` (float16, opened memory-mapped), the facts beside them, so
later epochs, later runs and ``evaluate`` never decode again. The key covers the files (paths, sizes,
modification times, or the array bytes of a ``.npz``) and the spec: change either and the cache is rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medclf import reporting, threads
from medclf.data.references import read_train_references
from medclf.data.samples import SampleSet
from medclf.data.scan import ScanResult, scan, train_copy_flags, train_copy_matches
from medclf.data.signatures import NEAR_THRESHOLD
from medclf.data.sources import fingerprint_files
from medclf.preprocess import PreprocessSpec, preprocess

CACHE_VERSION = 1
_LIST_FIELDS = ("reasons", "messages", "hashes", "formats", "modes")


def default_cache_dir() -> Path:
    env = os.environ.get("MEDCLF_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medclf"


@dataclass
class PreparedData:
    """A dataset decoded, audited and preprocessed: row ``i`` belongs to sample ``i``."""

    samples: SampleSet
    spec: PreprocessSpec
    tensors: np.ndarray
    scan: ScanResult
    train_copy: np.ndarray
    fingerprint: str
    path: Path | None

    @property
    def ok(self) -> np.ndarray:
        return self.scan.ok

    @property
    def hashes(self) -> list[str | None]:
        return self.scan.hashes

    @property
    def errors(self) -> list[dict[str, str]]:
        return [
            {
                "path": self.samples.display_ref(int(i)),
                "reason": str(self.scan.reasons[i]),
                "message": str(self.scan.messages[i]),
            }
            for i in self.scan.failed()
        ]


def _preprocess_f16(image: Any, spec: PreprocessSpec) -> np.ndarray:
    return preprocess(image, spec).astype(np.float16)


def cache_key(samples: SampleSet, spec: PreprocessSpec) -> str:
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}\0{spec.digest()}\0".encode())
    h.update(fingerprint_files(samples, include_splits=False).encode())
    return h.hexdigest()[:24]


def is_cached(samples: SampleSet, spec: PreprocessSpec, cache_dir: str | Path | None = None) -> bool:
    """Whether :func:`prepare` would find ``samples`` already decoded at ``spec`` in the cache (nothing is
    decoded: a time budget need not count the decoding of such a source)."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        meta = json.loads((root / cache_key(samples, spec) / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("version") == CACHE_VERSION and meta.get("n") == len(samples))


def prepare(
    samples: SampleSet,
    spec: PreprocessSpec,
    *,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    use_cache: bool = True,
    extra_train_hashes: set[str] | None = None,
    near_threshold: float = NEAR_THRESHOLD,
) -> PreparedData:
    """Decode + preprocess every sample (or reuse the cache) and flag copies of training samples.
    Messages and progress go to the active reporter (:mod:`medclf.reporting`)."""
    rep = reporting.current()
    workers = workers or threads.decode_workers()
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = cache_key(samples, spec)
    folder = root / key
    loaded = _load(folder, len(samples)) if use_cache else None
    if loaded is None:
        rep.print(f"Decoding and preprocessing {len(samples)} samples ({workers} workers)...")
        writer = _TensorWriter.open(folder, len(samples), spec) if use_cache else None
        sink: Callable[[int, Any], None]
        if writer is None:
            tensors = np.zeros((len(samples), *spec.input_shape), dtype=np.float16)
            sink = functools.partial(_put_row, tensors)
        else:
            sink = writer.write
        try:
            result = scan(
                samples,
                workers=workers,
                extra=functools.partial(_preprocess_f16, spec=spec),
                progress=progress,
                sink=sink,
            )
        except BaseException:
            if writer is not None:
                writer.discard()
            raise
        rep.print(f"  done in {result.seconds:.1f} s; {int((~result.ok).sum())} unreadable")
        if writer is not None:
            try:
                writer.finish(folder, result, samples, spec)
                tensors = np.load(folder / "tensors.npy", mmap_mode="r", allow_pickle=False)
            except OSError as exc:
                done = _load(folder, len(samples))  # another process (a second node) may have won the race
                if done is not None:
                    writer.discard()
                    tensors = done[0]
                else:
                    # The rows are only on disk: without a cache folder they must be read back into memory.
                    rep.print(f"[yellow]could not write the cache at {folder} ({exc}); continuing without[/]")
                    tensors = writer.read_back()
                    folder = None  # type: ignore[assignment]
        else:
            folder = None  # type: ignore[assignment]
    else:
        tensors, result = loaded
    flags = train_copy_flags(
        samples, result, near_threshold=near_threshold, extra_train_hashes=extra_train_hashes
    )
    return PreparedData(
        samples=samples,
        spec=spec,
        tensors=tensors,
        scan=result,
        train_copy=flags,
        fingerprint=fingerprint_files(samples),
        path=folder,
    )


@dataclass
class AgainstBundle:
    """Samples decoded for a bundle, with the copies of that bundle's training images among them."""

    prepared: PreparedData
    exact: np.ndarray  # per sample: the same bytes as a training file
    near: np.ndarray  # per sample: a near copy of a training image (by the signatures the bundle carries)
    near_checked: bool  # False: the bundle carries no signatures (older bundles), only exact copies found


def prepare_for_bundle(
    samples: SampleSet,
    spec: PreprocessSpec,
    bundle_dir: Path,
    files: Mapping[str, str],
    *,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> AgainstBundle:
    """Decode ``samples`` with a bundle's ``spec`` and find copies of its training images: what evaluation,
    recalibration and multi-label evaluation score a bundle on. ``bundle_dir``/``files``: where the bundle
    is and its manifest's ``files`` (for :func:`medclf.data.references.read_train_references`)."""
    refs = read_train_references(bundle_dir, files)
    train_hashes = set(refs.hashes)
    # The whole dataset is decoded (not just the split scored): the cache key then matches training's, so
    # a dataset already seen by `train` is not decoded again.
    prepared = prepare(
        samples,
        spec,
        cache_dir=cache_dir,
        workers=workers,
        progress=progress,
        extra_train_hashes=train_hashes,
    )
    exact, near, _ = train_copy_matches(
        samples, prepared.scan, extra_train_hashes=train_hashes, extra_train_signatures=refs.signatures
    )
    return AgainstBundle(prepared, exact, near, near_checked=refs.signatures is not None)


def _put_row(tensors: np.ndarray, i: int, row: np.ndarray | None) -> None:
    if row is not None:
        tensors[i] = row


class _TensorWriter:
    """Writes preprocessed rows straight to ``tensors.npy`` in a temporary folder beside the cache, in
    sample order, as the decoding workers deliver them: the whole array never sits in memory, so a dataset
    larger than RAM can be cached. Plain file writes (not a writable memory map) keep the rows out of the
    process's resident memory; the kernel's page cache holds them only as long as memory allows."""

    def __init__(self, tmp: Path, n: int, spec: PreprocessSpec) -> None:
        self.tmp, self.n, self.shape = tmp, n, spec.input_shape
        self.row_bytes = int(np.prod(self.shape)) * np.dtype(np.float16).itemsize
        self.fh = open(tmp / "tensors.npy", "wb")  # noqa: SIM115 - closed in finish()/discard()
        header = {"descr": np.dtype(np.float16).str, "fortran_order": False, "shape": (n, *self.shape)}
        np.lib.format.write_array_header_1_0(self.fh, header)
        self.written = 0

    @classmethod
    def open(cls, folder: Path, n: int, spec: PreprocessSpec) -> _TensorWriter | None:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(folder)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        except OSError as exc:
            reporting.current().print(
                f"[yellow]cannot write the cache at {folder} ({exc}); keeping tensors in memory[/]"
            )
            return None
        return cls(tmp, n, spec)

    def write(self, i: int, row: np.ndarray | None) -> None:
        assert i == self.written, "rows must arrive in sample order"
        if row is None:
            self.fh.write(bytes(self.row_bytes))  # an unreadable sample: zeros, flagged by scan.ok
        else:
            self.fh.write(np.ascontiguousarray(row, dtype=np.float16).tobytes())
        self.written += 1

    def finish(self, folder: Path, result: ScanResult, samples: SampleSet, spec: PreprocessSpec) -> None:
        self.fh.close()
        _store(folder, self.tmp, result, samples, spec)

    def read_back(self) -> np.ndarray:
        try:
            return np.array(np.load(self.tmp / "tensors.npy", mmap_mode="r", allow_pickle=False))
        finally:
            self.discard()

    def discard(self) -> None:
        self.fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


STALE_AFTER_S = 3600.0


def _remove_stale(folder: Path) -> None:
    """Delete temporary folders of this cache entry left by a killed run. One that is still being written
    (by another process, e.g. on a second machine sharing the cache) has a fresh modification time."""
    now = time.time()
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        try:
            newest = max((p.stat().st_mtime for p in tmp.iterdir()), default=tmp.stat().st_mtime)
        except OSError:
            continue
        if now - newest > STALE_AFTER_S:
            shutil.rmtree(tmp, ignore_errors=True)


def _store(folder: Path, tmp: Path, result: ScanResult, samples: SampleSet, spec: PreprocessSpec) -> None:
    """Complete the temporary folder ``tmp`` (which already holds ``tensors.npy``) and move it into place.
    On failure ``tmp`` is left for the caller (its rows may be all there is)."""
    np.save(tmp / "signatures.npy", result.signatures, allow_pickle=False)
    np.save(tmp / "stats.npy", result.stats, allow_pickle=False)
    meta = {
        "version": CACHE_VERSION,
        "n": len(samples),
        "source": samples.source,
        "spec": spec.to_dict(),
        "ok": result.ok.tolist(),
        "decoded": result.decoded.tolist(),
        "constant": result.constant.tolist(),
        "channels": result.channels.tolist(),
        "shapes": [list(s) if s is not None else None for s in result.shapes],
        "seconds": result.seconds,
        **{f: getattr(result, f) for f in _LIST_FIELDS},
        "cues": result.cues,
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)


def _load(folder: Path, n: int) -> tuple[np.ndarray, ScanResult] | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("n") != n:
            return None
        tensors = np.load(folder / "tensors.npy", mmap_mode="r", allow_pickle=False)
        sigs = np.load(folder / "signatures.npy", allow_pickle=False)
        stats = np.load(folder / "stats.npy", allow_pickle=False)
    except (OSError, ValueError, json.JSONDecodeError):
        return None  # missing or damaged: rebuild
    result = ScanResult(
        ok=np.array(meta["ok"], dtype=bool),
        decoded=np.array(meta["decoded"], dtype=bool),
        signatures=sigs,
        constant=np.array(meta["constant"], dtype=bool),
        shapes=[tuple(s) if s is not None else None for s in meta["shapes"]],
        channels=np.array(meta["channels"], dtype=np.int64),
        stats=stats,
        seconds=0.0,
        **{f: meta[f] for f in _LIST_FIELDS},
        cues=meta.get("cues"),  # absent in caches written before the shortcut check
    )
    return tensors, result
