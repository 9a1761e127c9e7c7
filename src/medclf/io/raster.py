"""PNG, JPEG and TIFF reader: Pillow, with tifffile for the TIFFs Pillow cannot hold losslessly.

Greyscale modes (1, L, LA, I;16*, I, F) give one channel and keep their full range (a 16-bit PNG stays
0..65535); colour modes (RGB, RGBA, P, PA, CMYK, YCbCr, ...) give three, alpha dropped, unless R == G == B
everywhere, which gives one channel and ``meta["was_rgb_grey"]``. EXIF / TIFF orientation is applied.
A multi-page TIFF whose pages share size and mode is a volume ``(C, pages, H, W)``; other formats' extra
frames (APNG, MPO) are ignored. Spacing is 1.0: raster DPI describes printing, not anatomy.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image as PILImage
from PIL import ImageChops, ImageOps, PngImagePlugin

from medclf.errors import InputRejected
from medclf.io.guard import (
    ReadLimits,
    check_memory,
    check_shape,
    collapse_grey,
    count_in_file,
    inflated_size,
    library_errors,
    reject,
)
from medclf.io.image import Image

# Pillow refuses images above twice this many pixels at open time: keep its guard as a backstop behind
# ours (checked from the header below), consistent with the default limits rather than its own 89M.
PILImage.MAX_IMAGE_PIXELS = ReadLimits().max_pixels

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}
_GREY_AS_IS = {"L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_GREY_CONVERT = {"1", "LA", "La"}
_RGB_CONVERT = {"RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
# Tolerance for RGB -> grey on lossy JPEG, whose chroma may carry +-1 noise on grey content.
_JPEG_GREY_TOLERANCE = 2.0
# Bytes per stored value by Pillow mode (everything else is 8 bits per sample).
_MODE_BYTES = {"I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "I": 4, "F": 4}

# PNG structure (ISO/IEC 15948): channels per colour type and the bit depths each allows.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# Adam7 passes: (x0, y0, dx, dy).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_MAX_CHUNKS = 1 << 18


def read_raster(path: Path, fmt: str, limits: ReadLimits) -> Image:
    """Decode a PNG, JPEG or TIFF file (``fmt`` as sniffed) into an :class:`Image`."""
    # Structure checks that read no pixel data come first: Pillow inflates PNG text chunks at open time.
    png = _png_structure(path) if fmt == "png" else None
    if fmt == "tiff":
        _check_tiff_directories(path, limits)
    # Pillow gets a file object, not the name: given a name it maps an uncompressed TIFF's pixels into
    # memory (mmap), and reading a mapped file that another process truncates kills us with SIGBUS.
    with open(path, "rb") as fh:
        try:
            with library_errors(path, f"{fmt.upper()} header", reason="malformed"):
                im = _open(fh, fmt, path)
        except InputRejected as exc:
            if fmt == "tiff" and exc.reason == "malformed":  # e.g. float RGB: only tifffile can open it
                return _read_tifffile(path, limits)
            raise
        with im:
            if fmt == "tiff" and _needs_tifffile(im):
                return _read_tifffile(path, limits)
            return _read_pillow(im, path, fmt, limits, png)


def _open(fh: Any, fmt: str, path: Path) -> PILImage.Image:
    try:
        return PILImage.open(fh, formats=[_PIL_FORMAT[fmt]])
    except PILImage.DecompressionBombError as exc:
        raise reject(
            f"refused by the image decoder's size guard: {exc}", "decompression_bomb", path
        ) from None


def _needs_tifffile(im: PILImage.Image) -> bool:
    """TIFFs Pillow would get wrong go to tifffile.

    Pillow reduces 16-bit multi-sample TIFFs to 8 bits per sample, and its TIFF loader applies the
    Orientation tag itself, inconsistently across versions (13.0 scrambles the transposing ones, 5-8).
    """
    tags = getattr(im, "tag_v2", {})
    bits = tags.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    oriented = int(tags.get(274, 1) or 1) != 1
    return oriented or (int(tags.get(277, 1)) > 1 and max(int(b) for b in bits) > 8)


def _channels_of(mode: str) -> int:
    if mode in _GREY_AS_IS or mode in _GREY_CONVERT:
        return 1
    if mode == "RGB" or mode in _RGB_CONVERT:
        return 3
    return 0


def _read_pillow(
    im: PILImage.Image, path: Path, fmt: str, limits: ReadLimits, png: _PngLayout | None = None
) -> Image:
    mode = im.mode
    channels = _channels_of(mode)
    if channels == 0:
        raise reject(f"{fmt.upper()} pixel mode {mode} is not supported", "unsupported_dtype", path)
    width, height = im.size
    with library_errors(path, f"{fmt.upper()} header", reason="malformed"):
        n_frames = int(getattr(im, "n_frames", 1) or 1)
        pages = 1
        if fmt == "tiff" and n_frames > 1:
            # A volume only if every page matches the first (not, say, a pyramid's thumbnails).
            for i in range(1, n_frames):
                im.seek(i)
                if im.size != (width, height) or im.mode != mode:
                    break
            else:
                pages = n_frames
            im.seek(0)
    spatial = (pages, height, width) if pages > 1 else (height, width)
    check_shape(spatial, channels, limits, path, what=f"{fmt.upper()} image")
    check_memory(
        pages * height * width * channels,
        _MODE_BYTES.get(mode, 1),
        limits,
        path,
        what=f"{fmt.upper()} image",
        compressed_bytes=path.stat().st_size,
    )
    if png is not None:
        _check_png_image_data(path, png)
    elif fmt == "jpeg":
        _count_jpeg_scans(path, limits)

    # Orientation is per page; the first page's is what gets reported.
    meta: dict[str, Any] = {
        "mode": mode,
        "decoder": "pillow",
        "exif_transposed": _orientation(im) in range(2, 9),
    }
    if n_frames > pages:
        meta["frames_ignored"] = n_frames - pages
    if fmt == "png" and _png_colour_16bit(path):
        meta["precision_reduced"] = True  # Pillow decodes 16-bit RGB(A)/LA PNG at 8 bits per channel

    arrays = []
    for i in range(pages):
        with library_errors(path, f"{fmt.upper()} pixel data"):
            if i:
                im.seek(i)
            try:
                im.load()
            except OSError as exc:
                if "truncated" in str(exc).lower():
                    raise reject(f"the {fmt.upper()} file is truncated ({exc})", "truncated", path) from None
                raise
            # PNG/JPEG EXIF orientation (oriented TIFFs never reach here, see _needs_tifffile). Without one,
            # exif_transpose would only copy the image.
            oriented = meta["exif_transposed"] if i == 0 else _orientation(im) in range(2, 9)
            page = ImageOps.exif_transpose(im) if oriented else im
            if page.mode in _GREY_CONVERT:
                page = page.convert("L")
            elif page.mode in _RGB_CONVERT:
                page = page.convert("RGB")
            if pages == 1 and page.mode == "RGB":
                tolerance = _JPEG_GREY_TOLERANCE if fmt == "jpeg" else 0.0
                grey = _grey_of_rgb_page(page, tolerance)
                if grey is not None:
                    meta["was_rgb_grey"] = True
                    return Image(grey[np.newaxis], (1.0, 1.0), fmt, meta)
            arrays.append(np.asarray(page))
    arr = np.stack(arrays)  # (pages, H, W) or (pages, H, W, 3)
    pixels = (
        arr[np.newaxis].astype(np.float32) if arr.ndim == 3 else np.moveaxis(arr, -1, 0).astype(np.float32)
    )
    pixels = collapse_grey(pixels, meta, tolerance=_JPEG_GREY_TOLERANCE if fmt == "jpeg" else 0.0)
    if pages == 1:
        pixels = pixels[:, 0]
    return Image(np.ascontiguousarray(pixels), (1.0,) * (pixels.ndim - 1), fmt, meta)


def _grey_of_rgb_page(page: PILImage.Image, tolerance: float) -> np.ndarray | None:
    """The single channel of an 8-bit RGB page whose channels agree within ``tolerance`` (else None).

    The same answer as ``collapse_grey`` on the float32 RGB array, bit for bit, at a fraction of the cost:
    greyscale scans saved as RGB JPEGs are the common case (most of the brain MRI set), and the comparison
    and channel sum run on uint8/uint16 in Pillow and numpy instead of three float32 planes."""
    r, g, b = page.split()
    if (
        # One band: getextrema() is (min, max); its stub also allows the per-band pairs of a multi-band image.
        max(ImageChops.difference(r, g).getextrema()[1], ImageChops.difference(g, b).getextrema()[1])
        > tolerance  # type: ignore[operator]
    ):
        return None
    if tolerance <= 0:
        return np.asarray(r, dtype=np.float32)
    # ((r + g) + b) / 3 in float32, as collapse_grey computes it: the integer sum is exact in both.
    total = np.asarray(r, dtype=np.uint16) + np.asarray(g, dtype=np.uint16) + np.asarray(b, dtype=np.uint16)
    return total.astype(np.float32) / np.float32(3)


def _orientation(im: PILImage.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1


def _png_colour_16bit(path: Path) -> bool:
    with open(path, "rb") as fh:
        ihdr = fh.read(26)
    # IHDR data starts at byte 16: width, height, bit depth (24), colour type (25: 2 RGB, 4 LA, 6 RGBA).
    return len(ihdr) == 26 and ihdr[24] == 16 and ihdr[25] in (2, 4, 6)


# TIFF orientation tag -> the numpy equivalent of Pillow's exif_transpose, on the last two axes.
def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    h, w = arr.ndim - 2, arr.ndim - 1
    ops = {
        2: lambda a: np.flip(a, w),
        3: lambda a: np.flip(a, (h, w)),
        4: lambda a: np.flip(a, h),
        5: lambda a: np.swapaxes(a, h, w),
        6: lambda a: np.rot90(a, -1, (h, w)),
        7: lambda a: np.flip(np.swapaxes(a, h, w), (h, w)),
        8: lambda a: np.rot90(a, 1, (h, w)),
    }
    return ops[orientation](arr) if orientation in ops else arr


def _photometric_name(value: int) -> str:
    try:
        return tifffile.PHOTOMETRIC(value).name
    except ValueError:
        return str(value)


def _read_tifffile(path: Path, limits: ReadLimits) -> Image:
    with library_errors(path, "TIFF header", reason="malformed"), tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        page = tif.pages.first
        shape, axes, dtype = tuple(int(s) for s in series.shape), str(series.axes), series.dtype
        photometric = int(page.photometric)
        extrasamples = tuple(page.extrasamples)
        tag = page.tags.get(274)  # Orientation
        orientation = int(tag.value) if tag is not None else 1
        compressed = int(page.compression) != 1
    if dtype.kind not in "biuf":
        raise reject(f"TIFF sample type {dtype} is not supported", "unsupported_dtype", path)
    if "Y" not in axes or "X" not in axes:
        raise reject(f"TIFF layout {axes} {shape} is not an image", "unsupported_layout", path)
    samples = shape[axes.index("S")] if "S" in axes else 1
    rgb = photometric == tifffile.PHOTOMETRIC.RGB
    if rgb and samples >= 3:
        channels = 3  # RGB plus any alpha / extra samples, which are dropped
    elif photometric == tifffile.PHOTOMETRIC.MINISBLACK and (
        samples == 1 or samples - len(extrasamples) == 1
    ):
        channels = 1
    else:
        raise reject(
            f"TIFF with photometric interpretation {_photometric_name(photometric)} and {samples} samples per pixel "
            "is not supported",
            "unsupported_layout",
            path,
        )
    others = [(i, a) for i, a in enumerate(axes) if a not in "SYX" and shape[i] > 1]
    if len(others) > 1:
        raise reject(f"TIFF with dimensions {axes} {shape} is not supported", "unsupported_layout", path)
    depth = shape[others[0][0]] if others else 1
    height, width = shape[axes.index("Y")], shape[axes.index("X")]
    spatial = (depth, height, width) if depth > 1 else (height, width)
    check_shape(spatial, channels, limits, path, what="TIFF image")
    check_memory(
        depth * height * width * samples,
        dtype.itemsize,
        limits,
        path,
        what="TIFF image",
        compressed_bytes=path.stat().st_size if compressed else None,
    )

    with library_errors(path, "TIFF pixel data"):
        arr = tifffile.imread(path, series=0)
    # Reorder to (S, other, Y, X) whatever the stored axis order, then keep the channels we use.
    order = [axes.index("S")] if "S" in axes else []
    order += [others[0][0]] if others else []
    order += [axes.index("Y"), axes.index("X")]
    rest = [i for i in range(arr.ndim) if i not in order]  # singleton axes
    arr = np.transpose(arr, order + rest).reshape([arr.shape[i] for i in order])
    if "S" not in axes:
        arr = arr[np.newaxis]
    arr = arr[:channels]
    if not others:
        arr = arr[:, np.newaxis]
    pixels = _orient(arr, orientation).astype(np.float32)  # (C, D, H, W)
    meta: dict[str, Any] = {
        "mode": f"{'RGB' if channels == 3 else 'L'};{dtype.name}",
        "decoder": "tifffile",
        "exif_transposed": orientation in range(2, 9),
    }
    pixels = collapse_grey(pixels, meta)
    if depth == 1:
        pixels = pixels[:, 0]
    return Image(np.ascontiguousarray(pixels), (1.0,) * (pixels.ndim - 1), "tiff", meta)


# ----------------------------------------------------------------------------------------------------
# structure checks that need no decoding


def _region(path: Path, start: int, length: int) -> Iterator[bytes]:
    """The bytes ``[start, start + length)`` of a file, in pieces of at most 1 MiB."""
    with open(path, "rb") as fh:
        fh.seek(start)
        while length > 0:
            block = fh.read(min(length, 1 << 20))
            if not block:
                return
            length -= len(block)
            yield block


def _png_raw_size(width: int, height: int, depth: int, colour: int, interlaced: bool) -> int:
    """Bytes the IDAT stream must inflate to: filtered scanlines, one filter byte per row."""
    bits = depth * _PNG_CHANNELS[colour]

    def rows(w: int, h: int) -> int:
        return 0 if w <= 0 or h <= 0 else h * (1 + (w * bits + 7) // 8)

    if not interlaced:
        return rows(width, height)
    return sum(rows((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy) for x0, y0, dx, dy in _ADAM7)


@dataclass(frozen=True)
class _PngLayout:
    width: int
    height: int
    depth: int
    colour: int
    interlaced: bool
    idat: tuple[tuple[int, int], ...]  # (offset, length) of every IDAT chunk's data


def _png_structure(path: Path) -> _PngLayout:
    """Walk the PNG chunks: lengths inside the file, a valid IHDR first, image data present, and the
    compressed text/ICC chunks inflating (counted, not kept) to no more than Pillow's 1 MiB cap, so a text
    bomb is refused as one instead of failing inside Pillow. Reads no image data.
    """
    size = path.stat().st_size
    idat: list[tuple[int, int]] = []
    header: tuple[int, int, int, int, bool] | None = None
    pos, count = 8, 0
    with open(path, "rb") as fh:
        while True:
            fh.seek(pos)
            head = fh.read(8)
            if len(head) < 8:
                raise reject("the PNG file ends before its IEND chunk", "truncated", path)
            length, kind = struct.unpack(">I4s", head)
            name = kind.decode("latin-1")
            if length > 0x7FFFFFFF or not kind.isalpha():
                raise reject(f"invalid PNG chunk {name!r} of length {length}", "malformed", path)
            if pos + 12 + length > size:
                raise reject(
                    f"the PNG chunk {name} declares {length} bytes, past the end of the file",
                    "truncated",
                    path,
                )
            count += 1
            if count == 1 and (kind != b"IHDR" or length != 13):
                raise reject("the PNG file does not start with a valid IHDR chunk", "malformed", path)
            if count > _PNG_MAX_CHUNKS:
                raise reject(f"the PNG file has more than {_PNG_MAX_CHUNKS} chunks", "malformed", path)
            if kind == b"IHDR":
                ihdr = fh.read(13)
                if len(ihdr) < 13:  # the size was checked above: the file shrank since
                    raise reject("the PNG file ends inside its IHDR chunk", "truncated", path)
                width, height, depth, colour, _comp, _filt, interlace = struct.unpack(">IIBBBBB", ihdr)
                if colour not in _PNG_DEPTHS or depth not in _PNG_DEPTHS[colour] or interlace > 1:
                    raise reject(
                        f"invalid PNG header: bit depth {depth}, colour type {colour}, interlace {interlace}",
                        "inconsistent_header",
                        path,
                    )
                header = (width, height, depth, colour, interlace == 1)
            elif kind == b"IDAT":
                idat.append((pos + 8, length))
            elif kind in (b"zTXt", b"iCCP", b"iTXt"):
                _check_png_text(path, fh, kind, pos + 8, length)
            elif kind == b"IEND":
                break
            pos += 12 + length
    if header is None or not idat:
        raise reject("the PNG file has no image data (IDAT)", "malformed", path)
    return _PngLayout(*header, idat=tuple(idat))


def _check_png_image_data(path: Path, png: _PngLayout) -> None:
    """Inflate (counting only) the image data, once the header passed the memory check: refuse a stream
    that is longer than IHDR declares (a bomb behind a small header) or shorter (truncated)."""
    expected = _png_raw_size(png.width, png.height, png.depth, png.colour, png.interlaced)
    slack = 65536  # trailing bytes after a whole image are tolerated, as by libpng

    def pieces() -> Iterator[bytes]:
        for start, length in png.idat:
            yield from _region(path, start, length)

    try:
        inflated, _complete = inflated_size(pieces(), expected + slack)
    except zlib.error as exc:
        raise reject(f"the PNG image data is corrupt ({exc})", "decode_failed", path) from None
    if inflated > expected + slack:
        raise reject(
            f"the PNG image data inflates to more than the {expected} bytes its header declares",
            "decompression_bomb",
            path,
        )
    if inflated < expected:
        raise reject(
            f"the PNG image data holds {inflated} of the {expected} bytes its header declares",
            "truncated",
            path,
        )


def _check_tiff_directories(path: Path, limits: ReadLimits) -> None:
    """Follow the chain of image directories (IFDs): each must lie inside the file, and it must not loop
    (a loop sends naive readers into an endless walk) or run longer than ``limits.max_dim`` pages."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
        if len(head) < 16:
            raise reject("the TIFF file ends inside its header", "truncated", path)
        endian = "<" if head[:2] == b"II" else ">"
        big = struct.unpack(endian + "H", head[2:4])[0] == 43
        count_fmt, entry_size, pointer_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
        offset = struct.unpack(endian + ("Q" if big else "I"), head[8:16] if big else head[4:8])[0]
        seen: set[int] = set()
        while offset:
            if offset in seen:
                raise reject("the TIFF's chain of image directories loops", "malformed", path)
            if len(seen) >= limits.max_dim:
                raise reject(f"the TIFF has more than {limits.max_dim} pages", "too_large", path)
            seen.add(offset)
            count_size = struct.calcsize(count_fmt)
            if offset + count_size > size:
                raise reject("a TIFF image directory lies past the end of the file", "truncated", path)
            fh.seek(offset)
            n = struct.unpack(endian + count_fmt, _exact(fh, count_size, path))[0]
            next_at = offset + count_size + n * entry_size
            if next_at + struct.calcsize(pointer_fmt) > size:
                raise reject("a TIFF image directory runs past the end of the file", "truncated", path)
            fh.seek(next_at)
            offset = struct.unpack(endian + pointer_fmt, _exact(fh, struct.calcsize(pointer_fmt), path))[0]


