"""Property-based fuzzing (hypothesis): mutated DICOM, NIfTI, PNG, JPEG, TIFF and NPZ files either read as a valid
image or are refused with InputRejected; no reader raises anything else, whatever the damage.

Mutations: byte flips, truncations, header field overwrites (1, 2 or 4 bytes written into the first bytes,
where the headers live), inserted bytes, and for PNG inserted well-formed chunks. Deterministic
(``derandomize=True``), bounded (150 examples per format) and without a deadline.
"""

from __future__ import annotations

import gzip
import io
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from medclf.errors import InputRejected
from medclf.io import read_image

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _pixels(h: int = 40, w: int = 48) -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.integers(0, 255, (h, w), dtype=np.uint8)


def _dicom(compressed: bool = False) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["fuzz", str(compressed)])
    ds.Modality = "MR"
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.WindowCenter, ds.WindowWidth = 200, 400
    ds.PixelSpacing = [0.5, 0.5]
    ds.set_pixel_data((_pixels().astype(np.uint16) * 16), "MONOCHROME2", 12)
    if compressed:
        ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _raster(fmt: str) -> bytes:
    buf = io.BytesIO()
    arr = np.stack([_pixels(), _pixels()[::-1], 255 - _pixels()], -1) if fmt == "JPEG" else _pixels()
    PILImage.fromarray(arr).save(buf, format=fmt, **({"quality": 80} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, image=_pixels(), spacing=np.array([0.5, 0.5]))
    return buf.getvalue()


def _nifti() -> bytes:
    data = np.random.default_rng(6).normal(size=(16, 20, 6)).astype(np.float32)
    return nib.Nifti1Image(data, np.diag([0.8, 0.9, 2.0, 1.0])).to_bytes()


SEEDS: dict[str, bytes] = {
    "dicom": _dicom(),
    "dicom_rle": _dicom(compressed=True),
    "nifti": _nifti(),
    "nifti_gz": gzip.compress(_nifti(), mtime=0),
    "png": _raster("PNG"),
    "jpeg": _raster("JPEG"),
    "tiff": _raster("TIFF"),
    "npz": _npz(),
}
# Where each format keeps the header fields worth corrupting.
HEADER_BYTES = {
    "dicom": 700,
    "dicom_rle": 700,
    "nifti": 352,
    "nifti_gz": 64,
    "png": 64,
    "jpeg": 700,
    "tiff": 200,
    "npz": 200,
}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


@st.composite
def mutated(draw: st.DrawFn, fmt: str) -> bytes:
    blob = bytearray(SEEDS[fmt])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(["flip", "truncate", "field", "insert", "chunk" if fmt == "png" else "flip"])
        )
        if not blob:
            break
        if op == "flip":
            pos = draw(st.integers(0, len(blob) - 1))
            blob[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del blob[draw(st.integers(0, len(blob) - 1)) :]
        elif op == "field":
            width = draw(st.sampled_from([1, 2, 4]))
            pos = draw(st.integers(0, max(0, min(HEADER_BYTES[fmt], len(blob)) - width)))
            value = draw(
                st.one_of(
                    st.sampled_from([0, 1, 0xFF, 0x7F, 0x80, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]),
                    st.integers(0, 2 ** (8 * width) - 1),
                )
            )
            blob[pos : pos + width] = (value % 2 ** (8 * width)).to_bytes(
                width, draw(st.sampled_from(["little", "big"]))
            )
        elif op == "insert":
            pos = draw(st.integers(0, len(blob)))
            blob[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        else:  # a well-formed PNG chunk of any type, after the IHDR
            kind = draw(
                st.sampled_from([b"IDAT", b"zTXt", b"iCCP", b"tEXt", b"PLTE", b"IHDR", b"acTL", b"eXIf"])
            )
            data = draw(st.one_of(st.binary(max_size=64), st.just(zlib.compress(bytes(4096)))))
            blob[33:33] = _png_chunk(kind, data)
    return bytes(blob)


_WORKDIR = Path(tempfile.mkdtemp(prefix="medclf-fuzz-"))


def _check(content: bytes, name: str) -> None:
    path = _WORKDIR / name
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = read_image(path)
        except InputRejected as exc:
            assert exc.reason and exc.message
            return
    assert image.pixels.dtype == np.float32 and image.pixels.ndim in (3, 4)
    assert np.isfinite(image.pixels).all()
    assert len(image.spacing) == image.pixels.ndim - 1


def test_seeds_are_valid() -> None:
    for fmt, blob in SEEDS.items():
        path = _WORKDIR / f"seed-{fmt}"
        path.write_bytes(blob)
        assert read_image(path).pixels.size > 0, fmt


@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_mutated_files_read_or_are_refused(fmt: str) -> None:
    @FUZZ
    @given(content=mutated(fmt))
    def run(content: bytes) -> None:
        _check(content, f"mutated-{fmt}")

    run()
