"""Acquisition cues: what a file says about how it was made, read from its header only.

A model can learn where an image came from instead of what it shows (a "shortcut"): when one source
supplies most of one class, its size, file format, colour mode, JPEG quality or scanner predict the label.
These cues serve three purposes: the shortcut audit (:mod:`medclf.data.shortcuts`) asks how well they alone
predict the label, subgroup evaluation (``medclf evaluate --by KEY``) groups samples by them, and the
mitigation balances training over class x acquisition group.

:func:`header_cues` reads one file's header (after the guard's file checks, no pixel decoding where the
format allows it); :data:`GROUP_KEYS` turns cues into group labels; :func:`sample_groups` gives one label
per sample for a key that is a manifest column, a :data:`GROUP_KEYS` name or a DICOM keyword.

Identifying DICOM text (station, institution, manufacturer and model names, any person name or UID) is
kept only as a short hash: groups can be compared, the clear text never leaves the file.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing as mp
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from medclf.data.samples import SampleSet
from medclf.errors import ConfigError

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

# The label of a sample that has no value for a key.
UNKNOWN = "unknown"

# DICOM attributes recorded by header_cues: keyword -> cue name. Identifying text values are hashed.
DICOM_CUES = {
    "Modality": "modality",
    "Manufacturer": "manufacturer",
    "ManufacturerModelName": "model",
    "StationName": "station",
    "InstitutionName": "institution",
    "MagneticFieldStrength": "field_strength",
    "SliceThickness": "slice_thickness",
    "PixelSpacing": "pixel_spacing",
    "KVP": "kvp",
    "ViewPosition": "view_position",
    "BodyPartExamined": "body_part",
    "PhotometricInterpretation": "mode",
    "BitsStored": "bit_depth",
}
# Value representations whose values are codes or numbers, never names: kept in clear text. Every other
# string VR (LO, SH, PN, UI, DA, ...) may name a person, a place or a device and is hashed.
_CLEAR_VRS = {"CS", "AS"}
_NUMERIC_VRS = {"DS", "IS", "FL", "FD", "US", "UL", "SS", "SL", "UV", "SV"}
_HASH_CHARS = 10

# Bits per sample by Pillow mode.
_PIL_BITS = {"1": 1, "I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 32, "F": 32}

# ITU-T T.81 Annex K luminance quantisation table (quality 50 in the IJG scaling).
_STD_LUMINANCE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip


def hash_text(value: str) -> str:
    """A short, stable hash of an identifying text value (site, station, device names)."""
    return hashlib.sha256(value.strip().encode("utf-8", "replace")).hexdigest()[:_HASH_CHARS]


def jpeg_quality(luminance_table: Sequence[int]) -> int | None:
    """The IJG quality (1-100) that would produce ``luminance_table``, estimated from its sum.

    libjpeg scales the standard table by ``s = 5000/q`` (q < 50) or ``200 - 2q`` (q >= 50) percent; the
    ratio of sums recovers ``s`` whatever order the 64 entries are listed in (zigzag or natural).
    """
    table = [int(v) for v in luminance_table]
    if len(table) != 64 or min(table) < 1:
        return None
    scale = 100.0 * sum(table) / sum(_STD_LUMINANCE)
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return int(min(100, max(1, round(quality))))


# --------------------------------------------------------------------------------------------------
# Header reading
# --------------------------------------------------------------------------------------------------


def header_cues(ref: str, *, dicom_keywords: Sequence[str] = ()) -> dict[str, Any]:
    """Acquisition facts of one file from its header: JSON-safe values; ``{}`` when it cannot be read.

    Keys (present when the format knows them): ``format``, ``width``, ``height``, ``depth``, ``aspect``
    (width / height), ``mode``, ``bit_depth``, ``jpeg_quality``, ``bytes_per_pixel`` (file bytes per
    stored pixel, all channels), ``file_bytes``; for DICOM also the :data:`DICOM_CUES` names (identifying
    text as hashes) and ``dicom:<Keyword>`` for each of ``dicom_keywords``. Never raises.
    """
    try:
        from medclf.io.guard import check_file, sniff

        path = Path(ref)
        size = check_file(path, None)
        sniffed = sniff(path, size)
        fmt = sniffed.format
        if fmt == "dicom":
            cues = _dicom_cues(path, sniffed.bare_dicom, dicom_keywords)
        elif fmt == "nifti":
            cues = _nifti_cues(path)
        elif fmt == "npz":
            cues = _npz_cues(path)
        else:
            cues = _raster_cues(path, fmt)
        cues["format"] = fmt
        cues["file_bytes"] = int(size)
        _derive(cues)
        return cues
    except Exception:  # a cue is a nice-to-have: an unreadable file is the audit's business, not ours
        return {}


def _derive(cues: dict[str, Any]) -> None:
    w, h = cues.get("width"), cues.get("height")
    if w and h:
        cues["aspect"] = round(float(w) / float(h), 4)
        pixels = int(w) * int(h) * int(cues.get("depth") or 1)
        if cues.get("file_bytes"):
            cues["bytes_per_pixel"] = round(cues["file_bytes"] / pixels, 4)


def _raster_cues(path: Path, fmt: str) -> dict[str, Any]:
    from PIL import Image as PILImage

    from medclf.io.guard import ReadLimits

    PILImage.MAX_IMAGE_PIXELS = ReadLimits().max_pixels
    # Image.open parses the header only; pixels would be decoded by .load(), never called here.
    with PILImage.open(path, formats=[{"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}[fmt]]) as im:
        width, height = im.size
        mode = im.mode
        cues: dict[str, Any] = {"width": int(width), "height": int(height), "mode": mode}
        bits = _PIL_BITS.get(mode, 8)
        if fmt == "png":
            with open(path, "rb") as fh:
                ihdr = fh.read(26)
            if len(ihdr) >= 25:
                bits = int(ihdr[24])  # IHDR bit depth: Pillow reports 16-bit RGB as 8-bit "RGB"
        elif fmt == "tiff":
            # Pages are not counted: that walks every directory, which a hostile file makes endless.
            tag = getattr(im, "tag_v2", {}).get(258)
            if tag:
                bits = int(max(tag) if isinstance(tag, tuple) else tag)
        cues["bit_depth"] = bits
        if fmt == "jpeg":
            tables = getattr(im, "quantization", None) or {}
            if 0 in tables:
                q = jpeg_quality(list(tables[0]))
                if q is not None:
                    cues["jpeg_quality"] = q
            cues["progressive"] = bool(im.info.get("progressive") or im.info.get("progression"))
            sampling = getattr(im, "layer", None)
            if sampling:
                cues["chroma_subsampling"] = "x".join(f"{h}{v}" for _, h, v, _ in sampling)
    return cues


def _dicom_cues(path: Path, bare: bool, keywords: Sequence[str]) -> dict[str, Any]:
    import pydicom

    from medclf.io.guard import check_preamble

    if not bare:
        check_preamble(path)
    ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=bare, defer_size=1 << 16)
    cues: dict[str, Any] = {}
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows and cols:
        cues["height"], cues["width"] = int(rows), int(cols)
    frames = ds.get("NumberOfFrames")
    if frames and int(frames) > 1:
        cues["depth"] = int(frames)
    for keyword, name in DICOM_CUES.items():
        value = dicom_value(ds, keyword)
        if value is not None:
            cues[name] = value
    for keyword in keywords:
        value = dicom_value(ds, keyword)
        if value is not None:
            cues[f"dicom:{keyword}"] = value
    return cues


def dicom_value(ds: Any, keyword: str) -> Any:
    """A DICOM element's value as JSON: numbers as floats (lists for multi-values), codes as text,
    anything that may identify a person, place or device as :func:`hash_text`; ``None`` when absent."""
    from pydicom.multival import MultiValue

    element = ds.get(keyword) if keyword in ds else None
    if element is None:
        return None
    element = ds[keyword]
    vr, value = str(element.VR), element.value
    if vr == "SQ" or value is None:
        return None
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    if vr in _NUMERIC_VRS:
        try:
            nums = [round(float(v), 4) for v in values]
        except (TypeError, ValueError):
            return None
        if not nums or not all(math.isfinite(v) for v in nums):
            return None
        return nums[0] if len(nums) == 1 else nums
    if isinstance(value, bytes):
        return None
    text = "\\".join(str(v) for v in values).strip()
    if not text:
        return None
    return text if vr in _CLEAR_VRS else hash_text(text)


def _nifti_cues(path: Path) -> dict[str, Any]:
    import nibabel as nib

    # nibabel reads the header here; the voxel data stays on disk (a proxy) until asked for.
    # nib.load is typed as returning any file-based image; a NIfTI file loads as a spatial one.
    header = cast("SpatialImage", nib.load(str(path))).header
    shape = [int(s) for s in header.get_data_shape()]
    zooms = [float(z) for z in header.get_zooms()]
    cues: dict[str, Any] = {"mode": "grey", "bit_depth": int(header.get_data_dtype().itemsize * 8)}
    if len(shape) >= 2:
        cues["width"], cues["height"] = shape[0], shape[1]
    if len(shape) >= 3 and shape[2] > 1:
        cues["depth"] = shape[2]
    if len(zooms) >= 2:
        cues["pixel_spacing"] = [round(zooms[0], 4), round(zooms[1], 4)]
    if len(zooms) >= 3:
        cues["slice_thickness"] = round(zooms[2], 4)
    return cues


def _npz_cues(path: Path) -> dict[str, Any]:
    from medclf.io.npz import read_npz_image

    image = read_npz_image(path, _limits())
    return image_cues_of(image, None)


def _limits() -> Any:
    from medclf.io.guard import ReadLimits

    return ReadLimits()


def array_cues(arr: np.ndarray) -> dict[str, Any]:
    """Cues of an image held in an array (a ``.npz`` dataset has no file headers): size, mode, bit depth."""
    from medclf.io.npz import image_from_array

    return image_cues_of(image_from_array(arr), arr.dtype)


def image_cues_of(image: Any, dtype: Any) -> dict[str, Any]:
    """Size and mode cues of a decoded :class:`~medclf.io.Image` (``dtype``: the stored array's)."""
    shape = image.spatial_shape
    cues: dict[str, Any] = {
        "format": image.format,
        "width": int(shape[-1]),
        "height": int(shape[-2]),
        "mode": {1: "grey", 3: "rgb", 4: "rgba"}.get(image.channels, f"{image.channels}ch"),
    }
    if (image.meta or {}).get("was_rgb_grey"):
        cues["mode"] = "rgb"  # stored as colour: how it was saved is the cue, not what it shows
    if len(shape) == 3:
        cues["depth"] = int(shape[0])
    if dtype is not None:
        cues["bit_depth"] = int(np.dtype(dtype).itemsize * 8)
    cues["aspect"] = round(cues["width"] / cues["height"], 4)
    return cues


# --------------------------------------------------------------------------------------------------
# Group keys
# --------------------------------------------------------------------------------------------------


def _bin(value: Any, edges: Sequence[float], labels: Sequence[str]) -> str:
    if value is None:
        return UNKNOWN
    try:
        v = float(value)
    except (TypeError, ValueError):
        return UNKNOWN
    for edge, label in zip(edges, labels, strict=False):
        if v < edge:
            return label
    return labels[-1]


def _text(name: str) -> Callable[[dict[str, Any]], str]:
    def label(cues: dict[str, Any]) -> str:
        value = cues.get(name)
        if value is None or value == "":
            return UNKNOWN
        if isinstance(value, list):
            return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    label.__doc__ = f"the cue {name!r} as text"
    return label


def _size(cues: dict[str, Any]) -> str:
    w, h = cues.get("width"), cues.get("height")
    if not w or not h:
        return UNKNOWN
    d = cues.get("depth")
    return f"{w}x{h}x{d}" if d else f"{w}x{h}"


def _jpeg_quality(cues: dict[str, Any]) -> str:
    if "jpeg_quality" not in cues:
        return "not-jpeg" if cues.get("format") not in (None, "jpeg") else UNKNOWN
    return _bin(cues["jpeg_quality"], (50, 75, 90, 95), ("<50", "50-74", "75-89", "90-94", "95-100"))


def _aspect(cues: dict[str, Any]) -> str:
    return _bin(
        cues.get("aspect"), (0.8, 0.95, 1.05, 1.25), ("<0.8", "0.8-0.95", "0.95-1.05", "1.05-1.25", ">=1.25")
    )


def _bytes_per_pixel(cues: dict[str, Any]) -> str:
    return _bin(
        cues.get("bytes_per_pixel"),
        (0.05, 0.1, 0.2, 0.5, 1.0),
        ("<0.05", "0.05-0.1", "0.1-0.2", "0.2-0.5", "0.5-1", ">=1"),
    )


def _long_side(cues: dict[str, Any]) -> str:
    w, h = cues.get("width"), cues.get("height")
    if not w or not h:
        return UNKNOWN
    return _bin(
        max(w, h),
        (128, 256, 384, 512, 513, 1024),
        ("<128", "128-255", "256-383", "384-511", "512", "513-1023", ">=1024"),
    )


#: Group keys: name -> function of :func:`header_cues` output -> group label ("unknown" when absent).
GROUP_KEYS: dict[str, Callable[[dict[str, Any]], str]] = {
    "size": _size,
    "long_side": _long_side,
    "format": _text("format"),
    "mode": _text("mode"),
    "aspect": _aspect,
    "bit_depth": _text("bit_depth"),
    "jpeg_quality": _jpeg_quality,
    "bytes_per_pixel": _bytes_per_pixel,
    "modality": _text("modality"),
    "manufacturer": _text("manufacturer"),
    "model": _text("model"),
    "station": _text("station"),
    "institution": _text("institution"),
    "field_strength": _text("field_strength"),
    "slice_thickness": _text("slice_thickness"),
    "pixel_spacing": _text("pixel_spacing"),
    "kvp": _text("kvp"),
    "view_position": _text("view_position"),
    "body_part": _text("body_part"),
}


def is_dicom_keyword(key: str) -> bool:
    import pydicom.datadict

    return pydicom.datadict.tag_for_keyword(key) is not None


def known_keys(samples: SampleSet | None = None) -> list[str]:
    """Keys :func:`sample_groups` accepts by name (DICOM keywords come on top)."""
    return [*(samples.metadata if samples is not None else {}), *GROUP_KEYS]


def check_key(samples: SampleSet | None, key: str) -> None:
    """Raise :class:`ConfigError` (one line) unless ``key`` names a column, a group key or a DICOM keyword."""
    if samples is not None and key in samples.metadata:
        return
    if key in GROUP_KEYS or is_dicom_keyword(key):
        return
    columns = ", ".join(samples.metadata) if samples is not None and samples.metadata else "none"
    raise ConfigError(
        f"unknown group key {key!r}: use a manifest column (here: {columns}), one of "
        f"{', '.join(GROUP_KEYS)}, or a DICOM keyword such as StationName"
    )


def sample_cues(
    samples: SampleSet, *, workers: int = 1, dicom_keywords: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """:func:`header_cues` of every sample (array cues for ``.npz`` samples), in sample order."""
    if samples.arrays:
        out = []
        for ref in samples.refs:
            split, index = ref.split("/")
            try:
                out.append(array_cues(samples.arrays[split][int(index)]))
            except Exception:
                out.append({})
        return out
    keywords = tuple(dicom_keywords)
    if workers > 1 and len(samples) >= 64 and "fork" in mp.get_all_start_methods():
        with mp.get_context("fork").Pool(workers) as pool:
            return pool.starmap(
                _cues_job,
                [(ref, keywords) for ref in samples.refs],
                chunksize=max(1, len(samples) // (workers * 8)),
            )
    return [header_cues(ref, dicom_keywords=keywords) for ref in samples.refs]


def _cues_job(ref: str, keywords: tuple[str, ...]) -> dict[str, Any]:
    return header_cues(ref, dicom_keywords=keywords)


def group_label(cues: dict[str, Any], key: str) -> str:
    """The group label of one sample's cues for a :data:`GROUP_KEYS` name or a DICOM keyword."""
    if key in GROUP_KEYS:
        return GROUP_KEYS[key](cues)
    return _text(f"dicom:{key}")(cues)


def sample_groups(
    samples: SampleSet,
    key: str,
    *,
    workers: int = 1,
    cues: Sequence[dict[str, Any]] | None = None,
) -> list[str]:
    """One group label per sample for ``key``: a manifest column (``SampleSet.metadata``), a
    :data:`GROUP_KEYS` name, or a DICOM keyword (identifying ones hashed). Samples without a value get
    ``"unknown"``. ``cues`` (from :func:`sample_cues`) saves reading the headers again.
    Raises :class:`ConfigError` for an unknown key.
    """
    check_key(samples, key)
    if key in samples.metadata:
        return [v.strip() or UNKNOWN for v in samples.metadata[key]]
    if key not in GROUP_KEYS:  # a DICOM keyword: read just that element from every header
        cues = sample_cues(samples, workers=workers, dicom_keywords=(key,))
    elif cues is None:
        cues = sample_cues(samples, workers=workers)
    if len(cues) != len(samples):
        raise ValueError(f"{len(cues)} cue records for {len(samples)} samples")
    return [group_label(c, key) for c in cues]
