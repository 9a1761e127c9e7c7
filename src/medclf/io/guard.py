"""What every reader checks before it trusts a file: size, format by content, header dimensions.

Everything here works on bytes and header values only, so a hostile or broken file is refused before any
pixel is decoded. Every refusal is an :class:`~medclf.errors.InputRejected` whose ``reason`` is one of:

=========================  ===================================================================
``not_found``              the path does not exist
``not_a_file``             the path is a folder, a device, a FIFO or a socket
``symlink_loop``           the path is a symbolic link that loops (or a chain too long to follow)
``unreadable``             the file exists but cannot be opened (permissions, I/O error)
``empty``                  zero bytes
``file_too_large``         more bytes than ``ReadLimits.max_file_bytes``
``unsupported_format``     the content is none of DICOM, NIfTI, PNG, JPEG, TIFF, NPZ
``too_large``              the header declares more voxels, a longer side or more data than allowed,
                           or decoding it would need more memory than ``ReadLimits.max_memory_bytes``
``too_small``              an in-plane side shorter than ``ReadLimits.min_side``
``aspect_ratio``           an in-plane aspect ratio above ``ReadLimits.max_aspect_ratio``
``too_many_channels``      more channels than ``ReadLimits.max_channels``
``decompression_bomb``     compressed data that would inflate past the memory limit (a tiny file declaring
                           a huge image, a PNG/gzip/deflate stream longer than its header allows, a
                           PNG text or ICC chunk bomb) or a decoder's own bomb guard fired
``too_many_scans``         a JPEG with more scans than ``ReadLimits.max_jpeg_scans`` (CPU exhaustion)
``timeout``                decoding took longer than ``ReadLimits.max_seconds``
``executable_preamble``    a DICOM preamble holding an executable or script header (CVE-2019-11687)
``element_beyond_file``    a DICOM data element whose declared length runs past the end of the file
``malformed``              the header cannot be parsed
``inconsistent_header``    header values contradict each other, the format's rules or the stored data
                           (e.g. DICOM Rows x Columns x BitsAllocated vs the pixel data length)
``truncated``              the file ends before the pixel data it declares
``decode_failed``          the pixel data could not be decoded (or a reader failed in a way no check foresaw)
``changed_while_reading``  the file was rewritten, truncated or replaced while it was being read
``unsupported_*``          a valid file using a feature medclf does not handle (compression,
                           photometric interpretation, dtype, layout)
``no_pixels``              a valid file with no image in it (e.g. a DICOM structured report)
``nonfinite``              every value is NaN or infinite
``pickle``                 an ``.npz`` holding object (pickled) arrays; never loaded
``dataset_npz``            a MedMNIST-style dataset ``.npz``: use it as data, not as one image
``ambiguous_npz``          an ``.npz`` with several arrays and none named ``image``
=========================  ===================================================================
"""

from __future__ import annotations

import errno
import gzip
import math
import os
import re
import signal
import struct
import threading
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medclf.errors import InputRejected

FORMATS = ("dicom", "nifti", "png", "jpeg", "tiff", "npz")

_GIB = 1 << 30
_HEAD_BYTES = 1024  # enough for the DICOM preamble + first elements and a NIfTI-2 header (540)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
#: Environment variable that overrides the default read memory ceiling (bytes, or e.g. ``2G``, ``512M``).
MEMORY_ENV = "MEDCLF_MAX_READ_MEMORY"


