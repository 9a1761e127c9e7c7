"""DICOM reader: pydicom 3 with the pylibjpeg plugins (RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000).

Reading happens in two passes over the same parse. First the data set is read with the pixel data
deferred, so the image header (rows, columns, frames, samples, bit depths) is validated against the
:class:`~medclf.io.guard.ReadLimits` and the stored pixel bytes are checked against what the header
requires (truncation) before anything is decoded. Then pydicom decodes the pixels and its own helpers
apply the display pipeline: Modality LUT (rescale slope/intercept, e.g. to Hounsfield units), VOI LUT or
window when the file has one, and MONOCHROME1 inversion so that higher always means brighter.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.datadict
import pydicom.filereader
import pydicom.tag
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medclf.io.guard import (
    ReadLimits,
    check_memory,
    check_preamble,
    check_shape,
    collapse_grey,
    count_in_file,
    inflated_size,
    library_errors,
    reject,
)
from medclf.io.image import Image

# Elements larger than this are not read by the first pass; the pixel data always is one of them unless
# the image is tiny, in which case reading it is harmless.
_DEFER_BYTES = 16 * 1024
_PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
_GREY = ("MONOCHROME1", "MONOCHROME2")
_PALETTE = "PALETTE COLOR"
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
_BITS_ALLOCATED = (1, 8, 16, 32, 64)
# Attributes the grey-level pipeline reads; copied into small per-frame views (see _transform_views).
_TRANSFORM_KEYWORDS = (
    "BitsStored",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)
_FG_TRANSFORM_KEYWORDS = ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth", "VOILUTFunction")


@dataclass(frozen=True)
class _Header:
    rows: int
    cols: int
    frames: int
    samples: int
    photometric: str
    bits_allocated: int
    bits_stored: int
    pixel_tag: int


def read_dicom(path: Path, limits: ReadLimits, *, size: int, bare: bool = False) -> Image:
    """Decode a DICOM file into an :class:`Image` (see the module docstring for the pipeline).

    Grey images give 1 channel, colour (RGB, YBR_*, PALETTE COLOR) 3 channels (1 when R == G == B).
    A single frame is ``(C, H, W)`` with spacing ``(row, column)`` from PixelSpacing (else
    ImagerPixelSpacing); several frames are ``(C, frames, H, W)`` with the frame spacing from
    SpacingBetweenSlices (else SliceThickness). Missing spacings are 1.0.
    ``bare`` is set by the sniffer for a data set without preamble and file meta.
    """
    if not bare:
        check_preamble(path)
    # A deflated data set is inflated whole by pydicom: bound it first, and measure offsets in it.
    size = _check_deflated(path, limits, bare) or size
    ds = _read_dataset(path, bare)
    _check_element_lengths(ds, path, size)
    tsuid = _transfer_syntax(ds, path)
    hdr = _check_header(ds, path, limits, size)
    _check_pixel_length(ds, hdr, tsuid, path, size)
    _check_codestreams(ds, hdr, tsuid, path, size)
    _check_decoder(tsuid, hdr, path)

    # pydicom converts element values lazily, so reading any attribute can raise on a damaged file.
    with library_errors(path, "DICOM header", reason="malformed"):
        meta: dict[str, Any] = {
            "modality": str(ds.get("Modality", "") or "") or None,
            "photometric_interpretation": hdr.photometric,
            "bits_allocated": hdr.bits_allocated,
            "bits_stored": hdr.bits_stored,
            "transfer_syntax": tsuid.name,
            "number_of_frames": hdr.frames,
            "window_applied": False,
            "rescaled": False,
            "inverted": False,
            "lossy": str(ds.get("LossyImageCompression", "") or "").strip() == "01",
        }
        spacing = _spacing(ds, three_d=hdr.frames > 1)

    with library_errors(path, f"DICOM pixel data ({tsuid.name})"):
        arr = ds.pixel_array
    expected = (hdr.frames, hdr.rows, hdr.cols, hdr.samples)
    if arr.size != int(np.prod(expected)):
        raise reject(
            f"decoded DICOM pixel data has shape {arr.shape}, but the header declares "
            f"{hdr.frames} frame(s) of {hdr.rows} x {hdr.cols} x {hdr.samples}",
            "inconsistent_header",
            path,
        )
    arr = arr.reshape(expected)

    if hdr.photometric in _GREY:
        grey, rescaled, windowed = _grey_frames(arr[..., 0], ds, hdr, path)
        pixels = grey[np.newaxis]  # (1, F, H, W)
        meta.update(rescaled=rescaled, window_applied=windowed, inverted=hdr.photometric == "MONOCHROME1")
    else:
        if hdr.photometric == _PALETTE:
            with library_errors(path, "DICOM palette colour lookup table", reason="malformed"):
                arr = apply_color_lut(arr[..., 0], ds)[..., :3]
        # pydicom already converted YBR to RGB (its default ``as_rgb``); only the layout changes here.
        pixels = collapse_grey(np.moveaxis(arr, -1, 0).astype(np.float32), meta)
    if hdr.frames == 1:
        pixels = pixels[:, 0]
    return Image(np.ascontiguousarray(pixels, dtype=np.float32), spacing, "dicom", meta)


def check_structure(path: Path, limits: ReadLimits, *, size: int, bare: bool = False) -> None:
    """The structural checks of :func:`read_dicom` without the image ones, for tools that rewrite files
    (``medclf deid``): a bounded deflated data set and no element running past the end of the file."""
    size = _check_deflated(path, limits, bare) or size
    _check_element_lengths(_read_dataset(path, bare), path, size)


def _read_dataset(path: Path, bare: bool) -> Dataset:
    with library_errors(path, "DICOM header", reason="malformed"):
        # force=True only for preamble-less data sets the sniffer has already validated element by element.
        ds = pydicom.dcmread(str(path), defer_size=_DEFER_BYTES, force=bare)
    if len(ds) == 0:
        # pydicom returns an empty data set, with only a warning, when the file ends inside any element.
        raise _missing_pixels(ds, path)
    return ds


def _check_deflated(path: Path, limits: ReadLimits, bare: bool) -> int | None:
    """For the Deflated Explicit VR Little Endian syntax, the size of the inflated data set, else None.

    pydicom inflates such a data set in one ``zlib.decompress`` call, before anything can be checked, so a
    small file could claim gigabytes: inflate it here first in bounded pieces, counting bytes only, and
    refuse anything above an eighth of the memory limit (the data set is then decoded on top of it).
    """
    if bare:
        return None
    with library_errors(path, "DICOM file meta", reason="malformed"), open(path, "rb") as fh:
        pydicom.filereader.read_preamble(fh, False)
        meta = pydicom.filereader._read_file_meta_info(fh)
        start = fh.tell()
    if str(meta.get("TransferSyntaxUID", "")) != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return None
    cap = limits.max_memory_bytes // 8

    def pieces():
        with open(path, "rb") as fh:
            fh.seek(start)
            while block := fh.read(1 << 20):
                yield block

    try:
        inflated, complete = inflated_size(pieces(), cap, wbits=-15)
    except zlib.error as exc:
        raise reject(f"the deflated DICOM data set is corrupt ({exc})", "malformed", path) from None
    if inflated > cap:
        raise reject(
            f"the deflated DICOM data set inflates to more than {cap} bytes (a quarter of the read memory "
            "limit is allowed)",
            "decompression_bomb",
            path,
        )
    if not complete:
        raise reject("the deflated DICOM data set is truncated", "truncated", path)
    return inflated


def _check_element_lengths(ds: Dataset, path: Path, size: int) -> None:
    """Refuse top-level elements whose declared length runs past the end of the file (or inflated data).

    pydicom stops quietly at the end of the file, leaving a short or missing value, so a lying length
    would otherwise show up later as a confusing error, or not at all.
    """
    for tag in list(ds.keys()):
        elem = ds.get_item(tag, keep_deferred=True)
        length = getattr(elem, "length", None)
        tell = getattr(elem, "value_tell", None)
        if length is None or tell is None or length == 0xFFFFFFFF:
            continue
        value = elem.value
        available = max(size - int(tell), 0) if value is None else len(value)
        if available >= length:
            continue
        if int(tag) in _PIXEL_TAGS:
            raise reject(
                f"the DICOM pixel data is truncated: the element declares {length} bytes but the file ends "
                f"after {min(available, length)} of them",
                "truncated",
                path,
            )
        name = pydicom.datadict.keyword_for_tag(tag) or "private or unknown element"
        raise reject(
            f"the DICOM element {pydicom.tag.Tag(tag)} ({name}) declares {length} bytes, but only "
            f"{available} remain in the file",
            "element_beyond_file",
            path,
        )


def _transfer_syntax(ds: Dataset, path: Path) -> UID:
    with library_errors(path, "DICOM file meta", reason="malformed"):
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if ts is None:
            # No file meta (or no transfer syntax in it): the encoding pydicom detected while parsing
            # is the transfer syntax, and a native one since compressed data needs the meta to say so.
            implicit, little = ds.original_encoding
            if implicit is None:
                raise reject("cannot tell the DICOM transfer syntax", "malformed", path)
            ts = (
                ImplicitVRLittleEndian
                if implicit
                else ExplicitVRLittleEndian
                if little
                else ExplicitVRBigEndian
            )
            ds.file_meta.TransferSyntaxUID = ts
        ts = UID(str(ts))
    if not ts.is_transfer_syntax:
        raise reject(f"unknown DICOM transfer syntax {ts}", "unsupported_compression", path)
    return ts


def _int_attr(ds: Dataset, keyword: str, path: Path, default: int | None = None) -> int:
    with library_errors(path, f"DICOM {keyword}", reason="malformed"):
        value = ds.get(keyword, None)
    if value is None or value == "":
        if default is None:
            raise reject(f"the DICOM header has no {keyword}", "inconsistent_header", path)
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise reject(
            f"the DICOM {keyword} {value!r} is not an integer", "inconsistent_header", path
        ) from None


def _check_header(ds: Dataset, path: Path, limits: ReadLimits, size: int) -> _Header:
    pixel_tag = next((t for t in _PIXEL_TAGS if t in ds), None)
    if pixel_tag is None:
        raise _missing_pixels(ds, path)
    rows = _int_attr(ds, "Rows", path)
    cols = _int_attr(ds, "Columns", path)
    frames = _int_attr(ds, "NumberOfFrames", path, default=1)
    samples = _int_attr(ds, "SamplesPerPixel", path, default=1)
    bits_allocated = _int_attr(ds, "BitsAllocated", path)
    bits_stored = _int_attr(ds, "BitsStored", path, default=bits_allocated)
    pixel_rep = _int_attr(ds, "PixelRepresentation", path, default=0)
    with library_errors(path, "DICOM PhotometricInterpretation", reason="malformed"):
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()

    if rows < 1 or cols < 1 or frames < 1:
        raise reject(
            f"the DICOM header declares {frames} frame(s) of {rows} x {cols}", "inconsistent_header", path
        )
    if (
        bits_allocated not in _BITS_ALLOCATED
        or not 1 <= bits_stored <= bits_allocated
        or pixel_rep not in (0, 1)
    ):
        raise reject(
            f"inconsistent DICOM bit depths: BitsAllocated {bits_allocated}, BitsStored {bits_stored}, "
            f"PixelRepresentation {pixel_rep}",
            "inconsistent_header",
            path,
        )
    if photometric in _GREY or photometric == _PALETTE:
        want_samples = 1
    elif photometric in _COLOUR:
        want_samples = 3
    else:
        raise reject(
            f"unsupported DICOM photometric interpretation {photometric or '(missing)'}",
            "unsupported_photometric",
            path,
        )
    if samples != want_samples:
        raise reject(
            f"DICOM {photometric} needs SamplesPerPixel {want_samples}, the header says {samples}",
            "inconsistent_header",
            path,
        )
    if pixel_tag != 0x7FE00010 and bits_allocated != (32 if pixel_tag == 0x7FE00008 else 64):
        raise reject(
            f"DICOM {_PIXEL_TAGS[pixel_tag]} with BitsAllocated {bits_allocated}", "inconsistent_header", path
        )
    spatial = (frames, rows, cols) if frames > 1 else (rows, cols)
    check_shape(spatial, samples, limits, path, what="DICOM image")
    encapsulated = (
        bool(getattr(ds.file_meta, "TransferSyntaxUID", None))
        and UID(str(ds.file_meta.TransferSyntaxUID)).is_encapsulated
    )
    elem = ds.get_item(pixel_tag, keep_deferred=True)
    stored_length = getattr(elem, "length", None)
    check_memory(
        rows * cols * frames * samples,
        max(bits_allocated / 8, 1),  # 1-bit data is unpacked to one byte per value
        limits,
        path,
        what="DICOM image",
        compressed_bytes=int(stored_length)
        if encapsulated and stored_length not in (None, 0xFFFFFFFF)
        else None,
    )
    return _Header(rows, cols, frames, samples, photometric, bits_allocated, bits_stored, pixel_tag)


def _missing_pixels(ds: Dataset, path: Path) -> Exception:
    # pydicom silently drops an encapsulated pixel data element that the end of the file cuts short, so
    # "no pixel data" may really mean "truncated": look for the element's tag in the raw bytes.
    tag_seen = any(
        count_in_file(path, tag, stop_after=0) for tag in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
    )
    if tag_seen:
        return reject(
            "the DICOM pixel data is truncated: the file ends before the end of the pixel data element",
            "truncated",
            path,
        )
    if len(ds) == 0:
        return reject(
            "the DICOM data set is empty or cut short (truncated or corrupt file)", "malformed", path
        )
    try:
        sop = ds.get("SOPClassUID")
        kind = f" ({UID(str(sop)).name})" if sop else ""
    except Exception:  # only used to word the message
        kind = ""
    return reject(f"the DICOM file{kind} contains no image (no pixel data)", "no_pixels", path)


def _check_pixel_length(ds: Dataset, hdr: _Header, tsuid: UID, path: Path, size: int) -> None:
    """For native (uncompressed) syntaxes the stored bytes must cover what the header requires."""
    if tsuid.is_encapsulated:
        return  # compressed fragments: the decoder validates them
    elem = ds.get_item(hdr.pixel_tag, keep_deferred=True)
    with library_errors(path, "DICOM header", reason="inconsistent_header"):
        expected = int(get_expected_length(ds, "bytes"))
    value = getattr(elem, "value", None)
    # A raw element knows the length its header declared; a converted one only its value.
    raw_length = getattr(elem, "length", None)
    declared = int(raw_length) if raw_length is not None else len(value or b"")
    if declared == 0xFFFFFFFF:
        raise reject(
            f"native DICOM pixel data with undefined length ({tsuid.name})", "inconsistent_header", path
        )
    if value is not None:
        available = len(value)  # small elements were read already, as far as the file went
    elif tsuid.is_deflated:
        available = declared  # offsets refer to the inflated stream: the file size says nothing
    else:
        # A deferred raw element (get_item returns one; its stub says a DataElement, which has no offset).
        available = min(declared, size - int(elem.value_tell))  # type: ignore[attr-defined]
    layout = f"{hdr.frames} frame(s) of {hdr.rows} x {hdr.cols} x {hdr.samples} at {hdr.bits_allocated} bits"
    if declared < expected:
        # The element is whole but too short: Rows, Columns, frames or BitsAllocated do not match it.
        raise reject(
            f"the DICOM header does not match its pixel data: {layout} need {expected} bytes, but the pixel "
            f"data element holds {declared}",
            "inconsistent_header",
            path,
        )
    if available < expected:
        raise reject(
            f"the DICOM pixel data is truncated: {layout} need {expected} bytes, but the file ends after "
            f"{max(available, 0)} of the element's {declared} bytes",
            "truncated",
            path,
        )
    frame_bytes = expected // hdr.frames
    if declared - expected >= max(frame_bytes, 2):
        # More than padding: at least one more frame's worth of data than the header describes.
        raise reject(
            f"the DICOM header does not match its pixel data: {layout} need {expected} bytes, but the pixel "
            f"data element holds {declared}",
            "inconsistent_header",
            path,
        )


# JPEG start-of-frame markers (baseline .. lossless, arithmetic variants, JPEG-LS), which carry the size.
_SOF_MARKERS = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}
_ITEM_TAG = b"\xfe\xff\x00\xe0"
_SEQUENCE_END_TAG = b"\xfe\xff\xdd\xe0"
_FRAGMENT_HEAD = 65536  # bytes of each fragment searched for the frame header


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    """(rows, columns) from the SOF segment of a JPEG / JPEG-LS codestream's first bytes, else None."""
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(head[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS:
            if pos + 9 > len(head):
                return None
            return int.from_bytes(head[pos + 5 : pos + 7], "big"), int.from_bytes(
                head[pos + 7 : pos + 9], "big"
            )
        if marker == 0xDA or length < 2:
            return None
        pos += 2 + length
    return None


def _j2k_size(head: bytes) -> tuple[int, int] | None:
    """(rows, columns) from the SIZ segment of a JPEG 2000 codestream (bare or in a JP2 file), else None."""
    at = head.find(b"\xff\x4f\xff\x51")
    if at < 0 or at + 24 > len(head):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", head[at + 8 : at + 24])
    return ysiz - yosiz, xsiz - xosiz


def _check_codestreams(ds: Dataset, hdr: _Header, tsuid: UID, path: Path, size: int) -> None:
    """Every JPEG / JPEG-LS / JPEG 2000 frame in encapsulated pixel data must be the size the header says.

    The decoders allocate what the codestream declares, not what Rows and Columns say: a few hundred
    bytes claiming a 20000 x 20000 frame behind a 64 x 64 header would take gigabytes and minutes. So
    the frame headers are read from the file (the first 64 KiB of each fragment) before decoding.
    """
    if not tsuid.is_encapsulated or hdr.pixel_tag != 0x7FE00010:
        return
    elem = ds.get_item(hdr.pixel_tag, keep_deferred=True)
    tell = getattr(elem, "value_tell", None)
    if tell is None:
        return  # already converted by pydicom; nothing to read from the file
    with open(path, "rb") as fh:
        fh.seek(int(tell))
        first = True
        while True:
            item = fh.read(8)
            if len(item) < 8 or item[:4] == _SEQUENCE_END_TAG or item[:4] != _ITEM_TAG:
                return  # the decoder reports malformed encapsulation itself
            length = struct.unpack("<I", item[4:])[0]
            start = fh.tell()
            if first:  # the Basic Offset Table
                first = False
            elif length:
                head = fh.read(min(length, _FRAGMENT_HEAD))
                found = (
                    _jpeg_size(head)
                    if head[:2] == b"\xff\xd8"
                    else _j2k_size(head)
                    if head[:4] == b"\xff\x4f\xff\x51" or head[4:8] == b"jP  "
                    else None
                )
                if found is not None and found != (hdr.rows, hdr.cols):
                    raise reject(
                        f"the compressed frame declares {found[0]} x {found[1]} pixels, but the DICOM header "
                        f"says {hdr.rows} x {hdr.cols} (Rows x Columns)",
                        "inconsistent_header",
                        path,
                    )
            if start + length > size:
                return  # truncated: the pixel length checks and the decoder report it
            fh.seek(start + length)


def _check_decoder(tsuid: UID, hdr: _Header, path: Path) -> None:
    if hdr.pixel_tag != 0x7FE00010:
        return  # float pixel data is always native
    try:
        decoder = get_decoder(tsuid)
        available = decoder.is_available
    except Exception:
        available = False
    if not available:
        raise reject(
            f"DICOM transfer syntax {tsuid.name} cannot be decoded here (no decoder plugin installed)",
            "unsupported_compression",
            path,
        )


def _copy_elements(dst: Dataset, src: Dataset, keywords: tuple[str, ...]) -> None:
    for kw in keywords:
        if kw in src:
            dst.add(src[kw])  # the element, not the value: LUT data needs its VR


def _functional_items(group: Dataset) -> list[Dataset]:
    items = []
    for seq in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
        value = group.get(seq)
        if value:
            items.append(value[0])
    return items


def _transform_views(ds: Dataset, frames: int) -> list[Dataset]:
    """One small data set per frame holding the attributes the grey pipeline needs.

    Enhanced multi-frame objects keep rescale and window in the Shared / Per-frame Functional Groups
    instead of the top level, where pydicom's helpers look; frames sharing settings share a view.
    """
    base = Dataset()
    _copy_elements(base, ds, _TRANSFORM_KEYWORDS)
    base.file_meta = ds.file_meta  # pydicom reads OW LUT data with the file's byte order
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        for item in _functional_items(shared[0]):
            _copy_elements(base, item, _FG_TRANSFORM_KEYWORDS)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) != frames:
        return [base] * frames
    views = []
    for group in per_frame:
        items = _functional_items(group)
        if not items:
            views.append(base)
            continue
        view = Dataset()  # not Dataset(base), which would share base's element dict
        _copy_elements(view, base, _TRANSFORM_KEYWORDS)
        view.file_meta = ds.file_meta
        for item in items:
            _copy_elements(view, item, _FG_TRANSFORM_KEYWORDS)
        views.append(view)
    return views


def _has_modality(view: Dataset) -> bool:
    # The condition under which pydicom's apply_modality_lut changes anything.
    return bool(view.get("ModalityLUTSequence")) or ("RescaleSlope" in view and "RescaleIntercept" in view)


def _has_voi(view: Dataset) -> bool:
    seq = view.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return True
    return view.get("WindowCenter") not in (None, "") and view.get("WindowWidth") not in (None, "")


def _apply_pipeline(stored: np.ndarray, view: Dataset, try_voi: bool) -> tuple[np.ndarray, bool]:
    """Modality LUT then, if asked and valid, VOI LUT / window. Returns (values, window_applied)."""
    out = apply_modality_lut(stored, view)
    if not try_voi:
        return out, False
    voi_in = out
    if (
        view.get("VOILUTSequence")
        and not np.issubdtype(out.dtype, np.integer)
        and np.all(np.mod(out, 1) == 0)
    ):
        voi_in = out.astype(np.int64)  # a VOI LUT indexes by integer; rescale produced whole floats
    try:
        return apply_voi_lut(voi_in, view), True
    except (ValueError, NotImplementedError, IndexError, KeyError, AttributeError, TypeError):
        # A broken window (zero width, unknown VOI function) does not spoil the pixels: skip it.
        return out, False


def _output_range(view: Dataset, hdr: _Header, stored: np.ndarray, windowed: bool) -> tuple[float, float]:
    """The range the pipeline maps all storable values to (MONOCHROME1 is inverted within it)."""
    if not np.issubdtype(stored.dtype, np.integer):
        probe = np.array([stored.min(), stored.max()])
    else:
        signed = int(view.get("PixelRepresentation", 0) or 0) == 1
        lo = -(1 << (hdr.bits_stored - 1)) if signed else 0
        hi = (1 << (hdr.bits_stored - 1)) - 1 if signed else (1 << hdr.bits_stored) - 1
        # Every storable value when that is cheap (LUTs need not be monotonic), else the two ends.
        probe = (
            np.arange(lo, hi + 1, dtype=np.int64) if hdr.bits_stored <= 16 else np.array([lo, hi], np.int64)
        )
    out, _ = _apply_pipeline(probe, view, try_voi=windowed)
    return float(np.min(out)), float(np.max(out))


def _grey_frames(arr: np.ndarray, ds: Dataset, hdr: _Header, path: Path) -> tuple[np.ndarray, bool, bool]:
    """Apply the grey pipeline to ``arr`` (frames, H, W); return float32 values, rescaled?, windowed?."""
    out = np.empty(arr.shape, np.float32)
    rescaled = windowed = False
    with library_errors(path, "DICOM modality/VOI lookup tables", reason="malformed"):
        views = _transform_views(ds, hdr.frames)
        groups: dict[int, list[int]] = {}
        for i, view in enumerate(views):
            groups.setdefault(id(view), []).append(i)
        for idx in groups.values():
            view = views[idx[0]]
            stored = arr[idx] if len(idx) < hdr.frames else arr
            values, win = _apply_pipeline(stored, view, try_voi=_has_voi(view))
            if hdr.photometric == "MONOCHROME1":
                lo, hi = _output_range(view, hdr, stored, win)
                values = (lo + hi) - np.asarray(values, np.float64)
            rescaled = rescaled or _has_modality(view)
            windowed = windowed or win
            out[idx] = values
    return out, rescaled, windowed


def _positive(value: Any, n: int) -> list[float] | None:
    """``n`` positive finite floats from a DS value (single or multi-valued), else None."""
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value]
    try:
        out = [float(v) for v in items[:n]]
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) and v > 0 for v in out):
        return None
    return out


def _spacing(ds: Dataset, three_d: bool) -> tuple[float, ...]:
    sources = [ds]
    for seq in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(seq)
        if groups and groups[0].get("PixelMeasuresSequence"):
            sources.append(groups[0].PixelMeasuresSequence[0])
    in_plane: list[float] | None = None
    between: list[float] | None = None
    for src in sources:
        for kw in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
            if in_plane is None and src.get(kw) is not None:
                in_plane = _positive(src.get(kw), 2)
        for kw in ("SpacingBetweenSlices", "SliceThickness"):
            if between is None and src.get(kw) not in (None, ""):
                between = _positive(src.get(kw), 1)
    if between is None and three_d:
        # RT Dose grids give frame positions instead (GridFrameOffsetVector, mm from the first frame).
        try:
            steps = np.diff([float(v) for v in ds.get("GridFrameOffsetVector")])
        except (TypeError, ValueError):
            steps = np.array([])
        if steps.size and np.allclose(steps, steps[0]):
            between = _positive(abs(float(steps[0])), 1)
    row, col = in_plane or (1.0, 1.0)
    return (between[0] if between else 1.0, row, col) if three_d else (row, col)
