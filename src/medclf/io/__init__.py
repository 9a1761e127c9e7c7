"""Image readers behind one guarded entry point: :func:`read_image`.

The format is decided by the file's content, never its name; headers are checked against
:class:`ReadLimits` before pixels are decoded; every problem with the input is an
:class:`~medclf.errors.InputRejected` with a specific ``reason`` (listed in :mod:`medclf.io.guard`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medclf.io.guard import (
    FORMATS,
    FileStamp,
    ReadLimits,
    check_file,
    check_shape,
    check_unchanged,
    read_deadline,
    reader_errors,
    replace_nonfinite,
    sniff,
    sniff_format,
)
from medclf.io.image import Image
from medclf.io.npz import image_from_array, iter_npz_images, read_npz

__all__ = [
    "FORMATS",
    "Image",
    "ReadLimits",
    "image_from_array",
    "iter_npz_images",
    "read_image",
    "read_npz",
    "sniff_format",
]


def read_image(path: str | Path, *, limits: ReadLimits | None = None) -> Image:
    """Read one image file: DICOM, NIfTI (.nii / .nii.gz), PNG, JPEG, TIFF or single-image NPZ.

    Returns float32 channel-first pixels, ``(C, H, W)`` or ``(C, D, H, W)``; NaN/Inf values are replaced
    by 0 and counted in ``meta["nonfinite_replaced"]``. Raises :class:`~medclf.errors.InputRejected` for
    anything that cannot be used, including a MedMNIST dataset ``.npz`` (``reason="dataset_npz"``).
    The read is bounded by ``limits``: memory from the header before decoding, wall time by a watchdog
    (:func:`medclf.io.guard.read_deadline`). A file rewritten while it is read is refused
    (``reason="changed_while_reading"``), and no reader failure escapes as anything but InputRejected.
    """
    limits = limits or ReadLimits()
    p = Path(path)
    with read_deadline(limits.max_seconds, p):
        return _read(p, limits)


def _read(p: Path, limits: ReadLimits) -> Image:
    before = FileStamp.of(p)  # first: a change between here and any later read is then noticed
    size = check_file(p, limits)
    with reader_errors(p, before):
        image = _decode(p, size, limits)
    # Checked (and decoded) one version, but maybe decoded bytes of the next: refuse rather than mix them.
    check_unchanged(p, before)
    return image


def _decode(p: Path, size: int, limits: ReadLimits) -> Image:
    sniffed = sniff(p, size)
    # Readers are imported on demand: pydicom, nibabel and Pillow are slow to import.
    if sniffed.format == "dicom":
        from medclf.io.dicom import read_dicom

        image = read_dicom(p, limits, size=size, bare=sniffed.bare_dicom)
    elif sniffed.format == "nifti":
        from medclf.io.nifti import read_nifti

        image = read_nifti(p, limits, size=size, gzipped=sniffed.gzipped)
    elif sniffed.format == "npz":
        from medclf.io.npz import read_npz_image

        image = read_npz_image(p, limits)
    else:
        from medclf.io.raster import read_raster

        image = read_raster(p, sniffed.format, limits)
    return _finalise(image, p, limits)


def _finalise(image: Image, path: Path, limits: ReadLimits) -> Image:
    """Checks common to every reader, on the decoded result."""
    pixels = np.ascontiguousarray(image.pixels, dtype=np.float32)
    # Also catches float64 values beyond float32's range, which the cast made infinite.
    pixels = replace_nonfinite(pixels, image.meta, path)
    # A decoder must deliver what the header promised; re-check in case it did not.
    check_shape(pixels.shape[1:], pixels.shape[0], limits, path, what="decoded image")
    image.pixels = pixels
    return image