def parse_bytes(text: str) -> int:
    """``"1G"`` -> 1073741824; plain integers are bytes; K/M/G/T are powers of 1024 (``B``/``iB`` allowed)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"cannot read the size {text!r} (examples: 1073741824, 512M, 2G)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def _default_memory() -> int:
    value = os.environ.get(MEMORY_ENV, "").strip()
    return parse_bytes(value) if value else _GIB


@dataclass(frozen=True)
class ReadLimits:
    """Bounds a file must satisfy, checked from its header before pixels are decoded.

    ``max_pixels`` counts every stored value: rows x columns x frames (or slices) x channels.
    ``min_side`` and ``max_aspect_ratio`` apply to the in-plane (last two) axes: a 1x1 or 3x4000 image is
    almost certainly an icon, a mistake or an attack, not a medical image. ``max_npz_bytes`` bounds the
    total decoded size of all arrays in an ``.npz`` (dataset files hold many images).

    ``max_memory_bytes`` (default 1 GiB, or ``$MEDCLF_MAX_READ_MEMORY``) bounds the memory one read may
    need. It is enforced from the header, before decoding, with the estimate of :func:`decode_memory`, and
    it also caps every stream medclf inflates itself (gzip NIfTI, PNG deflate, deflated DICOM).
    ``max_seconds`` bounds the wall time of one read (see :func:`read_deadline`; ``None`` disables it).
    ``max_jpeg_scans`` bounds the number of scans of a JPEG: each scan re-decodes the whole image, so a
    file of many tiny scans costs minutes of CPU (a "scan bomb"); real progressive JPEGs have about 10.
    """

    max_file_bytes: int = 2 * _GIB
    max_pixels: int = 512 * 1024 * 1024
    max_dim: int = 65535
    min_side: int = 8
    max_aspect_ratio: float = 50.0
    max_channels: int = 4
    max_npz_bytes: int = 8 * _GIB
    max_memory_bytes: int = field(default_factory=_default_memory)
    max_seconds: float | None = 30.0
    max_jpeg_scans: int = 1000

    def __post_init__(self) -> None:
        for name in (
            "max_file_bytes",
            "max_pixels",
            "max_dim",
            "min_side",
            "max_channels",
            "max_npz_bytes",
            "max_memory_bytes",
            "max_jpeg_scans",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ReadLimits.{name} must be at least 1")
        if not self.max_aspect_ratio >= 1:
            raise ValueError("ReadLimits.max_aspect_ratio must be at least 1")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError("ReadLimits.max_seconds must be positive (or None)")


@dataclass(frozen=True)
class Sniffed:
    """The outcome of content sniffing: the format plus how the reader must open it."""

    format: str
    gzipped: bool = False  # NIfTI inside a gzip stream
    bare_dicom: bool = False  # DICOM data set without the 128-byte preamble and "DICM"


def reject(message: str, reason: str, path: str | Path | None) -> InputRejected:
    """Build the one exception type readers raise (``raise reject(...)`` keeps call sites short)."""
    return InputRejected(message, reason=reason, path=str(path) if path is not None else None)


def check_file(path: Path, limits: ReadLimits | None) -> int:
    """Refuse missing, non-regular, empty or (with ``limits``) oversized files; return the size in bytes."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise reject("a symbolic link to a file that does not exist", "not_found", path) from None
        raise reject("no such file", "not_found", path) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise reject(
                "a symbolic link that loops (too many levels of links)", "symlink_loop", path
            ) from None
        raise reject(f"cannot read file: {exc.strerror or exc}", "unreadable", path) from None
    if path.is_dir():
        raise reject("is a folder, not an image file", "not_a_file", path)
    if not path.is_file():
        raise reject("is not a regular file", "not_a_file", path)
    if st.st_size == 0:
        raise reject("the file is empty (0 bytes)", "empty", path)
    if limits is not None and st.st_size > limits.max_file_bytes:
        raise reject(
            f"the file has {st.st_size} bytes, more than the limit of {limits.max_file_bytes}",
            "file_too_large",
            path,
        )
    return int(st.st_size)


def _read_head(path: Path, n: int = _HEAD_BYTES) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError as exc:
        raise reject(f"cannot read file: {exc.strerror or exc}", "unreadable", path) from None


def _nifti_header_kind(head: bytes) -> int | None:
    """1 or 2 when ``head`` starts a single-file NIfTI (``n+1`` / ``n+2``), else None."""
    if len(head) >= 348:
        for endian in "<>":
            if struct.unpack(endian + "i", head[:4])[0] == 348 and head[344:348] == b"n+1\x00":
                return 1
    if len(head) >= 540:
        for endian in "<>":
            if struct.unpack(endian + "i", head[:4])[0] == 540 and head[4:8] == b"n+2\x00":
                return 2
    return None


