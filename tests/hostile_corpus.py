"""A corpus of malformed and hostile input files, built on demand (nothing is stored in the repository).

``build_corpus(dest)`` writes every file into ``dest`` and returns one :class:`CorpusFile` per file: its
path, its kind (the family of attack or damage) and the ``InputRejected.reason`` values that are a correct
refusal of it. The reader tests, the ``medclf predict`` memory test and the HTTP server test all use it::

    for entry in build_corpus(tmp_path / "corpus"):
        ...  # entry.path, entry.kind, entry.reasons

Bombs are real: their compressed streams inflate to hundreds of megabytes (zeros, generated in 1 MiB
pieces so building the corpus stays cheap). Files are named with image extensions on purpose: medclf
must decide by content. Everything is generated from scratch with the standard library, NumPy, Pillow
and pydicom, so the corpus does not depend on any test data file.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
from PIL import Image as PILImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

_MIB = 1 << 20


class CorpusFile(NamedTuple):
    path: Path
    kind: str
    reasons: frozenset[str]


# ----------------------------------------------------------------------------------------------------
# building blocks


def _zeros(n_bytes: int) -> Iterator[bytes]:
    while n_bytes > 0:
        step = min(n_bytes, _MIB)
        yield bytes(step)
        n_bytes -= step


def _deflate(pieces: Iterator[bytes], wbits: int = zlib.MAX_WBITS) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, wbits)
    out = [comp.compress(p) for p in pieces]
    out.append(comp.flush())
    return b"".join(out)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png(
    width: int, height: int, idat: bytes, *, depth: int = 8, colour: int = 0, extra: bytes = b""
) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + extra
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _png_zero_rows(width: int, height: int) -> Iterator[bytes]:
    """Filtered scanlines of an all-black 8-bit grey image, a few rows at a time."""
    row = bytes(1 + width)
    rows_per_piece = max(1, _MIB // len(row))
    for start in range(0, height, rows_per_piece):
        yield row * min(rows_per_piece, height - start)


def _valid_png(size: int = 64) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8)
    PILImage.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _valid_jpeg(size: int = 64, progressive: bool = False) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(1).integers(0, 255, (size, size), dtype=np.uint8)
    PILImage.fromarray(arr).save(buf, format="JPEG", quality=85, progressive=progressive)
    return buf.getvalue()


def _tiff(width: int, height: int, strip: bytes, *, compression: int = 1, loop: bool = False) -> bytes:
    """A little-endian, one-strip, 8-bit grey TIFF; ``loop`` makes the IFD chain point back to itself."""
    entries = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, compression),
        (262, 3, 1, 1),
        (273, 4, 1, 0),  # strip offset, patched below
        (277, 3, 1, 1),
        (278, 4, 1, height),
        (279, 4, 1, len(strip)),
    ]
    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    data_offset = ifd_offset + ifd_size
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_offset))
    out += struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<H", value) + b"\x00\x00" if typ == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, typ, count) + packed
    out += struct.pack("<I", ifd_offset if loop else 0)
    return bytes(out) + strip


def _nifti(shape: tuple[int, ...], dtype: str = "int16", data: bytes | None = None, **fields) -> bytes:
    """A single-file NIfTI-1 (``n+1``) built by hand, so that any header field can lie."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.dtype(dtype))
    hdr.set_data_shape(tuple(max(s, 1) for s in shape))
    hdr["magic"] = b"n+1"
    hdr["vox_offset"] = 352
    for key, value in fields.items():
        hdr[key] = value
    raw = bytearray(hdr.binaryblock)
    if any(s < 1 for s in shape):  # nibabel refuses to store these; write them ourselves
        struct.pack_into("<8h", raw, 40, len(shape), *shape, *([1] * (7 - len(shape))))
    body = data if data is not None else bytes(abs(int(np.prod(shape))) * np.dtype(dtype).itemsize)
    return bytes(raw) + b"\x00" * 4 + body


