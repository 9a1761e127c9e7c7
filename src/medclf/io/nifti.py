"""NIfTI-1/2 reader (nibabel), plain ``.nii`` or gzip-compressed, recognised by content.

Axis order: the voxel array is reoriented to the closest canonical RAS+ orientation
(:func:`nibabel.orientations.io_orientation`, what :func:`nibabel.as_closest_canonical` does), so array
axes 0/1/2 run towards the subject's Right, Anterior and Superior. Pixels are then returned as
``(C, Z, Y, X)``: ``pixels[c, k, j, i]`` is the RAS voxel ``(i, j, k)``, i.e. the depth axis is
inferior-to-superior, rows posterior-to-anterior and columns left-to-right. Any spatial axis of length 1
is dropped, so a single slice becomes ``(C, H, W)`` with the two remaining axes in the same relative order
(an axial slice is ``(Y, X)``, a coronal one ``(Z, X)``). ``spacing`` follows the same order, in mm.
Every file, whatever its stored orientation, therefore arrives in one convention.

A 4th dimension (after dropping singleton ones beyond the 3rd) of at most ``ReadLimits.max_channels``
entries is read as channels; longer 4D series (fMRI, DWI) are refused. scl_slope/scl_inter are applied
(nibabel's ``get_fdata``). NaN/Inf are replaced by 0 by :func:`medclf.io.read_image`.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import aff2axcodes, apply_orientation, io_orientation

from medclf.io.guard import ReadLimits, check_memory, check_shape, library_errors, reject
from medclf.io.image import Image

_QUIET = logging.getLogger("medclf.io.nifti.header_check")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False

# Bytes tolerated after the declared voxels in a .nii.gz stream (padding); more is refused.
_MAX_TRAILING = 1 << 20


@dataclass(frozen=True)
class _Header:
    """What the checked header declares."""

    klass: Any  # nib.Nifti1Image or nib.Nifti2Image
    sizeof_hdr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    zooms: list[float]
    affine: np.ndarray

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_nifti(path: Path, limits: ReadLimits, *, size: int, gzipped: bool) -> Image:
    """Decode a NIfTI file (see the module docstring for the axis order)."""
    raw_head = _head(path, gzipped)
    h = _parse_header(raw_head, path)
    spatial = (*h.shape, 1, 1, 1)[:3]
    channels = _channels(h, limits, path)
    ornt, reoriented = _orientation(h.affine)
    canon = [0, 0, 0]
    canon_zoom = [1.0, 1.0, 1.0]
    zooms3 = [*h.zooms, 1.0, 1.0, 1.0][:3]
    for axis in range(3):
        canon[int(ornt[axis, 0])] = spatial[axis]
        canon_zoom[int(ornt[axis, 0])] = zooms3[axis]
    # (x, y, z) -> (z, y, x), then drop axes of length 1.
    keep = [a for a in (2, 1, 0) if canon[a] > 1]
    if len(keep) < 2:
        raise reject(
            f"the NIfTI image {h.shape} has fewer than two non-trivial spatial axes", "too_small", path
        )
    check_shape([canon[a] for a in keep], channels, limits, path, what="NIfTI image")
    _check_extent(h, limits, path, size=size, gzipped=gzipped)

    # Header and voxels are decoded from one buffer of exactly the bytes the checked header declares, and
    # that buffer must start with the checked header: a file rewritten since (another process saving it)
    # cannot slip other dimensions past the checks above.
    whole = _inflate(path, h.offset + h.nbytes) if gzipped else _read_plain(path, h.offset + h.nbytes)
    if whole[: h.sizeof_hdr] != raw_head[: h.sizeof_hdr]:
        raise reject("the NIfTI header changed while the file was being read", "changed_while_reading", path)
    with library_errors(path, "NIfTI image data"):
        img = h.klass.from_bytes(whole)
        data = _voxels(img)

    data = data.reshape((*spatial, channels))
    data = apply_orientation(data, ornt)  # acts on the first three axes only
    pixels = np.transpose(data, (3, 2, 1, 0))  # (C, Z, Y, X)
    squeeze = tuple(1 + i for i, a in enumerate((2, 1, 0)) if canon[a] == 1)
    pixels = np.squeeze(pixels, axis=squeeze) if squeeze else pixels
    spacing = tuple(_valid_zoom(canon_zoom[a]) for a in keep)

    meta: dict[str, Any] = {
        "nifti_version": 2 if h.sizeof_hdr == 540 else 1,
        "datatype": str(h.dtype),
        "compressed": gzipped,
        "original_orientation": "".join(str(c) for c in aff2axcodes(h.affine)) if reoriented else None,
        "orientation": "RAS" if reoriented else None,
    }
    return Image(np.ascontiguousarray(pixels, dtype=np.float32), spacing, "nifti", meta)


def _parse_header(raw_head: bytes, path: Path) -> _Header:
    """Parse (nibabel) and sanity-check the header bytes, before any voxel is read."""
    if len(raw_head) < 348:  # the sniffer saw a whole header: the file was cut short since
        raise reject(
            f"the NIfTI header is truncated ({len(raw_head)} of at least 348 bytes)", "truncated", path
        )
    sizeof_hdr = 540 if struct.unpack("<i", raw_head[:4])[0] in (540, 0x1C020000) else 348
    if len(raw_head) < sizeof_hdr:
        raise reject(
            f"the NIfTI-2 header is truncated ({len(raw_head)} of {sizeof_hdr} bytes)", "truncated", path
        )
    klass = nib.Nifti2Image if sizeof_hdr == 540 else nib.Nifti1Image
    with library_errors(path, "NIfTI header", reason="malformed"):
        header = klass.header_class(binaryblock=raw_head[:sizeof_hdr], check=False)
        # nibabel's own logger prints every problem to stderr; the refusal already says what is wrong.
        header.check_fix(logger=_QUIET, error_level=nib.imageglobals.error_level)
        h = _Header(
            klass=klass,
            sizeof_hdr=sizeof_hdr,
            shape=tuple(int(s) for s in header.get_data_shape()),
            dtype=header.get_data_dtype(),
            offset=int(header.get_data_offset()),
            zooms=[float(z) for z in header.get_zooms()],
            affine=header.get_best_affine(),
        )
    if not h.shape or any(s < 1 for s in h.shape):
        raise reject(f"the NIfTI header declares dimensions {h.shape}", "inconsistent_header", path)
    if h.dtype.names is None and h.dtype.kind not in "biuf":
        raise reject(
            f"NIfTI data type {h.dtype} is not supported (need integer or real)", "unsupported_dtype", path
        )
    return h


def _channels(h: _Header, limits: ReadLimits, path: Path) -> int:
    """The channel count the layout declares (a short 4th dimension, or RGB voxels); refuse other layouts."""
    extra = [s for s in h.shape[3:] if s > 1]
    if len(extra) > 1:
        raise reject(
            f"NIfTI image with dimensions {h.shape} (5D or more) is not supported", "unsupported_layout", path
        )
    channels = extra[0] if extra else 1
    rgb_fields = [n for n in (h.dtype.names or ()) if n in ("R", "G", "B")]
    if h.dtype.names is not None:
        if extra or len(rgb_fields) != 3:
            raise reject(
                f"NIfTI data type {h.dtype} with dimensions {h.shape} is not supported",
                "unsupported_dtype",
                path,
            )
        channels = 3
    elif channels > limits.max_channels:
        raise reject(
            f"a NIfTI series of {channels} volumes ({h.shape}); only up to {limits.max_channels} channels are "
            "read (4D time series are not supported)",
            "unsupported_layout",
            path,
        )
    return channels


def _check_extent(h: _Header, limits: ReadLimits, path: Path, *, size: int, gzipped: bool) -> None:
    """Refuse a voxel offset, file length or decoded size that the header and the limits do not allow."""
    if h.offset < h.sizeof_hdr + 4 or h.offset > limits.max_memory_bytes // 4:
        # Single-file NIfTI puts the voxels after the header and its 4 extension bytes; an offset beyond a
        # quarter of the memory limit would make medclf inflate (for .nii.gz) that much before the voxels.
        raise reject(
            f"the NIfTI vox_offset {h.offset} is outside the valid range "
            f"[{h.sizeof_hdr + 4}, {limits.max_memory_bytes // 4}]",
            "inconsistent_header",
            path,
        )
    if not gzipped and size < h.offset + h.nbytes:
        raise reject(
            f"the NIfTI file is truncated: it has {size} bytes, the header needs {h.offset + h.nbytes}",
            "truncated",
            path,
        )
    values = math.prod(h.shape) * (3 if h.dtype.names is not None else 1)
    check_memory(
        values,
        h.nbytes / values,
        limits,
        path,
        what="NIfTI image",
        compressed_bytes=size if gzipped else None,
    )


def _head(path: Path, gzipped: bool) -> bytes:
    with library_errors(path, "NIfTI header", reason="malformed"):
        if gzipped:
            with gzip.open(path, "rb") as gz:
                return gz.read(540)
        with open(path, "rb") as fh:
            return fh.read(540)


def _read_plain(path: Path, needed: int) -> bytes:
    with library_errors(path, "NIfTI file", reason="unreadable"), open(path, "rb") as fh:
        data = fh.read(needed)
    if len(data) < needed:
        raise reject(
            f"the NIfTI file is truncated: it has {len(data)} bytes, the header needs {needed}",
            "truncated",
            path,
        )
    return data


def _inflate(path: Path, needed: int) -> bytes:
    """Decompress exactly the header, extensions and declared voxels: never more than the header asks for."""
    try:
        with gzip.open(path, "rb") as gz:
            data = gz.read(needed)
            # A valid stream ends with the voxels; megabytes more are a bomb riding on a small header.
            trailing = len(gz.read(_MAX_TRAILING + 1))
    except EOFError:
        raise reject("the gzip-compressed NIfTI stream is truncated", "truncated", path) from None
    except (OSError, zlib.error) as exc:
        raise reject(f"the gzip-compressed NIfTI stream is corrupt ({exc})", "malformed", path) from None
    if len(data) < needed:
        raise reject(
            f"the NIfTI file is truncated: it decompresses to {len(data)} bytes, the header needs {needed}",
            "truncated",
            path,
        )
    if trailing > _MAX_TRAILING:
        raise reject(
            f"the gzip stream goes on for more than {_MAX_TRAILING} bytes past the {needed} the NIfTI header "
            "declares",
            "decompression_bomb",
            path,
        )
    return data


def _voxels(img: nib.Nifti1Image) -> np.ndarray:
    dtype = img.header.get_data_dtype()
    if dtype.names is not None:  # RGB24 / RGBA32: a structured array, one field per colour
        raw = np.asanyarray(img.dataobj)
        return np.stack([raw[c] for c in ("R", "G", "B")], axis=-1).astype(np.float32)
    return img.get_fdata(dtype=np.float32, caching="unchanged")


def _orientation(affine: np.ndarray) -> tuple[np.ndarray, bool]:
    """The reorientation to closest canonical RAS, or identity if the affine is unusable."""
    identity = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    if not np.all(np.isfinite(affine)):
        return identity, False
    try:
        ornt = io_orientation(affine)
    except Exception:  # a degenerate affine (zero columns): keep the stored order
        return identity, False
    if np.any(np.isnan(ornt)):
        return identity, False
    return ornt, True


def _valid_zoom(z: float) -> float:
    return float(z) if math.isfinite(z) and z > 0 else 1.0