def _element_at(head: bytes, pos: int, endian: str) -> tuple[int, int, int] | None:
    """Parse one data element header at ``pos``: (group, value length, next position), or None."""
    from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR  # lazy: pydicom is a heavy import

    if pos + 8 > len(head):
        return None
    group, _elem = struct.unpack(endian + "HH", head[pos : pos + 4])
    vr = head[pos + 4 : pos + 6]
    try:
        vr_name = vr.decode("ascii")
    except UnicodeDecodeError:
        vr_name = ""
    if vr_name in VR.__members__:
        if VR(vr_name) in EXPLICIT_VR_LENGTH_32:
            if pos + 12 > len(head) or head[pos + 6 : pos + 8] != b"\x00\x00":
                return None
            length = struct.unpack(endian + "I", head[pos + 8 : pos + 12])[0]
            start = pos + 12
        else:
            length = struct.unpack(endian + "H", head[pos + 6 : pos + 8])[0]
            start = pos + 8
    elif endian == "<":  # implicit VR is little endian only
        length = struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        start = pos + 8
    else:
        return None
    return group, length, start + length


def _looks_like_bare_dicom(head: bytes, size: int) -> bool:
    """True only for data sets that plainly start with a file meta (0002) or identifying (0008) element.

    Old or hand-made DICOM files may lack the preamble. We accept them only when the first two element
    headers parse, belong to group 0002 or 0008 and have short values that fit in the file, so that random
    data is never handed to pydicom's permissive ``force=True`` parser.
    """
    for endian in "<>":
        first = _element_at(head, 0, endian)
        if first is None:
            continue
        group, length, nxt = first
        if group not in (0x0002, 0x0008) or (group == 0x0002 and endian == ">"):
            continue  # the file meta group is always little endian
        if length > 1024 or nxt > size:  # the first elements of these groups are short strings or UL
            continue
        second = _element_at(head, nxt, endian)
        if second is None or nxt + 8 > size:
            continue
        group2, length2, nxt2 = second
        if group2 in (group, 0x0008) and (length2 == 0xFFFFFFFF or nxt2 <= size):
            return True
    return False


def _peek_gzip(path: Path, n: int = 544) -> bytes:
    """The first ``n`` decompressed bytes of a gzip file (never the whole stream)."""
    try:
        with gzip.open(path, "rb") as gz:
            return gz.read(n)
    except Exception as exc:  # BadGzipFile (OSError), EOFError, zlib.error, ...
        raise reject(f"a gzip file that cannot be decompressed ({exc})", "malformed", path) from None