def _dicom_dataset(rows: int = 64, cols: int = 64, frames: int = 1, *, identity: bool = True) -> Dataset:
    """A valid, small, uncompressed MR image (16-bit) built from scratch."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MR"
    if identity:
        ds.PatientName = "Hostile^Corpus"
        ds.PatientID = "HC-0001"
    rng = np.random.default_rng(2)
    shape = (frames, rows, cols) if frames > 1 else (rows, cols)
    ds.set_pixel_data(rng.integers(0, 4000, shape, dtype=np.uint16), "MONOCHROME2", 12)
    return ds


def _dicom_bytes(ds: Dataset, preamble: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    if preamble is not None:
        ds.preamble = preamble.ljust(128, b"\x00")[:128]
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _deflated_dicom_bomb(inflated_bytes: int) -> bytes:
    """A Deflated Explicit VR Little Endian file whose data set inflates to ``inflated_bytes``."""
    ds = _dicom_dataset(identity=False)
    del ds.PixelData
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(buf, meta, enforce_standard=True)
    plain = pydicom.filebase.DicomBytesIO()
    plain.is_little_endian, plain.is_implicit_VR = True, False  # the syntax deflates explicit VR LE
    pydicom.filewriter.write_dataset(plain, ds)
    header = plain.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, inflated_bytes)

    def stream() -> Iterator[bytes]:
        yield header
        yield from _zeros(inflated_bytes)

    return buf.getvalue() + _deflate(stream(), wbits=-15)


def _npz(members: dict[str, tuple[bytes, Iterator[bytes]]]) -> bytes:
    """A ZIP_DEFLATED .npz from (npy header, data pieces) per member, streamed."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, (header, pieces) in members.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                fh.write(header)
                for piece in pieces:
                    fh.write(piece)
    return buf.getvalue()


def _npy_header(shape: tuple[int, ...], dtype: str = "|u1") -> bytes:
    buf = io.BytesIO()  # magic, version and header dict, as np.save writes them
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _jpeg_scan_bomb(n_scans: int) -> bytes:
    """A progressive JPEG whose first scan is repeated ``n_scans`` times (each one re-decodes the image)."""
    data = _valid_jpeg(256, progressive=True)
    pos = data.index(b"\xff\xda")
    seg_len = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    end = pos + 2 + seg_len
    while True:  # the entropy-coded data runs to the next marker that is not 0xFF00 or a restart
        end = data.index(b"\xff", end)
        if data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7:
            break
        end += 2
    scan = data[pos:end]
    return data[:end] + scan * n_scans + data[end:]


# ----------------------------------------------------------------------------------------------------
# the corpus