def _exact(fh: Any, n: int, path: Path) -> bytes:
    """``n`` bytes, or a refusal: the file ended earlier than the size checked before (cut short since)."""
    data = fh.read(n)
    if len(data) < n:
        raise reject(
            "the file ends earlier than its size said (truncated while being read)", "truncated", path
        )
    return data


def _check_png_text(path: Path, fh: Any, kind: bytes, start: int, length: int) -> None:
    fh.seek(start)
    prefix = fh.read(min(length, 240))
    sep = prefix.find(b"\x00")
    if sep < 0:
        return  # Pillow ignores (or rejects) such a chunk itself
    if kind == b"iTXt":
        if len(prefix) < sep + 3 or prefix[sep + 1] != 1:
            return  # uncompressed international text
        lang_end = prefix.find(b"\x00", sep + 3)
        tkey_end = prefix.find(b"\x00", lang_end + 1) if lang_end >= 0 else -1
        if tkey_end < 0:
            return
        data_start = tkey_end + 1
    else:
        data_start = sep + 2  # keyword, NUL, compression method
    cap = PngImagePlugin.MAX_TEXT_CHUNK
    try:
        inflated, _ = inflated_size(_region(path, start + data_start, length - data_start), cap)
    except zlib.error:
        return  # Pillow skips corrupt text; a corrupt ICC profile is its decode error
    if inflated > cap:
        raise reject(
            f"the PNG {kind.decode()} chunk inflates to more than {cap} bytes (a text or ICC profile bomb)",
            "decompression_bomb",
            path,
        )


def _count_jpeg_scans(path: Path, limits: ReadLimits) -> None:
    """Refuse JPEGs with more scans than ``limits.max_jpeg_scans``.

    0xFF 0xDA (start of scan) cannot occur inside entropy-coded data (every 0xFF there is followed by 0x00
    or a restart marker), so counting it overestimates only by the scans of embedded thumbnails.
    """
    scans = count_in_file(path, b"\xff\xda", stop_after=limits.max_jpeg_scans)
    if scans > limits.max_jpeg_scans:
        raise reject(
            f"the JPEG has more than {limits.max_jpeg_scans} scans; each scan re-decodes the image "
            "(a CPU exhaustion attack)",
            "too_many_scans",
            path,
        )