def _is_npz(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except Exception:  # zipfile raises several types (BadZipFile, NotImplementedError, ...) on junk
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def sniff(path: Path, size: int | None = None) -> Sniffed:
    """Decide the format from the file's bytes; the file name is never consulted."""
    head = _read_head(path)
    if not head:
        raise reject("the file is empty (0 bytes)", "empty", path)
    size = len(head) if size is None else size
    # The DICOM check comes first: a DICOM preamble may legally contain another format's magic.
    if len(head) >= 132 and head[128:132] == b"DICM":
        return Sniffed("dicom")
    if _nifti_header_kind(head):
        return Sniffed("nifti")
    if head.startswith(_PNG_MAGIC):
        return Sniffed("png")
    if head.startswith(_JPEG_MAGIC):
        return Sniffed("jpeg")
    if head[:4] in _TIFF_MAGICS:
        return Sniffed("tiff")
    if head.startswith(_GZIP_MAGIC):
        if _nifti_header_kind(_peek_gzip(path)):
            return Sniffed("nifti", gzipped=True)
        raise reject("a gzip file that does not contain a NIfTI image", "unsupported_format", path)
    if head.startswith(_ZIP_MAGIC):
        if _is_npz(path):
            return Sniffed("npz")
        raise reject("a ZIP archive that is not a readable NumPy .npz file", "unsupported_format", path)
    if _looks_like_bare_dicom(head, size):
        return Sniffed("dicom", bare_dicom=True)
    raise reject(
        "unsupported or unrecognised file content (expected DICOM, NIfTI, PNG, JPEG, TIFF or NPZ)",
        "unsupported_format",
        path,
    )


def sniff_format(path: str | Path) -> str:
    """Return the format of ``path`` by content: one of :data:`FORMATS`; else raise InputRejected."""
    p = Path(path)
    size = check_file(p, None)
    return sniff(p, size).format


def check_shape(
    spatial: Sequence[int], channels: int, limits: ReadLimits, path: str | Path | None, what: str = "image"
) -> None:
    """Refuse dimensions outside ``limits``; ``spatial`` is (H, W) or (D, H, W), in-plane last."""
    dims = [int(s) for s in spatial]
    if len(dims) < 2 or any(d < 1 for d in dims) or channels < 1:
        raise reject(
            f"the {what} has invalid dimensions {tuple(dims)} x {channels} channels",
            "inconsistent_header",
            path,
        )
    if max(dims) > limits.max_dim:
        raise reject(
            f"the {what} declares a side of {max(dims)} pixels, more than the limit of {limits.max_dim}",
            "too_large",
            path,
        )
    total = math.prod(dims) * int(channels)
    if total > limits.max_pixels:
        raise reject(
            f"the {what} declares {total} values ({' x '.join(map(str, dims))} x {channels} channels), "
            f"more than the limit of {limits.max_pixels}",
            "too_large",
            path,
        )
    if channels > limits.max_channels:
        raise reject(
            f"the {what} has {channels} channels, more than the limit of {limits.max_channels}",
            "too_many_channels",
            path,
        )
    h, w = dims[-2:]
    if min(h, w) < limits.min_side:
        raise reject(
            f"the {what} is {h} x {w} pixels; each side must be at least {limits.min_side}", "too_small", path
        )
    if max(h, w) / min(h, w) > limits.max_aspect_ratio:
        raise reject(
            f"the {what} is {h} x {w} pixels, an aspect ratio above {limits.max_aspect_ratio:g}",
            "aspect_ratio",
            path,
        )


# Peak memory of a read, per decoded value, beyond the stored bytes: the float32 result plus the
# decoders' and display pipelines' intermediate copies. Measured peaks (4000 x 4000 images, 256^3 volumes):
# 5-8 bytes/value for NIfTI and NPZ, 8-15 for PNG/JPEG/TIFF, 17 for 16-bit DICOM (its LUT step is float64).
_WORK_BYTES_PER_VALUE = 16
# Deflate cannot expand data more than ~1032x; legitimate medical images stay far below this ratio.
_BOMB_RATIO = 100


def decode_memory(values: int, stored_bytes_per_value: float) -> int:
    """Estimated peak memory (bytes) of decoding ``values`` stored values of the given width."""
    return int(values * (stored_bytes_per_value + _WORK_BYTES_PER_VALUE))


def check_memory(
    values: int,
    stored_bytes_per_value: float,
    limits: ReadLimits,
    path: str | Path | None,
    *,
    what: str = "image",
    compressed_bytes: int | None = None,
) -> None:
    """Refuse, before decoding, an image whose decoding would need more than ``limits.max_memory_bytes``.

    ``compressed_bytes`` is the size of the compressed data when the pixels are compressed: if they would
    inflate more than 100-fold past the limit, the refusal says ``decompression_bomb``, else ``too_large``.
    """
    need = decode_memory(values, stored_bytes_per_value)
    if need <= limits.max_memory_bytes:
        return
    mib = 1 << 20
    raw = int(values * stored_bytes_per_value)
    bomb = compressed_bytes is not None and raw > _BOMB_RATIO * max(compressed_bytes, 1)
    detail = f" from {compressed_bytes} bytes of compressed data" if bomb else ""
    raise reject(
        f"decoding the {what} ({values} values{detail}) would need about {need // mib} MiB, more than the "
        f"read memory limit of {limits.max_memory_bytes // mib} MiB (ReadLimits.max_memory_bytes, "
        f"${MEMORY_ENV})",
        "decompression_bomb" if bomb else "too_large",
        path,
    )


def count_in_file(path: Path, needle: bytes, *, stop_after: int | None = None) -> int:
    """How many times ``needle`` (a marker that cannot overlap itself) occurs in the file; counting stops
    once it exceeds ``stop_after``.

    Reads 1 MiB blocks rather than mapping the file: reading a mapped file that another process truncates
    meanwhile kills the reading process with SIGBUS, with no exception to turn into a refusal.
    """
    count, tail = 0, b""
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            window = tail + block  # a marker split across two blocks is found in the overlap
            count += window.count(needle)
            if stop_after is not None and count > stop_after:
                break
            tail = window[-(len(needle) - 1) :] if len(needle) > 1 else b""
    return count


def inflated_size(pieces: Iterable[bytes], cap: int, *, wbits: int = zlib.MAX_WBITS) -> tuple[int, bool]:
    """Inflate a deflate/zlib/gzip stream given in pieces without keeping the output.

    Returns ``(bytes produced, reached the end of the stream)``. Stops as soon as more than ``cap`` bytes
    came out, so a bomb costs at most ``cap`` bytes of CPU work and 1 MiB of memory. Raises ``zlib.error``
    on corrupt data.
    """
    inflater = zlib.decompressobj(wbits)
    total = 0
    for piece in pieces:
        data = piece
        while data:
            total += len(inflater.decompress(data, 1 << 20))
            if total > cap:
                return total, False
            if inflater.eof:
                return total, True
            data = inflater.unconsumed_tail
    return total, inflater.eof


# Executable or script headers that have no business in a DICOM preamble (CVE-2019-11687: a file that is
# at once a valid DICOM object and a Windows PE program). The standard allows other preambles (TIFF).
_EXECUTABLE_MAGICS = {
    b"MZ": "a Windows/DOS executable (PE)",
    b"\x7fELF": "a Linux executable (ELF)",
    b"\xfe\xed\xfa\xce": "a macOS executable (Mach-O)",
    b"\xfe\xed\xfa\xcf": "a macOS executable (Mach-O)",
    b"\xce\xfa\xed\xfe": "a macOS executable (Mach-O)",
    b"\xcf\xfa\xed\xfe": "a macOS executable (Mach-O)",
    b"\xca\xfe\xba\xbe": "a macOS universal binary or Java class",
    b"#!": "a script",
    b"PK\x03\x04": "a ZIP/JAR archive",
}


def executable_preamble(preamble: bytes) -> str | None:
    """What executable format a DICOM preamble's first bytes announce, or None."""
    for magic, kind in _EXECUTABLE_MAGICS.items():
        if preamble.startswith(magic):
            return kind
    return None


def check_preamble(path: Path) -> None:
    """Refuse a DICOM file whose 128-byte preamble starts with an executable header (CVE-2019-11687)."""
    kind = executable_preamble(_read_head(path, 128))
    if kind:
        raise reject(
            f"the DICOM preamble holds {kind} header: a file that is both DICOM and a program "
            "(CVE-2019-11687) is refused; `medclf deid` writes a copy with the preamble zeroed",
            "executable_preamble",
            path,
        )


class _ReadTimeout(BaseException):
    """Raised by the watchdog inside whatever decoder is running; a BaseException so no library eats it."""


@contextmanager
def read_deadline(seconds: float | None, path: str | Path | None) -> Iterator[None]:
    """Interrupt the enclosed read after ``seconds`` of wall time: InputRejected(reason="timeout").

    A SIGALRM interval timer, so it only works in the main thread of a process (the CLI, training's and
    audit's worker processes); elsewhere (a server's worker threads) and when another ITIMER_REAL is already
    running it does nothing, and the caller must bound time itself (e.g. run reads in a worker process).
    Python checks for signals between bytecodes, so a single long call inside a C decoder finishes first:
    the header limits bound such calls.
    """
    usable = (
        seconds is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    )
    if not usable:
        yield
        return

    def expire(_signum: int, _frame: Any) -> None:
        raise _ReadTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))  # type: ignore[arg-type]
    try:
        yield
    except _ReadTimeout:
        raise reject(
            f"reading the file took longer than the limit of {seconds:g} s (ReadLimits.max_seconds)",
            "timeout",
            path,
        ) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # Library messages can quote header values; keep them short.
    return text if len(text) <= 200 else text[:197] + "..."