def _entries() -> Iterator[tuple[str, str, bytes | None, set[str]]]:
    """(file name, kind, content, accepted reasons); content None = made specially in build_corpus."""
    bomb = {"decompression_bomb", "too_large"}

    # --- decompression bombs: tiny files that inflate to hundreds of megabytes
    yield (
        "png_deflate_bomb.png",
        "decompression_bomb",
        _png(15000, 15000, _deflate(_png_zero_rows(15000, 15000))),
        bomb,
    )
    yield "png_idat_overflow.png", "decompression_bomb", _png(64, 64, _deflate(_zeros(64 * _MIB))), bomb
    ztxt = _png_chunk(b"zTXt", b"Comment\x00\x00" + _deflate(_zeros(64 * _MIB)))
    yield "png_ztxt_bomb.png", "decompression_bomb", _valid_png()[:33] + ztxt + _valid_png()[33:], bomb
    iccp = _png_chunk(b"iCCP", b"icc\x00\x00" + _deflate(_zeros(64 * _MIB)))
    yield "png_iccp_bomb.png", "decompression_bomb", _valid_png()[:33] + iccp + _valid_png()[33:], bomb
    yield (
        "tiff_deflate_bomb.tif",
        "decompression_bomb",
        _tiff(15000, 15000, _deflate(_zeros(15000 * 15000)), compression=8),
        bomb,
    )
    yield (
        "nifti_gzip_bomb.nii.gz",
        "decompression_bomb",
        _gzip_stream(_nifti((420, 420, 420), data=b""), 420 * 420 * 420 * 2),
        bomb,
    )
    # The header asks for a 16 x 16 x 8 volume; the stream goes on for 64 MiB more.
    yield (
        "nifti_gzip_tail_bomb.nii.gz",
        "decompression_bomb",
        _gzip_stream(_nifti((16, 16, 8), data=b""), 64 * _MIB),
        {"decompression_bomb"},
    )
    yield (
        "npz_zip_bomb.npz",
        "decompression_bomb",
        _npz({"image": (_npy_header((15000, 15000)), _zeros(15000 * 15000))}),
        bomb,
    )
    yield (
        "npz_dataset_bomb.npz",
        "decompression_bomb",
        _npz(
            {
                "train_images": (_npy_header((9000, 256, 256)), _zeros(9000 * 256 * 256)),
                "train_labels": (_npy_header((9000, 1)), _zeros(9000)),
            }
        ),
        bomb,
    )
    yield "dicom_deflate_bomb.dcm", "decompression_bomb", _deflated_dicom_bomb(200 * _MIB), bomb

    # --- headers declaring absurd sizes (nothing behind them)
    yield "png_huge_dims.png", "huge_dimensions", _png(100_000, 100_000, _deflate(_zeros(1024))), bomb
    yield "png_huge_area.png", "huge_dimensions", _png(60_000, 60_000, _deflate(_zeros(1024))), bomb
    jpeg = bytearray(_valid_jpeg())
    sof = jpeg.index(b"\xff\xc0")
    struct.pack_into(">HH", jpeg, sof + 5, 65000, 65000)
    yield "jpeg_huge_dims.jpg", "huge_dimensions", bytes(jpeg), bomb
    yield "tiff_huge_dims.tif", "huge_dimensions", _tiff(60_000, 60_000, b"\x00" * 64), bomb
    yield "nifti_absurd_dims.nii", "huge_dimensions", _nifti((32767, 32767, 32767), data=b"\x00" * 64), bomb
    yield (
        "nifti_huge_4d.nii",
        "huge_dimensions",
        _nifti((256, 256, 256, 4), data=b"\x00" * 64),
        bomb | {"truncated"},
    )
    yield "dicom_huge_rows.dcm", "huge_dimensions", _dicom_bytes(_big_rows(60000, 60000)), bomb
    yield "dicom_many_frames.dcm", "huge_dimensions", _dicom_bytes(_big_rows(512, 512, frames=100_000)), bomb

    # --- truncations
    good_png, good_jpeg = _valid_png(128), _valid_jpeg(128)
    good_dcm = _dicom_bytes(_dicom_dataset())
    noise = np.random.default_rng(3).normal(size=(32, 32, 8)).astype("<f4")
    good_nii = _nifti((32, 32, 8), dtype="float32", data=noise.tobytes())
    good_tif = _tiff(64, 64, bytes(range(256)) * 16)
    truncated = {"truncated"}
    yield "png_truncated.png", "truncation", good_png[: len(good_png) // 2], truncated
    yield "jpeg_truncated.jpg", "truncation", good_jpeg[: len(good_jpeg) // 2], truncated | {"decode_failed"}
    yield "tiff_truncated.tif", "truncation", good_tif[:1000], truncated | {"decode_failed", "malformed"}
    yield "dicom_truncated.dcm", "truncation", good_dcm[: len(good_dcm) - 3000], truncated
    yield "nifti_truncated.nii", "truncation", good_nii[:5000], truncated
    yield "nifti_gz_truncated.nii.gz", "truncation", gzip.compress(good_nii)[:900], truncated | {"malformed"}
    good_npz = io.BytesIO()
    np.savez_compressed(good_npz, image=np.zeros((64, 64), np.uint8))
    yield "npz_truncated.npz", "truncation", good_npz.getvalue()[:-40], {"unsupported_format", "malformed"}

    # --- headers that contradict their data
    ds = _dicom_dataset()
    ds.Rows = 128
    yield "dicom_rows_lie.dcm", "lying_header", _dicom_bytes(ds), {"inconsistent_header"}
    ds = _dicom_dataset()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    yield "dicom_bits_allocated_lie.dcm", "lying_header", _dicom_bytes(ds), {"inconsistent_header"}
    ds = _dicom_dataset(frames=2)
    ds.NumberOfFrames = 1
    yield "dicom_frames_lie.dcm", "lying_header", _dicom_bytes(ds), {"inconsistent_header"}
    ds = _dicom_dataset()
    ds.SamplesPerPixel = 3
    yield "dicom_samples_lie.dcm", "lying_header", _dicom_bytes(ds), {"inconsistent_header"}
    ds = _dicom_dataset()
    ds.BitsStored = 20
    yield "dicom_bits_stored_lie.dcm", "lying_header", _dicom_bytes(ds), {"inconsistent_header"}
    blob = bytearray(good_dcm)
    at = blob.index(b"\x10\x00\x10\x00PN")
    struct.pack_into("<H", blob, at + 6, 0xFFF0)
    yield "dicom_element_beyond_file.dcm", "element_beyond_file", bytes(blob), {"element_beyond_file"}
    blob = bytearray(good_dcm)
    at = blob.rindex(b"\xe0\x7f\x10\x00")
    struct.pack_into("<I", blob, at + 8, 0x7FFFFFF0)
    yield (
        "dicom_pixel_length_lie.dcm",
        "element_beyond_file",
        bytes(blob),
        {"truncated", "element_beyond_file"},
    )
    bad_ihdr = bytearray(good_png)
    bad_ihdr[24:26] = bytes([4, 2])  # bit depth 4 with colour type RGB is not allowed
    yield "png_bad_ihdr.png", "lying_header", bytes(bad_ihdr), {"inconsistent_header", "malformed"}
    yield (
        "nifti_vox_offset_lie.nii",
        "lying_header",
        _nifti((32, 32, 8), dtype="float32", vox_offset=1 << 30),
        {"inconsistent_header", "truncated"},
    )
    yield (
        "nifti_dim0_lie.nii",
        "lying_header",
        _nifti((32, 32, 8), dim=[9, 32, 32, 8, 1, 1, 1, 1]),
        {
            "malformed",
            "inconsistent_header",
        },
    )
    yield "nifti_negative_dim.nii", "lying_header", _nifti((32, -32, 8)), {"malformed", "inconsistent_header"}
    yield (
        "nifti_all_nan.nii",
        "lying_header",
        _nifti((32, 32, 8), dtype="float32", data=np.full((32, 32, 8), np.nan, "<f4").tobytes()),
        {"nonfinite"},
    )
    yield "tiff_ifd_loop.tif", "lying_header", _tiff(64, 64, bytes(64 * 64), loop=True), {"malformed"}

    # --- executables and scripts named as images
    unsupported = {"unsupported_format"}
    elf = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + struct.pack("<HHI", 2, 0x3E, 1) + os.urandom(4000)
    yield "elf_program.png", "executable_as_image", elf, unsupported
    pe = b"MZ\x90\x00" + bytes(56) + b"This program cannot be run in DOS mode.\r\r\n$" + bytes(4000)
    yield "pe_program.dcm", "executable_as_image", pe, unsupported
    yield "shell_script.jpg", "executable_as_image", b"#!/bin/sh\necho pwned > /tmp/pwned\n" * 20, unsupported
    yield (
        "html_page.nii",
        "executable_as_image",
        b"<html><script>alert(1)</script></html>\n" * 40,
        unsupported,
    )

    # --- DICOM whose preamble is an executable (CVE-2019-11687)
    yield (
        "dicom_pe_preamble.dcm",
        "dicom_executable_preamble",
        _dicom_bytes(_dicom_dataset(), preamble=pe[:128]),
        {"executable_preamble"},
    )
    yield (
        "dicom_elf_preamble.dcm",
        "dicom_executable_preamble",
        _dicom_bytes(_dicom_dataset(), preamble=elf[:128]),
        {"executable_preamble"},
    )

    # --- DICOM without an image
    ds = _dicom_dataset()
    del ds.PixelData
    yield "dicom_no_pixels.dcm", "missing_pixel_data", _dicom_bytes(ds), {"no_pixels"}
    yield "dicom_preamble_only.dcm", "missing_pixel_data", b"\x00" * 128 + b"DICM", {"malformed", "no_pixels"}

    # --- pickles (never loaded)
    obj = io.BytesIO()
    np.savez(obj, image=np.array([{"payload": "os.system"}, None], dtype=object))
    yield "npz_pickled.npz", "pickle", obj.getvalue(), {"pickle"}
    npy = io.BytesIO()
    np.save(npy, np.array([{"payload": 1}], dtype=object), allow_pickle=True)
    yield "npy_pickled.npz", "pickle", npy.getvalue(), unsupported

    # --- empty, random and look-alike content
    rng = np.random.default_rng(1234)
    yield "empty.png", "empty_or_random", b"", {"empty"}
    yield "random_1k.dcm", "empty_or_random", rng.bytes(1024), unsupported
    yield "random_64k.nii", "empty_or_random", rng.bytes(65536), unsupported
    yield "zeros.jpg", "empty_or_random", bytes(4096), unsupported
    yield "gzip_not_nifti.nii.gz", "empty_or_random", gzip.compress(rng.bytes(4096)), unsupported
    not_npz = io.BytesIO()
    with zipfile.ZipFile(not_npz, "w") as zf:
        zf.writestr("readme.txt", "hello")
    yield "zip_not_npz.npz", "empty_or_random", not_npz.getvalue(), unsupported
    yield "png_magic_only.png", "empty_or_random", b"\x89PNG\r\n\x1a\n", {"truncated", "malformed"}

    # --- degenerate geometry
    tiny = io.BytesIO()
    PILImage.fromarray(np.zeros((1, 1), np.uint8)).save(tiny, format="PNG")
    yield "png_one_pixel.png", "degenerate", tiny.getvalue(), {"too_small"}
    sliver = io.BytesIO()
    PILImage.fromarray(np.zeros((8, 4000), np.uint8)).save(sliver, format="PNG")
    yield "png_sliver.png", "degenerate", sliver.getvalue(), {"aspect_ratio"}

    # --- CPU exhaustion
    yield "jpeg_scan_bomb.jpg", "cpu_exhaustion", _jpeg_scan_bomb(3000), {"too_many_scans"}

    # --- file-system oddities (content None: made by build_corpus)
    yield "fifo.png", "filesystem", None, {"not_a_file"}
    yield "symlink_loop.dcm", "filesystem", None, {"symlink_loop"}
    yield "dangling_link.png", "filesystem", None, {"not_found"}
    yield "device_link.dcm", "filesystem", None, {"not_a_file"}
    yield "sparse_3gib.png", "filesystem", None, {"file_too_large"}


def _big_rows(rows: int, cols: int, frames: int = 1) -> Dataset:
    ds = _dicom_dataset(64, 64)
    ds.Rows, ds.Columns = rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def _gzip_stream(header: bytes, n_zeros: int) -> bytes:
    """A gzip file of ``header`` followed by ``n_zeros`` zero bytes."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip wrapper

    def stream() -> Iterator[bytes]:
        yield header
        yield from _zeros(n_zeros)

    return b"".join(comp.compress(p) for p in stream()) + comp.flush()


@functools.cache
def _cached_entries() -> tuple[tuple[str, str, bytes | None, frozenset[str]], ...]:
    # Making the bombs (deflating hundreds of MiB of zeros) takes seconds and several test files build the
    # corpus: the contents (a few MiB) are made once per test process, the files written anew each time.
    return tuple((name, kind, content, frozenset(reasons)) for name, kind, content, reasons in _entries())


def build_corpus(dest: str | Path) -> list[CorpusFile]:
    """Write the hostile corpus into ``dest`` (created) and describe every file (see the module doc)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out: list[CorpusFile] = []
    for name, kind, content, reasons in _cached_entries():
        path = dest / name
        if content is not None:
            path.write_bytes(content)
        elif name.startswith("fifo"):
            os.mkfifo(path)
        elif name.startswith("symlink_loop"):
            os.symlink(path.name, path)
        elif name.startswith("dangling"):
            os.symlink("does-not-exist.png", path)
        elif name.startswith("device"):
            os.symlink("/dev/zero", path)
        elif name.startswith("sparse"):
            with open(path, "wb") as fh:
                fh.truncate(3 << 30)  # sparse: takes no disk space
        out.append(CorpusFile(path, kind, frozenset(reasons)))
    return out