@contextmanager
def library_errors(path: str | Path, what: str, reason: str = "decode_failed") -> Iterator[None]:
    """Turn whatever a third-party decoder raises into InputRejected(reason).

    pydicom, Pillow, nibabel, zlib and numpy raise a zoo of types on malformed input (ValueError, OSError,
    EOFError, struct.error, KeyError, AttributeError, ...); callers of :func:`read_image` must only ever see
    InputRejected. Wrap library calls only, not medclf's own logic, so real bugs still surface.
    """
    try:
        yield
    except (InputRejected, _ReadTimeout):
        raise
    except MemoryError:
        raise reject(f"not enough memory to decode the {what}", "too_large", path) from None
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        # BaseException, not Exception: Rust-based decoders (pylibjpeg-rle via pyo3) signal a panic on
        # malformed data with pyo3's PanicException, which derives from BaseException.
        raise reject(f"cannot decode the {what}: {_describe(exc)}", reason, path) from exc


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of a file: device, inode, size and modification time (ns)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | Path) -> FileStamp | None:
        """The stamp of ``path`` now, or None when it cannot be stat'ed (gone, unreadable)."""
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def check_unchanged(path: str | Path, before: FileStamp | None) -> None:
    """Refuse a file whose stamp differs from ``before``: it was rewritten or replaced during the read, so
    what was decoded may mix two versions (or one version checked and another decoded)."""
    if changed_since(path, before):
        raise _changed_error(path)


def changed_since(path: str | Path, before: FileStamp | None) -> bool:
    return before is not None and FileStamp.of(path) != before


def _changed_error(path: str | Path) -> InputRejected:
    return reject(
        "the file changed while it was being read (rewritten, truncated or replaced); read it again once "
        "it is complete",
        "changed_while_reading",
        path,
    )


@contextmanager
def reader_errors(path: str | Path, before: FileStamp | None = None) -> Iterator[None]:
    """The one choke point of :func:`medclf.io.read_image` and the ``.npz`` readers: whatever a reader
    raises becomes InputRejected for this file only.

    Readers turn the failures they foresee into specific refusals (:func:`library_errors` around library
    calls). What still escapes (``struct.error``, ``OSError``, ``ValueError``, ``IndexError`` ... from
    reading a file that another process is rewriting, or from damage no check anticipated) must not end a
    folder's prediction or an audit with a traceback: it is refused as ``changed_while_reading`` when the
    file's stamp moved since ``before``, else as ``decode_failed``, with the original exception chained.
    """
    try:
        yield
    except (InputRejected, _ReadTimeout):
        raise
    except MemoryError:
        raise reject("not enough memory to read the file", "too_large", path) from None
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # BaseException: see library_errors (pyo3 panics)
        if changed_since(path, before):
            raise _changed_error(path) from exc
        raise reject(
            f"cannot read the file ({type(exc).__name__}: {_describe(exc)})", "decode_failed", path
        ) from exc


def replace_nonfinite(pixels: np.ndarray, meta: dict[str, Any], path: str | Path | None) -> np.ndarray:
    """Replace NaN/Inf by 0 (counted in ``meta["nonfinite_replaced"]``); refuse all-non-finite images."""
    if not np.issubdtype(pixels.dtype, np.floating):
        return pixels
    # Any NaN or infinity makes the float64 sum non-finite: one reduction for the usual clean image.
    if np.isfinite(pixels.sum(dtype=np.float64)):
        return pixels
    bad = ~np.isfinite(pixels)
    count = int(bad.sum())
    if count == 0:
        return pixels
    if count == pixels.size:
        raise reject("every pixel value is NaN or infinite", "nonfinite", path)
    pixels = np.where(bad, np.float32(0), pixels)
    meta["nonfinite_replaced"] = count
    return pixels


def collapse_grey(pixels: np.ndarray, meta: dict[str, Any], tolerance: float = 0.0) -> np.ndarray:
    """Return one channel when a 3-channel image has R == G == B (within ``tolerance``) everywhere.

    Datasets mix greyscale images stored as RGB (typically JPEGs) with true greyscale ones; downstream code
    needs one channel count per kind of content. Sets ``meta["was_rgb_grey"]`` when it collapses.
    """
    if pixels.shape[0] != 3:
        return pixels
    r, g, b = pixels[0], pixels[1], pixels[2]
    if tolerance <= 0:
        grey = np.array_equal(r, g) and np.array_equal(g, b)
    else:
        rf, gf, bf = (np.asarray(c, dtype=np.float32) for c in (r, g, b))  # no copy when already float32
        grey = bool(np.abs(rf - gf).max() <= tolerance and np.abs(gf - bf).max() <= tolerance)
    if not grey:
        return pixels
    meta["was_rgb_grey"] = True
    if tolerance <= 0:
        return pixels[:1]
    # Lossy chroma noise: average rather than pick one channel. Written out, the same float32 sums as
    # .mean(axis=0) in the same order (bit-identical), ~10x faster than numpy's axis-0 reduction.
    p = np.asarray(pixels, dtype=np.float32)
    return (((p[0] + p[1]) + p[2]) / np.float32(3))[np.newaxis]
